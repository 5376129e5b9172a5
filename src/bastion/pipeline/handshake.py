"""The handshake: `initialize` for a legacy session (its upstream channels opened, their
capabilities merged) and `server/discover` for 2026-07-28, answered for the whole route.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bastion.errors import BastionError, UpstreamError
from bastion.methods import SERVER_DISCOVER
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.pipeline.upstream import Caller, json_object
from bastion.types import JSON, LEGACY_VERSIONS, META_SERVER_INFO, PROBE_META, SUPPORTED_VERSIONS

log = logging.getLogger("bastion.dispatch")

SERVER_INFO = {"name": "bastion", "title": "Bastion MCP gateway", "version": "0.1.0"}
_MERGED_CAPABILITIES = ("tools", "prompts", "resources", "logging", "completions")
_LIST_CAPABILITIES = ("tools", "prompts", "resources")


class Handshake:
    """Answers initialize and server/discover for a route."""

    def __init__(self, caller: Caller) -> None:
        self._caller = caller

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
        opened = await self._caller.open(exchange, upstream)
        return opened if opened is not None else await self._discover_one(exchange, upstream)

    async def _discover_one(self, exchange: Exchange, upstream: str) -> JSON:
        message = {
            "jsonrpc": "2.0",
            "id": "discover",
            "method": SERVER_DISCOVER,
            "params": {"_meta": PROBE_META},
        }
        reply = await self._caller.call_once(exchange, upstream, message)
        body = reply.get("result")
        if not isinstance(body, dict):
            raise UpstreamError(f"upstream {upstream!r} refused {SERVER_DISCOVER}")
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
            upstream_meta = json_object(found[0].get("_meta"))
            if META_SERVER_INFO in upstream_meta:
                body["_meta"] = {META_SERVER_INFO: upstream_meta[META_SERVER_INFO]}
            instructions = found[0].get("instructions")
            if isinstance(instructions, str) and instructions:
                body["instructions"] = instructions
        elif route.instructions:
            body["instructions"] = route.instructions
        return body


def merge_capabilities(all_caps: list[JSON]) -> JSON:
    """Union of the upstreams' server capabilities; list changes always relayed."""
    merged: JSON = {}
    for caps in all_caps:
        if not isinstance(caps, dict):
            continue  # an upstream's odd capabilities add nothing
        for key, value in caps.items():
            if key in _MERGED_CAPABILITIES and isinstance(value, dict):
                slot = merged.setdefault(key, {})
                for flag, on in value.items():
                    slot[flag] = bool(slot.get(flag)) or bool(on)
    for key in _LIST_CAPABILITIES:
        if key in merged:
            merged[key]["listChanged"] = True
    return merged


def negotiate(requested: Any) -> str:
    """The legacy protocol version to answer initialize with."""
    return requested if requested in LEGACY_VERSIONS else LEGACY_VERSIONS[0]
