"""Upstream trust in the registry store: definition pins and quarantines, and the gateway's
in-memory view of them.

```
SqliteTrustStore  tables `pins` and `quarantines` in the registry's SQLite file (its
                  migration is the registry's), one `trust_revision` row bumped by every change
TrustView         the `Trust` port of the request path (bastion.inspect.trust): reads an
                  immutable snapshot, queues writes; `watch` (a refresher the gateway runs)
                  writes the queue, reloads when the revision moved and raises the alerts
```

A pin row is one version of one definition: `approved` (the pin; at most one per name) or
`pending` (offered since, waiting for an operator). Approving a pending version replaces the
pin. The CLI and the admin API change the store; every gateway sharing it sees the change
within `POLL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bastion.audit.detect import Alert
from bastion.background import Refresher
from bastion.control.registry.store import RegistryTables
from bastion.errors import (
    RegistryConflict,
    RegistryInvalid,
    RegistryNotFound,
    RegistryUnavailable,
    shown,
)
from bastion.inspect.pins import KINDS, Kind, diff, digest
from bastion.inspect.trust import PinState
from bastion.types import JSON

__all__ = ["PinRecord", "QuarantineRecord", "SqliteTrustStore", "TrustSnapshot", "TrustView"]

log = logging.getLogger("bastion.alerts")

POLL_SECONDS = 0.2  # a CLI approval or release is in force within about this long
_MAX_QUEUE = 1000  # writes waiting at most; beyond, a definition is queued at its next listing
_MAX_NAMES = 10_000  # definitions remembered per upstream and kind
_MAX_FLAGS = 100_000  # (upstream, kind, name, digest, rule) alerted, remembered
_Key = tuple[str, str, str]  # (upstream, kind, name)

_SELECT_PINS = """SELECT upstream, kind, name, digest, definition, state, first_seen,
    approved_by, approved_at FROM pins
    WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR upstream = ?2)
    AND (?3 IS NULL OR kind = ?3) AND (?4 IS NULL OR name = ?4)
    ORDER BY upstream, kind, name, state, first_seen"""


@dataclass(frozen=True)
class PinRecord:
    """One version of one definition: the pin (`approved`) or an offered one (`pending`)."""

    upstream: str
    kind: str
    name: str
    digest: str
    definition: JSON
    state: str
    first_seen: float
    approved_by: str | None = None
    approved_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON for the CLI and the admin API."""
        return asdict(self)


@dataclass(frozen=True)
class QuarantineRecord:
    """An upstream taken out of service: why, since when, and its release once released."""

    upstream: str
    reason: str
    since: float
    released_at: float | None = None
    released_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON for the CLI and the admin API."""
        return asdict(self)


@dataclass(frozen=True)
class TrustSnapshot:
    """What the request path judges by: replaced whole, never changed."""

    version: int = -1
    approved: Mapping[_Key, str] = field(default_factory=dict)  # key → pinned digest
    approvers: Mapping[_Key, str | None] = field(default_factory=dict)  # None: first seen
    pending: Mapping[_Key, frozenset[str]] = field(default_factory=dict)
    quarantined: Mapping[str, str] = field(default_factory=dict)  # upstream → reason


class SqliteTrustStore(RegistryTables):
    """Pins and quarantines in the registry's SQLite file. Blocking: the gateway calls it
    from worker threads, the CLI directly."""

    # --- reads ---

    def version(self) -> int:
        """The trust revision: moves with every committed change."""
        with self._lock, self._guard():
            return int(self._db.execute("SELECT value FROM trust_revision").fetchone()[0])

    def snapshot(self) -> TrustSnapshot:
        """Pinned and pending digests and active quarantines, in one transaction."""
        with self._lock, self._guard(), self._transaction("BEGIN"):
            version = int(self._db.execute("SELECT value FROM trust_revision").fetchone()[0])
            rows = self._db.execute(
                "SELECT upstream, kind, name, digest, state, approved_by FROM pins"
            )
            approved: dict[_Key, str] = {}
            approvers: dict[_Key, str | None] = {}
            pending: dict[_Key, set[str]] = {}
            for upstream, kind, name, found, state, by in rows.fetchall():
                if state == "approved":
                    approved[(upstream, kind, name)] = found
                    approvers[(upstream, kind, name)] = by
                else:
                    pending.setdefault((upstream, kind, name), set()).add(found)
            held = self._db.execute(
                "SELECT upstream, reason FROM quarantines WHERE released_at IS NULL"
            ).fetchall()
        return TrustSnapshot(
            version,
            approved,
            approvers,
            {key: frozenset(digests) for key, digests in pending.items()},
            {upstream: reason for upstream, reason in held},
        )

    def pins(
        self,
        state: str | None = None,
        upstream: str | None = None,
        kind: str | None = None,
        name: str | None = None,
    ) -> builtins.list[PinRecord]:
        """Pin rows, optionally of one state, upstream, kind and name."""
        with self._lock, self._guard():
            rows = self._db.execute(_SELECT_PINS, (state, upstream, kind, name)).fetchall()
        return [_pin(row) for row in rows]

    def quarantines(self, active: bool = True) -> builtins.list[QuarantineRecord]:
        """Quarantines in force (or every one ever, with `active` off), oldest first."""
        with self._lock, self._guard():
            rows = self._db.execute(
                "SELECT upstream, reason, since, released_at, released_by FROM quarantines "
                "WHERE (? = 0 OR released_at IS NULL) ORDER BY since, id",
                (int(active),),
            ).fetchall()
        return [QuarantineRecord(*row) for row in rows]

    def versions(self, upstream: str, kind: str, name: str) -> dict[str, Any]:
        """The pin of one definition and each pending version with its diff from the pin:
        what an operator reads before approving (`bastion tools diff`)."""
        _check_kind(kind)
        rows = self.pins(None, upstream, kind, name)
        if not rows:
            raise RegistryNotFound(
                f"no {kind} {shown(name)} of upstream {shown(upstream)} was ever seen"
            )
        pin = next((r for r in rows if r.state == "approved"), None)
        old = pin.definition if pin is not None else None
        return {
            "pinned": pin.to_dict() if pin is not None else None,
            "pending": [
                {**r.to_dict(), "diff": diff(_kind(kind), old, r.definition)}
                for r in rows
                if r.state == "pending"
            ],
        }

    # --- writes ---

    def offer(
        self, upstream: str, kind: str, name: str, found: str, definition: JSON, when: float
    ) -> tuple[str, PinRecord | None]:
        """Record a definition seen by a gateway: pinned when the name has no pin yet
        (first seen wins, across every gateway sharing the store), else pending. Returns
        what it became (`approved`, `pending`, or `known` when that version was recorded
        already) and the pin it differs from (None when it is the pin)."""
        with self._lock, self._guard(), self._transaction("BEGIN IMMEDIATE"):
            key = (upstream, kind, name)
            rows = self._db.execute(_SELECT_PINS, ("approved", *key)).fetchall()
            pin = _pin(rows[0]) if rows else None
            if pin is not None and pin.digest == found:
                return "known", None
            exists = self._db.execute(
                "SELECT 1 FROM pins WHERE upstream = ? AND kind = ? AND name = ? AND digest = ?",
                (*key, found),
            ).fetchone()
            if exists:
                return "known", pin
            state = "pending" if pin is not None else "approved"
            self._db.execute(
                "INSERT INTO pins (upstream, kind, name, digest, definition, state, first_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*key, found, _dumps(definition), state, when),
            )
            self._bump()
            return state, pin

    def approve(self, upstream: str, kind: str, name: str, found: str | None, by: str) -> PinRecord:
        """Make a pending version the pin (the only pending one when `found` is None)."""
        _check_kind(kind)
        with self._lock, self._guard(), self._transaction("BEGIN IMMEDIATE"):
            key = (upstream, kind, name)
            pending = [_pin(r) for r in self._db.execute(_SELECT_PINS, ("pending", *key))]
            chosen = [p for p in pending if found is None or p.digest == found]
            if not chosen:
                raise RegistryNotFound(
                    f"no pending version of {kind} {shown(name)} of upstream {shown(upstream)}"
                    + (f" with digest {shown(found)}" if found else "")
                )
            if len(chosen) > 1:
                raise RegistryConflict(
                    f"{len(chosen)} pending versions of {kind} {name!r}: name one with --digest "
                    f"({', '.join(p.digest[:19] for p in chosen)})"
                )
            now = time.time()
            self._db.execute(
                "DELETE FROM pins WHERE upstream = ? AND kind = ? AND name = ? "
                "AND state = 'approved'",
                key,
            )
            self._db.execute(
                "UPDATE pins SET state = 'approved', approved_by = ?, approved_at = ? "
                "WHERE upstream = ? AND kind = ? AND name = ? AND digest = ?",
                (by, now, *key, chosen[0].digest),
            )
            self._bump()
        return PinRecord(**{**asdict(chosen[0]), "state": "approved", "approved_by": by,
                            "approved_at": now})  # fmt: skip

    def quarantine(self, upstream: str, reason: str, when: float) -> bool:
        """Take an upstream out of service; False when it already is."""
        with self._lock, self._guard(), self._transaction("BEGIN IMMEDIATE"):
            held = self._db.execute(
                "SELECT 1 FROM quarantines WHERE upstream = ? AND released_at IS NULL",
                (upstream,),
            ).fetchone()
            if held:
                return False
            self._db.execute(
                "INSERT INTO quarantines (upstream, reason, since) VALUES (?, ?, ?)",
                (upstream, reason[:500], when),
            )
            self._bump()
            return True

    def release(self, upstream: str, by: str) -> QuarantineRecord:
        """Put a quarantined upstream back in service; `RegistryNotFound` when it is not."""
        if not by.strip():
            raise RegistryInvalid("by: expected who releases the upstream")
        with self._lock, self._guard(), self._transaction("BEGIN IMMEDIATE"):
            row = self._db.execute(
                "SELECT id, upstream, reason, since FROM quarantines "
                "WHERE upstream = ? AND released_at IS NULL",
                (upstream,),
            ).fetchone()
            if row is None:
                raise RegistryNotFound(f"upstream {shown(upstream)} is not quarantined")
            now = time.time()
            self._db.execute(
                "UPDATE quarantines SET released_at = ?, released_by = ? WHERE id = ?",
                (now, by[:200], row[0]),
            )
            self._bump()
        return QuarantineRecord(row[1], row[2], row[3], now, by[:200])

    def _bump(self) -> None:
        self._db.execute("UPDATE trust_revision SET value = value + 1")

    def _transaction(self, begin: str) -> _Transaction:
        return _Transaction(self._db, begin)

    def _guard(self) -> _Translate:
        return _Translate(self.path)


@dataclass(frozen=True)
class _Offer:
    upstream: str
    kind: Kind
    name: str
    digest: str
    definition: JSON


Alerting = Callable[[Alert], Awaitable[None]]


class TrustView:
    """The `Trust` port over a `SqliteTrustStore`: in-memory reads on the request path,
    writes queued to `watch`, which also reloads the snapshot when the store changed and
    raises the alerts (`alerts`, set by the gateway to its trail's)."""

    def __init__(self, store: SqliteTrustStore, *, poll: float = POLL_SECONDS) -> None:
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
    def path(self) -> Path:
        """The registry file the store is in (for the admin API and the CLI)."""
        return self._store.path

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


def _pin(row: Any) -> PinRecord:
    return PinRecord(
        upstream=row[0], kind=row[1], name=row[2], digest=row[3], definition=json.loads(row[4]),
        state=row[5], first_seen=row[6], approved_by=row[7], approved_at=row[8],
    )  # fmt: skip


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise RegistryInvalid(f"kind: expected one of {', '.join(KINDS)}, found {shown(kind)}")


def _kind(kind: str) -> Kind:
    _check_kind(kind)
    return kind  # type: ignore[return-value]  # checked against KINDS just above


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class _Transaction:
    """BEGIN on enter; COMMIT on success, ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection, begin: str) -> None:
        self._db, self._begin = db, begin

    def __enter__(self) -> None:
        self._db.execute(self._begin)

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self._db.execute("ROLLBACK")
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._db.execute("ROLLBACK")
            raise


class _Translate:
    """Turn sqlite3 errors into `RegistryUnavailable` at the adapter's edge."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, _: object, exc: BaseException | None, __: object) -> None:
        if isinstance(exc, sqlite3.Error):
            raise RegistryUnavailable(f"registry {self._path}: {exc}") from exc


def _as_read(definition: JSON) -> bytes | None:
    """A definition's content as canonical JSON bytes, None when it is not JSON-able (then it
    counts as changed every time)."""
    try:
        return orjson.dumps(definition, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
