"""Assembly: settings → upstreams → pipeline → routes → the ASGI application, and serving it.

The gateway owns its background work in one place (`Background`): the registry and key
watchers, the trusted issuers' JWKS watchers, the policy-file watcher, the catalog jobs
(relisting upstreams, learning resource URIs) and the idle-session janitor. `start` launches
them, `stop` cancels and awaits them; the request path only reads what they publish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from bastion.asgi import ASGIApp, Receive, Scope, Send
from bastion.audit import AuditRecord, AuditWriter, Query
from bastion.audit.detect import Alert
from bastion.audit.recover import recover
from bastion.background import Background, Refresher
from bastion.config import Settings
from bastion.inspect.trust import Trust
from bastion.observe.metrics import Metrics
from bastion.observe.tracing import Tracing
from bastion.pipeline.authn import AgentDirectory, SigningKeys
from bastion.pipeline.chain import Pipeline
from bastion.pipeline.route import Route
from bastion.transport.front import Front
from bastion.transport.server import HttpServer
from bastion.transport.tls import Certificates
from bastion.upstream.pool import Upstreams

if TYPE_CHECKING:  # the redis client is imported only when a gateway shares its state
    from bastion.state.redis import RedisState

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


class WatchedDirectory(AgentDirectory, Protocol):
    """The registry as the gateway holds it: a snapshot the request path reads, kept current
    by `watch`, a refresher the gateway runs."""

    @property
    def watch(self) -> Refresher: ...


class WatchedKeys(SigningKeys, Protocol):
    """The embedded issuer's keys, kept current by `watch` (rotations by other processes)."""

    @property
    def watch(self) -> Refresher: ...


class WatchedTrust(Trust, Protocol):
    """Pins and quarantines as the gateway holds them: a snapshot the request path reads,
    kept current (and its queued writes written, its alerts raised) by `watch`."""

    alerts: Callable[[Alert], Awaitable[None]] | None

    @property
    def watch(self) -> Refresher: ...


# The registry view is read within this long of `start` before the gateway serves.
_FIRST_READ_SECONDS = 10.0


class Gateway:
    """The running gateway: an ASGI app whose lifespan starts and stops the upstreams and
    the background work."""

    def __init__(
        self,
        settings: Settings,
        agents: WatchedDirectory | None = None,
        keys: WatchedKeys | None = None,
        secrets: Mapping[str, str] | None = None,
        endpoints: Mapping[str, ASGIApp] | None = None,
        audit: AuditWriter | None = None,
        suspend: Callable[[str, str], Awaitable[None]] | None = None,
        nonce_key: bytes | None = None,
        trust: WatchedTrust | None = None,
        shared: RedisState | None = None,
        approval_key: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.upstreams = Upstreams(settings)
        # `shared`: the Redis every replica's hot state lives in (None: this process's own);
        # `approval_key`: the key approval states are signed with, the same on every replica.
        self.pipeline = Pipeline(
            settings,
            self.upstreams,
            agents,
            keys,
            secrets,
            audit,
            nonce_key=nonce_key,
            trust=trust,
            shared=shared,
            approval_key=approval_key,
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
        self._agents = agents
        self.background = self._background(agents, keys)
        if trust is not None:  # pins and quarantines: written, reloaded, alerted beside the path
            trust.alerts = trail.alert
            self.background.add(trust.watch.name, trust.watch.run)

    def _background(self, agents: WatchedDirectory | None, keys: WatchedKeys | None) -> Background:
        """Everything that runs beside the request path, owned here."""
        background = Background()
        if agents is not None:
            # A registry change (a suspension, a revocation) ends sessions and credentials.
            agents.watch.after_change(self.pipeline.reconcile)
            background.add(agents.watch.name, agents.watch.run)
        if keys is not None:
            background.add(keys.watch.name, keys.watch.run)
        for name, run in self.pipeline.authz.background():
            background.add(name, run)
        for name, run in self.pipeline.authn.issuers.background():  # trusted issuers' JWKS
            background.add(name, run)
        period = min(60.0, self.settings.limits.session_idle_seconds / 2)
        janitor = Refresher("idle sessions", self._expire_sessions, every=period)
        background.add(janitor.name, janitor.run)
        # A shared trail: one replica at a time runs the detectors over every replica's records.
        trail = self.pipeline.trail
        if self.audit is not None and self.settings.audit.store == "postgres":
            from bastion.audit.fleet import open_fleet  # psycopg only for a shared trail

            fleet = open_fleet(self.settings, trail)
        else:
            fleet = None
        if fleet is not None:
            trail.leave_detection()
            background.add(fleet.name, fleet.run)
        return background

    async def start(self) -> None:
        """Launch managed upstreams, load the policy, then start the background work; ready
        once the registry view was read by it."""
        if self.audit is not None:
            await self._warm(self.audit)
            await self.audit.start()
            await recover(self.audit)  # decisions a killed process left without an outcome
        for service in self.services:
            await service.start()
        await self.upstreams.start()
        await self.pipeline.start()
        await self.background.start()
        if self._agents is not None:
            # Loading the policy may have taken a while: read the registry before serving.
            await self._agents.watch.ask(_FIRST_READ_SECONDS)
        self.front.ready = True

    async def stop(self) -> None:
        """Stop the background work, end sessions, close upstreams, stop launched servers,
        flush the traces."""
        self.front.ready = False
        await self.background.stop()
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

    async def _expire_sessions(self) -> bool:
        """One round of the janitor: end sessions idle for longer than allowed."""
        expired = await self.pipeline.sessions.expire()
        if expired:
            log.info("expired %d idle sessions", expired)
        return False

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
    """Run the gateway on its own HTTP server (over TLS when `listen.tls` is set, the
    certificate reloaded as its files change) until SIGTERM or SIGINT, then drain and stop:
    not ready at once, answers in progress get `listen.drain_seconds`, event streams are told
    to reconnect, and what is left at the deadline is cut."""
    settings = gateway.settings
    limits = settings.limits
    certificates = _certificates(gateway)
    server = HttpServer(
        gateway.front,
        max_body=limits.max_body_bytes,
        keepalive_timeout=limits.idle_connection_seconds,
        header_timeout=limits.header_timeout_seconds,
        tls=certificates.listener if certificates is not None else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        gateway.front.ready = False  # the balancer's next health check takes us out
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping)
    try:
        await gateway.start()
        port = await server.start(settings.listen.host, settings.listen.port)
        if on_ready is not None:
            on_ready(port)
        await stop.wait()
        gateway.front.ready = False  # a signal during `start` came before it said ready
        await _drain(server, settings.listen.drain_seconds)
    finally:
        await gateway.stop()


def _certificates(gateway: Gateway) -> Certificates | None:
    """The listener's certificate, watched by the gateway's background work (a new pair that
    is refused raises an alert); None without TLS."""
    tls = gateway.settings.listen.tls
    if tls is None:
        return None
    trail = gateway.pipeline.trail

    async def refused(reason: str) -> None:
        alert = Alert(
            "tls_reload_failed", "high", None, "bastion", reason, uuid.uuid4().hex, time.time()
        )
        await trail.alert(alert)

    certificates = Certificates(tls, refused)
    gateway.background.add(certificates.watch.name, certificates.watch.run)
    return certificates


async def _drain(server: HttpServer, seconds: float) -> None:
    log.info("stopping: not ready; answers in progress get up to %s s", seconds)
    cut = await server.drain(seconds)
    if cut:
        log.warning(
            "stopping: %d connection(s) with answers still in progress after %s s were cut",
            cut,
            seconds,
        )
    else:
        log.info("stopping: every answer in progress was sent")
    await server.stop(grace=1.0)
