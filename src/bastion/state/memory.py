"""In-memory state for one process: replay caches and TTL-bounded caches."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class ReplayCache:
    """Remembers ids (assertion and DPoP `jti`s) until they expire; refuses a second use.

    Bounded: when full, the entries closest to expiry go first, and an id is never kept past
    the moment its token would be refused anyway.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._max = max_entries

    def first_use(self, key: str, expires_at: float, now: float | None = None) -> bool:
        """True the first time `key` is presented; False for a replay."""
        now = time.time() if now is None else now
        self._evict(now)
        if key in self._seen:
            return False
        self._seen[key] = expires_at
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return True

    def _evict(self, now: float) -> None:
        # Entries are appended in arrival order and lifetimes are short and similar, so
        # expired ones collect at the front.
        while self._seen:
            key, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[key]

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
