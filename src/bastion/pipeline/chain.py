"""The stages in order: authn → session → route → authz → credentials → dispatch."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from secrets import token_bytes
from typing import cast

from bastion.audit import AuditWriter
from bastion.config import RESERVED_TENANT, Settings
from bastion.errors import BastionError, InvalidParams, SessionNotFound, shown
from bastion.observe.tracing import stage
from bastion.pipeline.authn import AgentDirectory, Authenticator, SigningKeys
from bastion.pipeline.authz import Authorizer
from bastion.pipeline.credentials import Credentials, CurrentKey
from bastion.pipeline.dispatch import Dispatcher
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.obligations import Obligations
from bastion.pipeline.route import Route
from bastion.pipeline.session import ClientSession, SessionStore, session_hash
from bastion.pipeline.trail import Trail
from bastion.policy.approval import ApprovalStates
from bastion.state.rates import MemoryRateCounter, RateCounter
from bastion.types import JSON, Principal
from bastion.upstream.base import Answer
from bastion.upstream.pool import Upstreams

log = logging.getLogger("bastion.pipeline")

# Who the gateway is when it lists upstreams for policy.
CATALOG_PRINCIPAL = Principal(tenant=RESERVED_TENANT, agent="bastion-catalog")
# Forwarded methods whose upstream is found by URI: a URI the route has not seen yet is looked
# up before the decision, so nothing reaches an upstream undecided.
_BY_URI = ("resources/read", "resources/subscribe", "resources/unsubscribe", "completion/complete")


class Pipeline:
    """Runs an exchange through every stage; a denial stops it with a JSON-RPC error."""

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
    ) -> None:
        self.settings = settings
        self.trail = Trail(settings, audit)
        self.agents = agents
        self.keys = keys
        self._keys_checked = 0.0
        self.authn = Authenticator(
            settings.auth, settings.base_url(), agents, keys, nonce_key=nonce_key
        )
        # Ending a session ends its upstream sessions, each DELETE with a fresh credential.
        self.sessions = SessionStore(
            settings.limits,
            lambda principal, upstream: self.credentials.headers(principal, upstream, "close"),
        )
        self.credentials = Credentials(settings, cast("CurrentKey | None", keys), secrets)
        self.dispatcher = Dispatcher(upstreams, self.credentials)
        # One key per process signs approval states: a restart voids pending approvals.
        approvals = ApprovalStates(token_bytes(32), settings.policy.approval_timeout_seconds)
        self.authz = Authorizer(settings, self._listing, rates or MemoryRateCounter(), approvals)
        self.dispatcher.visible = self.authz.visible
        self.dispatcher.catalogued = self.authz.relist
        self.obligations = Obligations(settings, self.dispatcher, approvals)

    async def start(self) -> None:
        """Load the policy (listing every upstream first); raises PolicyLoadError if invalid."""
        await self.authz.start()

    async def _listing(self, upstream: str) -> JSON:
        return await self.dispatcher.listing(upstream, CATALOG_PRINCIPAL)

    async def admit(
        self,
        exchange: Exchange,
        route: Route,
        headers: dict[str, str],
        method: str,
        url: str,
        session_id: str | None = None,
    ) -> None:
        """The stages before the upstream: who, which session, where, whether. A refusal is
        left in `exchange.denial` (with its challenge headers)."""
        if self.agents is not None and self.agents.refresh():
            await self.reconcile()
        if self.keys is not None and (now := time.monotonic()) > self._keys_checked + 1.0:
            self._keys_checked = now
            self.keys.refresh()  # a rotation by `bastion keys rotate`, seen within a second
        resource = self.settings.base_url() + route.path
        with stage(exchange.trace, "authn"):
            await self.authn.authenticate(exchange, headers, method, url, resource)
        if exchange.denial is not None:
            return
        assert exchange.principal is not None  # noqa: S101 - authn sets it or denies
        try:
            if session_id is not None:
                exchange.session = self._session(session_id, exchange, route)
            exchange.target = route.target(exchange)
            if exchange.target is None and exchange.method in _BY_URI:
                await self.dispatcher.refresh_index(exchange, route)
                exchange.target = route.target(exchange)
                if exchange.target is None:
                    ref = exchange.params.get("ref") or {}
                    uri = exchange.params.get("uri", ref.get("uri"))
                    raise InvalidParams(f"resource not found: {shown(uri)}")
        except BastionError as exc:
            exchange.denial = exc
            return
        with stage(exchange.trace, "authz"):
            await self._decide(exchange)

    async def _decide(self, exchange: Exchange) -> None:
        """The authz stage: policy's view of the target's upstream is current, then decide."""
        self.authz.maybe_reload()
        target = exchange.target
        if target is not None:
            tool = target.name if exchange.method == "tools/call" else None
            try:
                await self.authz.relist(target.upstream, tool)
            except BastionError as exc:
                exchange.denial = exc
                return
        await self.authz.authorize(exchange)

    def _session(self, session_id: str, exchange: Exchange, route: Route) -> ClientSession:
        assert exchange.principal is not None  # noqa: S101 - authn ran
        if self.agents is not None and self.agents.session_killed(session_hash(session_id)):
            raise SessionNotFound("session not found; send initialize to start a new session")
        try:
            return self.sessions.get(session_id, exchange.principal, route.name)
        except SessionNotFound:
            owner = self.sessions.owner(session_id)
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
                await self.sessions.remove(session.id)
            if not usable:
                self.credentials.forget_agent(session.principal.agent)

    async def run(self, exchange: Exchange, route: Route) -> Answer:
        """Execute an admitted exchange, with the obligations of its decision (approval,
        redaction); the Answer ends with the response."""
        decision = exchange.decision
        if decision is None or not decision.obligations:
            return await self.dispatcher.run(exchange, route)
        return await self.obligations.run(exchange, route)
