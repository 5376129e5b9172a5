"""The SQLite audit store and the state-directory files: reads, queries, resumption, errors,
writer-id slots."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from tests.test_audit_record import sample

from bastion.audit.chain import Chain, Entry
from bastion.audit.keys import claim_writer_id
from bastion.audit.record import AuditRecord
from bastion.audit.seal import Checkpoint, sign_checkpoint
from bastion.audit.store import Query, SqliteAuditStore
from bastion.errors import AuditUnavailable
from bastion.identity.keys import generate


def append(store: SqliteAuditStore, chain: Chain, *records: bytes) -> list[Entry]:
    entries = chain.extend(records)
    store.append_batch(entries)
    chain.advance(entries[-1])
    return entries


@pytest.fixture
def store(tmp_path: Path) -> SqliteAuditStore:
    return SqliteAuditStore(tmp_path / "audit.db")


def test_append_read_and_resume(store: SqliteAuditStore) -> None:
    a, b = Chain("a"), Chain("b")
    append(store, a, sample(0).to_json(), sample(1).to_json())
    append(store, b, sample(2).to_json())
    append(store, a, sample(3).to_json())
    assert [(e.writer_id, e.seq) for e in store.read()] == [("a", 1), ("a", 2), ("b", 1), ("a", 3)]
    assert [e.seq for e in store.read("a", since_seq=1)] == [2, 3]
    assert store.last("a") == (3, a.head) and store.last("b") == (1, b.head)
    assert store.last("c") is None and store.last_checkpoint("a") is None
    mark = sign_checkpoint(generate("EdDSA"), "a", 3, a.head, 1.0)
    store.append_batch([], [mark])
    assert store.last_checkpoint("a") == mark
    assert store.checkpoints() == [mark] and store.checkpoints("b") == []


def test_a_batch_is_one_transaction(store: SqliteAuditStore) -> None:
    chain = Chain("a")
    good = chain.extend([sample(0).to_json()])
    clash = chain.extend([sample(1).to_json()])
    store.append_batch(good)
    with pytest.raises(AuditUnavailable, match="(?i)unique"):
        store.append_batch([clash[0], good[0]])  # the second row repeats (a, 1)
    assert [e.seq for e in store.read()] == [1]  # the first row of the batch was rolled back


def test_read_streams_in_chunks(store: SqliteAuditStore) -> None:
    chain = Chain("a")
    append(store, chain, *(sample(i).to_json() for i in range(2500)))
    assert [e.seq for e in store.read()] == list(range(1, 2501))
    assert len(list(store.read("a", since_seq=1200))) == 1300


def test_query_returns_the_newest_matches_oldest_first(store: SqliteAuditStore) -> None:
    chain = Chain("a")
    rows = [
        sample(0, time=100.0, tenant="acme", decision="allow"),
        sample(1, time=200.0, tenant="globex", decision="allow"),
        sample(2, time=300.0, tenant="acme", decision="deny", tool_exposed=None),
        sample(3, time=400.0, tenant="acme", phase="outcome", decision=None, outcome="ok"),
    ]
    append(store, chain, *(r.to_json() for r in rows))

    def ids(**filters: object) -> list[str]:
        found = store.query(Query(**filters))  # type: ignore[arg-type]
        return [AuditRecord.from_json(entry.record).request_id for entry in found]

    assert ids() == ["req-0", "req-1", "req-2", "req-3"]
    assert ids(tenant="acme", limit=2) == ["req-2", "req-3"]
    assert ids(decision="allow") == ["req-0", "req-1"]
    assert ids(tool="search_tasks") == ["req-2"]  # no exposed name: the original one counts
    assert ids(phase="outcome") == ["req-3"]
    assert ids(since=200.0, until=400.0) == ["req-1", "req-2"]
    assert store.tail(2)[1][1].seq == 4
    position = store.tail(2)[0][0]
    assert [e.seq for _, e in store.after(position)] == [4]


def test_disk_quota_is_a_clear_error(tmp_path: Path) -> None:
    store = SqliteAuditStore(tmp_path / "audit.db", max_bytes=48 * 1024)
    chain = Chain("a")
    with pytest.raises(AuditUnavailable, match="database or disk is full"):
        for i in range(1000):
            append(store, chain, sample(i).to_json())
    store.close()


def test_missing_or_unreadable_store(tmp_path: Path) -> None:
    with pytest.raises(AuditUnavailable, match="no audit store"):
        SqliteAuditStore(tmp_path / "absent.db", create=False)
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(AuditUnavailable, match="cannot open"):
        SqliteAuditStore(tmp_path / "junk.db")


def test_the_store_keeps_wal_and_the_chosen_sync_mode(tmp_path: Path) -> None:
    SqliteAuditStore(tmp_path / "audit.db", synchronous="NORMAL").close()
    with sqlite3.connect(tmp_path / "audit.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="FULL or NORMAL"):
        SqliteAuditStore(tmp_path / "other.db", synchronous="OFF")  # type: ignore[arg-type]


def test_writer_id_slots(tmp_path: Path) -> None:
    first = claim_writer_id(tmp_path)
    second = claim_writer_id(tmp_path)
    assert first.writer_id != second.writer_id
    assert (first.path.name, second.path.name) == ("writer-id", "writer-id.1")
    assert first.path.stat().st_mode & 0o777 == 0o600
    first.release()
    again = claim_writer_id(tmp_path)
    assert again.writer_id == first.writer_id  # the same chain goes on after a restart
    again.release()
    second.release()


def test_checkpoint_round_trips_through_the_store(store: SqliteAuditStore) -> None:
    mark = Checkpoint("w", 7, "ab" * 32, 1234.5678, "kid", "c2ln")
    store.append_batch([], [mark])
    assert store.checkpoints("w") == [mark]
