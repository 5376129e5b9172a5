"""Pending approvals every replica shares, in Redis: a call held on one replica is listed,
approved or denied through any other, and released where it waits.

```
<prefix>approval:<id>        hash {item: JSON, status}; expires when no longer worth keeping
<prefix>approvals            sorted set: every kept id by creation time (listing)
<prefix>approvals:pending    sorted set: pending ids by expiry (the bound)
```

Adding checks the bound and closing is a compare-and-set on `status`, each one Lua script
the server runs atomically: a full store refuses new holds (`Overloaded`), and of two
approvers deciding at once on two replicas exactly one wins. A call held on replica A learns
of a decision made on A at once, and of one made on B within `POLL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from bastion.errors import Overloaded
from bastion.state.approvals import (
    Decided,
    PendingApproval,
    Requester,
    Status,
)

if TYPE_CHECKING:  # the redis client is imported only when a gateway shares its state
    from bastion.state.redis import RedisState

__all__ = [
    "POLL_SECONDS",
    "RedisPendingApprovals",
]

POLL_SECONDS = 0.25  # how soon a held call sees a decision made on another replica
_KEEP_CLOSED_SECONDS = 3600.0  # a decided item stays listable this long (as in memory)
_STALE_SECONDS = 60.0  # past its expiry, a pending item nobody waits on is closed
_FORGET_SECONDS = 7 * 86400.0  # an index entry this old is dropped whatever became of it

# KEYS: item, all, pending. ARGV: id, JSON, created, expires, bound, stale before, keep ms,
# forget before. Returns 1 when added, 0 when full.
_ADD = """
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[8])
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', KEYS[1], 'item', ARGV[2], 'status', 'pending')
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 1
"""

# KEYS: item, pending. ARGV: id, status, JSON, keep ms. Returns 1 when this call closed it.
_CLOSE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'item', ARGV[3], 'status', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


def _encode(item: PendingApproval) -> bytes:
    return orjson.dumps(dataclasses.asdict(item))


def _decode(raw: bytes | str) -> PendingApproval:
    data: dict[str, Any] = orjson.loads(raw)
    decided = data["decision"]
    return PendingApproval(
        **{
            **data,
            "requester": Requester(**data["requester"]),
            "approvers": tuple(data["approvers"]),
            "decision": None
            if decided is None
            else Decided(**{**decided, "roles": tuple(decided["roles"])}),
        }
    )


def _ms(seconds: float) -> int:
    return max(1000, math.ceil(seconds * 1000))


class RedisPendingApprovals:
    """The `PendingApprovals` of every replica, bounded like the memory one: at most
    `max_items` pending at once across the fleet."""

    def __init__(
        self, shared: RedisState, max_items: int = 1000, clock: Callable[[], float] = time.time
    ) -> None:
        self._shared = shared
        self._max = max_items
        self._clock = clock
        self._all = shared.key("approvals")
        self._pending = shared.key("approvals", "pending")
        self._add = shared.script(_ADD)
        self._close = shared.script(_CLOSE)
        # Decisions made through this replica wake its own waiters at once.
        self._changed: dict[str, asyncio.Event] = {}

    def _item(self, approval_id: str) -> str:
        return self._shared.key("approval", approval_id)

    async def add(self, item: PendingApproval) -> None:
        """Keep a new pending item; raises `Overloaded` when the fleet holds `max_items`."""
        now = self._clock()
        life = item.expires_at - now + _STALE_SECONDS + _KEEP_CLOSED_SECONDS
        keys = [self._item(item.id), self._all, self._pending]
        args = [
            item.id,
            _encode(item),
            repr(item.created_at),
            repr(item.expires_at),
            self._max,
            repr(now - _STALE_SECONDS),
            _ms(life),
            repr(now - _FORGET_SECONDS),
        ]
        added = await self._shared.run("hold a call", self._add(keys=keys, args=args))
        if not added:
            raise Overloaded(
                f"the gateway holds {self._max} calls waiting for approval; call again later"
            )

    async def get(self, approval_id: str) -> PendingApproval | None:
        """The item, or None when unknown (or long closed)."""
        client = self._shared.client
        raw = await self._shared.run(
            "read a held call", client.hget(self._item(approval_id), "item")
        )
        return None if raw is None else _decode(raw)

    async def list(self, status: str | None = "pending") -> list[PendingApproval]:
        """Items of one status (None: all kept), oldest first; a pending one nobody waited
        on past its expiry is closed as expired first, as the memory adapter does."""
        client = self._shared.client
        ids = await self._shared.run("list held calls", client.zrange(self._all, 0, -1))
        names = [raw.decode() if isinstance(raw, bytes) else str(raw) for raw in ids]
        if not names:
            return []
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hget(self._item(name), "item")
        found = await self._shared.run("list held calls", pipe.execute())
        gone = [name for name, raw in zip(names, found, strict=True) if raw is None]
        if gone:  # expired with their hash: the index forgets them too
            await self._shared.run("list held calls", client.zrem(self._all, *gone))
        items = [_decode(raw) for raw in found if raw is not None]
        now = self._clock()
        kept: list[PendingApproval] = []
        for item in items:
            if item.status == "pending" and now > item.expires_at + _STALE_SECONDS:
                why = "expired with nobody waiting on it"
                closed = await self.close(item.id, "expired", Decided(None, "gateway", now, why))
                item = closed or await self.get(item.id) or item
            if status is None or item.status == status:
                kept.append(item)
        return kept

    async def close(
        self, approval_id: str, status: Status, decided: Decided
    ) -> PendingApproval | None:
        """Move a pending item to `status` (compare-and-set in Redis): the closed item, or
        None when it is not pending (another replica decided first, it expired, unknown)."""
        item = await self.get(approval_id)
        if item is None or item.status != "pending":
            return None
        closed = dataclasses.replace(item, status=status, decision=decided)
        keys = [self._item(approval_id), self._pending]
        args = [approval_id, status, _encode(closed), _ms(_KEEP_CLOSED_SECONDS)]
        won = await self._shared.run("decide a held call", self._close(keys=keys, args=args))
        if not won:
            return None
        event = self._changed.pop(approval_id, None)
        if event is not None:
            event.set()
        return closed

    async def wait(self, approval_id: str, seconds: float) -> PendingApproval | None:
        """The item once it is no longer pending, or as it stands after `seconds`: woken at
        once by a decision through this replica, within `POLL_SECONDS` by another's."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(seconds, 0.0)
        while True:
            item = await self.get(approval_id)
            left = deadline - loop.time()
            if item is None or item.status != "pending" or left <= 0:
                self._changed.pop(approval_id, None)
                return item
            event = self._changed.setdefault(approval_id, asyncio.Event())
            try:
                async with asyncio.timeout(min(POLL_SECONDS, left)):
                    await event.wait()
            except TimeoutError:
                pass
