"""In-memory state for one process: replay caches and TTL-bounded caches.

```
Replays (port)        first_use · remembers_since: a replay cache, here or shared
├── ReplayCache       this process's (below)
└── RedisReplays      every replica's (`bastion.state.shared`)
```
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from bastion.errors import Overloaded

__all__ = [
    "SKEW_LEEWAY",
    "ReplayCache",
    "Replays",
    "TtlCache",
]

V = TypeVar("V")
# Seconds of clock skew allowed around a process start (the DPoP and assertion leeway).
SKEW_LEEWAY = 5.0


class Replays(Protocol):
    """The replay port: ids (DPoP proof and assertion `jti`s, approval-state nonces) used at
    most once within their lifetime, and since when the ids are remembered at all."""

    async def first_use(self, key: str, expires_at: float, now: float | None = None) -> bool:
        """True the first time `key` is presented; False for a replay. Raises `Overloaded`
        (full) or `StateUnavailable` (a shared store that cannot answer): never a guess."""
        ...

    def remembers_since(self) -> float:
        """Ids made before this time may have been used while they were not remembered (a
        restart, a flushed store): callers refuse them. Current as of the last `first_use`."""
        ...


class ReplayCache:
    """Remembers ids (assertion and DPoP `jti`s, approval states) until they expire, and
    refuses a second use.

    Bounded, and failing closed: an id is dropped only once it has expired (after that its
    token or proof is refused anyway). When the cache is full of live ids, `first_use` raises
    `Overloaded` instead of forgetting one, because a forgotten id could be replayed. Ids are
    kept as their 64-bit string hash (keyed per process): about 165 bytes an entry, 165 MB at
    the default bound of a million. A collision (odds about 3e-8 when full) refuses a fresh
    id as a replay, never the reverse.
    """

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self._seen: OrderedDict[int, float] = OrderedDict()
        self._max = max_entries
        # Empty at start: what was made before (beyond the clock-skew leeway) may have been
        # used with a previous process, so it is refused.
        self._since = time.time() - SKEW_LEEWAY

    def remembers_since(self) -> float:
        """This process's start, less the clock-skew leeway."""
        return self._since

    async def first_use(self, key: str, expires_at: float, now: float | None = None) -> bool:
        """True the first time `key` is presented; False for a replay. Raises `Overloaded`
        when the cache is full of ids that have not expired."""
        now = time.time() if now is None else now
        self._evict(now)
        digest = hash(key)
        if digest in self._seen:
            return False
        if len(self._seen) >= self._max:
            raise Overloaded(
                f"the replay cache holds {self._max} unexpired ids; retry in a few seconds"
            )
        self._seen[digest] = expires_at
        return True

    def _evict(self, now: float) -> None:
        # Entries are appended in arrival order and lifetimes are short and similar, so
        # expired ones collect at the front; one with a longer life there only delays the
        # eviction of those behind it.
        while self._seen:
            digest, expires = next(iter(self._seen.items()))
            if expires >= now:  # still live at its expiry instant, as the checks are
                break
            del self._seen[digest]

    def __len__(self) -> int:
        return len(self._seen)


class TtlCache(Generic[V]):
    """A bounded map whose entries expire at their own time (least recently added first)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._max = max_entries

    def get(self, key: str, now: float) -> V | None:
        """The value, unless absent or expired."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[key]
            return None
        return item[1]

    def put(self, key: str, value: V, expires_at: float) -> None:
        """Keep a value until `expires_at`."""
        self._items[key] = (expires_at, value)
        self._items.move_to_end(key)
        if len(self._items) > self._max:
            self._items.popitem(last=False)

    def drop_where(self, test: Callable[[str], bool]) -> int:
        """Forget the entries whose key passes `test` (an offboarded agent's); say how many."""
        doomed = [key for key in self._items if test(key)]
        for key in doomed:
            del self._items[key]
        return len(doomed)

    def __len__(self) -> int:
        return len(self._items)
