"""The audit trail's own costs, without a gateway around it.

- writer throughput with the hash chain, to SQLite (FULL), relaxed appends and strict appends
  from 256 concurrent callers (records/s; the issue asks for at least 20,000);
- event-loop CPU per record of a strict append (what a call waits for besides the commit);
- the anomaly detectors' CPU per record, over a realistic mix of agents and tools.

Usage: .venv/bin/python bench/audit.py [--records N] [--repeats R]
Each figure is the median of the repeats; the machine is noisy, so compare runs, not digits.
The event loop is uvloop, as in the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from bastion.audit import AuditRecord
from bastion.audit.detect import Detectors
from bastion.audit.trail import open_writer
from bastion.audit.writer import WriterOptions
from bastion.config import Alerts


def record(i: int) -> AuditRecord:
    return AuditRecord(
        time=1_800_000_000.0 + i * 0.01,
        request_id=f"{i:032x}",
        phase="decision",
        tenant=f"tenant-{i % 7}",
        agent=f"agent-{i % 50}",
        client=f"10.0.{i % 3}.1",
        route="/mcp",
        method="tools/call",
        server="workspace",
        tool_exposed=f"workspace__tool_{i % 12}",
        args_digest="ab" * 32,
        decision="deny" if i % 40 == 0 else "allow",
        policies=("grant:acme-read",),
        reason="acme agents read their workspace",
    )


async def writer_throughput(records: int, durable: bool) -> tuple[float, float]:
    """(records/s, loop CPU µs per record)."""
    with tempfile.TemporaryDirectory() as tmp:
        writer = open_writer(Path(tmp), WriterOptions())
        await writer.start()
        items = [record(i) for i in range(records)]
        cpu, wall = time.thread_time(), time.perf_counter()
        if durable:
            queue = iter(items)

            async def caller() -> None:
                for item in queue:
                    await writer.append(item, True)

            async with asyncio.TaskGroup() as group:
                for _ in range(256):
                    group.create_task(caller())
        else:
            for item in items:
                await writer.append(item, False)
            while writer.queue_depth:
                await asyncio.sleep(0.001)
        wall = time.perf_counter() - wall
        cpu = time.thread_time() - cpu
        await writer.stop()
    return records / wall, cpu / records * 1e6


async def lone_strict(records: int) -> float:
    """Loop CPU µs of one strict append at a time (a batch of one each)."""
    with tempfile.TemporaryDirectory() as tmp:
        writer = open_writer(Path(tmp), WriterOptions())
        await writer.start()
        cpu = time.thread_time()
        for i in range(records):
            await writer.append(record(i), True)
        cpu = time.thread_time() - cpu
        await writer.stop()
    return cpu / records * 1e6


def detector_cost(records: int) -> float:
    """CPU µs per record through every rule."""
    detectors = Detectors(Alerts())
    items = [record(i) for i in range(records)]
    start = time.process_time()
    for item in items:
        detectors.observe(item)
    return (time.process_time() - start) / records * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        rate, cpu = uvloop.run(writer_throughput(args.records, durable=False))
        rows.setdefault("relaxed: records/s", []).append(rate)
        rows.setdefault("relaxed: loop CPU µs/record", []).append(cpu)
        rate, cpu = uvloop.run(writer_throughput(args.records, durable=True))
        rows.setdefault("strict, 256 callers: records/s", []).append(rate)
        rows.setdefault("strict, 256 callers: loop CPU µs/record", []).append(cpu)
        rows.setdefault("strict, one at a time: loop CPU µs/record", []).append(
            uvloop.run(lone_strict(min(args.records, 2000)))
        )
        rows.setdefault("detectors: CPU µs/record", []).append(detector_cost(args.records))
    print(f"audit bench: {args.records} records, median of {args.repeats}")
    for name, values in rows.items():
        print(f"  {name:45} {statistics.median(values):>10.1f}")


if __name__ == "__main__":
    main()
