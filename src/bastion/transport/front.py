"""The Streamable HTTP front: plain ASGI, both protocol eras on every MCP route.

POST carries one JSON-RPC message. Legacy era (2025-06-18, 2025-11-25): `initialize` opens a
session named by `Mcp-Session-Id`; GET opens the session's server stream; DELETE ends it; SSE
streams are resumable with `Last-Event-ID`. Modern era (2026-07-28): every POST stands alone,
with `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` checked against the body.

The front turns HTTP into exchanges for the pipeline; `delivery` writes the answers back (a
JSON body or an SSE stream).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from bastion import methods, rpc, sse
from bastion.asgi import ASGIApp, Receive, Scope, Send
from bastion.config import Settings
from bastion.errors import (
    AuthError,
    BastionError,
    BodyTooLarge,
    InvalidRequest,
    MethodNotFound,
    ProtocolError,
    SessionRequired,
    shown,
)
from bastion.observe.metrics import CONTENT_TYPE as METRICS_TYPE
from bastion.observe.metrics import Metrics
from bastion.observe.tracing import RequestTrace, Tracing
from bastion.pipeline.chain import Pipeline
from bastion.pipeline.dispatch import negotiate
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.pipeline.session import ClientSession
from bastion.pipeline.trail import error_code
from bastion.transport import checks
from bastion.transport.client_ip import client_address
from bastion.transport.delivery import (
    SSE_HEADERS,
    Ended,
    Watched,
    deliver,
    deliver_failure,
    send_error,
    send_json,
    send_plain,
    session_headers,
    write_shared,
    write_stream,
)
from bastion.types import JSON, LEGACY_VERSIONS, MODERN_VERSION, Era

log = logging.getLogger("bastion.transport")

# How a POST arrived: the client's address, the body's size, and its trace.
Origin = tuple[str, int, RequestTrace]


class Front:
    """The ASGI application serving every MCP route plus health endpoints."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        routes: list[Route],
        endpoints: Mapping[str, ASGIApp] | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.tracing = tracing or Tracing()
        self.pipeline = pipeline
        self.routes = {route.path: route for route in routes}
        self.endpoints = dict(endpoints or {})
        self.mounts: dict[str, ASGIApp] = {}
        self.base = settings.base_url()
        self.metadata = {
            PRM_PATH + route.path: resource_metadata(settings, route) for route in routes
        }
        if routes:
            self.metadata[PRM_PATH] = self.metadata[PRM_PATH + routes[0].path]
        self.hosts = checks.HostPolicy(
            settings.is_loopback(),
            settings.security.allowed_hosts,
            settings.security.allowed_origins,
        )
        self.ready = False
        self.max_body = settings.limits.max_body_bytes
        self.keepalive = settings.limits.sse_keepalive_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/healthz":
            await send_plain(send, 200, b'{"status":"ok"}')
            return
        if path == "/readyz":
            status = 200 if self.ready else 503
            await send_plain(
                send, status, b'{"status":"ready"}' if self.ready else b'{"status":"starting"}'
            )
            return
        if path == "/metrics" and scope["method"] == "GET":
            body = self.metrics.render()
            exposition = [
                (b"content-type", METRICS_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": exposition})
            await send({"type": "http.response.body", "body": body})
            return
        endpoint = self.endpoints.get(path) or self._mounted(path)
        if endpoint is not None:
            await endpoint(scope, receive, send)
            return
        document = self.metadata.get(path)
        if document is not None and scope["method"] in ("GET", "HEAD"):
            await send_json(send, 200, orjson.dumps(document), [_CORS])
            return
        route = self.routes.get(path.rstrip("/") or "/")
        if route is None:
            await send_plain(send, 404, b'{"error":"no MCP endpoint at this path"}')
            return
        headers = _headers(scope)
        try:
            self.hosts.check(headers.get("host"), headers.get("origin"))
            method = scope["method"]
            if method == "POST":
                await self._post(scope, receive, send, route, headers)
            elif method == "GET":
                await self._get(receive, send, route, headers)
            elif method == "DELETE":
                await self._delete(send, route, headers)
            else:
                raise _MethodNotAllowed()
        except _Refused as refused:
            denial = refused.exchange.denial
            assert denial is not None  # noqa: S101 - only raised with a denial
            await send_error(send, denial, None, extra=refused.exchange.response_headers)
        except _MethodNotAllowed:
            await send_plain(
                send, 405, b'{"error":"method not allowed"}', [(b"allow", b"GET, POST, DELETE")]
            )
        except BastionError as exc:
            await send_error(send, exc, None)

    def mount(self, prefix: str, app: ASGIApp) -> None:
        """Serve `prefix` and every path under it with `app` (the admin API under /admin)."""
        self.mounts[prefix.rstrip("/")] = app

    def _mounted(self, path: str) -> ASGIApp | None:
        for prefix, app in self.mounts.items():
            if path == prefix or path.startswith(prefix + "/"):
                return app
        return None

    # -- POST -------------------------------------------------------------------------------

    async def _post(
        self, scope: Scope, receive: Receive, send: Send, route: Route, headers: dict[str, str]
    ) -> None:
        checks.check_post_media(headers.get("content-type"), headers.get("accept"))
        body = await self._read_body(receive, headers)
        size = len(body)
        message: Any = None
        try:
            message = rpc.loads(body)
            kind = rpc.classify(message)
        except ProtocolError as exc:
            await send_error(send, exc, rpc.request_id(message))
            return
        version = headers.get("mcp-protocol-version")
        if version is not None:
            try:
                checks.check_version(version)
            except ProtocolError as exc:
                await send_error(send, exc, rpc.request_id(message))
                return
        trace = self.tracing.begin(
            headers, message, message["method"] if kind is rpc.Kind.REQUEST else None
        )
        send = trace.watch(send)
        origin = (client_address(scope, self.settings.security), size, trace)
        try:
            if version == MODERN_VERSION or (
                version is None and "mcp-session-id" not in headers and _has_modern_meta(message)
            ):
                await self._post_modern(
                    send, receive, route, headers, message, kind, origin, version
                )
            else:
                await self._post_legacy(
                    send, receive, route, headers, message, kind, origin, version
                )
        except BastionError as exc:
            trace.failed(exc)
            raise
        finally:
            trace.end()

    async def _read_body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise BodyTooLarge(f"body of {length} bytes exceeds the limit of {self.max_body}")
        chunks = []
        size = 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                raise InvalidRequest("client disconnected before sending the whole body")
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge(f"body exceeds the limit of {self.max_body} bytes")
            chunks.append(chunk)
            if not event.get("more_body", False):
                return b"".join(chunks)

    async def _post_modern(
        self,
        send: Send,
        receive: Receive,
        route: Route,
        headers: dict[str, str],
        message: JSON,
        kind: rpc.Kind,
        origin: Origin,
        version: str | None,
    ) -> None:
        if kind is rpc.Kind.RESPONSE:
            await send_error(send, InvalidRequest("clients send no responses in 2026-07-28"), None)
            return
        if kind is rpc.Kind.NOTIFICATION:
            await send_plain(send, 202, b"")
            return
        try:
            checks.check_modern_headers(message, version or "", headers)
        except ProtocolError as exc:
            await send_error(send, exc, message.get("id"))
            return
        if not methods.served(message["method"], Era.MODERN):
            missing = MethodNotFound(
                f"method {shown(message['method'])} does not exist in {MODERN_VERSION}"
            )
            await send_error(send, missing, message.get("id"), status=404)
            return
        exchange = self._exchange(route, headers, message, Era.MODERN, MODERN_VERSION, origin)
        exchange.mirrored = {
            name.removeprefix("mcp-param-"): checks.decode_header(name, value)
            for name, value in headers.items()
            if name.startswith("mcp-param-")
        }
        await self._serve(send, receive, exchange, route)

    async def _post_legacy(
        self,
        send: Send,
        receive: Receive,
        route: Route,
        headers: dict[str, str],
        message: JSON,
        kind: rpc.Kind,
        origin: Origin,
        version: str | None,
    ) -> None:
        session_id = headers.get("mcp-session-id")
        if kind is rpc.Kind.REQUEST and message["method"] == methods.INITIALIZE:
            params = message.get("params") or {}
            agreed = negotiate(params.get("protocolVersion"))
            exchange = self._exchange(route, headers, message, Era.LEGACY, agreed, origin)
            await self._serve(send, receive, exchange, route)
            return
        if session_id is None:
            raise SessionRequired(
                "Mcp-Session-Id header is required; send initialize first "
                f"(or use protocol version {MODERN_VERSION} with its request headers)"
            )
        era_version = version or LEGACY_VERSIONS[0]
        exchange = self._exchange(route, headers, message, Era.LEGACY, era_version, origin)
        exchange.session_id = session_id
        await self._serve(send, receive, exchange, route)

    def _exchange(
        self,
        route: Route,
        headers: dict[str, str],
        message: JSON,
        era: Era,
        version: str,
        origin: Origin,
    ) -> Exchange:
        """The exchange a POSTed message becomes: what the stages need of the HTTP request,
        and what the audit record and the trace need of it."""
        client, size, trace = origin
        exchange = Exchange(message, era, version, route.name, client)
        exchange.headers = headers
        exchange.url = self.base + route.path
        _describe(exchange, size, trace)
        return exchange

    # -- answering: JSON or SSE -------------------------------------------------------------

    async def _serve(self, send: Send, receive: Receive, exchange: Exchange, route: Route) -> None:
        """Hand the exchange to the pipeline and deliver its answer: one message as a JSON
        body, more as an SSE stream; a notification or response gets 202. Once the decision
        is recorded, the pipeline hears how the delivery ended whatever happens: an answer
        the gateway cannot relay, a failure while answering, the client going away."""
        ended = Ended()
        watched = Watched(send)
        try:
            answer = await self.pipeline.handle(exchange, route)
            if answer is None:
                await send_plain(send, 202, b"", self._session_headers(exchange))
                return
            if not exchange.recorded:  # refused, or the trail could not take the decision
                status = exchange.http_status or 200
                extra = self._session_headers(exchange) + exchange.response_headers
                await send_json(send, status, rpc.dumps(answer.first), extra)
                self._count(exchange, route, None)
                return
            await deliver(watched, receive, exchange, answer, ended, self.keepalive)
        except OSError:
            ended.failure = _GONE
            raise  # the server drops the connection
        except Exception as exc:
            if not exchange.recorded:
                raise
            extra = self._session_headers(exchange)
            await deliver_failure(exc, watched, exchange, extra, ended)
        except BaseException:
            ended.failure = _CANCELLED
            raise
        finally:
            if exchange.recorded:
                try:
                    if exchange.trace is not None:
                        exchange.trace.answered(ended.reply)
                    self._count(exchange, route, ended.reply, ended.failure is not None)
                except Exception:  # metrics and traces must never cost the outcome record
                    log.exception("metrics of request %s failed", exchange.request_id)
                await self.pipeline.finish(exchange, route, ended.reply, ended.failure)

    @staticmethod
    def _session_headers(exchange: Exchange) -> list[tuple[bytes, bytes]]:
        return session_headers(exchange.session) if exchange.session is not None else []

    def _count(
        self, exchange: Exchange, route: Route, final: JSON | None, failed: bool = False
    ) -> None:
        """Metrics of one answered request: its outcome, decision and latency."""
        total = time.perf_counter() - exchange.started
        denial = exchange.denial
        if denial is not None:
            outcome = "unauthenticated" if isinstance(denial, AuthError) else denial.code
            if not isinstance(denial, AuthError):
                self.metrics.decided(route.path, False)
        else:
            self.metrics.decided(route.path, True)
            # A streamed answer (final is None) ended normally unless `failed`.
            code = error_code(final)
            outcome = _label(code) if code is not None else "error" if failed else "ok"
            if outcome.startswith("upstream.") and exchange.target is not None:
                self.metrics.upstream_failed(exchange.target.upstream, outcome)
        stages = exchange.trace.stages if exchange.trace is not None else None
        admitted = exchange.admitted
        self.metrics.answered(route.path, exchange.method, outcome, admitted, total, stages)

    # -- GET and DELETE (legacy sessions) ---------------------------------------------------

    async def _session(self, method: str, route: Route, headers: dict[str, str]) -> ClientSession:
        session_id = headers.get("mcp-session-id")
        if session_id is None:
            raise SessionRequired("Mcp-Session-Id header is required")
        exchange = Exchange({}, Era.LEGACY, LEGACY_VERSIONS[0], route.name, "")
        exchange.headers = headers
        exchange.http_method = method
        exchange.url = self.base + route.path
        exchange.session_id = session_id
        try:
            return await self.pipeline.session_for(exchange, route)
        except BastionError:
            raise _Refused(exchange) from None

    async def _get(
        self, receive: Receive, send: Send, route: Route, headers: dict[str, str]
    ) -> None:
        if headers.get("mcp-protocol-version") == MODERN_VERSION:
            raise _MethodNotAllowed()
        checks.check_get_accept(headers.get("accept"))
        session = await self._session("GET", route, headers)
        last = headers.get("last-event-id")
        if session.shared is not None:
            await self._get_shared(receive, send, route, session, last)
            return
        stream, after = session.streams["0"], 0
        if last is not None:
            stream_id, _, seq = last.rpartition("-")
            found = session.streams.get(stream_id)
            if found is None or not _decimal(seq):
                raise InvalidRequest(f"Last-Event-ID {shown(last)} names no stream of this session")
            stream, after = found, int(seq)
        elif stream.attached:
            await send_plain(send, 409, _GET_OPEN)
            return
        stream.attached = True
        if stream.id == "0":
            self.pipeline.dispatcher.start_listening(session, route)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": SSE_HEADERS + session_headers(session),
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": sse.encode_priming(stream.event_id(after)),
                "more_body": True,
            }
        )
        await write_stream(send, stream, after, receive, self.keepalive)

    async def _get_shared(
        self,
        receive: Receive,
        send: Send,
        route: Route,
        session: ClientSession,
        last: str | None,
    ) -> None:
        """A GET of a session every replica may serve: what any replica stored of the named
        stream (the standalone one without Last-Event-ID) is replayed, then live events."""
        assert session.shared is not None  # noqa: S101 - only for shared sessions
        stream_id, after = "0", 0
        if last is not None:
            stream_id, _, seq = last.rpartition("-")
            if not _decimal(stream_id) or not _decimal(seq) or len(seq) > 18:
                raise InvalidRequest(f"Last-Event-ID {shown(last)} names no stream of this session")
            after = int(seq)
        # Read before answering: with the shared state out of reach the GET is refused (503).
        replay = await session.shared.since(stream_id, after)
        local = session.streams.get(stream_id)
        if stream_id == "0" and local is not None:
            if last is None and local.attached:
                await send_plain(send, 409, _GET_OPEN)
                return
            local.attached = True
            # This replica feeds the stream now, whichever started it.
            self.pipeline.dispatcher.start_listening(session, route)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": SSE_HEADERS + session_headers(session),
            }
        )
        priming = sse.encode_priming(f"{stream_id}-{after}")
        await send({"type": "http.response.body", "body": priming, "more_body": True})
        await write_shared(
            send, session.shared, stream_id, replay, after, local, receive, self.keepalive
        )

    async def _delete(self, send: Send, route: Route, headers: dict[str, str]) -> None:
        session = await self._session("DELETE", route, headers)
        await self.pipeline.sessions.remove(session.id)
        await send_plain(send, 200, b"")


class _MethodNotAllowed(Exception):
    pass


_GONE = "the client went away before the answer was sent"
_GET_OPEN = b'{"error":"this session already has an open GET stream"}'
_CANCELLED = "the request was cancelled before it was answered"


class _Refused(Exception):
    """An exchange the stages refused outside a POST (GET or DELETE)."""

    def __init__(self, exchange: Exchange) -> None:
        super().__init__("refused")
        self.exchange = exchange


PRM_PATH = "/.well-known/oauth-protected-resource"
_CORS = (b"access-control-allow-origin", b"*")


def resource_metadata(settings: Settings, route: Route) -> JSON:
    """RFC 9728 protected resource metadata for one MCP route."""
    base = settings.base_url()
    return {
        "resource": base + route.path,
        "authorization_servers": [base],
        "scopes_supported": list(settings.auth.scopes),
        "bearer_methods_supported": ["header"],
        "dpop_signing_alg_values_supported": ["ES256", "ES384", "EdDSA", "RS256", "PS256"],
        "resource_name": f"Bastion MCP gateway: {route.name}",
    }


def _label(code: str) -> str:
    """A metrics label for an error code: the gateway's own codes, else "error" (an upstream
    may put any string there, and labels must stay a small set)."""
    return code if code in _gateway_codes() else "error"


def _gateway_codes(kind: type[BastionError] = BastionError) -> set[str]:
    """The codes of every error class the gateway defines."""
    codes = {kind.code}
    for sub in kind.__subclasses__():
        codes |= _gateway_codes(sub)
    return codes


def _describe(exchange: Exchange, size: int, trace: RequestTrace) -> None:
    """What the audit record needs from the HTTP request: its size and trace id (the
    client's, or one the gateway started); and what the request's span describes."""
    exchange.request_bytes = size
    exchange.trace = trace
    exchange.trace_id = trace.trace_id
    trace.bind(exchange)


def _decimal(text: str) -> bool:
    """Whether a part of Last-Event-ID is a plain number: ASCII digits only (`isdigit` alone
    admits the Latin-1 superscripts '²³¹', which `int` refuses: a 500, not a 400)."""
    return text.isascii() and text.isdigit()


def _has_modern_meta(message: Any) -> bool:
    params = message.get("params") if isinstance(message, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and "io.modelcontextprotocol/protocolVersion" in meta


def _headers(scope: Scope) -> dict[str, str]:
    # ASGI servers lower-case header names already.
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
