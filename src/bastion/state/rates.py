"""The rate counter port, and its in-memory adapter.

Counters are sliding windows approximated by two fixed windows (the previous one weighted by
how much of it still overlaps, rounded up): memory per key is two integers, a burst at a
window edge cannot double the limit, and calls made in a quick run across an edge are never
let through one more time than the limit. `bastion.state.shared.RedisRateCounter`
implements the same two calls for every replica at once.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Protocol


class RateCounter(Protocol):
    """Counts events per key over a window."""

    async def peek(self, key: str, window: float) -> int:
        """Events counted for `key` over the last `window` seconds."""
        ...

    async def hit(self, key: str, window: float, limit: int | None = None) -> tuple[bool, int]:
        """Count one event unless that would pass `limit`; (counted, count before it)."""
        ...


class MemoryRateCounter:
    """Per-process counters, bounded in number of keys (least recently used go first)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        # key → (window start, count in it, count in the previous window)
        self._keys: OrderedDict[str, tuple[float, int, int]] = OrderedDict()
        self._max = max_keys

    def _state(self, key: str, window: float, now: float) -> tuple[float, int, int]:
        start = math.floor(now / window) * window
        found = self._keys.get(key)
        if found is None:
            return start, 0, 0
        old_start, current, previous = found
        if old_start == start:
            return start, current, previous
        if old_start == start - window:
            return start, 0, current
        return start, 0, 0

    def _count(self, state: tuple[float, int, int], window: float, now: float) -> int:
        start, current, previous = state
        overlap = 1.0 - (now - start) / window
        return current + math.ceil(previous * overlap)

    async def peek(self, key: str, window: float) -> int:
        """Events counted for `key` over the last `window` seconds."""
        now = time.time()
        return self._count(self._state(key, window, now), window, now)

    async def hit(self, key: str, window: float, limit: int | None = None) -> tuple[bool, int]:
        """Count one event unless that would pass `limit`; (counted, count before it)."""
        now = time.time()
        state = self._state(key, window, now)
        count = self._count(state, window, now)
        if limit is not None and count >= limit:
            self._keys[key] = state
            return False, count
        start, current, previous = state
        self._keys[key] = (start, current + 1, previous)
        self._keys.move_to_end(key)
        if len(self._keys) > self._max:
            self._keys.popitem(last=False)
        return True, count
