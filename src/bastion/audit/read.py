"""Reading the audit trail for operators, shared by `bastion audit` and the admin API.

The time syntax of `--since`/`--until` (ISO 8601 or relative), a record filter that agrees with
the store's `query`, verification in the order a live writer requires, and the verify report
as JSON. Pure apart from `verify_trail`, which reads the store, the checkpoint keys it trusts
and the anchor files.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bastion.audit.anchor import read_anchor
from bastion.audit.chain import MAX_PROBLEMS, Finding, VerifyReport
from bastion.audit.chain import verify as verify_chain
from bastion.audit.record import AuditRecord
from bastion.audit.signer import trusted_keys
from bastion.audit.store import AuditStore, Query
from bastion.config import Settings
from bastion.errors import FilterInvalid, shown

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str, now: float, parameter: str) -> float:
    """Epoch seconds of ISO 8601 (UTC unless it says) or a time before `now` (30m, 1h, 2d)."""
    relative = _RELATIVE.fullmatch(value.strip())
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2)]
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise FilterInvalid(
            parameter,
            f"expected ISO 8601 (2026-05-01T12:00:00Z) or relative (30m, 1h, 2d), "
            f"found {shown(value)}",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def matches(query: Query, record: AuditRecord) -> bool:
    """Whether `record` passes `query`'s filters (not its limit), as the store's `query` does."""
    return (
        (query.tenant is None or record.tenant == query.tenant)
        and (query.agent is None or record.agent == query.agent)
        and (query.tool is None or record.tool == query.tool)
        and (query.decision is None or record.decision == query.decision)
        and (query.phase is None or record.phase == query.phase)
        and (query.since is None or record.time >= query.since)
        and (query.until is None or record.time < query.until)
    )


def verify_trail(
    store: AuditStore,
    folder: Path,
    settings: Settings | None = None,
    *,
    keys: Sequence[Path] = (),
    anchors: Sequence[Path] = (),
) -> VerifyReport:
    """Check every hash link and signed checkpoint of the trail whose audit directory is
    `folder`, and hold it to the `anchors` (else the anchor `settings` configure).

    Signatures are checked against the `keys` JWK Sets when given, else the configured
    signer's public keys, else the state directory's (and the report notes what that is worth).
    """
    trusted, note = trusted_keys(settings, folder, keys)
    configured = settings.audit.anchor if settings is not None else None
    if not anchors and configured is not None:
        anchors = [Path(configured.path)]
    anchored, unreadable, notes = read_anchor(anchors)
    # The anchor first, then the store's checkpoints, then its entries: each is written
    # after what it names committed, so a live writer is never found ahead of its records.
    checkpoints = store.checkpoints()
    report = verify_chain(store.read(), checkpoints, trusted, anchored if anchors else None)
    if unreadable:
        report.findings = (unreadable + report.findings)[:MAX_PROBLEMS]
        report.problem_count += len(unreadable)
    report.notes = [*([note] if note else []), *notes]
    if not anchors:
        report.notes.append(
            "no anchor was checked: a cut tail or a deleted writer's chain would go unnoticed "
            "(--anchor FILE, or audit.anchor)"
        )
    return report


def report_json(report: VerifyReport) -> dict[str, Any]:
    """The report as `bastion audit verify --json` prints it and the admin API answers it."""

    def finding(f: Finding) -> dict[str, Any]:
        return {
            "writer": f.writer_id,
            "seq": f.seq,
            "problem": str(f.problem),
            "message": f.message,
        }

    return {
        "ok": report.ok,
        "first": None if report.first is None else finding(report.first),
        "problem_count": report.problem_count,
        "problems": [finding(f) for f in report.findings],
        "anchor_entries": report.anchored,
        "notes": report.notes,
        "writers": {
            writer_id: {
                "entries": s.entries,
                "first_seq": s.first_seq,
                "last_seq": s.last_seq,
                "checkpoints": s.checkpoints,
                "sealed_seq": s.sealed_seq,
                "anchored_seq": s.anchored_seq,
                "unsealed": s.unsealed,
            }
            for writer_id, s in sorted(report.writers.items())
        },
    }
