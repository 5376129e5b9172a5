"""Trusted external issuers' keys: fetched in the background, read with no I/O.

```
IssuerDirectory ─► one Refresher per trusted issuer (`watches`): discovery (OIDC, then
                   RFC 8414) and the JWKS, every REFRESH_SECONDS (every MIN_REFETCH_SECONDS
                   while failing) and whenever a token names a kid it does not know
               ─► an immutable KeySet per issuer, which `keys` returns without I/O
```

A token whose `kid` is not in the published keys asks that issuer's watcher for a fetch and
waits for it, bounded (`keys(..., refresh=True)`); the watcher fetches at most once every
`MIN_REFETCH_SECONDS` however many ask, so a flood of tokens with made-up kids costs the
issuer one request per window, and the request never fetches anything itself.

An issuer that cannot be reached keeps its last good keys for `KEEP_SECONDS` after they were
last fetched. Beyond that (or before a first fetch succeeded) its tokens are refused with 503
and Retry-After, not 401: the token may be perfectly valid — it is the gateway that cannot
check it, and a 401 would send clients to get new tokens from the same issuer in vain. Keys
are not kept longer because an unreachable issuer is also how a key the issuer withdrew (a
leaked one) would stay trusted: whoever blocks the gateway's way to the issuer keeps it alive.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from bastion.background import Refresher
from bastion.config import TrustedIssuer
from bastion.errors import IssuerUnavailable, TokenError, WireError, shown
from bastion.identity.keys import KeySet
from bastion.wire import Pool

# A discovery document or key set larger than this is refused: a hostile issuer does not get
# to fill the gateway's memory (real JWKS are a few KiB).
_MAX_DOCUMENT = 1 << 20

__all__ = [
    "KEEP_SECONDS",
    "MIN_REFETCH_SECONDS",
    "REFRESH_SECONDS",
    "IssuerDirectory",
]

log = logging.getLogger("bastion.issuers")

# Keys are fetched again this often, so that a rotation at the issuer (a key added, a key
# withdrawn) is in force here within about this long even when no token asks.
REFRESH_SECONDS = 300.0
# At most one fetch per issuer this often, whoever asks (tokens with unknown kids, a failing
# issuer being retried): the issuer sees a bounded rate of requests from each gateway.
MIN_REFETCH_SECONDS = 30.0
# The last good keys of an issuer that cannot be reached are used this long after they were
# fetched (three missed refreshes), then its tokens are refused (503).
KEEP_SECONDS = 900.0
_TIMEOUT = 5.0  # one whole fetch (discovery and JWKS)
_GAP = 0.05  # between two rounds of a watcher: a flood of asks costs a round per gap at most


@dataclass(frozen=True)
class _Fetched:
    """One issuer's keys as last fetched: replaced whole, never changed."""

    keys: KeySet
    at: float  # clock time of the fetch


class _FetchFailed(Exception):
    """An issuer's discovery document or JWKS could not be had (logged by the watcher)."""


class IssuerDirectory:
    """The key sets of trusted issuers, kept current by background watchers (`watches`)."""

    def __init__(
        self,
        issuers: Iterable[TrustedIssuer] = (),
        *,
        every: float = REFRESH_SECONDS,
        min_refetch: float = MIN_REFETCH_SECONDS,
        keep: float = KEEP_SECONDS,
        timeout: float = _TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issuers = {t.issuer: t for t in issuers}
        self._every = every
        self._min_refetch = min_refetch
        self._keep = keep
        self._timeout = timeout
        self._clock = clock
        self._fetched: dict[str, _Fetched] = {}
        self._attempted: dict[str, float] = {}
        self._asked: set[str] = set()
        self._jwks_uri: dict[str, str] = {}
        # Each watcher turns as often as a failing issuer may be retried; a round fetches
        # only when it is due (see `_round`).
        self.watches = {
            name: Refresher(
                f"issuer keys {name}", self._rounds_of(name), every=min_refetch, gap=_GAP
            )
            for name in self._issuers
        }
        self.fetches = 0  # fetches attempted, for tests and metrics

    def background(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        """The watchers, for the gateway's `Background` to own."""
        return [(watch.name, watch.run) for watch in self.watches.values()]

    async def keys(self, issuer: str, refresh: bool = False) -> KeySet:
        """The issuer's published keys, read with no I/O. When there are none usable (none
        fetched yet, or too old), or when `refresh` (a token names a kid not in them), the
        issuer's watcher is asked for a fetch first and waited for, at most a few seconds; it
        fetches at most once every `min_refetch` seconds whoever asks. Raises IssuerUnavailable
        (503) when there are no keys, or only keys older than `keep` seconds (the issuer
        cannot be reached)."""
        watch = self.watches.get(issuer)
        if watch is not None and (refresh or not self._fresh(issuer)):
            self._asked.add(issuer)
            await watch.ask(self._timeout + 1.0)
        return self._usable(issuer)

    def _fresh(self, issuer: str) -> bool:
        fetched = self._fetched.get(issuer)
        return fetched is not None and self._clock() - fetched.at <= self._keep

    def _usable(self, issuer: str) -> KeySet:
        fetched = self._fetched.get(issuer)
        if fetched is None:
            raise IssuerUnavailable(
                f"the keys of trusted issuer {shown(issuer)} could not be fetched yet; "
                "its tokens cannot be checked (retry later)",
            )
        age = self._clock() - fetched.at
        if age > self._keep:
            raise IssuerUnavailable(
                f"the keys of trusted issuer {shown(issuer)} were last fetched {age:.0f} s ago "
                f"(used at most {self._keep:g} s); its tokens are refused until it can be "
                "reached (retry later)",
            )
        return fetched.keys

    def _rounds_of(self, issuer: str) -> Callable[[], Coroutine[Any, Any, bool]]:
        async def round_() -> bool:
            return await self._round(issuer)

        return round_

    async def _round(self, issuer: str) -> bool:
        """One turn of an issuer's watcher: fetch when asked, when failing or when the keys
        are due for a refresh — but never twice within `min_refetch` seconds."""
        now = self._clock()
        asked = issuer in self._asked
        self._asked.discard(issuer)
        if now - self._attempted.get(issuer, -math.inf) < self._min_refetch:
            return False  # however many tokens asked
        fetched = self._fetched.get(issuer)
        last = self._attempted.get(issuer, -math.inf)
        due = (
            asked
            or fetched is None
            or last > fetched.at  # the last fetch failed: retried every `min_refetch`
            or now - fetched.at >= self._every
        )
        if not due:
            return False
        self._attempted[issuer] = now
        self.fetches += 1
        keys = await self._fetch(self._issuers[issuer])
        self._fetched[issuer] = _Fetched(keys, self._clock())
        return True

    async def _fetch(self, issuer: TrustedIssuer) -> KeySet:
        try:
            async with asyncio.timeout(self._timeout):
                jwks_uri = issuer.jwks_uri or self._jwks_uri.get(issuer.issuer)
                if jwks_uri is None:
                    jwks_uri = await self._discover(issuer.issuer)
                    self._jwks_uri[issuer.issuer] = jwks_uri
                try:
                    document = await self._get_json(jwks_uri)
                except _FetchFailed:
                    self._jwks_uri.pop(issuer.issuer, None)  # discover again next time
                    raise
        except TimeoutError as exc:
            raise _FetchFailed(f"no answer within {self._timeout:g} s") from exc
        try:
            keys = KeySet.from_jwks(document)
        except (TokenError, ValueError, TypeError, KeyError) as exc:
            raise _FetchFailed(f"{jwks_uri} is not a usable JWKS: {exc}") from exc
        log.info("fetched %d keys of issuer %s", len(keys), issuer.issuer)
        return keys

    async def _discover(self, issuer: str) -> str:
        base = issuer.rstrip("/")
        parts = urlsplit(base)
        candidates = [
            f"{base}/.well-known/openid-configuration",
            f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}",
        ]
        for url in candidates:
            try:
                metadata = await self._get_json(url)
            except _FetchFailed:
                continue
            if metadata.get("issuer") != issuer:
                raise _FetchFailed(f"{url} describes another issuer")
            jwks_uri = metadata.get("jwks_uri")
            if isinstance(jwks_uri, str):
                return jwks_uri
        raise _FetchFailed(f"no discovery document with a jwks_uri for {issuer}")

    async def _get_json(self, url: str) -> dict[str, object]:
        parts = urlsplit(url)
        pool = Pool(url, 1, self._timeout, self._timeout)
        try:
            response = await pool.request("GET", {"Accept": "application/json"})
            async with response:
                body = await response.read(_MAX_DOCUMENT)
        except (OSError, WireError) as exc:
            raise _FetchFailed(f"cannot reach {parts.netloc}: {exc}") from exc
        finally:
            pool.close()
        if response.status != 200:
            raise _FetchFailed(f"{url} answered HTTP {response.status}")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _FetchFailed(f"{url} did not answer JSON") from exc
        if not isinstance(document, dict):
            raise _FetchFailed(f"{url} did not answer a JSON object")
        return document
