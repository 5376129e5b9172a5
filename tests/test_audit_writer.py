"""The audit writer: strict appends are committed when they return, relaxed ones never wait,
a failing or full store fails closed without losing a record, stop flushes, and records a
strict append reported survive kill -9 of the writing process."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.test_audit_chain import check, found
from tests.test_audit_record import sample

from bastion.audit.chain import Entry
from bastion.audit.keys import DB_FILE, audit_dir, claim_writer_id, load_checkpoint_key
from bastion.audit.seal import Checkpoint
from bastion.audit.store import SqliteAuditStore
from bastion.audit.writer import AuditWriter, WriterOptions, open_writer
from bastion.errors import AuditUnavailable

ROOT = Path(__file__).resolve().parent.parent


class GatedStore:
    """A real store behind a gate: writes wait while it is closed, and can be made to fail."""

    def __init__(self, inner: SqliteAuditStore) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.failures = 0  # how many of the next writes raise

    def append_batch(
        self, entries: Sequence[Entry], checkpoints: Sequence[Checkpoint] = ()
    ) -> None:
        self.entered.set()
        if not self.gate.wait(10):
            raise RuntimeError("the test never opened the gate")
        if self.failures:
            self.failures -= 1
            # Untranslated, as a buggy adapter would let it through: the writer still copes.
            raise sqlite3.OperationalError("database or disk is full")
        self.inner.append_batch(entries, checkpoints)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def gated_writer(state_dir: Path, **options: Any) -> tuple[AuditWriter, GatedStore]:
    folder = audit_dir(state_dir)
    store = GatedStore(SqliteAuditStore(folder / DB_FILE))
    claim = claim_writer_id(folder)
    writer = AuditWriter(
        store,  # type: ignore[arg-type]
        claim.writer_id,
        load_checkpoint_key(folder),
        WriterOptions(**{"linger": 0.0, **options}),
        claim=claim,
    )
    return writer, store


def stored_ids(state_dir: Path) -> list[str]:
    """Request ids in the store, read over a connection of its own."""
    with sqlite3.connect(audit_dir(state_dir) / DB_FILE) as db:
        rows = db.execute("SELECT json_extract(record, '$.request_id') FROM entries ORDER BY id")
        return [row[0] for row in rows]


async def until(condition: Any, deadline: float = 5.0) -> None:
    """Poll `condition()` on the event loop until it holds or the deadline passes."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


async def test_strict_append_returns_after_commit(tmp_path: Path) -> None:
    writer = open_writer(tmp_path)
    await writer.start()
    for i in range(5):
        await writer.append(sample(i), durable=True)
        assert stored_ids(tmp_path)[-1] == f"req-{i}"
    assert writer.healthy and writer.queue_depth == 0
    await writer.stop()
    assert not writer.healthy  # stopped


async def test_relaxed_append_does_not_wait_but_strict_does(tmp_path: Path) -> None:
    writer, store = gated_writer(tmp_path)
    await writer.start()
    store.gate.clear()
    async with asyncio.timeout(1):
        await writer.append(sample(0), durable=False)  # returns although nothing can commit
    strict = asyncio.create_task(writer.append(sample(1), durable=True))
    await until(store.entered.is_set)
    await asyncio.sleep(0.05)
    assert not strict.done()
    assert writer.queue_depth == 2
    store.gate.set()
    await strict
    assert stored_ids(tmp_path) == ["req-0", "req-1"]
    await writer.stop()


async def test_full_disk_fails_strict_appends_closed_and_keeps_every_record(
    tmp_path: Path,
) -> None:
    writer = open_writer(
        tmp_path, WriterOptions(linger=0, retry_initial=0.01, retry_max=0.05), max_bytes=96 * 1024
    )
    await writer.start()
    appended = 0
    with pytest.raises(AuditUnavailable, match="database or disk is full") as raised:
        for i in range(2000):
            appended += 1
            await writer.append(sample(i), durable=True)
    assert raised.value.http_status == 503 and raised.value.code == "audit.unavailable"
    assert raised.value.rpc_error()["code"] == -32603
    assert not writer.healthy and "full" in writer.problem
    committed = len(stored_ids(tmp_path))
    assert 0 < committed < appended
    assert committed + writer.queue_depth == appended  # the failed record is still queued

    with pytest.raises(AuditUnavailable):  # fails at once while unhealthy...
        async with asyncio.timeout(1):
            await writer.append(sample(5000), durable=True)
    await writer.append(sample(5001), durable=False)  # ...relaxed ones queue
    assert committed + writer.queue_depth == appended + 2

    with pytest.raises(AuditUnavailable, match=f"{appended + 2 - committed} audit records"):
        await writer.stop(grace=0.3)
    assert len(stored_ids(tmp_path)) == committed
    assert check(tmp_path).ok  # what did commit is an intact chain


async def test_store_that_recovers_writes_the_records_it_refused(tmp_path: Path) -> None:
    writer, store = gated_writer(tmp_path, retry_initial=0.01)
    await writer.start()
    store.failures = 3
    with pytest.raises(AuditUnavailable, match="OperationalError: database or disk is full"):
        await writer.append(sample(0), durable=True)
    assert not writer.healthy
    await writer.append(sample(1), durable=False)
    await until(lambda: writer.healthy and writer.queue_depth == 0)
    assert stored_ids(tmp_path) == ["req-0", "req-1"]  # refused to its caller, never dropped
    await writer.append(sample(2), durable=True)
    await writer.stop()
    assert check(tmp_path).ok


async def test_full_queue_pushes_back_then_gives_up(tmp_path: Path) -> None:
    writer, store = gated_writer(tmp_path, queue_max=4, put_timeout=0.2)
    await writer.start()
    store.gate.clear()
    for i in range(4):
        await writer.append(sample(i), durable=False)
    assert writer.queue_depth == 4
    with pytest.raises(AuditUnavailable, match="queue is full"):
        await writer.append(sample(4), durable=False)
    waiting = asyncio.create_task(writer.append(sample(5), durable=False))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    store.gate.set()
    await waiting
    await writer.stop()
    assert stored_ids(tmp_path) == ["req-0", "req-1", "req-2", "req-3", "req-5"]


async def test_stalled_commit_fails_its_callers_and_those_queued_behind(tmp_path: Path) -> None:
    writer, store = gated_writer(tmp_path, commit_timeout=0.2)
    await writer.start()
    store.gate.clear()
    first = asyncio.create_task(writer.append(sample(0), durable=True))
    await until(store.entered.is_set)
    behind = asyncio.create_task(writer.append(sample(1), durable=True))
    for task in (first, behind):
        with pytest.raises(AuditUnavailable, match="did not commit within 0.2 s"):
            await task
    assert not writer.healthy
    with pytest.raises(AuditUnavailable):
        await writer.append(sample(2), durable=True)
    store.gate.set()
    await until(lambda: writer.healthy and writer.queue_depth == 0)
    assert stored_ids(tmp_path) == ["req-0", "req-1", "req-2"]
    await writer.stop()


async def test_stop_flushes_and_seals_with_checkpoints_on_the_way(tmp_path: Path) -> None:
    writer = open_writer(tmp_path, WriterOptions(checkpoint_every=300, batch_max=128))
    await writer.start()
    for i in range(2000):
        await writer.append(sample(i), durable=False)
        if i % 100 == 0:
            await asyncio.sleep(0)
    await writer.stop()
    assert len(stored_ids(tmp_path)) == 2000
    with SqliteAuditStore(audit_dir(tmp_path) / DB_FILE) as db:
        seqs = [cp.seq for cp in db.checkpoints()]
    assert seqs[-1] == 2000
    assert all(0 < b - a < 300 + 128 for a, b in zip([0, *seqs], seqs, strict=False))
    report = check(tmp_path)
    assert report.ok and report.writers[writer.writer_id].unsealed == 0


async def test_an_idle_tail_gets_a_checkpoint_after_checkpoint_seconds(tmp_path: Path) -> None:
    writer = open_writer(tmp_path, WriterOptions(checkpoint_seconds=0.05, checkpoint_every=10**6))
    await writer.start()
    with SqliteAuditStore(audit_dir(tmp_path) / DB_FILE) as store:
        await writer.append(sample(0), durable=True)
        await writer.append(sample(1), durable=True)
        await until(lambda: any(cp.seq == 2 for cp in store.checkpoints()))
    await writer.stop()


async def test_unserializable_record_fails_at_its_caller(tmp_path: Path) -> None:
    writer = open_writer(tmp_path)
    with pytest.raises(AuditUnavailable, match="not running"):
        await writer.append(sample(0), durable=False)
    await writer.start()
    with pytest.raises(TypeError):
        await writer.append(sample(0, args={"x": object()}), durable=True)
    assert writer.queue_depth == 0 and writer.healthy
    await writer.stop()
    with pytest.raises(AuditUnavailable, match="not running"):
        await writer.append(sample(1), durable=True)


# --- kill -9 ----------------------------------------------------------------------------------

CHILD = """
import asyncio, sys
from bastion.audit.writer import WriterOptions, open_writer
from tests.test_audit_record import sample

async def main(state_dir):
    writer = open_writer(state_dir, WriterOptions(checkpoint_every=50))
    await writer.start()
    async def worker(k):
        i = k
        while True:
            await writer.append(sample(i), durable=True)
            print(f"req-{i}", flush=True)
            i += 8
    await asyncio.gather(*(worker(k) for k in range(8)))

asyncio.run(main(sys.argv[1]))
"""


def test_records_reported_durable_survive_kill_9(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None
    printed: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(printed) < 400 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            printed.append(line.decode().strip())
        assert len(printed) >= 400, child.stderr.read().decode() if child.stderr else ""
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    printed += rest.decode().split()
    stored = set(stored_ids(tmp_path))
    assert set(printed) <= stored, sorted(set(printed) - stored)[:5]
    report = check(tmp_path)
    assert report.ok, found(report)

    async def restart() -> str:
        writer = open_writer(tmp_path)
        await writer.start()
        await writer.append(sample(10**6), durable=True)
        await writer.stop()
        return writer.writer_id

    wid = asyncio.run(restart())
    report = check(tmp_path)
    assert report.ok, found(report)
    assert list(report.writers) == [wid]  # the lock died with the child: same chain goes on
    assert report.writers[wid].last_seq == len(stored) + 1
