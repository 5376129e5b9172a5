"""Running an MCP method once the stages have passed it: forward, fan out, or answer here.

Every function yields JSON-RPC messages ending with the response to the client's request, so
the transport can choose a JSON body (one message) or an SSE stream (several).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson

from bastion.errors import BastionError, InvalidParams, MethodNotFound, UpstreamError, shown
from bastion.observe.tracing import UpstreamCall, stage
from bastion.pipeline.credentials import Credentials
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.pipeline.session import ClientSession
from bastion.rpc import error, result
from bastion.types import (
    JSON,
    LEGACY_VERSIONS,
    META_CAPABILITIES,
    META_CLIENT_INFO,
    META_SERVER_INFO,
    META_SUBSCRIPTION,
    META_VERSION,
    MODERN_VERSION,
    PROBE_META,
    SUPPORTED_VERSIONS,
    Era,
    Principal,
)
from bastion.upstream.base import Answer, Channel, answer_from, refusal
from bastion.upstream.pool import Upstreams

log = logging.getLogger("bastion.dispatch")

SERVER_INFO = {"name": "bastion", "title": "Bastion MCP gateway", "version": "0.1.0"}
_LISTS = {
    "tools/list": ("tools", "name"),
    "prompts/list": ("prompts", "name"),
    "resources/list": ("resources", "uri"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate"),
}
_FORWARDED = frozenset(
    {
        "tools/call",
        "prompts/get",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "completion/complete",
    }
)
KNOWN_METHODS = frozenset(
    {
        *_FORWARDED,
        *_LISTS,
        "initialize",
        "ping",
        "server/discover",
        "logging/setLevel",
        "subscriptions/listen",
    }
)
_MAX_INDEX_PAGES = 20
# The `_meta` member of a merged list naming the upstreams whose items it lacks, and why.
META_UNAVAILABLE = "bastion/unavailable"


class Dispatcher:
    """Executes MCP methods for a route against its upstreams."""

    def __init__(self, upstreams: Upstreams, credentials: Credentials) -> None:
        self.upstreams = upstreams
        self.credentials = credentials
        # Policy's view of a list page: (exchange, upstream, method, items) → visible items.
        self.visible: Callable[[Exchange, str, str, list[JSON]], list[JSON]] | None = None
        # Makes sure policy's catalog holds an upstream (listing it again when it was down at
        # start); raises the listing's error when it still cannot. Without it in the catalog,
        # `visible` shows none of the upstream's items.
        self.catalogued: Callable[[str], Awaitable[None]] | None = None

    async def listing(self, upstream: str, principal: Principal) -> JSON:
        """Every tool and prompt of an upstream, asked as the gateway itself (for policy)."""
        out: JSON = {}
        for method, key in (("tools/list", "tools"), ("prompts/list", "prompts")):
            items: list[JSON] = []
            cursor = None
            for page in range(_MAX_INDEX_PAGES):
                params: JSON = {"_meta": PROBE_META}
                if cursor is not None:
                    params["cursor"] = cursor
                message = {
                    "jsonrpc": "2.0",
                    "id": f"catalog-{page}",
                    "method": method,
                    "params": params,
                }
                exchange = Exchange(message, Era.MODERN, MODERN_VERSION, "catalog", "", principal)
                reply = await self.call_once(exchange, upstream, message)
                body = reply.get("result")
                if not isinstance(body, dict):
                    if key == "prompts":  # a server without prompts may refuse the method
                        break
                    raise UpstreamError(f"upstream {upstream!r} refused {method}: {refusal(reply)}")
                items.extend(_items(body, key))
                cursor = body.get("nextCursor")
                if cursor is None:
                    break
            out[key] = items
        return out

    async def _headers(
        self, principal: Principal | None, upstream: str, message: JSON
    ) -> tuple[dict[str, str], str | None]:
        """The credential an upstream gets for this message, scoped to the tool it calls, and
        the id of the credential (None when nothing was minted)."""
        method = str(message.get("method", ""))
        params = message.get("params") or {}
        if method == "tools/call":
            scope = str(params.get("name", ""))
        elif method == "prompts/get":
            scope = f"prompts/get:{params.get('name', '')}"
        else:
            scope = method
        return await self.credentials.issue(principal, upstream, scope)

    # -- channels ---------------------------------------------------------------------------

    async def channel(self, exchange: Exchange, upstream: str) -> Channel:
        """The channel this exchange uses to reach an upstream."""
        session = exchange.session
        if session is not None:
            channel = session.channels.get(upstream)
            if channel is None:
                async with session._open_lock:
                    channel = session.channels.get(upstream)
                    if channel is None:
                        channel = await self.upstreams.session_channel(
                            upstream, session.hello, session.principal.tenant
                        )
                        session.channels[upstream] = channel
            return channel
        assert exchange.principal is not None  # noqa: S101 - authn ran
        return await self.upstreams.stateless_channel(upstream, exchange.principal.tenant)

    def _shape(self, exchange: Exchange, channel: Channel, message: JSON) -> JSON:
        """Carry a legacy session's request to a modern upstream: add the per-request _meta."""
        if channel.era is Era.MODERN and exchange.era is Era.LEGACY and exchange.session:
            params = dict(message.get("params") or {})
            meta = dict(params.get("_meta") or {})
            meta.setdefault(META_VERSION, MODERN_VERSION)
            meta.setdefault(META_CAPABILITIES, exchange.session.hello.get("capabilities", {}))
            meta.setdefault(META_CLIENT_INFO, exchange.session.hello.get("clientInfo", {}))
            params["_meta"] = meta
            return {**message, "params": params}
        return message

    async def call(self, exchange: Exchange, upstream: str, message: JSON) -> Answer:
        """Send one request to one upstream, in the request's trace; map server requests into
        the session."""
        channel = await self.channel(exchange, upstream)
        shaped = self._shape(exchange, channel, message)
        # Timed, not spanned: an SDK span costs ~25 µs, and the CLIENT span follows at once.
        with stage(exchange.trace, "credentials", span=False):
            headers, exchange.credential_id = await self._headers(
                exchange.principal, upstream, message
            )
        if exchange.forward_headers:
            headers = {**headers, **exchange.forward_headers}
        call = exchange.trace.call(upstream, shaped) if exchange.trace is not None else None
        if call is not None:
            headers = {**headers, **call.headers}
            shaped = call.message
        try:
            answer = await channel.call(shaped, headers)
        except BaseException as exc:
            if call is not None:
                call.finish(exc=exc)
            raise
        if answer.rest is None:
            if call is not None:
                call.finish(answer.first)
            if "result" in answer.first and channel.era is not exchange.era:
                answer.first = _translate_result(answer.first, exchange.era, upstream)
            return answer
        adapted = self._adapt(exchange, channel, upstream, answer, call)
        return await answer_from(adapted, upstream)

    async def _adapt(
        self,
        exchange: Exchange,
        channel: Channel,
        upstream: str,
        answer: Answer,
        call: UpstreamCall | None,
    ) -> AsyncGenerator[JSON, None]:
        """A streamed answer as the client must see it: server requests under gateway ids,
        results in the client's era. The call ends with the stream."""
        assert answer.rest is not None  # noqa: S101 - only streamed answers come here
        last = answer.first
        try:
            yield self._adapt_one(exchange, channel, upstream, answer.first)
            async for last in answer.rest:
                yield self._adapt_one(exchange, channel, upstream, last)
        except Exception as exc:
            if call is not None:
                call.finish(exc=exc)
            raise
        finally:
            if call is not None:
                call.finish(last)  # nothing when it already finished
            await answer.close()

    def _adapt_one(self, exchange: Exchange, channel: Channel, upstream: str, reply: JSON) -> JSON:
        if "method" in reply and "id" in reply:
            if exchange.session is None:
                # A 2026-07-28 upstream asks through input_required results, never so.
                exc = UpstreamError(f"upstream {upstream!r} sent a request to a stateless call")
                return error(exchange.id, exc)
            return exchange.session.map_server_request(upstream, reply)
        if "result" in reply and channel.era is not exchange.era:
            return _translate_result(reply, exchange.era, upstream)
        return reply

    async def call_once(self, exchange: Exchange, upstream: str, message: JSON) -> JSON:
        """Send a request and return only its response."""
        answer = await self.call(exchange, upstream, message)
        reply = answer.first
        try:
            while "method" in reply and answer.rest is not None:
                reply = await anext(answer.rest)
        except StopAsyncIteration:
            raise UpstreamError(f"upstream {upstream!r} gave no response") from None
        finally:
            await answer.close()
        return reply

    # -- methods ----------------------------------------------------------------------------

    async def run(self, exchange: Exchange, route: Route) -> Answer:
        """Execute the exchange's method; the Answer ends with the response."""
        answer = await self._run(exchange, route)
        if answer.rest is not None:
            answer.rest = _guard(exchange, answer.rest)
        return answer

    async def _run(self, exchange: Exchange, route: Route) -> Answer:
        method = exchange.method
        try:
            if method in _FORWARDED:
                return await self._forward(exchange, route)
            if method in _LISTS:
                return Answer(await self._list(exchange, route))
            if method == "ping":
                return Answer(result(exchange.id, {}))
            if method == "server/discover":
                return Answer(result(exchange.id, await self.discover(exchange, route)))
            if method == "logging/setLevel":
                return Answer(await self._set_level(exchange, route))
            if method == "subscriptions/listen":
                return await self._listen(exchange, route)
            raise MethodNotFound(f"method {shown(method)} is not served by this gateway")
        except BastionError as exc:
            return Answer(error(exchange.id, exc))

    async def _forward(self, exchange: Exchange, route: Route) -> Answer:
        target = exchange.target
        if target is None:
            await self.refresh_index(exchange, route)
            target = route.target(exchange)
            if target is None:
                raise InvalidParams(f"resource not found: {shown(exchange.params.get('uri'))}")
        message = exchange.message
        if route.multiplex and exchange.method in ("tools/call", "prompts/get"):
            message = {**message, "params": {**exchange.params, "name": target.name}}
        elif route.multiplex and exchange.method == "completion/complete":
            ref = exchange.params["ref"]
            if ref.get("type") == "ref/prompt":
                params = {**exchange.params, "ref": {**ref, "name": target.name}}
                message = {**message, "params": params}
        return await self.call(exchange, target.upstream, message)

    async def _list(self, exchange: Exchange, route: Route) -> JSON:
        """A list request. On a virtual server every upstream's page is fetched at once and
        merged; the cursor carries each upstream's own cursor for those with more pages. An
        upstream that cannot be listed is named under `_meta` (never a silent partial list)."""
        key, _ = _LISTS[exchange.method]
        if not route.multiplex:
            return await self._list_one(exchange, route)
        cursors = _decode_cursor(exchange.params.get("cursor"), route.upstreams)
        pages = await asyncio.gather(
            *(self._page(exchange, route, upstream, cursor) for upstream, cursor in cursors.items())
        )
        merged: JSON = {key: []}
        following: dict[str, Any] = {}
        missing: list[JSON] = []
        for upstream, (page, why) in zip(cursors, pages, strict=True):
            if page is None:
                missing.append({"upstream": upstream, "reason": why})
                continue
            merged[key].extend(page[key])
            if page.get("nextCursor") is not None:
                following[upstream] = page["nextCursor"]
        if following:
            merged["nextCursor"] = _encode_cursor(following)
        if missing:
            merged["_meta"] = {META_UNAVAILABLE: missing}
        if exchange.era is Era.MODERN:
            merged.update(resultType="complete", ttlMs=0, cacheScope="private")
        return result(exchange.id, merged)

    async def _list_one(self, exchange: Exchange, route: Route) -> JSON:
        """A list request on one upstream's own route: its page, as policy lets the caller
        see it."""
        key, _ = _LISTS[exchange.method]
        upstream = route.upstreams[0]
        reply = await self.call_once(exchange, upstream, exchange.message)
        if "result" not in reply:
            return reply  # the upstream's error, relayed
        body = reply["result"]
        if not isinstance(body, dict):
            raise UpstreamError(
                f"upstream {upstream!r} answered {exchange.method} with a result that is not "
                "an object"
            )
        items = _items(body, key)
        self._learn(route, exchange.method, upstream, items)
        page: JSON = {**body, key: items}
        if self.visible is not None:
            why = await self._uncatalogued(upstream)
            if why is None:
                page[key] = self.visible(exchange, upstream, exchange.method, items)
            else:
                page[key] = []
                page["_meta"] = {
                    **_object(body.get("_meta")),
                    META_UNAVAILABLE: [{"upstream": upstream, "reason": why}],
                }
        return {**reply, "result": page}

    async def _page(
        self, exchange: Exchange, route: Route, upstream: str, cursor: Any
    ) -> tuple[JSON | None, str]:
        """One upstream's page of a merged list, or None and why it is missing."""
        key, _ = _LISTS[exchange.method]
        params = {k: v for k, v in exchange.params.items() if k != "cursor"}
        if cursor is not None:
            params["cursor"] = cursor
        try:
            reply = await self.call_once(exchange, upstream, {**exchange.message, "params": params})
        except BastionError as exc:
            log.warning("listing %s of %r failed: %s", key, upstream, exc.message)
            return None, exc.message
        body = reply.get("result")
        if not isinstance(body, dict):
            if _code(reply) == MethodNotFound.rpc_code:
                return {key: []}, ""  # the upstream offers no such list: it has none
            why = f"upstream {upstream!r} refused {exchange.method}: {refusal(reply)}"
            log.warning("%s", why)
            return None, why
        if not isinstance(body.get(key), list):
            why = f"upstream {upstream!r} answered {exchange.method} without a {key} array"
            log.warning("%s", why)
            return None, why
        items = _items(body, key)
        self._learn(route, exchange.method, upstream, items)
        if self.visible is not None:
            hidden = await self._uncatalogued(upstream)
            if hidden is not None:
                return None, hidden
            items = self.visible(exchange, upstream, exchange.method, items)
        if key in ("tools", "prompts"):
            items = [
                {**i, "name": route.expose(upstream, i["name"])}
                for i in items
                if isinstance(i.get("name"), str)
            ]
        return {key: items, "nextCursor": body.get("nextCursor")}, ""

    async def _uncatalogued(self, upstream: str) -> str | None:
        """Why policy cannot show this upstream's items yet (its catalog lacks the upstream
        and listing it again failed), or None when it can."""
        if self.catalogued is None:
            return None
        try:
            await self.catalogued(upstream)
        except BastionError as exc:
            why = f"upstream {upstream!r} is not in the policy catalog yet: {exc.message}"
            log.warning("%s", why)
            return why
        return None

    def _learn(self, route: Route, method: str, upstream: str, items: list[JSON]) -> None:
        if method == "resources/list":
            route.learn_resources(upstream, items)
        elif method == "resources/templates/list":
            route.learn_templates(upstream, items)

    async def refresh_index(self, exchange: Exchange, route: Route) -> None:
        """Learn every upstream's resources and templates (bounded number of pages)."""
        for upstream in route.upstreams:
            for method, key in (
                ("resources/list", "resources"),
                ("resources/templates/list", "resourceTemplates"),
            ):
                cursor = None
                for page in range(_MAX_INDEX_PAGES):
                    params: JSON = dict(
                        exchange.params.get("_meta") and {"_meta": exchange.params["_meta"]} or {}
                    )
                    if cursor is not None:
                        params["cursor"] = cursor
                    message = {
                        "jsonrpc": "2.0",
                        "id": f"index-{page}",
                        "method": method,
                        "params": params,
                    }
                    try:
                        reply = await self.call_once(exchange, upstream, message)
                    except UpstreamError:
                        break
                    body = reply.get("result")
                    if not isinstance(body, dict):
                        break
                    self._learn(route, method, upstream, _items(body, key))
                    cursor = body.get("nextCursor")
                    if cursor is None:
                        break

    async def _set_level(self, exchange: Exchange, route: Route) -> JSON:
        for upstream in route.upstreams:
            with contextlib.suppress(UpstreamError):
                await self.call_once(exchange, upstream, exchange.message)
        return result(exchange.id, {})

    # -- handshake and discovery ------------------------------------------------------------

    async def initialize(self, exchange: Exchange, route: Route) -> JSON:
        """Open the session's upstream channels and answer initialize."""
        session = exchange.session
        assert session is not None  # noqa: S101 - transport made the session
        results = await asyncio.gather(
            *(self._open(exchange, upstream) for upstream in route.upstreams),
            return_exceptions=True,
        )
        opened = [r for r in results if isinstance(r, dict)]
        for upstream, outcome in zip(route.upstreams, results, strict=True):
            if not isinstance(outcome, dict):
                log.warning("upstream %r did not initialize: %r", upstream, outcome)
        if not route.multiplex:
            if not opened:
                failure = results[0]
                if isinstance(failure, BastionError):
                    raise failure
                raise UpstreamError(f"upstream {route.upstreams[0]!r} did not initialize")
            body = dict(opened[0])
            body["protocolVersion"] = session.protocol_version
            return body
        body = {
            "protocolVersion": session.protocol_version,
            "capabilities": merge_capabilities([r.get("capabilities", {}) for r in opened]),
            "serverInfo": SERVER_INFO,
        }
        if route.instructions:
            body["instructions"] = route.instructions
        return body

    async def _open(self, exchange: Exchange, upstream: str) -> JSON:
        channel = await self.channel(exchange, upstream)
        headers, exchange.credential_id = await self._headers(
            exchange.principal, upstream, exchange.message
        )
        opened = await channel.open(headers)
        return opened if opened is not None else await self._discover_one(exchange, upstream)

    async def _discover_one(self, exchange: Exchange, upstream: str) -> JSON:
        message = {
            "jsonrpc": "2.0",
            "id": "discover",
            "method": "server/discover",
            "params": {"_meta": PROBE_META},
        }
        reply = await self.call_once(exchange, upstream, message)
        body = reply.get("result")
        if not isinstance(body, dict):
            raise UpstreamError(f"upstream {upstream!r} refused server/discover")
        return body

    async def discover(self, exchange: Exchange, route: Route) -> JSON:
        """Answer server/discover for the route (2026-07-28)."""
        results = await asyncio.gather(
            *(self._discover_one(exchange, upstream) for upstream in route.upstreams),
            return_exceptions=True,
        )
        found = [r for r in results if isinstance(r, dict)]
        body: JSON = {
            "resultType": "complete",
            "supportedVersions": list(SUPPORTED_VERSIONS),
            "capabilities": merge_capabilities([r.get("capabilities", {}) for r in found]),
            "_meta": {META_SERVER_INFO: SERVER_INFO},
            "ttlMs": 0,
            "cacheScope": "private",
        }
        if not route.multiplex and found:
            upstream_meta = _object(found[0].get("_meta"))
            if META_SERVER_INFO in upstream_meta:
                body["_meta"] = {META_SERVER_INFO: upstream_meta[META_SERVER_INFO]}
            instructions = found[0].get("instructions")
            if isinstance(instructions, str) and instructions:
                body["instructions"] = instructions
        elif route.instructions:
            body["instructions"] = route.instructions
        return body

    # -- server-initiated traffic -----------------------------------------------------------

    async def _listen(self, exchange: Exchange, route: Route) -> Answer:
        """subscriptions/listen: one client stream fed by every upstream's listen stream."""
        wanted = exchange.params.get("notifications") or {}
        if not isinstance(wanted, dict):
            raise InvalidParams("subscriptions/listen needs params.notifications as an object")
        per_upstream: dict[str, JSON] = {u: {} for u in route.upstreams}
        for flag in ("toolsListChanged", "promptsListChanged", "resourcesListChanged"):
            if wanted.get(flag) is True:
                for upstream in route.upstreams:
                    per_upstream[upstream][flag] = True
        for uri in wanted.get("resourceSubscriptions") or []:
            target = route.resolve_uri(uri) if isinstance(uri, str) else None
            if target is None:
                await self.refresh_index(exchange, route)
                target = route.resolve_uri(uri) if isinstance(uri, str) else None
            if target is not None:
                per_upstream[target.upstream].setdefault("resourceSubscriptions", []).append(uri)
        ack = {
            "jsonrpc": "2.0",
            "method": "notifications/subscriptions/acknowledged",
            "params": {"_meta": {META_SUBSCRIPTION: exchange.id}, "notifications": wanted},
        }
        wanted_by = {upstream: filt for upstream, filt in per_upstream.items() if filt}
        return Answer(ack, self._fan_in(exchange, wanted_by))

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
            answer = await self.call(exchange, upstream, message)
            try:
                await self._relay_notification(exchange, answer.first, queue)
                if answer.rest is not None:
                    async for reply in answer.rest:
                        await self._relay_notification(exchange, reply, queue)
            finally:
                await answer.close()
        except UpstreamError as exc:
            log.warning("listen stream of %r ended: %s", upstream, exc.message)

    async def _relay_notification(
        self, exchange: Exchange, reply: JSON, queue: asyncio.Queue[JSON]
    ) -> None:
        method = reply.get("method")
        if (
            isinstance(method, str)
            and method.startswith("notifications/")
            and method != "notifications/subscriptions/acknowledged"
        ):
            params = _object(reply.get("params"))
            params["_meta"] = {**_object(params.get("_meta")), META_SUBSCRIPTION: exchange.id}
            await queue.put({**reply, "params": params})

    def start_listening(self, session: ClientSession, route: Route) -> None:
        """Relay each upstream's own stream (legacy GET) into the session's standalone stream."""
        if session.listening:
            return
        session.listening = True
        for upstream in route.upstreams:
            session.spawn(self._pump_session(session, upstream))

    async def _pump_session(self, session: ClientSession, upstream: str) -> None:
        channel = session.channels.get(upstream)
        if channel is None:
            return
        headers = await self.credentials.headers(session.principal, upstream, "listen")
        stream = session.streams["0"]
        try:
            async for message in channel.listen(headers):
                if "method" in message and "id" in message:
                    message = session.map_server_request(upstream, message)
                stream.append(orjson.dumps(message))
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
        mapped = session.server_requests.pop(str(message.get("id")), None)
        if mapped is None:
            raise InvalidParams(f"no server request with id {shown(message.get('id'))} is pending")
        upstream, upstream_id = mapped
        channel = session.channels[upstream]
        headers = await self.credentials.headers(session.principal, upstream, "respond")
        await channel.send({**message, "id": upstream_id}, headers)

    async def notify(self, session: ClientSession, message: JSON) -> None:
        """Forward a client notification: cancellations to the upstream running the request,
        roots changes to every upstream of the session."""
        method = message.get("method")
        principal = session.principal

        async def headers_for(upstream: str) -> dict[str, str]:
            return await self.credentials.headers(principal, upstream, str(method))

        if method == "notifications/cancelled":
            request_id = (message.get("params") or {}).get("requestId")
            for upstream, channel in session.channels.items():
                upstream_id = channel.inflight.get(request_id)
                if upstream_id is not None:
                    params = {**message["params"], "requestId": upstream_id}
                    await channel.send({**message, "params": params}, await headers_for(upstream))
        elif method == "notifications/roots/list_changed":
            for upstream, channel in session.channels.items():
                with contextlib.suppress(BastionError):
                    await channel.send(message, await headers_for(upstream))


async def _guard(
    exchange: Exchange, rest: AsyncGenerator[JSON, None]
) -> AsyncGenerator[JSON, None]:
    """Whatever breaks in a streamed answer, the client still gets a response to its request."""
    try:
        async for message in rest:
            yield message
            if "method" not in message:
                return
        if exchange.method == "subscriptions/listen":
            return
        raise UpstreamError("the upstream's stream ended without a response")
    except BastionError as exc:
        yield error(exchange.id, exc)
    finally:
        await rest.aclose()


def _translate_result(reply: JSON, era: Era, upstream: str) -> JSON:
    """Carry a result across eras: stamp resultType for modern clients; refuse to hand a
    legacy session a multi-round-trip request it has no way to answer."""
    body = reply["result"]
    if not isinstance(body, dict):
        return reply
    if era is Era.MODERN:
        return {**reply, "result": {**body, "resultType": body.get("resultType", "complete")}}
    if body.get("resultType") == "input_required":
        exc = UpstreamError(
            f"upstream {upstream!r} asks for client input (2026-07-28 input_required), "
            "which a 2025-era session cannot answer; connect with protocol 2026-07-28"
        )
        return error(reply.get("id"), exc)
    return reply


def merge_capabilities(all_caps: list[JSON]) -> JSON:
    """Union of the upstreams' server capabilities; list changes always relayed."""
    merged: JSON = {}
    for caps in all_caps:
        if not isinstance(caps, dict):
            continue  # an upstream's odd capabilities add nothing
        for key, value in caps.items():
            if key in ("tools", "prompts", "resources", "logging", "completions") and isinstance(
                value, dict
            ):
                slot = merged.setdefault(key, {})
                for flag, on in value.items():
                    slot[flag] = bool(slot.get(flag)) or bool(on)
    for key in ("tools", "prompts", "resources"):
        if key in merged:
            merged[key]["listChanged"] = True
    return merged


def _items(body: JSON, key: str) -> list[JSON]:
    """The objects of a list result's array (whatever else an upstream put there is left out)."""
    items = body.get(key)
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _object(value: Any) -> JSON:
    """A copy of `value` when it is a JSON object, else an empty one."""
    return dict(value) if isinstance(value, dict) else {}


def _code(reply: JSON) -> Any:
    """The JSON-RPC error code of a reply, or None."""
    error = reply.get("error")
    return error.get("code") if isinstance(error, dict) else None


def _encode_cursor(cursors: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(cursors)).decode()


def _decode_cursor(cursor: Any, upstreams: tuple[str, ...]) -> dict[str, Any]:
    """{upstream: its cursor} to fetch next; no cursor means the first page of all."""
    if cursor is None:
        return dict.fromkeys(upstreams)
    try:
        cursors = orjson.loads(base64.urlsafe_b64decode(str(cursor)))
    except (ValueError, TypeError) as exc:
        raise InvalidParams(
            "invalid cursor: pass back the nextCursor of the previous page"
        ) from exc
    if not isinstance(cursors, dict) or not cursors or not set(cursors) <= set(upstreams):
        raise InvalidParams("invalid cursor: pass back the nextCursor of the previous page")
    return {u: cursors[u] for u in upstreams if u in cursors}


def negotiate(requested: Any) -> str:
    """The legacy protocol version to answer initialize with."""
    return requested if requested in LEGACY_VERSIONS else LEGACY_VERSIONS[0]
