"""Running an MCP method once the stages have passed it: forward, fan out, or answer here.

Every method yields JSON-RPC messages ending with the response to the client's request, so
the transport can choose a JSON body (one message) or an SSE stream (several).

`Dispatcher` composes the parts, none of which calls another's internals:

```
Dispatcher ─┬─► Lists      (lists.py)      list pages, fan-out and merge, the route's index
            ├─► Handshake  (handshake.py)  initialize, server/discover
            ├─► Streams    (streams.py)    subscriptions/listen, GET relay, client answers
            └─► Caller     (upstream.py)   one request to one upstream; the parts above use it
```
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

from bastion.errors import (
    BastionError,
    InvalidParams,
    MethodNotFound,
    SessionNotFound,
    UpstreamError,
    shown,
)
from bastion.methods import (
    KNOWN_METHODS,
    LOGGING_SET_LEVEL,
    METHODS,
    PING,
    SERVER_DISCOVER,
    SUBSCRIPTIONS_LISTEN,
    Routing,
)
from bastion.pipeline.credentials import Credentials
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.handshake import SERVER_INFO, Handshake, merge_capabilities, negotiate
from bastion.pipeline.lists import META_UNAVAILABLE, Lists, Visible
from bastion.pipeline.route import Route
from bastion.pipeline.session import ClientSession
from bastion.pipeline.streams import Streams
from bastion.pipeline.upstream import Caller
from bastion.rpc import error, result
from bastion.types import JSON, Principal
from bastion.upstream.base import Answer
from bastion.upstream.pool import Upstreams

__all__ = [
    "KNOWN_METHODS",
    "META_UNAVAILABLE",
    "SERVER_INFO",
    "Dispatcher",
    "merge_capabilities",
    "negotiate",
]


class Dispatcher:
    """Executes MCP methods for a route against its upstreams."""

    def __init__(self, upstreams: Upstreams, credentials: Credentials) -> None:
        self.upstreams = upstreams
        self.credentials = credentials
        self.caller = Caller(upstreams, credentials.for_message)
        self.lists = Lists(self.caller)
        self.handshake = Handshake(self.caller)
        # `streams.learn` is set by the pipeline: unseen URIs are learnt as the gateway.
        self.streams = Streams(self.caller, credentials.headers)

    # Policy's hooks into lists, set by the pipeline once the authz stage exists.

    @property
    def visible(self) -> Visible | None:
        """Policy's view of a list page: (exchange, upstream, method, items) → visible items."""
        return self.lists.visible

    @visible.setter
    def visible(self, value: Visible | None) -> None:
        self.lists.visible = value

    @property
    def catalogued(self) -> Callable[[str], Awaitable[None]] | None:
        """Makes sure policy's catalog holds an upstream; raises when it still cannot."""
        return self.lists.catalogued

    @catalogued.setter
    def catalogued(self, value: Callable[[str], Awaitable[None]] | None) -> None:
        self.lists.catalogued = value

    # -- the parts' entry points --------------------------------------------------------------

    async def listing(self, upstream: str, principal: Principal) -> JSON:
        """Every tool and prompt of an upstream, asked as the gateway itself (for policy)."""
        return await self.lists.listing(upstream, principal)

    async def refresh_index(self, exchange: Exchange, route: Route) -> None:
        """Learn every upstream's resources and templates (bounded number of pages)."""
        await self.lists.refresh_index(exchange, route)

    async def call_once(self, exchange: Exchange, upstream: str, message: JSON) -> JSON:
        """Send a request to one upstream and return only its response."""
        return await self.caller.call_once(exchange, upstream, message)

    async def initialize(self, exchange: Exchange, route: Route) -> JSON:
        """Open the session's upstream channels and answer initialize."""
        return await self.handshake.initialize(exchange, route)

    async def discover(self, exchange: Exchange, route: Route) -> JSON:
        """Answer server/discover for the route (2026-07-28)."""
        return await self.handshake.discover(exchange, route)

    def start_listening(self, session: ClientSession, route: Route) -> None:
        """Relay each upstream's own stream (legacy GET) into the session's standalone stream."""
        self.streams.start_listening(session, route)

    async def deliver(self, session: ClientSession, message: JSON) -> None:
        """Route a client's answer to a server request back to whoever asked."""
        await self.streams.deliver(session, message)

    async def notify(self, session: ClientSession, message: JSON) -> None:
        """Forward a client notification to the upstreams it concerns."""
        await self.streams.notify(session, message)

    # -- methods ------------------------------------------------------------------------------

    async def run(self, exchange: Exchange, route: Route) -> Answer:
        """Execute the exchange's method; the Answer ends with the response."""
        answer = await self._run(exchange, route)
        if answer.rest is not None:
            return answer.wrapped(answer.first, _guard(exchange, answer.rest))
        return answer

    async def _run(self, exchange: Exchange, route: Route) -> Answer:
        method = exchange.method
        known = METHODS.get(method)
        try:
            if known is not None and known.forwarded:
                return await self._forward(exchange, route)
            if known is not None and known.routing is Routing.LISTED:
                return Answer(await self.lists.answer(exchange, route))
            if method == PING:
                return Answer(result(exchange.id, {}))
            if method == SERVER_DISCOVER:
                return Answer(result(exchange.id, await self.discover(exchange, route)))
            if method == LOGGING_SET_LEVEL:
                return Answer(await self._set_level(exchange, route))
            if method == SUBSCRIPTIONS_LISTEN:
                return await self.streams.listen(exchange, route)
            raise MethodNotFound(f"method {shown(method)} is not served by this gateway")
        except SessionNotFound:  # ended elsewhere meanwhile: 404, as before the call
            raise
        except BastionError as exc:
            return Answer(error(exchange.id, exc))

    async def _forward(self, exchange: Exchange, route: Route) -> Answer:
        """A request for one upstream, under that upstream's own name for what it names."""
        target = exchange.target
        if target is None:  # the route stage resolves (or refuses) every forwarded target
            raise InvalidParams(f"resource not found: {shown(exchange.params.get('uri'))}")
        message = exchange.message
        routing = METHODS[exchange.method].routing
        if route.multiplex and routing is Routing.BY_NAME:
            message = {**message, "params": {**exchange.params, "name": target.name}}
        elif route.multiplex and routing is Routing.BY_REF:
            ref = exchange.params["ref"]
            if ref.get("type") == "ref/prompt":
                params = {**exchange.params, "ref": {**ref, "name": target.name}}
                message = {**message, "params": params}
        return await self.caller.call(exchange, target.upstream, message)

    async def _set_level(self, exchange: Exchange, route: Route) -> JSON:
        """logging/setLevel: passed to every upstream of the route; those that refuse it
        simply log as before."""
        for upstream in route.upstreams:
            with contextlib.suppress(UpstreamError):
                await self.caller.call_once(exchange, upstream, exchange.message)
        return result(exchange.id, {})


async def _guard(
    exchange: Exchange, rest: AsyncGenerator[JSON, None]
) -> AsyncGenerator[JSON, None]:
    """Whatever breaks in a streamed answer, the client still gets a response to its request."""
    try:
        async for message in rest:
            yield message
            if "method" not in message:
                return
        if exchange.method == SUBSCRIPTIONS_LISTEN:
            return
        raise UpstreamError("the upstream's stream ended without a response")
    except BastionError as exc:
        yield error(exchange.id, exc)
    finally:
        await rest.aclose()
