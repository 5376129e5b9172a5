"""Assembly: settings → upstreams → pipeline → routes → the ASGI application, and serving it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from bastion.audit import AuditRecord, AuditWriter, Query
from bastion.audit.recover import recover
from bastion.config import Settings
from bastion.observe.metrics import Metrics
from bastion.observe.tracing import Tracing
from bastion.pipeline.authn import AgentDirectory, SigningKeys
from bastion.pipeline.chain import Pipeline
from bastion.pipeline.route import Route
from bastion.transport.front import ASGIApp, Front, Receive, Scope, Send
from bastion.transport.server import HttpServer
from bastion.upstream.pool import Upstreams

log = logging.getLogger("bastion")
_WARM_RECORDS = 200_000  # records of history replayed into the detectors at most


def routes_for(settings: Settings) -> list[Route]:
    """Every MCP endpoint: the virtual servers, and /servers/{name}/mcp per exposed upstream."""
    routes = [
        Route(
            name=name,
            path=vs.path.rstrip("/") or "/",
            upstreams=vs.upstreams,
            multiplex=True,
            instructions=vs.instructions,
        )
        for name, vs in settings.virtual_servers.items()
    ]
    routes += [
        Route(
            name=f"server:{name}", path=f"/servers/{name}/mcp", upstreams=(name,), multiplex=False
        )
        for name, upstream in settings.upstreams.items()
        if upstream.expose
    ]
    return routes


class Service(Protocol):
    """Something that runs beside the gateway (an audit sink): started after the trail,
    stopped after it was flushed."""

    async def start(self) -> None: ...

    async def stop(self, grace: float = 5.0) -> None: ...


class Gateway:
    """The running gateway: an ASGI app whose lifespan starts and stops the upstreams."""

    def __init__(
        self,
        settings: Settings,
        agents: AgentDirectory | None = None,
        keys: SigningKeys | None = None,
        secrets: Mapping[str, str] | None = None,
        endpoints: Mapping[str, ASGIApp] | None = None,
        audit: AuditWriter | None = None,
        suspend: Callable[[str, str], Awaitable[None]] | None = None,
        nonce_key: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.upstreams = Upstreams(settings)
        self.pipeline = Pipeline(
            settings, self.upstreams, agents, keys, secrets, audit, nonce_key=nonce_key
        )
        self.routes = routes_for(settings)
        self.metrics = Metrics()
        self.tracing = Tracing(settings.telemetry.traces)  # this gateway's own tracer provider
        if audit is not None:
            self.metrics.watch_audit_queue(lambda: audit.queue_depth)
        trail = self.pipeline.trail
        trail.alerted = lambda alert: self.metrics.alerted(alert.rule, alert.severity)
        trail.suspend = suspend
        self.services: list[Service] = []  # audit sinks, added by the assembly
        self.front = Front(
            settings, self.pipeline, self.routes, endpoints, self.metrics, self.tracing
        )
        self._janitor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Launch managed upstreams and begin expiring idle sessions."""
        if self.audit is not None:
            await self._warm(self.audit)
            await self.audit.start()
            await recover(self.audit)  # decisions a killed process left without an outcome
        for service in self.services:
            await service.start()
        await self.upstreams.start()
        await self.pipeline.start()
        self._janitor = asyncio.create_task(self._expire_sessions())
        self.front.ready = True

    async def stop(self) -> None:
        """End sessions, close upstreams, stop launched servers, flush the traces."""
        self.front.ready = False
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        await self.pipeline.sessions.close()
        await self.upstreams.close()
        await self.tracing.close()
        try:
            if self.audit is not None:
                await self.audit.stop()
        finally:
            for service in self.services:
                await service.stop()

    async def _warm(self, audit: AuditWriter) -> None:
        """Replay recent history into the anomaly detectors, so baselines survive restarts."""
        trail = self.pipeline.trail
        days = self.settings.audit.alerts.baseline_days
        if trail.detectors is None or days <= 0:
            return
        since = time.time() - days * 86400

        def recent() -> list[AuditRecord]:
            entries = audit.store.query(Query(since=since, limit=_WARM_RECORDS))
            return [AuditRecord.from_json(entry.record) for entry in entries]

        count = trail.warm(await asyncio.to_thread(recent))
        log.info("anomaly detectors: baselines rebuilt from %d records", count)

    async def _expire_sessions(self) -> None:
        period = min(60.0, self.settings.limits.session_idle_seconds / 2)
        while True:
            await asyncio.sleep(period)
            expired = await self.pipeline.sessions.expire()
            if expired:
                log.info("expired %d idle sessions", expired)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.front(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event: Any = await receive()
            if event["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                    log.error("startup failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def serve(gateway: Gateway, on_ready: Callable[[int], None] | None = None) -> None:
    """Run the gateway on its own HTTP server until SIGTERM or SIGINT, then stop cleanly."""
    settings = gateway.settings
    limits = settings.limits
    server = HttpServer(
        gateway.front,
        max_body=limits.max_body_bytes,
        keepalive_timeout=limits.idle_connection_seconds,
        header_timeout=limits.header_timeout_seconds,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await gateway.start()
        port = await server.start(settings.listen.host, settings.listen.port)
        if on_ready is not None:
            on_ready(port)
        await stop.wait()
        log.info("stopping: finishing answers in progress")
        await server.stop()
    finally:
        await gateway.stop()
