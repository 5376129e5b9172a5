"""Upstream trust in the registry's store: definition pins and quarantines (`SqlTrustStore`,
on SQLite or PostgreSQL; the schema is the registry's), with one `trust_revision` row bumped
by every change. The gateway's view of them is trust.py.

A pin row is one version of one definition: `approved` (the pin; at most one per name) or
`pending` (offered since, waiting for an operator). Approving a pending version replaces the
pin. The CLI and the admin API change the store; every gateway sharing it sees the change
within its poll.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bastion.control.registry.store import RegistryTables
from bastion.errors import RegistryConflict, RegistryInvalid, RegistryNotFound, shown
from bastion.inspect.pins import KINDS, Kind, diff
from bastion.types import JSON

__all__ = ["PinRecord", "QuarantineRecord", "SqlTrustStore", "SqliteTrustStore", "TrustSnapshot"]

_Key = tuple[str, str, str]  # (upstream, kind, name)

_SELECT_PINS = """SELECT upstream, kind, name, digest, definition, state, first_seen,
    approved_by, approved_at FROM pins
    WHERE (CAST(? AS TEXT) IS NULL OR state = ?) AND (CAST(? AS TEXT) IS NULL OR upstream = ?)
    AND (CAST(? AS TEXT) IS NULL OR kind = ?) AND (CAST(? AS TEXT) IS NULL OR name = ?)
    ORDER BY upstream, kind, name, state, first_seen"""
_REVISION = "SELECT value FROM trust_revision"


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


class SqlTrustStore(RegistryTables):
    """Pins and quarantines beside the registry's agents, on SQLite or PostgreSQL. Blocking:
    the gateway calls it from worker threads, the CLI directly."""

    # --- reads ---

    def version(self) -> int:
        """The trust revision: moves with every committed change."""
        return self.db.count(_REVISION)

    def snapshot(self) -> TrustSnapshot:
        """Pinned and pending digests and active quarantines, in one transaction."""
        with self.db.snapshot():
            version = int(self.db.all(_REVISION)[0][0])
            rows = self.db.all("SELECT upstream, kind, name, digest, state, approved_by FROM pins")
            held = self.db.all("SELECT upstream, reason FROM quarantines WHERE released_at IS NULL")
        approved: dict[_Key, str] = {}
        approvers: dict[_Key, str | None] = {}
        pending: dict[_Key, set[str]] = {}
        for upstream, kind, name, found, state, by in rows:
            if state == "approved":
                approved[(upstream, kind, name)] = found
                approvers[(upstream, kind, name)] = by
            else:
                pending.setdefault((upstream, kind, name), set()).add(found)
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
        with self.db.read():
            rows = self._pins(state, upstream, kind, name)
        return [_pin(row) for row in rows]

    def _pins(self, *where: str | None) -> builtins.list[Any]:
        # Each filter twice: `CAST(? AS TEXT) IS NULL OR column = ?`.
        return self.db.all(_SELECT_PINS, [value for value in where for _ in (0, 1)])

    def quarantines(self, active: bool = True) -> builtins.list[QuarantineRecord]:
        """Quarantines in force (or every one ever, with `active` off), oldest first."""
        with self.db.read():
            rows = self.db.all(
                "SELECT upstream, reason, since, released_at, released_by FROM quarantines "
                "WHERE (? = 0 OR released_at IS NULL) ORDER BY since, id",
                (int(active),),
            )
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
        with self.db.write():
            key = (upstream, kind, name)
            rows = self._pins("approved", *key)
            pin = _pin(rows[0]) if rows else None
            if pin is not None and pin.digest == found:
                return "known", None
            exists = self.db.one(
                "SELECT 1 FROM pins WHERE upstream = ? AND kind = ? AND name = ? AND digest = ?",
                (*key, found),
            )
            if exists:
                return "known", pin
            state = "pending" if pin is not None else "approved"
            self.db.run(
                "INSERT INTO pins (upstream, kind, name, digest, definition, state, first_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*key, found, _dumps(definition), state, when),
            )
            self._bump()
            return state, pin

    def approve(self, upstream: str, kind: str, name: str, found: str | None, by: str) -> PinRecord:
        """Make a pending version the pin (the only pending one when `found` is None)."""
        _check_kind(kind)
        with self.db.write():
            key = (upstream, kind, name)
            pending = [_pin(r) for r in self._pins("pending", *key)]
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
            self.db.run(
                "DELETE FROM pins WHERE upstream = ? AND kind = ? AND name = ? "
                "AND state = 'approved'",
                key,
            )
            self.db.run(
                "UPDATE pins SET state = 'approved', approved_by = ?, approved_at = ? "
                "WHERE upstream = ? AND kind = ? AND name = ? AND digest = ?",
                (by, now, *key, chosen[0].digest),
            )
            self._bump()
        return PinRecord(**{**asdict(chosen[0]), "state": "approved", "approved_by": by,
                            "approved_at": now})  # fmt: skip

    def quarantine(self, upstream: str, reason: str, when: float) -> bool:
        """Take an upstream out of service; False when it already is."""
        with self.db.write():
            held = self.db.one(
                "SELECT 1 FROM quarantines WHERE upstream = ? AND released_at IS NULL",
                (upstream,),
            )
            if held:
                return False
            self.db.run(
                "INSERT INTO quarantines (upstream, reason, since) VALUES (?, ?, ?)",
                (upstream, reason[:500], when),
            )
            self._bump()
            return True

    def release(self, upstream: str, by: str) -> QuarantineRecord:
        """Put a quarantined upstream back in service; `RegistryNotFound` when it is not."""
        if not by.strip():
            raise RegistryInvalid("by: expected who releases the upstream")
        with self.db.write():
            row = self.db.one(
                "SELECT id, upstream, reason, since FROM quarantines "
                "WHERE upstream = ? AND released_at IS NULL",
                (upstream,),
            )
            if row is None:
                raise RegistryNotFound(f"upstream {shown(upstream)} is not quarantined")
            now = time.time()
            self.db.run(
                "UPDATE quarantines SET released_at = ?, released_by = ? WHERE id = ?",
                (now, by[:200], row[0]),
            )
            self._bump()
        return QuarantineRecord(row[1], row[2], row[3], now, by[:200])

    def _bump(self) -> None:
        self.db.run("UPDATE trust_revision SET value = value + 1")


class SqliteTrustStore(SqlTrustStore):
    """Pins and quarantines in the registry's SQLite file (its migration is the registry's)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        super().__init__(Path(path), create=create)
        self.path = Path(path)


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
