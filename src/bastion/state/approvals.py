"""Pending approvals: calls held until a person decides, behind a small port.

```
PendingApprovals (port)          add · get · list · close · wait
├── MemoryPendingApprovals       one process; bounded (Overloaded, never forgetting a live one)
└── RedisPendingApprovals        every replica's (`shared_approvals`), bounded the same way
```

An item holds exactly what the approver is shown, the digest of the call it releases, who
asked, until when, its status and, once decided, by whom, on which channel, when and why.
Status moves once, from `pending` to `approved`, `denied`, `expired` or `abandoned`; the
port does that compare-and-set, so two deciders never both win (in Redis, atomically on the
server, whichever replicas they decide through).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from bastion.errors import Overloaded

__all__ = [
    "CLOSED",
    "Decided",
    "MemoryPendingApprovals",
    "PendingApproval",
    "PendingApprovals",
    "Requester",
    "Status",
]

Status = Literal["pending", "approved", "denied", "expired", "abandoned"]
CLOSED: frozenset[str] = frozenset({"approved", "denied", "expired", "abandoned"})
_KEEP_CLOSED_SECONDS = 3600.0  # a decided item stays listable this long
_STALE_SECONDS = 60.0  # past its expiry, a pending item nobody waits on is closed


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asked: the agent, its tenant, the user it acts for, the token it presented."""

    agent: str
    tenant: str
    user: str | None = None
    token_id: str | None = None


@dataclass(frozen=True, slots=True)
class Decided:
    """How an item ended: by whom (None for expiry and abandonment), their roles, the
    channel, when, and why."""

    by: str | None
    channel: str
    at: float
    reason: str | None = None
    roles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PendingApproval:
    """One held call as the approver sees it and as the trail records it."""

    id: str
    call: str  # the digest of principal, route, upstream, tool and arguments it releases
    policy: str
    server: str
    tool: str
    called_as: str
    requester: Requester
    shown: dict[str, Any]  # {"text", "values", "digest"}: exactly what an approver reads
    approvers: tuple[str, ...]
    created_at: float
    expires_at: float
    history: dict[str, list[str]] = field(default_factory=dict)  # {"tools", "labels"}
    status: Status = "pending"
    decision: Decided | None = None

    def to_dict(self) -> dict[str, Any]:
        """The item as JSON for the admin API, the CLI and the console."""
        decision = self.decision
        return {
            "id": self.id,
            "status": self.status,
            "policy": self.policy,
            "server": self.server,
            "tool": self.tool,
            "called_as": self.called_as,
            "requester": {
                "agent": self.requester.agent,
                "tenant": self.requester.tenant,
                "user": self.requester.user,
            },
            "shown": self.shown,
            "history": self.history,
            "approvers": list(self.approvers),
            "call_digest": self.call,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "decision": None
            if decision is None
            else {
                "by": decision.by,
                "roles": list(decision.roles),
                "channel": decision.channel,
                "at": decision.at,
                "reason": decision.reason,
            },
        }


class PendingApprovals(Protocol):
    """The port: where held calls wait for a person's decision."""

    async def add(self, item: PendingApproval) -> None:
        """Keep a new pending item; raises `Overloaded` when full of live ones."""
        ...

    async def get(self, approval_id: str) -> PendingApproval | None:
        """The item, or None when unknown (or long closed)."""
        ...

    async def list(self, status: str | None = "pending") -> list[PendingApproval]:
        """Items of one status (None: all kept), oldest first."""
        ...

    async def close(
        self, approval_id: str, status: Status, decided: Decided
    ) -> PendingApproval | None:
        """Move a pending item to `status`: the closed item, or None when it is not pending
        (someone else decided first, it expired, or it is unknown)."""
        ...

    async def wait(self, approval_id: str, seconds: float) -> PendingApproval | None:
        """The item once it is no longer pending, or as it stands after `seconds`."""
        ...


class MemoryPendingApprovals:
    """Pending approvals of one process, bounded: a full store refuses new holds (503)
    rather than dropping one a person may be reading."""

    def __init__(self, max_items: int = 1000, clock: Any = time.time) -> None:
        self._items: OrderedDict[str, PendingApproval] = OrderedDict()
        self._changed: dict[str, asyncio.Event] = {}
        self._max = max_items
        self._clock = clock

    async def add(self, item: PendingApproval) -> None:
        """Keep a new pending item; raises `Overloaded` when full of live ones."""
        self._evict()
        if len(self._items) >= self._max:
            self._evict(everything_closed=True)  # a closed item may go; a pending one never
        if len(self._items) >= self._max:
            raise Overloaded(
                f"the gateway holds {self._max} calls waiting for approval; call again later"
            )
        self._items[item.id] = item
        self._changed[item.id] = asyncio.Event()

    async def get(self, approval_id: str) -> PendingApproval | None:
        """The item, or None when unknown (or long closed)."""
        return self._items.get(approval_id)

    async def list(self, status: str | None = "pending") -> list[PendingApproval]:
        """Items of one status (None: all kept), oldest first."""
        self._evict()
        return [i for i in self._items.values() if status is None or i.status == status]

    async def close(
        self, approval_id: str, status: Status, decided: Decided
    ) -> PendingApproval | None:
        """Move a pending item to `status` (compare-and-set)."""
        item = self._items.get(approval_id)
        if item is None or item.status != "pending":
            return None
        return self._close(item, status, decided)

    def _close(self, item: PendingApproval, status: Status, decided: Decided) -> PendingApproval:
        approval_id = item.id
        closed = replace(item, status=status, decision=decided)
        self._items[approval_id] = closed
        event = self._changed.pop(approval_id, None)
        if event is not None:
            event.set()
        return closed

    async def wait(self, approval_id: str, seconds: float) -> PendingApproval | None:
        """The item once it is no longer pending, or as it stands after `seconds`."""
        event = self._changed.get(approval_id)
        if event is not None:
            try:
                async with asyncio.timeout(max(seconds, 0.0)):
                    await event.wait()
            except TimeoutError:
                pass
        return self._items.get(approval_id)

    def _evict(self, everything_closed: bool = False) -> None:
        """Drop closed items kept long enough (or all closed ones); pending ones never, but
        one whose wait never ran (its client gone at once) is closed as expired."""
        now = self._clock()
        for item in [i for i in self._items.values() if i.status == "pending"]:
            if now > item.expires_at + _STALE_SECONDS:
                why = "expired with nobody waiting on it"
                self._close(item, "expired", Decided(None, "gateway", now, why))
        now = float("inf") if everything_closed else now
        for key in [
            k
            for k, item in self._items.items()
            if item.status in CLOSED
            and item.decision is not None
            and item.decision.at < now - _KEEP_CLOSED_SECONDS
        ]:
            del self._items[key]

    def __len__(self) -> int:
        return len(self._items)
