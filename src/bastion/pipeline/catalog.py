"""The catalog: what the upstreams offer, as the gateway itself lists them, and the policy
built over it — kept current by background work, read by the request path as snapshots.

```
PolicyLoader   tools and prompts of every upstream → the Cedar schema → the PolicyEngine
               (published whole; the authz stage reads `engine`). At start: list everything.
               In the background: reload edited policy files (`watch`), relist an upstream
               a request found missing or lacking a tool, save the listings to the state dir.
ResourceIndex  which upstream owns a resource URI a route has not seen: the route's
               resources and templates listed again in the background.
```

Every listing is made as the gateway (the catalog principal), never with a caller's
credential, and never by the request path: a request that needs one asks the background job
and waits for it within a deadline, so nothing reaches an upstream on a caller's behalf
before its decision.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bastion.background import Jobs, Refresher
from bastion.config import Settings
from bastion.errors import BastionError, PolicyLoadError, UpstreamTimeout
from bastion.methods import RESOURCES_LIST
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.policy.build import build_engine, fingerprint
from bastion.policy.catalog import Catalog, action_id
from bastion.policy.engine import PolicyEngine
from bastion.types import JSON, MODERN_VERSION, PROBE_META, Era, Principal

log = logging.getLogger("bastion.policy")

Lister = Callable[[str], Awaitable[JSON]]  # upstream → {"tools": [...], "prompts": [...]}
# Learns a route's resources and templates, asked as the exchange's principal.
RefreshIndex = Callable[[Exchange, Route], Awaitable[None]]

RETRY_LISTING_SECONDS = 5.0  # an upstream is listed again at most this often
INDEX_RETRY_SECONDS = 1.0  # a route's resource index is refreshed at most this often
_WAIT_MARGIN = 2.0  # beyond the listing's own limit: rebuilding the policy, saving it


class PolicyLoader:
    """Holds the running policy: loaded at start, then changed only by background work, each
    change a new engine swapped in whole (a failed rebuild keeps the running one)."""

    def __init__(
        self,
        settings: Settings,
        lister: Lister,
        jobs: Jobs,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.policy = settings.policy
        self._lister = lister
        self._jobs = jobs
        self._clock = clock
        self.engine: PolicyEngine | None = None
        self.problem: str | None = None  # why the last rebuild failed, while it stands
        self._print: tuple[tuple[str, int, int], ...] = ()
        self._listed_at: dict[str, float] = {}
        self._listings: dict[str, JSON] = {}  # replaced, never changed in place
        self._list_errors: dict[str, BastionError] = {}
        self._snapshot = Path(settings.state_dir) / "policy-catalog.json"
        self._rebuilding = asyncio.Lock()
        self.watch = Refresher("policy files", self._check_files, every=self.policy.reload_seconds)

    # -- start ---------------------------------------------------------------------------

    async def start(self, save: bool = True) -> None:
        """List every upstream's tools and prompts, then load the policy. An invalid policy
        raises PolicyLoadError (the gateway refuses to start). The listings are saved for
        `bastion policy` and for starting while an upstream is down (unless `save` is off)."""
        saved = self._read_snapshot()
        names = list(self.settings.upstreams)
        found = await asyncio.gather(*(self._list(n) for n in names), return_exceptions=True)
        listings: dict[str, JSON] = {}
        for name, listing in zip(names, found, strict=True):
            if isinstance(listing, dict):
                listings[name] = listing
                continue
            if isinstance(listing, BastionError):
                self._list_errors[name] = listing
            if name in saved:
                log.warning(
                    "upstream %r cannot be listed (%s); using its last saved listing", name, listing
                )
                listings[name] = saved[name]
            else:
                log.warning(
                    "upstream %r cannot be listed (%s); its tools are denied until it can",
                    name,
                    listing,
                )
        self._listings = listings
        self._print = fingerprint(self.policy)
        self.engine = build_engine(self.policy, self._catalog(listings))
        if save:
            self._write_snapshot(listings)
        log.info(
            "policy loaded: %d policies over %d tools",
            len(self.engine.docs),
            len(self.engine.schema.tool_actions),
        )

    async def _list(self, upstream: str) -> JSON:
        self._listed_at[upstream] = self._clock()
        limit = self.policy.catalog_timeout_seconds
        try:
            async with asyncio.timeout(limit):
                return await self._lister(upstream)
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream {upstream!r} did not list its tools within {limit} s"
            ) from None

    def _catalog(self, listings: dict[str, JSON]) -> Catalog:
        return Catalog.build(self.settings.upstreams, listings, self.settings.environment)

    def _read_snapshot(self) -> dict[str, JSON]:
        try:
            data = json.loads(self._snapshot.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_snapshot(self, listings: dict[str, JSON]) -> None:
        try:
            self._snapshot.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._snapshot.with_suffix(".tmp")
            tmp.write_text(json.dumps(listings, sort_keys=True), encoding="utf-8")
            tmp.replace(self._snapshot)
        except OSError as exc:
            log.warning("cannot save the tool catalog to %s: %s", self._snapshot, exc)

    # -- the request path: ask, never list -------------------------------------------------

    async def relist(self, upstream: str, tool: str | None = None) -> None:
        """Make sure the catalog holds `upstream` (and `tool`): when it lacks them (down at
        start, added since) and the last listing is older than 5 s, the background lists the
        upstream again and this waits for it. Raises the upstream's last listing failure when
        it still was never listed (nothing could be allowed on it)."""
        engine = self.engine
        if engine is None or upstream not in self.settings.upstreams:
            return
        if upstream in self._listings and (
            tool is None or action_id(upstream, tool) in engine.schema.tool_actions
        ):
            return
        if self._clock() >= self._listed_at.get(upstream, -math.inf) + RETRY_LISTING_SECONDS:
            wait = self.policy.catalog_timeout_seconds + _WAIT_MARGIN
            await self._jobs.ask(f"list:{upstream}", lambda: self._relist(upstream), wait)
        if upstream not in self._listings and upstream in self._list_errors:
            raise self._list_errors[upstream]

    # -- background work -----------------------------------------------------------------

    async def _relist(self, upstream: str) -> None:
        """List an upstream again (as the gateway); when its tools changed, rebuild the policy
        over them and save the listings. A policy that no longer validates keeps the old."""
        try:
            listing = await self._list(upstream)
        except Exception as exc:  # noqa: BLE001 - any failure: asked again later
            log.info("upstream %r cannot be listed: %s", upstream, exc)
            if isinstance(exc, BastionError):
                self._list_errors[upstream] = exc
            return
        self._list_errors.pop(upstream, None)
        async with self._rebuilding:
            engine = self.engine
            if engine is None or listing == self._listings.get(upstream):
                return
            listings = {**self._listings, upstream: listing}
            try:
                rebuilt = await asyncio.to_thread(
                    build_engine, self.policy, self._catalog(listings), engine.version + 1
                )
            except PolicyLoadError as exc:
                self.problem = exc.message
                log.error(
                    "policy invalid with %r's new tools, previous policy kept: %s",
                    upstream,
                    exc.message,
                )
                return
            self._listings, self.engine = listings, rebuilt
            log.info("upstream %r listed again: policy rebuilt over its tools", upstream)
            # Under the lock: two relistings never write the file at the same time.
            await asyncio.to_thread(self._write_snapshot, listings)

    async def _check_files(self) -> bool:
        """One round of `watch`: reload when a policy file changed (mtime or size)."""
        if self.engine is None:
            return False
        current = await asyncio.to_thread(fingerprint, self.policy)
        if current == self._print:
            return False
        self._print = current
        async with self._rebuilding:
            return await asyncio.to_thread(self.reload)

    def reload(self) -> bool:
        """Rebuild from the files (blocking: the watcher runs it in a worker thread); on
        failure keep the running policy and record why."""
        assert self.engine is not None  # noqa: S101 - started
        try:
            engine = build_engine(
                self.policy, self.engine.catalog, self.engine.version + 1, self.engine.schema
            )
        except PolicyLoadError as exc:
            self.problem = exc.message
            log.error("policy reload failed, the previous policy stays in force: %s", exc.message)
            return False
        self.engine = engine
        self.problem = None
        log.info("policy reloaded (version %d): %d policies", engine.version, len(engine.docs))
        return True


class ResourceIndex:
    """Learns, for a route, which upstream owns a resource URI it has not seen: the route's
    resources and templates listed again as the gateway, in the background.

    What it learns goes into the route's gateway-level view (tenant `bastion`): the
    upstreams' answer to the gateway itself, not any tenant's data. A tenant's request is
    routed by that tenant's own view first, then by this one; another tenant's listings never
    route it. Its one state, when each route was last indexed, is gateway-level too."""

    def __init__(
        self, settings: Settings, jobs: Jobs, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = settings.policy.catalog_timeout_seconds
        self._jobs = jobs
        self._clock = clock
        self._indexed_at: dict[str, float] = {}

    async def learn(self, route: Route, principal: Principal, refresh: RefreshIndex) -> None:
        """Have the background list the route's resources and templates as `principal` (the
        gateway's catalog principal) and wait for it, at most `catalog_timeout_seconds`. At
        most once a second per route: a client cannot make the gateway list every upstream
        for each made-up URI it sends."""
        if self._clock() < self._indexed_at.get(route.name, -math.inf) + INDEX_RETRY_SECONDS:
            return
        work = lambda: self._index(route, principal, refresh)  # noqa: E731 - one call's job
        await self._jobs.ask(f"index:{route.name}", work, self._limit + _WAIT_MARGIN)

    async def _index(self, route: Route, principal: Principal, refresh: RefreshIndex) -> None:
        self._indexed_at[route.name] = self._clock()
        message = {
            "jsonrpc": "2.0",
            "id": "index",
            "method": RESOURCES_LIST,
            "params": {"_meta": PROBE_META},
        }
        exchange = Exchange(message, Era.MODERN, MODERN_VERSION, "catalog", "", principal)
        try:
            async with asyncio.timeout(self._limit):
                await refresh(exchange, route)
        except TimeoutError:
            log.warning(
                "route %r: its upstreams did not list their resources within %s s",
                route.name,
                self._limit,
            )
