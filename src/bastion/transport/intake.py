"""POST on an MCP route: one JSON-RPC message made an exchange for the pipeline, its answer
delivered, its outcome counted.

```
Intake.post ─┬─► 2026-07-28   headers checked against the body; every POST stands alone
             └─► legacy       `initialize` opens a session; anything else names one
             ──► _serve       the pipeline's answer: 202, a JSON body or an SSE stream
                              (`delivery`); metrics and the outcome record, however it ended
```
"""

from __future__ import annotations

import logging
import time
from typing import Any

from bastion import methods, rpc
from bastion.asgi import Receive, Scope, Send
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
from bastion.observe.metrics import Metrics
from bastion.observe.tracing import RequestTrace, Tracing
from bastion.pipeline.chain import Pipeline
from bastion.pipeline.dispatch import negotiate
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.pipeline.trail import error_code
from bastion.transport import checks
from bastion.transport.client_ip import client_address
from bastion.transport.delivery import (
    Ended,
    Watched,
    deliver,
    deliver_failure,
    send_error,
    send_json,
    send_plain,
    session_headers,
)
from bastion.types import JSON, LEGACY_VERSIONS, MODERN_VERSION, Era

__all__ = [
    "Intake",
    "Origin",
]

log = logging.getLogger("bastion.transport")

# How a POST arrived: the client's address, the body's size, and its trace.
Origin = tuple[str, int, RequestTrace]

_GONE = "the client went away before the answer was sent"
_CANCELLED = "the request was cancelled before it was answered"


class Intake:
    """Turns each POST on an MCP route into an exchange for the pipeline and delivers the
    answer."""

    def __init__(
        self, settings: Settings, pipeline: Pipeline, metrics: Metrics, tracing: Tracing
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.metrics = metrics
        self.tracing = tracing
        self.base = settings.base_url()
        self.max_body = settings.limits.max_body_bytes
        self.keepalive = settings.limits.sse_keepalive_seconds

    async def post(
        self, scope: Scope, receive: Receive, send: Send, route: Route, headers: dict[str, str]
    ) -> None:
        """Serve one POST on an MCP route: its body read and checked, made an exchange for
        the protocol era it speaks, handed to the pipeline and its answer delivered. A
        malformed message is answered here; other refusals are raised as BastionError for
        the front to answer."""
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

    # -- answering: JSON or SSE -----------------------------------------------------------

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


def _has_modern_meta(message: Any) -> bool:
    params = message.get("params") if isinstance(message, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and "io.modelcontextprotocol/protocolVersion" in meta
