"""Crash recovery: a recorded decision whose outcome was never written gets one at start.

A call's decision record is written before the call goes upstream (and, under `durability:
strict`, made as safe as `audit.survives` says before: written ahead, or committed with an
fsync); its outcome record follows the answer without the client waiting for the disk. A
gateway that is killed between the two (kill -9, out of memory, power loss) leaves a decision
without an outcome. Records a killed process had only written ahead are committed when its
writer id is next claimed (`AuditWriter.start`), before this runs.

So at start, before serving, the writer reads its own chain back over its last
`RECOVER_WINDOW` records, and every allowed decision there without an outcome of the same
`request_id` gets an `outcome` record with `outcome: unknown` and a `reason` naming the stop.
The records are appended through the writer like any other (chained, then sealed by the next
checkpoint) and made durable before the gateway serves. A denied decision is final as it
stands; it never has an outcome record.

Only this writer's chain is read: no live process extends it (the writer id is claimed), so
none of its calls is still running. The chain of a process that died and never came back is
closed by the next process that claims its writer id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime

from bastion.audit.record import AuditRecord
from bastion.audit.store import AuditStore
from bastion.audit.writer import AuditWriter
from bastion.errors import AuditUnavailable

log = logging.getLogger("bastion.audit")

RECOVER_WINDOW = 20_000  # records of this writer's chain read back at start, at most


def unfinished(records: Iterable[AuditRecord]) -> list[AuditRecord]:
    """The allowed decisions among `records` (in chain order) that no outcome record follows."""
    waiting: dict[str, AuditRecord] = {}
    for record in records:
        if record.phase == "decision" and record.decision == "allow":
            waiting[record.request_id] = record
        elif record.phase == "outcome":
            waiting.pop(record.request_id, None)
    return list(waiting.values())


def closing(decision: AuditRecord, last_time: float, now: float) -> AuditRecord:
    """The `unknown` outcome record of a decision whose call the gateway never saw end;
    `last_time` is the time of the last record the stopped process wrote."""
    when = datetime.fromtimestamp(last_time, UTC).isoformat(timespec="seconds")
    reason = (
        "the gateway stopped before the outcome was recorded "
        f"(its process ended at or after {when}, the time of its last record)"
    )
    return replace(
        decision,
        time=now,
        phase="outcome",
        outcome="unknown",
        reason=reason,
        detail={**decision.detail, "failure": "gateway.stopped", "last_record_time": last_time},
    )


async def recover(
    writer: AuditWriter, window: int = RECOVER_WINDOW, clock: Callable[[], float] = time.time
) -> int:
    """Close the decisions this writer's chain left open (see the module docstring), waiting
    until the records are committed; how many were closed. Call it once `writer` runs, before
    the gateway serves. A trail that cannot take the records is logged, not raised: the next
    start closes them again."""
    found = await asyncio.to_thread(_scan, writer.store, writer.writer_id, window)
    if found is None:
        return 0
    last_time, waiting = found
    if not waiting:
        return 0
    now = clock()
    records = [closing(decision, last_time, now) for decision in waiting]
    try:
        for record in records[:-1]:
            await writer.append(record, False)
        # The writer commits in order: once the last is committed, so are the others.
        await writer.append(records[-1], True)
    except AuditUnavailable as exc:
        log.error("audit: could not record the end of %d open calls: %s", len(records), exc)
        return 0
    log.warning(
        "audit: %d calls had a decision but no outcome when the gateway last stopped; "
        "recorded them with outcome unknown",
        len(records),
    )
    return len(records)


def _scan(store: AuditStore, writer_id: str, window: int) -> tuple[float, list[AuditRecord]] | None:
    """The time of the chain's last record and its open decisions (None for an empty chain)."""
    last = store.last(writer_id)
    if last is None:
        return None
    records: list[AuditRecord] = []
    for entry in store.read(writer_id, since_seq=max(0, last[0] - window)):
        try:
            records.append(AuditRecord.from_json(entry.record))
        except ValueError:
            continue  # a record this version cannot read; `bastion audit verify` reports it
    if not records:
        return None
    return records[-1].time, unfinished(records)
