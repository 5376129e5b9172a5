"""The stages in order: authn → session → route → authz → credentials → dispatch."""

from __future__ import annotations

import logging

from bastion.config import Settings
from bastion.errors import BastionError, PolicyError
from bastion.pipeline.authn import Authenticator
from bastion.pipeline.authz import Authorizer
from bastion.pipeline.credentials import Credentials
from bastion.pipeline.dispatch import Dispatcher
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.pipeline.session import SessionStore
from bastion.upstream.base import Answer
from bastion.upstream.pool import Upstreams

log = logging.getLogger("bastion.pipeline")


class Pipeline:
    """Runs an exchange through every stage; a denial stops it with a JSON-RPC error."""

    def __init__(self, settings: Settings, upstreams: Upstreams) -> None:
        self.settings = settings
        self.authn = Authenticator(settings.auth)
        self.sessions = SessionStore(
            settings.limits.max_sessions, settings.limits.session_idle_seconds
        )
        self.authz = Authorizer()
        self.credentials = Credentials()
        self.dispatcher = Dispatcher(upstreams)

    def admit(self, exchange: Exchange, route: Route, session_id: str | None = None) -> None:
        """The stages before the upstream: who, which session, where, whether, with what
        credential. A refusal is left in `exchange.denial`."""
        self.authn.authenticate(exchange)
        if exchange.denial is not None:
            return
        assert exchange.principal is not None  # noqa: S101 - authn sets it or denies
        try:
            if session_id is not None:
                exchange.session = self.sessions.get(session_id, exchange.principal, route.name)
            exchange.target = route.target(exchange)
        except BastionError as exc:
            exchange.denial = exc
            return
        self.authz.authorize(exchange)
        if exchange.decision is not None and not exchange.decision.allowed:
            reason = "; ".join(exchange.decision.reasons) or "denied by policy"
            exchange.denial = PolicyError(reason)
            return
        self.credentials.attach(exchange)

    async def run(self, exchange: Exchange, route: Route) -> Answer:
        """Execute an admitted exchange; the Answer ends with the response."""
        return await self.dispatcher.run(exchange, route)
