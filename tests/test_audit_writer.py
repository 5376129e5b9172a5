"""The audit writer: strict appends are committed when they return, relaxed ones never wait,
a failing or full store fails closed without losing a record, stop flushes, and records a
strict append reported survive kill -9 of the writing process."""

from __future__ import annotations

import asyncio
import json
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

from bastion.audit.ahead import WriteAhead
from bastion.audit.chain import Entry
from bastion.audit.keys import DB_FILE, audit_dir, claim_writer_id, load_checkpoint_key
from bastion.audit.seal import Checkpoint
from bastion.audit.store import SqliteAuditStore
from bastion.audit.trail import open_writer
from bastion.audit.writer import AuditWriter, WriterOptions
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
from bastion.audit.writer import WriterOptions
from bastion.audit.trail import open_writer
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


# --- durability levels: the write-ahead (process) and group commit (both) ----------------------


class CountingStore(GatedStore):
    """A gated store that counts its commits (transactions holding entries)."""

    def __init__(self, inner: SqliteAuditStore) -> None:
        super().__init__(inner)
        self.commits = 0

    def append_batch(
        self, entries: Sequence[Entry], checkpoints: Sequence[Checkpoint] = ()
    ) -> None:
        super().append_batch(entries, checkpoints)
        if entries:
            self.commits += 1


def level_writer(
    state_dir: Path, survives: str, **options: Any
) -> tuple[AuditWriter, CountingStore]:
    """A writer at `survives` (process: with its write-ahead) over a counting, gated store."""
    folder = audit_dir(state_dir)
    synchronous = "NORMAL" if survives == "process" else "FULL"
    store = CountingStore(SqliteAuditStore(folder / DB_FILE, synchronous=synchronous))
    claim = claim_writer_id(folder)
    ahead = WriteAhead(folder, claim.writer_id) if survives == "process" else None
    writer = AuditWriter(
        store,  # type: ignore[arg-type]
        claim.writer_id,
        load_checkpoint_key(folder),
        WriterOptions(**options),
        claim=claim,
        ahead=ahead,
    )
    return writer, store


def ahead_ids(state_dir: Path, writer_id: str) -> list[str]:
    """Request ids in the writer's write-ahead files, read as a restart would."""
    records = WriteAhead(audit_dir(state_dir), writer_id).replay(0)
    return [json.loads(record)["request_id"] for record in records]


async def test_process_level_strict_append_waits_for_no_commit(tmp_path: Path) -> None:
    """At `process` a strict append returns once written ahead, while the store cannot commit:
    no commit (so no fsync, and no thread round trip) is on a call's path."""
    writer, store = level_writer(tmp_path, "process")
    await writer.start()
    store.gate.clear()
    async with asyncio.timeout(2):
        for i in range(3):
            await writer.append(sample(i), durable=True)
    assert stored_ids(tmp_path) == []
    assert ahead_ids(tmp_path, writer.writer_id) == ["req-0", "req-1", "req-2"]
    store.gate.set()
    await until(lambda: writer.queue_depth == 0)
    assert stored_ids(tmp_path) == ["req-0", "req-1", "req-2"]
    with sqlite3.connect(audit_dir(tmp_path) / DB_FILE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    await writer.stop()
    assert not any(audit_dir(tmp_path).glob("ahead-*"))  # all committed: nothing left ahead


@pytest.mark.parametrize("survives", ["process", "power"])
async def test_concurrent_strict_appends_share_commits(tmp_path: Path, survives: str) -> None:
    """N strict appends made while a commit is under way go to the store in fewer than N
    commits (at `power`, that is fewer fsyncs than calls)."""
    calls = 64
    writer, store = level_writer(tmp_path, survives)
    await writer.start()
    store.gate.clear()
    first = asyncio.create_task(writer.append(sample(0), durable=True))
    await until(lambda: store.entered.is_set() or first.done())
    tasks = [asyncio.create_task(writer.append(sample(i), durable=True)) for i in range(1, calls)]
    await until(lambda: writer.queue_depth == calls or all(t.done() for t in tasks))
    store.gate.set()
    await asyncio.gather(first, *tasks)
    await until(lambda: writer.queue_depth == 0)
    assert len(stored_ids(tmp_path)) == calls
    assert 0 < store.commits < calls, store.commits
    await writer.stop()
    assert check(tmp_path).ok


async def test_a_failed_write_ahead_falls_back_to_waiting_for_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write-ahead that fails (a full disk) never lets a strict append return before its
    record is safe: from then on strict appends wait for their commit."""
    writer, store = level_writer(tmp_path, "process", linger=0.0)
    await writer.start()

    def refuse(self: WriteAhead, seq: int, record: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WriteAhead, "write", refuse)
    store.gate.clear()
    strict = asyncio.create_task(writer.append(sample(0), durable=True))
    await until(store.entered.is_set)
    for _ in range(20):  # loop turns, not time: a write-ahead that said "safe" returns in one
        await asyncio.sleep(0)
    assert not strict.done()  # waits for the store, as at `power`
    store.gate.set()
    await strict
    assert stored_ids(tmp_path) == ["req-0"]
    await writer.stop()


def test_write_ahead_rotates_empties_and_skips_a_torn_line(tmp_path: Path) -> None:
    ahead = WriteAhead(tmp_path, "w", rotate_bytes=100)
    ahead.open()
    for seq in range(1, 4):
        ahead.write(seq, b'{"n":%d,"pad":"%s"}' % (seq, b"x" * 40))
    first, second = (path.stat().st_size for path in ahead.paths)
    assert first > 100 and second > 0  # the third went to the other file
    ahead.committed(2)
    assert ahead.paths[0].stat().st_size == 0  # all of its records are in the store
    assert [json.loads(r)["n"] for r in ahead.replay(0)] == [3]
    with ahead.paths[1].open("ab") as torn:
        torn.write(b'4 {"n":4,"pa')  # a write the kill cut short: never reported written
    assert [json.loads(r)["n"] for r in ahead.replay(0)] == [3]
    assert ahead.replay(3) == []
    ahead.close(remove=True)
    assert not any(path.exists() for path in ahead.paths)


CHILD_AHEAD = """
import asyncio, sys
from bastion.audit.writer import WriterOptions
from bastion.audit.trail import open_writer
from tests.test_audit_record import sample

async def main(state_dir):
    # A linger far past the test: nothing is committed, every record is only written ahead.
    writer = open_writer(
        state_dir, WriterOptions(linger=600, batch_max=10**6), survives="process"
    )
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


def test_process_level_records_survive_kill_9_through_the_write_ahead(tmp_path: Path) -> None:
    """At `process`, records a strict append reported survive kill -9 of the writing process
    although none was committed: the next writer of the id commits them, chain intact."""
    printed = run_and_kill(tmp_path, CHILD_AHEAD, 400)
    assert stored_ids(tmp_path) == []  # the kill came before any commit: only the write-ahead

    async def restart() -> str:
        writer = open_writer(tmp_path, survives="process")
        await writer.start()
        await writer.append(sample(10**6), durable=True)
        await writer.stop()
        return writer.writer_id

    wid = asyncio.run(restart())
    stored = stored_ids(tmp_path)
    assert set(printed) <= set(stored), sorted(set(printed) - set(stored))[:5]
    report = check(tmp_path)
    assert report.ok, found(report)
    assert report.writers[wid].last_seq == len(stored)
    assert not any(audit_dir(tmp_path).glob("ahead-*"))


def run_and_kill(state_dir: Path, script: str, lines: int) -> list[str]:
    """Run `script` until it printed `lines` lines, SIGKILL it, and return all it printed."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(state_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None
    printed: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(printed) < lines and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            printed.append(line.decode().strip())
        assert len(printed) >= lines, child.stderr.read().decode() if child.stderr else ""
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return printed + rest.decode().split()
