"""Access review sessions beside the registry's agents (SQLite or PostgreSQL): started,
decided finding by finding, closed (reviewer.py carries the decisions out and renders the
report).

At most one review is open at a time; a finding is decided once; a review closes only once
every finding was decided. The findings are stored when the review starts, so the report says
what was found then, whatever changed since.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from bastion.control.governance.review import Finding
from bastion.control.registry.agents import check_text
from bastion.control.registry.store import RegistryTables
from bastion.errors import RegistryConflict, RegistryNotFound, shown

__all__ = [
    "VERDICTS",
    "Decision",
    "Review",
    "ReviewStore",
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


class ReviewStore(RegistryTables):
    """Reviews beside the registry's agents, on SQLite or PostgreSQL (the schema is the
    registry's). Blocking: the gateway calls it from worker threads, the CLI directly."""

    def start(
        self, findings: Sequence[Finding], params: dict[str, Any], by: str, now: float
    ) -> Review:
        """Open a review of `findings`; `RegistryConflict` while another one is open."""
        check_text("by", by, 200)
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")
        review = Review(f"{stamp}-{uuid.uuid4().hex[:8]}", now, by, "open", params, tuple(findings))
        rows = json.dumps([f.to_dict() for f in findings], sort_keys=True)
        with self.db.write():
            found = self.db.one("SELECT id FROM reviews WHERE status = 'open'")
            if found:
                raise RegistryConflict(f"review {found[0]} is open; close it first")
            self.db.run(
                "INSERT INTO reviews (id, started_at, started_by, status, params, findings) "
                "VALUES (?, ?, ?, 'open', ?, ?)",
                (review.id, now, by, json.dumps(params, sort_keys=True), rows),
            )
        return review

    def get(self, review_id: str) -> Review:
        """The review with this id; `RegistryNotFound` when there is none."""
        with self.db.read():
            return self._by_id(review_id)

    def current(self) -> Review:
        """The open review; `RegistryNotFound` when none is."""
        with self.db.read():
            row = self.db.one(_SELECT + " WHERE status = 'open'")
            if row is None:
                raise RegistryNotFound("no review is open; start one (bastion review start)")
            return self._review(row)

    def last_closed_at(self) -> float | None:
        """When the most recent review was closed; None when none ever was."""
        with self.db.read():
            row = self.db.one("SELECT max(closed_at) FROM reviews")
        return None if row is None or row[0] is None else float(row[0])

    def decide(self, review_id: str, decision: Decision) -> None:
        """Store a decision on an open review's finding, once (`RegistryConflict` else)."""
        with self.db.write():
            review = self._open(review_id, "")
            review.finding(decision.finding_id)
            if any(d.finding_id == decision.finding_id for d in review.decisions):
                raise RegistryConflict(f"finding {decision.finding_id} was decided already")
            self.db.run(
                "INSERT INTO review_decisions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (review_id, *astuple_decision(decision)),
            )

    def close_review(self, review_id: str, by: str, now: float) -> Review:
        """Close an open review once every finding was decided."""
        check_text("by", by, 200)
        with self.db.write():
            review = self._open(review_id, " already")
            left = review.undecided()
            if left:
                raise RegistryConflict(
                    f"{len(left)} findings are undecided (first: {left[0]}); decide each"
                )
            self.db.run(
                "UPDATE reviews SET status = 'closed', closed_at = ?, closed_by = ? WHERE id = ?",
                (now, by, review_id),
            )
        return replace(review, status="closed", closed_at=now, closed_by=by)

    def _by_id(self, review_id: str) -> Review:
        row = self.db.one(_SELECT + " WHERE id = ?", (review_id,))
        if row is None:
            raise RegistryNotFound(f"no review {shown(review_id)}")
        return self._review(row)

    def _open(self, review_id: str, already: str) -> Review:
        review = self._by_id(review_id)
        if review.status != "open":
            raise RegistryConflict(f"review {review_id} is closed{already}")
        return review

    def _review(self, row: Sequence[Any]) -> Review:
        decisions = self.db.all(
            "SELECT finding_id, decision, reason, by, at, effect FROM review_decisions "
            "WHERE review_id = ? ORDER BY at, finding_id",
            (row[0],),
        )
        return Review(
            id=row[0], started_at=row[1], started_by=row[2], status=row[3],
            params=json.loads(row[4]),
            findings=tuple(Finding.from_dict(f) for f in json.loads(row[5])),
            decisions=tuple(Decision(*d) for d in decisions),
            closed_at=row[6], closed_by=row[7],
        )  # fmt: skip


class SqliteReviewStore(ReviewStore):
    """Reviews in the registry's SQLite file (its migration is the registry's)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        super().__init__(Path(path), create=create)
        self.path = Path(path)


def astuple_decision(decision: Decision) -> tuple[object, ...]:
    """A decision's columns after the review id, in the table's order."""
    d = decision
    return (d.finding_id, d.decision, d.reason, d.by, d.at, d.effect)
