"""Upstream trust: the gateway's in-memory view of the pins and quarantines in the registry's
store (pins.py), the `Trust` port of the request path (bastion.inspect.trust).

`TrustView` reads an immutable snapshot and queues writes; `watch` (a refresher the gateway
runs) writes the queue, reloads when the store's revision moved and raises the alerts: a
changed definition withheld, and the operators' approvals and releases made through any
gateway or the CLI, seen within `POLL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from bastion.audit.detect import Alert
from bastion.background import Refresher
from bastion.control.registry.pins import (
    PinRecord,
    QuarantineRecord,
    SqliteTrustStore,
    SqlTrustStore,
    TrustSnapshot,
)
from bastion.inspect.pins import Kind, diff, digest
from bastion.inspect.trust import PinState
from bastion.types import JSON

# The store's names stay importable from here (where they were before pins.py).
__all__ = [
    "PinRecord",
    "QuarantineRecord",
    "SqlTrustStore",
    "SqliteTrustStore",
    "TrustSnapshot",
    "TrustView",
]

log = logging.getLogger("bastion.alerts")

POLL_SECONDS = 0.2  # a CLI approval or release is in force within about this long
_MAX_QUEUE = 1000  # writes waiting at most; beyond, a definition is queued at its next listing
_MAX_NAMES = 10_000  # definitions remembered per upstream and kind
_MAX_FLAGS = 100_000  # (upstream, kind, name, digest, rule) alerted, remembered
_Key = tuple[str, str, str]  # (upstream, kind, name)


@dataclass(frozen=True)
class _Offer:
    upstream: str
    kind: Kind
    name: str
    digest: str
    definition: JSON


Alerting = Callable[[Alert], Awaitable[None]]


class TrustView:
    """The `Trust` port over a `SqlTrustStore`: in-memory reads on the request path,
    writes queued to `watch`, which also reloads the snapshot when the store changed and
    raises the alerts (`alerts`, set by the gateway to its trail's)."""

    def __init__(self, store: SqlTrustStore, *, poll: float = POLL_SECONDS) -> None:
        self._store = store
        self._snap = store.snapshot()
        # Moves whenever what `check`, `seen` or `quarantined` answer could move: a verdict
        # cached under one generation holds until the next (see `Screen.refusal`).
        self.generation = 0
        self._seen: dict[tuple[str, str], dict[str, JSON]] = {}
        # Each remembered definition as it read then: a call re-remembers the definition it
        # is judged by, which must not move the generation (or no verdict would ever be
        # reused, and every call on a virtual server would scan every other tool's name),
        # while a definition changed since, even in place, must.
        self._seen_as: dict[tuple[str, str], dict[str, bytes]] = {}
        self._provisional: dict[_Key, str] = {}  # pinned here, the write not landed yet
        self._offers: dict[tuple[str, str, str, str], _Offer] = {}
        self._flags: set[tuple[str, str, str, str, str]] = set()
        self._alerts: list[Alert] = []
        self._held: dict[str, str] = {}  # quarantined here, the write not landed yet
        self.alerts: Alerting | None = None
        self.watch = Refresher("upstream trust", self._round, every=poll)

    # --- the request path (no I/O) ---

    def remember(self, upstream: str, kind: Kind, name: str, definition: JSON) -> None:
        """Remember a definition as the one last seen (bounded per upstream and kind)."""
        seen = self._seen.setdefault((upstream, kind), {})
        if name in seen or len(seen) < _MAX_NAMES:
            seen[name] = definition
            text = _as_read(definition)
            as_read = self._seen_as.setdefault((upstream, kind), {})
            if text is None or as_read.get(name) != text:
                as_read[name] = text or b""
                self.generation += 1  # what `seen` answers moved (an equal copy moves nothing)

    def check(self, upstream: str, kind: Kind, name: str, definition: JSON) -> PinState:
        """The pin state of a definition offered now; queues its pin or pending version."""
        found = digest(kind, definition)
        self.remember(upstream, kind, name, definition)
        key = (upstream, kind, name)
        pin = self._snap.approved.get(key)
        if pin is None:
            first = self._provisional.setdefault(key, found)
            self._offer(key, found, definition)
            return "new" if first == found else "changed"
        if pin == found:
            return "pinned"
        if found not in self._snap.pending.get(key, ()):
            self._offer(key, found, definition)
        return "changed"

    def seen(self, upstream: str, kind: Kind) -> Mapping[str, JSON]:
        """The definitions of an upstream last seen, by name."""
        return self._seen.get((upstream, kind), {})

    def flag(
        self, upstream: str, kind: Kind, name: str, definition: JSON, rule: str, kinds: list[str]
    ) -> None:
        """Queue an alert for a flagged definition, once per upstream, name, digest, rule."""
        found = digest(kind, definition)
        mark = (upstream, kind, name, found, rule)
        if mark in self._flags or len(self._flags) >= _MAX_FLAGS:
            return
        self._flags.add(mark)
        message = f"upstream {upstream!r}: {kind} {name!r} flagged ({rule}: {', '.join(kinds)})"
        facts = {"upstream": upstream, "kind": kind, "name": name, "digest": found,
                 "kinds": kinds}  # fmt: skip
        self._alerts.append(_alert(rule, "high", message, facts))

    def quarantined(self, upstream: str) -> str | None:
        """Why the upstream is out of service, or None."""
        return self._held.get(upstream) or self._snap.quarantined.get(upstream)

    async def quarantine(self, upstream: str, reason: str) -> None:
        """In force here at once; written to the store (for every replica) by `watch`,
        which this asks and waits for a moment."""
        if self.quarantined(upstream) is not None:
            return
        self._held[upstream] = reason[:500]
        self.generation += 1
        log.warning("upstream %r quarantined: %s", upstream, reason)
        await self.watch.ask(5.0)

    def _offer(self, key: _Key, found: str, definition: JSON) -> None:
        mark = (*key, found)
        if mark in self._offers or len(self._offers) >= _MAX_QUEUE:
            return
        upstream, kind, name = key
        self._offers[mark] = _Offer(upstream, kind, name, found, definition)  # type: ignore[arg-type]

    # --- background ---

    @property
    def where(self) -> str:
        """The store the pins are in (a SQLite file or a PostgreSQL server), for messages."""
        return self._store.where

    @property
    def version(self) -> int:
        """The store revision this view holds."""
        return self._snap.version

    async def settle(self) -> bool:
        """One round of `watch` now (queued writes written, snapshot reloaded, alerts
        raised), for a caller that runs no background (tests, tools); whether it changed."""
        return await self._round()

    async def _round(self) -> bool:
        """Write what is queued, reload when the store moved, then raise the alerts."""
        offers, held = list(self._offers.values()), dict(self._held)
        if offers or held:
            alerts = await asyncio.to_thread(self._write, offers, held)
            for offer in offers:
                self._offers.pop((offer.upstream, offer.kind, offer.name, offer.digest), None)
            self._alerts += alerts
        changed, events = await asyncio.to_thread(self._reload)
        self._alerts += events
        for upstream in held:
            if self._snap.quarantined.get(upstream) is not None:
                self._held.pop(upstream, None)
        alerts, self._alerts = self._alerts, []
        for alert in alerts:
            if self.alerts is not None:
                await self.alerts(alert)
        return changed

    def _write(self, offers: list[_Offer], held: dict[str, str]) -> list[Alert]:
        """The queued writes (blocking); the alerts of versions newly pending."""
        alerts: list[Alert] = []
        now = time.time()
        for offer in offers:
            state, pin = self._store.offer(
                offer.upstream, offer.kind, offer.name, offer.digest, offer.definition, now
            )
            if state == "pending":
                alerts.append(_changed(offer, pin))
        for upstream, reason in held.items():
            self._store.quarantine(upstream, reason, now)
        return alerts

    def refresh(self) -> bool:
        """Reload when the store's revision moved; whether it did (blocking)."""
        return self._reload()[0]

    def _reload(self) -> tuple[bool, list[Alert]]:
        """Reload when the store moved; the operators' acts it shows (an approval, a release,
        from the CLI or the admin API of any gateway) as alerts for this gateway's trail."""
        if self._store.version() == self._snap.version:
            return False, []
        old, snap = self._snap, self._store.snapshot()
        self._snap = snap
        self.generation += 1
        self._provisional = {k: v for k, v in self._provisional.items() if k not in snap.approved}
        if old.version < 0:
            return True, []
        return True, [*_approvals(old, snap), *self._releases(old, snap)]

    def _releases(self, old: TrustSnapshot, new: TrustSnapshot) -> list[Alert]:
        released = [u for u in old.quarantined if u not in new.quarantined]
        if not released:
            return []
        latest = {q.upstream: q for q in self._store.quarantines(active=False)}
        alerts = []
        for upstream in released:
            record = latest.get(upstream)
            by = record.released_by if record is not None else None
            message = f"upstream {upstream!r} released from quarantine by {by!r}"
            facts = {"upstream": upstream, "released_by": by, "reason": old.quarantined[upstream]}
            alerts.append(_alert("quarantine_released", "medium", message, facts))
        return alerts


def _approvals(old: TrustSnapshot, new: TrustSnapshot) -> list[Alert]:
    """Pins an operator set since the last snapshot (a pending version approved)."""
    alerts = []
    for key, found in new.approved.items():
        by = new.approvers.get(key)
        if by is None or old.approved.get(key) == found:
            continue
        upstream, kind, name = key
        message = f"upstream {upstream!r}: new version of {kind} {name!r} approved by {by!r}"
        facts = {"upstream": upstream, "kind": kind, "name": name, "digest": found,
                 "previous_digest": old.approved.get(key), "approved_by": by}  # fmt: skip
        alerts.append(_alert("pin_approved", "medium", message, facts))
    return alerts


def _changed(offer: _Offer, pin: PinRecord | None) -> Alert:
    """The alert of a definition that differs from its pin, with the diff."""
    message = (
        f"upstream {offer.upstream!r} changed its {offer.kind} {offer.name!r}: withheld until "
        "an operator approves it"
    )
    facts = {
        "upstream": offer.upstream,
        "kind": offer.kind,
        "name": offer.name,
        "digest": offer.digest,
        "pinned_digest": pin.digest if pin else None,
        "diff": diff(offer.kind, pin.definition if pin else None, offer.definition),
    }
    return _alert("tool_changed", "high", message, facts)


def _alert(rule: str, severity: Any, message: str, facts: dict[str, Any]) -> Alert:
    # The gateway itself noticed it, on no caller's request: no tenant, the gateway as agent.
    return Alert(rule, severity, None, "bastion", message, uuid.uuid4().hex, time.time(), facts)


def _as_read(definition: JSON) -> bytes | None:
    """A definition's content as canonical JSON bytes, None when it is not JSON-able (then it
    counts as changed every time)."""
    try:
        return orjson.dumps(definition, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
