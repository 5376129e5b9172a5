"""The Streamable HTTP front: plain ASGI, both protocol eras on every MCP route.

POST carries one JSON-RPC message. Legacy era (2025-06-18, 2025-11-25): `initialize` opens a
session named by `Mcp-Session-Id`; GET opens the session's server stream; DELETE ends it; SSE
streams are resumable with `Last-Event-ID`. Modern era (2026-07-28): every POST stands alone,
with `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` checked against the body.

The front finds what a request is for and checks its Host and Origin; `intake` turns a POST
into an exchange for the pipeline, `delivery` writes the answers back (a JSON body or an SSE
stream), and `resumption` serves a legacy session's GET.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from bastion.asgi import ASGIApp, Receive, Scope, Send
from bastion.config import Settings
from bastion.errors import BastionError, SessionRequired
from bastion.observe.metrics import CONTENT_TYPE as METRICS_TYPE
from bastion.observe.metrics import Metrics
from bastion.observe.tracing import Tracing
from bastion.pipeline.chain import Pipeline
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.pipeline.session import ClientSession
from bastion.transport import checks
from bastion.transport.delivery import send_error, send_json, send_plain
from bastion.transport.intake import Intake
from bastion.transport.resumption import serve_stream
from bastion.types import JSON, LEGACY_VERSIONS, MODERN_VERSION, Era

__all__ = [
    "PRM_PATH",
    "Front",
    "resource_metadata",
]


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
        self.keepalive = settings.limits.sse_keepalive_seconds
        self.intake = Intake(settings, pipeline, self.metrics, self.tracing)

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
                await self.intake.post(scope, receive, send, route, headers)
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

        def listen() -> None:
            self.pipeline.dispatcher.start_listening(session, route)

        last = headers.get("last-event-id")
        await serve_stream(receive, send, session, last, listen, self.keepalive)

    async def _delete(self, send: Send, route: Route, headers: dict[str, str]) -> None:
        session = await self._session("DELETE", route, headers)
        await self.pipeline.sessions.remove(session.id)
        await send_plain(send, 200, b"")


class _MethodNotAllowed(Exception):
    pass


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


def _headers(scope: Scope) -> dict[str, str]:
    # ASGI servers lower-case header names already.
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
