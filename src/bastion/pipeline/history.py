"""What a session already did, as policy reads it (`context.request.history`): the tools it
called and the labels of those tools and of what answers carried. The authz stage adds each
allowed call; the inspection and approval stages add what they learn."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from bastion.pipeline.exchange import Exchange
from bastion.types import Principal

__all__ = ["History", "history_key"]

_MAX_HISTORIES = 10_000
_HISTORY_IDLE_SECONDS = 3600.0


class History:
    """What each session (or, without one, each principal) already did: tools called and the
    labels of those tools. Bounded; idle entries go first."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, set[str], set[str]]] = OrderedDict()

    def get(self, key: str) -> tuple[list[str], list[str]]:
        item = self._items.get(key)
        if item is None or item[0] < self._clock() - _HISTORY_IDLE_SECONDS:
            return [], []
        return sorted(item[1]), sorted(item[2])

    def add(self, key: str, tool: str | None, labels: Iterable[str]) -> None:
        """Remember a tool called (None: only labels, e.g. what an answer carried)."""
        item = self._items.get(key)
        if item is None:
            item = (0.0, set(), set())
        tools, seen = item[1], item[2]
        if tool is not None:
            tools.add(tool)
        seen.update(labels)
        self._items[key] = (self._clock(), tools, seen)
        self._items.move_to_end(key)
        if len(self._items) > _MAX_HISTORIES:
            self._items.popitem(last=False)


def history_key(exchange: Exchange, principal: Principal) -> str:
    """Whose history a call adds to: its legacy session, else its principal."""
    if exchange.session is not None:
        return f"s:{exchange.session.id}"
    return "p:" + "/".join(str(part) for part in principal.binding_key())
