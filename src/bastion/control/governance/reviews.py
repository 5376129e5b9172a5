"""Access review sessions in the registry's SQLite file: started, decided finding by finding,
closed (reviewer.py carries the decisions out and renders the report).

At most one review is open at a time; a finding is decided once; a review closes only once
every finding was decided. The findings are stored when the review starts, so the report says
what was found then, whatever changed since.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from bastion.control.governance.review import Finding
from bastion.control.registry.agents import check_text
from bastion.control.registry.store import RegistryTables
from bastion.errors import RegistryConflict, RegistryNotFound, RegistryUnavailable, shown

__all__ = [
    "VERDICTS",
    "Decision",
    "Review",
    "SqliteReviewStore",
    "Verdict",
]

Verdict = Literal["keep", "revoke"]
VERDICTS: tuple[str, ...] = ("keep", "revoke")


@dataclass(frozen=True)
class Decision:
    """A reviewer's decision on one finding, and what it did."""

    finding_id: str
    decision: str
    reason: str | None
    by: str
    at: float
    effect: str

    def to_dict(self) -> dict[str, Any]:
        """As JSON."""
        return asdict(self)


@dataclass(frozen=True)
class Review:
    """One access review: when and by whom, its findings and the decisions taken."""

    id: str
    started_at: float
    started_by: str
    status: str  # open | closed
    params: dict[str, Any]
    findings: tuple[Finding, ...]
    decisions: tuple[Decision, ...] = ()
    closed_at: float | None = None
    closed_by: str | None = None

    def finding(self, finding_id: str) -> Finding:
        """The finding with this id; `RegistryNotFound` when the review has none."""
        for item in self.findings:
            if item.id == finding_id:
                return item
        raise RegistryNotFound(f"review {self.id} has no finding {shown(finding_id)}")

    def undecided(self) -> list[str]:
        """Ids of the findings without a decision yet."""
        done = {d.finding_id for d in self.decisions}
        return [f.id for f in self.findings if f.id not in done]

    def to_dict(self) -> dict[str, Any]:
        """As JSON: the review, its findings and decisions."""
        data = asdict(self)
        data["findings"] = [f.to_dict() for f in self.findings]
        data["decisions"] = [d.to_dict() for d in self.decisions]
        data["undecided"] = self.undecided()
        return data


# --- the store --------------------------------------------------------------------------------

_SELECT = """SELECT id, started_at, started_by, status, params, findings, closed_at, closed_by
    FROM reviews"""


class SqliteReviewStore(RegistryTables):
    """Reviews in the registry's SQLite file (its migration is the registry's). Blocking: the
    gateway calls it from worker threads, the CLI directly."""

    def start(
        self, findings: Sequence[Finding], params: dict[str, Any], by: str, now: float
    ) -> Review:
        """Open a review of `findings`; `RegistryConflict` while another one is open."""
        check_text("by", by, 200)
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")
        review = Review(f"{stamp}-{uuid.uuid4().hex[:8]}", now, by, "open", params, tuple(findings))
        rows = json.dumps([f.to_dict() for f in findings], sort_keys=True)
        with self._write():
            found = self._db.execute("SELECT id FROM reviews WHERE status = 'open'").fetchone()
            if found:
                raise RegistryConflict(f"review {found[0]} is open; close it first")
            self._db.execute(
                "INSERT INTO reviews (id, started_at, started_by, status, params, findings) "
                "VALUES (?, ?, ?, 'open', ?, ?)",
                (review.id, now, by, json.dumps(params, sort_keys=True), rows),
            )
        return review

    def get(self, review_id: str) -> Review:
        """The review with this id; `RegistryNotFound` when there is none."""
        with self._lock, self._guard():
            row = self._db.execute(_SELECT + " WHERE id = ?", (review_id,)).fetchone()
            if row is None:
                raise RegistryNotFound(f"no review {shown(review_id)}")
            return self._review(row)

    def current(self) -> Review:
        """The open review; `RegistryNotFound` when none is."""
        with self._lock, self._guard():
            row = self._db.execute(_SELECT + " WHERE status = 'open'").fetchone()
            if row is None:
                raise RegistryNotFound("no review is open; start one (bastion review start)")
            return self._review(row)

    def last_closed_at(self) -> float | None:
        """When the most recent review was closed; None when none ever was."""
        with self._lock, self._guard():
            row = self._db.execute("SELECT max(closed_at) FROM reviews").fetchone()
        return None if row[0] is None else float(row[0])

    def decide(self, review_id: str, decision: Decision) -> None:
        """Store a decision on an open review's finding, once (`RegistryConflict` else)."""
        with self._write():
            row = self._db.execute(_SELECT + " WHERE id = ?", (review_id,)).fetchone()
            if row is None:
                raise RegistryNotFound(f"no review {shown(review_id)}")
            review = self._review(row)
            if review.status != "open":
                raise RegistryConflict(f"review {review_id} is closed")
            review.finding(decision.finding_id)
            if any(d.finding_id == decision.finding_id for d in review.decisions):
                raise RegistryConflict(f"finding {decision.finding_id} was decided already")
            self._db.execute(
                "INSERT INTO review_decisions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (review_id, *astuple_decision(decision)),
            )

    def close_review(self, review_id: str, by: str, now: float) -> Review:
        """Close an open review once every finding was decided."""
        check_text("by", by, 200)
        with self._write():
            row = self._db.execute(_SELECT + " WHERE id = ?", (review_id,)).fetchone()
            if row is None:
                raise RegistryNotFound(f"no review {shown(review_id)}")
            review = self._review(row)
            if review.status != "open":
                raise RegistryConflict(f"review {review_id} is closed already")
            left = review.undecided()
            if left:
                raise RegistryConflict(
                    f"{len(left)} findings are undecided (first: {left[0]}); decide each"
                )
            self._db.execute(
                "UPDATE reviews SET status = 'closed', closed_at = ?, closed_by = ? WHERE id = ?",
                (now, by, review_id),
            )
        return replace(review, status="closed", closed_at=now, closed_by=by)

    def _review(self, row: Sequence[Any]) -> Review:
        decisions = self._db.execute(
            "SELECT finding_id, decision, reason, by, at, effect FROM review_decisions "
            "WHERE review_id = ? ORDER BY at, finding_id",
            (row[0],),
        ).fetchall()
        return Review(
            id=row[0], started_at=row[1], started_by=row[2], status=row[3],
            params=json.loads(row[4]),
            findings=tuple(Finding.from_dict(f) for f in json.loads(row[5])),
            decisions=tuple(Decision(*d) for d in decisions),
            closed_at=row[6], closed_by=row[7],
        )  # fmt: skip

    def _write(self) -> _Transaction:
        return _Transaction(self)

    def _guard(self) -> _Guard:
        return _Guard(self.path)


def astuple_decision(decision: Decision) -> tuple[object, ...]:
    """A decision's columns after the review id, in the table's order."""
    d = decision
    return (d.finding_id, d.decision, d.reason, d.by, d.at, d.effect)


class _Guard:
    """Turn sqlite3 errors into `RegistryUnavailable` at the adapter's edge."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, _: object, exc: BaseException | None, __: object) -> None:
        if isinstance(exc, sqlite3.IntegrityError):  # the one-open-review index, a race
            raise RegistryConflict("another review was opened or decided at the same time")
        if isinstance(exc, sqlite3.Error):
            raise RegistryUnavailable(f"registry {self._path}: {exc}") from exc


class _Transaction:
    """The store's lock and one IMMEDIATE transaction: committed on success, else rolled
    back; sqlite3 errors translated."""

    def __init__(self, store: SqliteReviewStore) -> None:
        self._lock = store._lock  # noqa: SLF001 - the store's own helper
        self._db = store._db  # noqa: SLF001
        self._guard = _Guard(store.path)

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            with self._guard:
                self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _: object
    ) -> None:
        try:
            with self._guard:
                if exc_type is not None:
                    self._db.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.Error):
                        raise exc
                    return
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    self._db.execute("ROLLBACK")
                    raise
        finally:
            self._lock.release()
