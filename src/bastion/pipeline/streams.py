"""Traffic outside request → response: `subscriptions/listen` fed by every upstream's listen
stream, each upstream's own stream relayed into a legacy session's GET stream, and what a
client sends back (answers to server requests, notifications) delivered to the upstream it is
meant for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

import orjson

from bastion.config import RESERVED_TENANT
from bastion.errors import BastionError, InvalidParams, UpstreamError, shown
from bastion.methods import (
    CANCELLED,
    NOTIFICATION_PREFIX,
    ROOTS_LIST_CHANGED,
    SUBSCRIPTIONS_ACKNOWLEDGED,
    SUBSCRIPTIONS_LISTEN,
)
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.pipeline.session import ClientSession
from bastion.pipeline.upstream import Caller, json_object
from bastion.types import JSON, META_SUBSCRIPTION, Principal, Target
from bastion.upstream.base import Answer

log = logging.getLogger("bastion.dispatch")

_LIST_CHANGED_FLAGS = ("toolsListChanged", "promptsListChanged", "resourcesListChanged")

# The credential headers for a message outside any request: (principal, upstream, scope).
HeadersFor = Callable[[Principal | None, str, str], Awaitable[dict[str, str]]]
# Learns the route's resource URIs in the background, as the gateway (never with a caller's
# credential): what the pipeline does for a URI it has not seen (`Resources.learn`).
Learn = Callable[[Route], Awaitable[None]]


# The inspection of a message an upstream started: (session, upstream, message) → message to
# deliver, or None to drop it.
Unsolicited = Callable[[ClientSession, str, JSON], Awaitable[JSON | None]]


class Streams:
    """Server-initiated traffic and the client's side of it."""

    def __init__(self, caller: Caller, headers_for: HeadersFor, learn: Learn | None = None) -> None:
        self._caller = caller
        self._headers_for = headers_for
        # Set by the pipeline once its authz stage exists; without it, a URI the route has
        # not seen is refused (nothing is looked up).
        self.learn = learn
        # Set by the pipeline: the inspection stage over what an upstream starts on its own
        # (a session's stream); None delivers, returns None to drop.
        self.inspect: Unsolicited | None = None

    async def listen(self, exchange: Exchange, route: Route) -> Answer:
        """subscriptions/listen: one client stream fed by every upstream's listen stream.
        A resource URI the route has not seen is learnt as the pipeline learns one (in the
        background, as the gateway); one still unknown refuses the listen, as a read of it
        would be refused."""
        wanted = exchange.params.get("notifications") or {}
        if not isinstance(wanted, dict):
            raise InvalidParams(f"{SUBSCRIPTIONS_LISTEN} needs params.notifications as an object")
        per_upstream: dict[str, JSON] = {u: {} for u in route.upstreams}
        for flag in _LIST_CHANGED_FLAGS:
            if wanted.get(flag) is True:
                for upstream in route.upstreams:
                    per_upstream[upstream][flag] = True
        uris = wanted.get("resourceSubscriptions") or []
        if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
            raise InvalidParams("notifications.resourceSubscriptions must be a list of URIs")
        tenant = exchange.principal.tenant if exchange.principal else RESERVED_TENANT
        for uri in uris:
            target = await self._resolve(route, uri, tenant)
            per_upstream[target.upstream].setdefault("resourceSubscriptions", []).append(uri)
        ack = {
            "jsonrpc": "2.0",
            "method": SUBSCRIPTIONS_ACKNOWLEDGED,
            "params": {"_meta": {META_SUBSCRIPTION: exchange.id}, "notifications": wanted},
        }
        wanted_by = {upstream: filt for upstream, filt in per_upstream.items() if filt}
        return Answer(ack, self._fan_in(exchange, wanted_by))

    async def _resolve(self, route: Route, uri: str, tenant: str) -> Target:
        target = route.resolve_uri(uri, tenant)
        if target is None and self.learn is not None:
            await self.learn(route)
            target = route.resolve_uri(uri, tenant)
        if target is None:
            raise InvalidParams(f"resource not found: {shown(uri)} (subscribe to a listed URI)")
        return target

    async def _fan_in(
        self, exchange: Exchange, wanted_by: dict[str, JSON]
    ) -> AsyncGenerator[JSON, None]:
        # Tasks start on the first read, so an answer nobody reads leaves nothing running.
        queue: asyncio.Queue[JSON] = asyncio.Queue(maxsize=1024)
        tasks = [
            asyncio.create_task(self._pump_listen(exchange, upstream, filt, queue))
            for upstream, filt in wanted_by.items()
        ]
        try:
            while True:
                yield await queue.get()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _pump_listen(
        self, exchange: Exchange, upstream: str, wanted: JSON, queue: asyncio.Queue[JSON]
    ) -> None:
        params = {**exchange.params, "notifications": wanted}
        message = {**exchange.message, "params": params}
        try:
            answer = await self._caller.call(exchange, upstream, message)
            try:
                await _relay_notification(exchange, answer.first, queue)
                if answer.rest is not None:
                    async for reply in answer.rest:
                        await _relay_notification(exchange, reply, queue)
            finally:
                await answer.close()
        except UpstreamError as exc:
            log.warning("listen stream of %r ended: %s", upstream, exc.message)

    def start_listening(self, session: ClientSession, route: Route) -> None:
        """Relay each upstream's own stream (legacy GET) into the session's standalone stream."""
        if session.listening:
            return
        session.listening = True
        # Upstream sessions that open later are relayed too, once open (`ClientSession.hear`),
        # with shared state those another replica opens or reopens too (`watch`).
        session.listener = lambda upstream: self._pump_session(session, upstream)
        session.hear()
        session.watch(route.upstreams)

    async def _pump_session(self, session: ClientSession, upstream: str) -> None:
        channel = session.channels.get(upstream)
        if channel is None:
            return
        headers = await self._headers_for(session.principal, upstream, "listen")
        stream = session.streams["0"]
        try:
            async for message in channel.listen(headers):
                if self.inspect is not None:
                    checked = await self.inspect(session, upstream, message)
                    if checked is None:
                        continue
                    message = checked
                if "method" in message and "id" in message:
                    message = session.map_server_request(upstream, message)
                    await session.save_requests()
                await stream.put(orjson.dumps(message))  # stored for every replica first
                await session.save_listened(upstream)
        except BastionError as exc:
            log.info("server stream of %r for a session ended: %s", upstream, exc.message)

    async def deliver(self, session: ClientSession, message: JSON) -> None:
        """Route a client's answer to a server request back to the upstream that asked (or to
        the gateway, when it asked)."""
        asked = session.asks.pop(str(message.get("id")), None)
        if asked is not None:
            if not asked.done():
                asked.set_result(message)
            return
        # With shared state, the replica that relayed the request may be another one.
        mapped = await session.take_request(str(message.get("id")))
        if mapped is None:
            raise InvalidParams(f"no server request with id {shown(message.get('id'))} is pending")
        upstream, upstream_id = mapped
        channel = session.channels[upstream]
        headers = await self._headers_for(session.principal, upstream, "respond")
        await channel.send({**message, "id": upstream_id}, headers)

    async def notify(self, session: ClientSession, message: JSON) -> None:
        """Forward a client notification: cancellations to the upstream running the request,
        roots changes to every upstream of the session."""
        method = message.get("method")
        principal = session.principal

        async def headers_for(upstream: str) -> dict[str, str]:
            return await self._headers_for(principal, upstream, str(method))

        if method == CANCELLED:
            request_id = (message.get("params") or {}).get("requestId")
            for upstream, channel in session.channels.items():
                upstream_id = channel.inflight.get(request_id)
                if upstream_id is not None:
                    params = {**message["params"], "requestId": upstream_id}
                    await channel.send({**message, "params": params}, await headers_for(upstream))
        elif method == ROOTS_LIST_CHANGED:
            for upstream, channel in session.channels.items():
                with contextlib.suppress(BastionError):
                    await channel.send(message, await headers_for(upstream))


async def _relay_notification(exchange: Exchange, reply: JSON, queue: asyncio.Queue[JSON]) -> None:
    """An upstream's notification on a listen stream, marked with the client's subscription
    (its own acknowledgement aside: the client got the gateway's)."""
    method = reply.get("method")
    if (
        isinstance(method, str)
        and method.startswith(NOTIFICATION_PREFIX)
        and method != SUBSCRIPTIONS_ACKNOWLEDGED
    ):
        params = json_object(reply.get("params"))
        params["_meta"] = {**json_object(params.get("_meta")), META_SUBSCRIPTION: exchange.id}
        await queue.put({**reply, "params": params})
