"""The request path: every stage, in order, run by one `Pipeline`.

```
authn → session → route → authz → [decision record] → approval → credentials → upstream
      → inspection → [outcome record, once the transport delivered the answer]
```

Each stage is one module of this package and reads and writes the exchange; none calls
another. A stage that refuses sets `exchange.denial`, and the later stages do not run: the
refusal is recorded (an `authn` record for a failed authentication, else a `decision`) and
answered. The transport only turns HTTP into exchanges and answers back into HTTP; it calls
`handle` for each message and `finish` when the answer has been delivered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Mapping
from secrets import token_bytes
from typing import TYPE_CHECKING, cast

from bastion import methods, rpc
from bastion.audit import AuditWriter
from bastion.config import RESERVED_TENANT, Settings
from bastion.errors import (
    AuditUnavailable,
    AuthError,
    BastionError,
    InvalidParams,
    InvalidRequest,
    SessionNotFound,
    shown,
)
from bastion.inspect.pins import Kind
from bastion.inspect.trust import Screen, Trust
from bastion.observe.tracing import stage
from bastion.pipeline import mirror
from bastion.pipeline.approval import Approval, Ask
from bastion.pipeline.authn import AgentDirectory, Authenticator, SigningKeys
from bastion.pipeline.authz import Authorizer
from bastion.pipeline.credentials import Credentials, CurrentKey
from bastion.pipeline.dispatch import Dispatcher
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.inspection import Inspection
from bastion.pipeline.route import Route
from bastion.pipeline.session import ClientSession, SessionStore, session_hash
from bastion.pipeline.trail import Trail
from bastion.policy.approval import ApprovalStates
from bastion.state.rates import MemoryRateCounter, RateCounter
from bastion.state.sessions import RedisSessionRecords
from bastion.state.shared import RedisRateCounter, RedisReplays
from bastion.state.shared_approvals import RedisPendingApprovals
from bastion.types import JSON, Era, Principal
from bastion.upstream.base import Answer
from bastion.upstream.pool import Upstreams

if TYPE_CHECKING:  # the redis client is imported only when a gateway shares its state
    from bastion.state.redis import RedisState

log = logging.getLogger("bastion.pipeline")

# Who the gateway is when it lists upstreams for policy.
CATALOG_PRINCIPAL = Principal(tenant=RESERVED_TENANT, agent="bastion-catalog")
# Forwarded methods whose upstream is found by URI: a URI the route has not seen yet is looked
# up before the decision, so nothing reaches an upstream undecided.
_BY_URI = methods.routed(methods.Routing.BY_URI, methods.Routing.BY_REF)
# Calls of a declared definition: refused while the definition is withheld.
_DECLARED: dict[str, Kind] = {methods.TOOLS_CALL: "tool", methods.PROMPTS_GET: "prompt"}


class Pipeline:
    """Runs each exchange through every stage; a denial stops it with a JSON-RPC error."""

    def __init__(
        self,
        settings: Settings,
        upstreams: Upstreams,
        agents: AgentDirectory | None = None,
        keys: SigningKeys | None = None,
        secrets: Mapping[str, str] | None = None,
        audit: AuditWriter | None = None,
        rates: RateCounter | None = None,
        nonce_key: bytes | None = None,
        trust: Trust | None = None,
        shared: RedisState | None = None,
        approval_key: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.trail = Trail(settings, audit)
        self.agents = agents
        self.keys = keys
        # With shared state, replays, rates and held calls are every replica's (Redis).
        self.authn = Authenticator(
            settings.auth,
            settings.base_url(),
            agents,
            keys,
            replay=RedisReplays(shared, "dpop") if shared else None,
            nonce_key=nonce_key,
        )
        self.credentials = Credentials(settings, cast("CurrentKey | None", keys), secrets)
        # Ending a session ends its upstream sessions, each DELETE with a fresh credential.
        # With shared state, any replica serves any session: recorded in Redis, re-attached
        # to the same upstream sessions by the replica a request lands on.
        self.sessions = SessionStore(
            settings.limits,
            lambda principal, upstream: self.credentials.headers(principal, upstream, "close"),
            RedisSessionRecords(shared, settings.limits.session_idle_seconds) if shared else None,
            upstreams.attach_channel,
        )
        self.dispatcher = Dispatcher(upstreams, self.credentials)
        # One key per process signs approval states (a restart voids pending approvals),
        # unless replicas share one (`approval_key`): a state issued by A verifies on B.
        approvals = ApprovalStates(
            approval_key or token_bytes(32), settings.policy.approval_timeout_seconds
        )
        if rates is None:
            rates = RedisRateCounter(shared) if shared else MemoryRateCounter()
        used = RedisReplays(shared, "approval-state") if shared else None
        self.authz = Authorizer(settings, self._listing, rates, approvals, used_states=used)
        self.dispatcher.visible = self.authz.visible
        self.dispatcher.catalogued = self.authz.relist
        # A listen naming an unseen URI: learnt as the gateway, never with the caller's token.
        self.dispatcher.streams.learn = lambda route: self.authz.resources.learn(
            route, CATALOG_PRINCIPAL, self.dispatcher.refresh_index
        )
        # An upstream listing another's resource URI is refused by the lists, alerted here.
        self.dispatcher.lists.claimed = self.trail.alert
        # Pins, poisoning, shadowing and quarantines; None enforces none (unit tests only:
        # the gateway always passes its store's view).
        self.trust = trust
        self.screen: Screen | None = None
        if trust is not None:
            rules = {name: upstream.inspect for name, upstream in settings.upstreams.items()}
            self.screen = Screen(rules, trust)
        self.dispatcher.lists.screen = self.screen
        held = RedisPendingApprovals(shared) if shared else None
        self.approval = Approval(settings, approvals, audit, self.authz.history, held)
        self.inspection = Inspection(
            settings, self.authz.history, agents.tenants if agents is not None else None
        )
        self.inspection.alert = self.trail.alert
        if trust is not None:  # a leaking upstream is taken out of service for everyone
            self.inspection.quarantine = trust.quarantine
        self.dispatcher.streams.inspect = self.inspection.unsolicited

    async def start(self) -> None:
        """Load the policy (listing every upstream first); raises PolicyLoadError if invalid."""
        await self.authz.start()

    async def _listing(self, upstream: str) -> JSON:
        return await self.dispatcher.listing(upstream, CATALOG_PRINCIPAL)

    # -- the path ----------------------------------------------------------------------------

    async def handle(self, exchange: Exchange, route: Route) -> Answer | None:
        """One message from a client through every stage, in order. Returns the answer to
        deliver (ending with the response), or None for a client's notification or response,
        which has no answer. Once the decision is recorded, call `finish` after delivery."""
        await self._admit(exchange, route)
        exchange.admitted = time.perf_counter() - exchange.started
        if exchange.denial is not None:
            return await self._refuse(exchange, route)
        if "method" not in exchange.message or "id" not in exchange.message:
            await self._accept(exchange)
            return None
        try:  # the audit stage, first half: nothing goes upstream unrecorded
            await self.trail.decision(exchange, route)
        except AuditUnavailable as exc:
            await self._drop_new_session(exchange)
            exchange.http_status = exc.http_status
            return Answer(rpc.error(exchange.id, exc))
        exchange.recorded = True
        if exchange.method == methods.INITIALIZE:
            return await self._initialize(exchange, route)
        gate = await self.approval.gate(exchange)
        if isinstance(gate, Ask):
            return Answer(gate.message, self._after_asking(exchange, route, gate))
        if gate is not None:
            return Answer(gate)
        return await self._upstream(exchange, route)

    async def finish(
        self, exchange: Exchange, route: Route, reply: JSON | None, failure: str | None = None
    ) -> None:
        """The audit stage, second half: how a recorded call ended, once its answer was
        delivered (or could not be). Never raises: a trail that cannot take it is logged."""
        if not exchange.recorded:
            return
        try:
            await self.trail.outcome(exchange, route, reply, failure)
        except BastionError as exc:
            log.error("outcome record of request %s not written: %s", exchange.request_id, exc)
        except Exception:
            log.exception("outcome record of request %s not written", exchange.request_id)

    async def session_for(self, exchange: Exchange, route: Route) -> ClientSession:
        """A legacy session's GET stream or DELETE: who asks, and that the session is theirs.
        Raises the refusal (unrecorded: no call is made)."""
        await self._refresh()
        resource = self.settings.base_url() + route.path
        await self.authn.authenticate(
            exchange, exchange.headers, exchange.http_method, exchange.url, resource
        )
        if exchange.denial is None:
            try:
                exchange.session = await self._session(exchange, route)
            except BastionError as exc:
                exchange.denial = exc
        if exchange.denial is not None:
            raise exchange.denial
        assert exchange.session is not None  # noqa: S101 - found or refused
        return exchange.session

    async def _admit(self, exchange: Exchange, route: Route) -> None:
        """The stages before the decision is recorded: authn → session → route → authz."""
        await self._refresh()
        resource = self.settings.base_url() + route.path
        with stage(exchange.trace, "authn"):
            await self.authn.authenticate(
                exchange, exchange.headers, exchange.http_method, exchange.url, resource
            )
        if exchange.denial is not None:
            return
        try:
            await self._open_or_find_session(exchange, route)
            exchange.target = route.target(exchange)
            if exchange.target is None and exchange.method in _BY_URI:
                # Learnt in the background as the gateway: nothing is sent with the caller's
                # credential before its decision.
                await self.authz.resources.learn(
                    route, CATALOG_PRINCIPAL, self.dispatcher.refresh_index
                )
                exchange.target = route.target(exchange)
                if exchange.target is None:
                    ref = exchange.params.get("ref") or {}
                    uri = exchange.params.get("uri", ref.get("uri"))
                    raise InvalidParams(f"resource not found: {shown(uri)}")
            if exchange.era is Era.MODERN:
                engine = self.authz.engine
                mirror.check(exchange, engine.catalog if engine else None)
        except BastionError as exc:
            exchange.denial = exc
            return
        with stage(exchange.trace, "authz"):
            await self._decide(exchange, route)

    async def _refresh(self) -> None:
        """The registry snapshot the request is judged by is current. The gateway's background
        work re-reads the registry (every 0.2 s) and the signing keys (every second); here
        only the snapshot's age is checked, refusing (503) when the registry could not be read
        for a while rather than missing a revocation. No I/O."""
        if self.agents is not None:
            self.agents.require_current()

    async def _open_or_find_session(self, exchange: Exchange, route: Route) -> None:
        """The session stage: `initialize` opens a session (within the principal's quotas);
        any other legacy message must name one of the caller's own."""
        if exchange.method == methods.INITIALIZE and "id" in exchange.message:
            session = self._new_session(exchange, route)
            refusal = await self.sessions.open(session)
            if refusal is not None:
                raise refusal
            exchange.session = session
            return
        if exchange.session_id is None:
            return  # 2026-07-28: stateless, the shared state is never asked
        session = await self._session(exchange, route)
        exchange.session = session
        version = exchange.headers.get("mcp-protocol-version")
        if version is not None and version != session.protocol_version:
            raise InvalidRequest(
                f"MCP-Protocol-Version {shown(version)} differs from the session's "
                f"{session.protocol_version!r}"
            )

    def _new_session(self, exchange: Exchange, route: Route) -> ClientSession:
        assert exchange.principal is not None  # noqa: S101 - authn ran
        params = exchange.params
        hello = {
            "protocolVersion": exchange.protocol_version,
            "capabilities": params.get("capabilities") or {},
            "clientInfo": params.get("clientInfo") or {"name": "unknown", "version": "0"},
        }
        return ClientSession(
            id=self.sessions.new_id(),
            principal=exchange.principal,
            route=route.name,
            protocol_version=exchange.protocol_version,
            hello=hello,
            keep_events=self.settings.limits.sse_replay_events,
        )

    async def _refuse(self, exchange: Exchange, route: Route) -> Answer:
        """A refusal: recorded (unless it only says an unknown session is unknown) and
        answered. A legacy message whose session was not found is answered without its id."""
        denial = exchange.denial
        assert denial is not None  # noqa: S101 - only refusals come here
        await self._drop_new_session(exchange)
        if isinstance(denial, AuthError):
            await self.trail.refused(exchange, route)
        elif not isinstance(denial, SessionNotFound) or exchange.foreign_session:
            await self.trail.decision(exchange, route)
        exchange.http_status = denial.http_status
        unbound = exchange.session_id is not None and exchange.session is None
        return Answer(rpc.error(None if unbound else exchange.id, denial))

    async def _drop_new_session(self, exchange: Exchange) -> None:
        """An `initialize` refused after its session was opened: the session goes again."""
        if exchange.method == methods.INITIALIZE and exchange.session is not None:
            await self.sessions.discard(exchange.session)
            exchange.session = None

    async def _accept(self, exchange: Exchange) -> None:
        """A legacy client's notification or response to a server request: delivered to the
        upstream (or the gateway) it is meant for."""
        session = exchange.session
        if session is None:
            raise InvalidRequest("a notification or response needs a session")
        if "method" not in exchange.message:
            await self.dispatcher.deliver(session, exchange.message)
        elif exchange.method == methods.INITIALIZED:
            await self.sessions.initialized(session)
        else:
            await self.dispatcher.notify(session, exchange.message)

    async def _initialize(self, exchange: Exchange, route: Route) -> Answer:
        """The upstream stage of `initialize`: the session's upstream channels are opened."""
        session = exchange.session
        assert session is not None  # noqa: S101 - the session stage opened it
        try:
            body = await self.dispatcher.initialize(exchange, route)
            await self.sessions.sync(session)  # other replicas join the same upstream sessions
        except BaseException:
            await self.sessions.discard(session)
            exchange.session = None
            raise
        # What an upstream says when a session opens (its instructions) is inspected too.
        answer = Answer(rpc.result(exchange.id, body))
        return await self.inspection.inspect(exchange, answer, route.upstreams)

    async def _upstream(self, exchange: Exchange, route: Route) -> Answer:
        """credentials → upstream → inspection (the credentials stage runs inside the
        upstream call today, per upstream it reaches)."""
        engine = self.authz.engine
        exchange.forward_headers = mirror.rebuild(exchange, engine.catalog if engine else None)
        answer = await self.dispatcher.run(exchange, route)
        if exchange.session is not None:  # relay an upstream session opened or reopened
            try:
                await self.sessions.sync(exchange.session)
            except BaseException:
                await answer.close()  # a streamed answer no one will read
                raise
        answer = self.approval.after(exchange, answer)
        target = exchange.target
        upstreams = (target.upstream,) if target is not None else route.upstreams
        return await self.inspection.inspect(exchange, answer, upstreams)

    async def _after_asking(
        self, exchange: Exchange, route: Route, ask: Ask
    ) -> AsyncGenerator[JSON, None]:
        """A call that waits for its approval: the question (or the notice that a person
        is asked) went out first; progress follows; the call only once it is approved."""
        async for note in self.approval.waiting(exchange, ask):
            yield note
        if ask.refusal is not None:
            yield ask.refusal
            return
        answer = await self._upstream(exchange, route)
        try:
            yield answer.first
            if answer.rest is not None:
                async for message in answer.rest:
                    yield message
        finally:  # closed early (the client went): the upstream's stream is let go now
            await answer.close()

    async def _decide(self, exchange: Exchange, route: Route) -> None:
        """The authz stage: policy's view of the target's upstream is current, then decide.
        Policy files are reloaded in the background; an upstream or tool missing from the
        catalog is listed again by background work, which this waits for (it lists nothing)."""
        target = exchange.target
        if target is not None:
            tool = target.name if exchange.method == methods.TOOLS_CALL else None
            try:
                await self.authz.relist(target.upstream, tool)
            except BastionError as exc:
                exchange.denial = exc
                return
            if self.screen is not None:  # quarantined upstream, changed or withheld definition
                kind = _DECLARED.get(exchange.method)
                exchange.denial = self.screen.refusal(
                    route.upstreams, route.multiplex, target.upstream, kind, target.name or ""
                )
                if exchange.denial is not None:
                    return
        await self.authz.authorize(exchange)

    async def _session(self, exchange: Exchange, route: Route) -> ClientSession:
        """The caller's own session (re-attached when another replica opened it); anyone
        else's is "not found", as an unknown one is."""
        assert exchange.principal is not None and exchange.session_id is not None  # noqa: S101
        session_id = exchange.session_id
        if self.agents is not None and self.agents.session_killed(session_hash(session_id)):
            raise SessionNotFound("session not found; send initialize to start a new session")
        try:
            return await self.sessions.find(session_id, exchange.principal, route.name)
        except SessionNotFound:
            owner = await self.sessions.owner(session_id)
            if owner is not None and owner.binding_key() != exchange.principal.binding_key():
                exchange.foreign_session = True
                if owner.tenant != exchange.principal.tenant:
                    exchange.foreign_tenants = (owner.tenant,)
            raise

    async def reconcile(self) -> None:
        """After a registry change: end the sessions and drop the cached credentials of agents
        that may no longer act, and end killed sessions."""
        assert self.agents is not None  # noqa: S101 - only called with a directory
        now = time.time()
        for session in self.sessions.all():
            agent = self.agents.agent(session.principal.agent)
            usable = agent is not None and agent.usable(now)[0]
            if not usable or self.agents.session_killed(session_hash(session.id)):
                log.warning(
                    "ending session of agent %r (revoked or killed)", session.principal.agent
                )
                await self.sessions.remove(session.id, strict=False)
            if not usable:
                self.credentials.forget_agent(session.principal.agent)
