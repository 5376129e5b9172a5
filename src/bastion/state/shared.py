"""Replay caches and rate counters every replica shares, in Redis (or Valkey).

```
RedisReplays        Replays port      SET id NX with expiry, and the store's epoch, in one script
RedisRateCounter    RateCounter port  the two-window sliding count, checked and counted in one
SharedStateService  the connection as a gateway service: asked at start, closed at stop
```

Each operation is one Lua script, which the server runs atomically: the same id presented to
two replicas at the same instant is accepted once, and N concurrent hits at a limit L from any
number of replicas count exactly L. Every failure is `StateUnavailable` (fail closed).

A Redis without persistence that restarts, or is flushed, forgets every id it remembered. So
the store keeps an epoch key, set to the time it was first found missing; a replica learns it
with every use and refuses ids made before it (`remembers_since`), as a restarted process
refuses what was made before it started.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import TYPE_CHECKING

from bastion.errors import StateUnavailable
from bastion.state.memory import SKEW_LEEWAY

if TYPE_CHECKING:  # the redis client is imported only when a gateway shares its state
    from bastion.state.redis import RedisState

__all__ = [
    "RedisRateCounter",
    "RedisReplays",
    "SharedStateService",
    "epoch_key",
]

# KEYS: epoch, id. ARGV: now, milliseconds to keep the id. Returns {1 if first use, epoch}.
_FIRST_USE = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
local fresh = 0
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then fresh = 1 end
return {fresh, epoch}
"""

# KEYS: this window's counter, the previous window's. ARGV: the share of the previous window
# still overlapping, the limit (negative: none), 'peek' or 'hit', milliseconds to keep a
# counter. Returns {1 if counted, the count before}.
_HIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
local count = current + math.ceil(previous * tonumber(ARGV[1]))
local limit = tonumber(ARGV[2])
if ARGV[3] == 'peek' or (limit >= 0 and count >= limit) then return {0, count} end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, count}
"""


def epoch_key(shared: RedisState) -> str:
    """The key holding when the store began remembering replay ids (seconds, as text)."""
    return shared.key("replay", "epoch")


def _digest(text: str) -> str:
    """A fixed-length key part for any id (ids and rate keys may be long, and client-made)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class RedisReplays:
    """A replay cache shared by every replica: `name` keeps its ids apart from the other
    caches' ("dpop", "assertion", "approval-state"); all share one epoch."""

    def __init__(self, shared: RedisState, name: str) -> None:
        self._shared = shared
        self._name = name
        self._epoch_key = epoch_key(shared)
        self._script = shared.script(_FIRST_USE)
        self._since = 0.0  # read by callers only after `first_use` answered, which sets it

    def remembers_since(self) -> float:
        """When the shared store began remembering ids, as of its last answer."""
        return self._since

    async def first_use(self, key: str, expires_at: float, now: float | None = None) -> bool:
        """True the first time any replica is shown `key`; False for a replay;
        `StateUnavailable` when Redis cannot answer."""
        now = time.time() if now is None else now
        # Relative, so the server's clock does not matter; kept the clock-skew leeway past
        # its expiry on this replica's clock, since a replica whose clock lags by up to that
        # accepts the id (by its iat) that much later.
        keep = math.ceil((expires_at - now + SKEW_LEEWAY) * 1000) + 1000
        keep = max(1000, keep)
        keys = [self._epoch_key, self._shared.key("replay", self._name, _digest(key))]
        found = await self._shared.run(
            f"check a {self._name} id for replay", self._script(keys=keys, args=[repr(now), keep])
        )
        fresh, epoch = found
        # Only ever later: an answer that raced a restart must not move it back.
        self._since = max(self._since, float(epoch))
        return bool(fresh)


class RedisRateCounter:
    """The `RateCounter` of every replica: one global limit, the memory adapter's semantics
    (the previous fixed window weighted by how much of it still overlaps)."""

    def __init__(self, shared: RedisState) -> None:
        self._shared = shared
        self._script = shared.script(_HIT)

    async def peek(self, key: str, window: float) -> int:
        """Events counted for `key` over the last `window` seconds."""
        return (await self._run(key, window, None, "peek"))[1]

    async def hit(self, key: str, window: float, limit: int | None = None) -> tuple[bool, int]:
        """Count one event unless that would pass `limit`; (counted, count before it)."""
        return await self._run(key, window, limit, "hit")

    async def _run(self, key: str, window: float, limit: int | None, mode: str) -> tuple[bool, int]:
        now = time.time()
        index = math.floor(now / window)
        overlap = 1.0 - (now - index * window) / window
        name = self._shared.key("rate", _digest(key), repr(window))
        keys = [f"{name}:{index}", f"{name}:{index - 1}"]
        args = [repr(overlap), -1 if limit is None else limit, mode, math.ceil(window * 2000)]
        counted, count = await self._shared.run(
            f"count a rate of {window:g} s", self._script(keys=keys, args=args)
        )
        return bool(counted), int(count)


class SharedStateService:
    """The Redis connection as one of the gateway's services: pinged when the gateway
    starts (a gateway that cannot reach its shared state does not serve), closed at stop."""

    def __init__(self, shared: RedisState) -> None:
        self._shared = shared

    async def start(self) -> None:
        """Raise `StateUnavailable` unless Redis answers; a store new to replay ids remembers
        from now (else the first ids after a deployment would predate a lazily set epoch)."""
        await self._shared.ping()
        await self._refuse_eviction()
        client = self._shared.client
        await self._shared.run(
            "mark when ids began to be remembered",
            client.set(epoch_key(self._shared), repr(time.time()), nx=True),
        )

    async def _refuse_eviction(self) -> None:
        """`StateUnavailable` for a Redis that evicts keys when memory runs short: it would
        forget used replay ids (a replay accepted), rate counters and sessions silently,
        while the epoch (no expiry) stays. `noeviction` refuses writes instead (fail closed)."""
        info = await self._shared.run("say its memory policy", self._shared.client.info("memory"))
        policy = str(info.get("maxmemory_policy", "noeviction"))
        capped = int(info.get("maxmemory", 0) or 0)
        if capped > 0 and policy != "noeviction":
            raise StateUnavailable(
                f"the shared state at {self._shared.where} may evict keys (maxmemory {capped} "
                f"with maxmemory-policy {policy[:32]}): it would forget used replay ids, rate "
                "counters and sessions; set maxmemory-policy noeviction (or maxmemory 0)"
            )

    async def stop(self, grace: float = 5.0) -> None:
        """Close the connections (`grace` is unused: nothing is left to flush)."""
        await self._shared.close()
