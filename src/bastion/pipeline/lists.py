"""Lists: one upstream's page as policy lets the caller see it, or every upstream's page of a
virtual server fetched at once and merged under one cursor; and what the route learns from
them (which upstream owns which resource URI and template).

An upstream listing a URI or template another upstream of the route owns (the first to list
it) is claiming it: the item is left out of the merged list, never learnt nor routed to the
claimant, and alerted once per route, claimant and item (rule `uri_claim`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from bastion.audit import digest
from bastion.audit.detect import Alert
from bastion.config import RESERVED_TENANT
from bastion.errors import BastionError, InvalidParams, MethodNotFound, UpstreamError
from bastion.inspect.pins import Kind
from bastion.inspect.trust import Screen
from bastion.methods import (
    PROMPTS_LIST,
    RESOURCES_LIST,
    RESOURCES_TEMPLATES_LIST,
    TOOLS_LIST,
    list_keys,
)
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Claim, Route
from bastion.pipeline.upstream import Caller, json_object
from bastion.rpc import result
from bastion.types import JSON, MODERN_VERSION, PROBE_META, Era, Principal
from bastion.upstream.base import refusal

log = logging.getLogger("bastion.dispatch")

_MAX_INDEX_PAGES = 20
# The `_meta` member of a merged list naming the upstreams whose items it lacks, and why.
META_UNAVAILABLE = "bastion/unavailable"

# Policy's view of a list page: (exchange, upstream, method, items) → the visible items.
Visible = Callable[[Exchange, str, str, list[JSON]], list[JSON]]


class Lists:
    """Answers list requests, and lists upstreams for policy and for the route's index."""

    def __init__(self, caller: Caller) -> None:
        self._caller = caller
        self.visible: Visible | None = None
        # Makes sure policy's catalog holds an upstream (listing it again when it was down at
        # start); raises the listing's error when it still cannot. Without it in the catalog,
        # `visible` shows none of the upstream's items.
        self.catalogued: Callable[[str], Awaitable[None]] | None = None
        # Raises an alert (the pipeline's trail): an upstream claimed another's URI.
        self.claimed: Callable[[Alert], Awaitable[None]] | None = None
        # Pins, poisoning and shadowing (set by the pipeline): withholds what an upstream
        # declares until it may be shown; None shows everything (unit tests only).
        self.screen: Screen | None = None

    async def listing(self, upstream: str, principal: Principal) -> JSON:
        """Every tool and prompt of an upstream, asked as the gateway itself (for policy)."""
        out: JSON = {}
        for method in (TOOLS_LIST, PROMPTS_LIST):
            key, _ = list_keys(method)
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
                reply = await self._caller.call_once(exchange, upstream, message)
                body = reply.get("result")
                if not isinstance(body, dict):
                    if method == PROMPTS_LIST:  # a server without prompts may refuse the method
                        break
                    raise UpstreamError(f"upstream {upstream!r} refused {method}: {refusal(reply)}")
                items.extend(_items(body, key))
                cursor = body.get("nextCursor")
                if cursor is None:
                    break
            if self.screen is not None:  # seen as the gateway: pinned on first sight
                self.screen.observe(upstream, _KINDS[method], items)
            out[key] = items
        return out

    async def answer(self, exchange: Exchange, route: Route) -> JSON:
        """A list request. On a virtual server every upstream's page is fetched at once and
        merged; the cursor carries each upstream's own cursor for those with more pages. An
        upstream that cannot be listed is named under `_meta` (never a silent partial list)."""
        key, _ = list_keys(exchange.method)
        if not route.multiplex:
            return await self._list_one(exchange, route)
        cursors = _decode_cursor(exchange.params.get("cursor"), route.upstreams)
        listed: dict[str, list[JSON]] = {}  # each upstream's items as it listed them
        pages = await asyncio.gather(
            *(
                self._page(exchange, route, upstream, cursor, listed)
                for upstream, cursor in cursors.items()
            )
        )
        # Learnt in the route's order, not as the pages arrived: the first to list a URI owns
        # it, and an upstream that answers faster must not become "first".
        claimed = {
            u: await self._learn(exchange, route, u, listed[u]) for u in cursors if u in listed
        }
        merged: JSON = {key: []}
        following: dict[str, Any] = {}
        missing: list[JSON] = []
        for upstream, (page, why) in zip(cursors, pages, strict=True):
            if page is None:
                missing.append({"upstream": upstream, "reason": why})
                continue
            merged[key].extend(_unclaimed(page[key], claimed.get(upstream, set())))
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
        key, _ = list_keys(exchange.method)
        upstream = route.upstreams[0]
        if self.screen is not None:  # a quarantined upstream is not even asked
            quarantined = self.screen.refusal(route.upstreams, False, upstream, None, "")
            if quarantined is not None:
                raise quarantined
        reply = await self._caller.call_once(exchange, upstream, exchange.message)
        if "result" not in reply:
            return reply  # the upstream's error, relayed
        body = reply["result"]
        if not isinstance(body, dict):
            raise UpstreamError(
                f"upstream {upstream!r} answered {exchange.method} with a result that is not "
                "an object"
            )
        items = self._screened(route, upstream, exchange.method, _items(body, key))
        await self._learn(exchange, route, upstream, items)
        page: JSON = {**body, key: items}
        if self.visible is not None:
            why = await self._uncatalogued(upstream)
            if why is None:
                page[key] = self.visible(exchange, upstream, exchange.method, items)
            else:
                page[key] = []
                page["_meta"] = {
                    **json_object(body.get("_meta")),
                    META_UNAVAILABLE: [{"upstream": upstream, "reason": why}],
                }
        return {**reply, "result": page}

    async def _page(
        self,
        exchange: Exchange,
        route: Route,
        upstream: str,
        cursor: Any,
        listed: dict[str, list[JSON]],
    ) -> tuple[JSON | None, str]:
        """One upstream's page of a merged list, or None and why it is missing; its items as
        listed go into `listed` (the route learns them once every page is in)."""
        key, item_key = list_keys(exchange.method)
        if self.screen is not None:  # a quarantined upstream is not even asked
            quarantined = self.screen.refusal(route.upstreams, True, upstream, None, "")
            if quarantined is not None:
                return None, quarantined.message
        params = {k: v for k, v in exchange.params.items() if k != "cursor"}
        if cursor is not None:
            params["cursor"] = cursor
        message = {**exchange.message, "params": params}
        try:
            reply = await self._caller.call_once(exchange, upstream, message)
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
        items = self._screened(route, upstream, exchange.method, _items(body, key))
        listed[upstream] = items
        if self.visible is not None:
            hidden = await self._uncatalogued(upstream)
            if hidden is not None:
                return None, hidden
            items = self.visible(exchange, upstream, exchange.method, items)
        if item_key == "name":  # tools and prompts: exposed under the route's names
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

    def _screened(self, route: Route, upstream: str, method: str, items: list[JSON]) -> list[JSON]:
        """The items of a tools, prompts or templates page the screen lets clients see
        (changed definitions, poisoned ones and shadowing names withheld per config)."""
        kind = _KINDS.get(method)
        if self.screen is None or kind is None:
            return items
        return self.screen.items(route.upstreams, route.multiplex, upstream, kind, items)

    async def _learn(
        self,
        exchange: Exchange,
        route: Route,
        upstream: str,
        items: list[JSON],
        method: str | None = None,
    ) -> set[str]:
        """What a resource or template page tells the route about who owns which URIs, in
        the view of the exchange's tenant (the catalog principal's is the gateway's own).
        Returns the URIs and templates the upstream claimed from another (refused), each
        claim alerted the first time."""
        method = method or exchange.method
        tenant = exchange.principal.tenant if exchange.principal else RESERVED_TENANT
        if method == RESOURCES_LIST:
            claims = route.learn_resources(upstream, items, tenant)
        elif method == RESOURCES_TEMPLATES_LIST:
            claims = route.learn_templates(upstream, items, tenant)
        else:
            return set()
        for claim in claims:
            if claim.first and self.claimed is not None:
                await self.claimed(_claim_alert(exchange, route, claim))
        return {claim.value for claim in claims}

    async def refresh_index(self, exchange: Exchange, route: Route) -> None:
        """Learn every upstream's resources and templates (bounded number of pages)."""
        for upstream in route.upstreams:
            for method in (RESOURCES_LIST, RESOURCES_TEMPLATES_LIST):
                await self._index(exchange, route, upstream, method)

    async def _index(self, exchange: Exchange, route: Route, upstream: str, method: str) -> None:
        key, _ = list_keys(method)
        cursor = None
        for page in range(_MAX_INDEX_PAGES):
            params: JSON = dict(
                exchange.params.get("_meta") and {"_meta": exchange.params["_meta"]} or {}
            )
            if cursor is not None:
                params["cursor"] = cursor
            message = {"jsonrpc": "2.0", "id": f"index-{page}", "method": method, "params": params}
            try:
                reply = await self._caller.call_once(exchange, upstream, message)
            except UpstreamError:
                return
            body = reply.get("result")
            if not isinstance(body, dict):
                return
            await self._learn(exchange, route, upstream, _items(body, key), method)
            cursor = body.get("nextCursor")
            if cursor is None:
                return


def _claim_alert(exchange: Exchange, route: Route, claim: Claim) -> Alert:
    """The alert against an upstream that listed another upstream's URI or template: it
    names both upstreams and a digest of the item (the URI itself may be a tenant's data)."""
    principal = exchange.principal
    return Alert(
        rule="uri_claim",
        severity="high",
        tenant=principal.tenant if principal else None,
        agent=principal.agent if principal else "",
        message=(
            f"upstream {claim.claimant!r} listed a resource {claim.kind} that upstream "
            f"{claim.owner!r} owns on route {route.name!r}: refused, never routed to it"
        ),
        request_id=exchange.request_id,
        time=time.time(),
        facts={
            "upstream": claim.claimant,
            "owner": claim.owner,
            "route": route.name,
            "kind": claim.kind,
            "item_digest": digest(claim.value),
        },
        suspend=False,
    )


def _unclaimed(items: list[JSON], claimed: set[str]) -> list[JSON]:
    """A page without the items its upstream claimed from another."""
    if not claimed:
        return items
    return [i for i in items if i.get("uri", i.get("uriTemplate")) not in claimed]


# What a list method lists, as the pins name it.
_KINDS: dict[str, Kind] = {
    TOOLS_LIST: "tool",
    PROMPTS_LIST: "prompt",
    RESOURCES_TEMPLATES_LIST: "template",
}


def _items(body: JSON, key: str) -> list[JSON]:
    """The objects of a list result's array (whatever else an upstream put there is left out)."""
    items = body.get(key)
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


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
