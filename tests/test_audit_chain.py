"""The hash chain and checkpoints: every kind of tampering with a stored trail is found, and
said where; an intact trail, a continued one and interleaved ones verify."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.test_audit_record import sample

from bastion.audit.chain import (
    GENESIS,
    Chain,
    Entry,
    Problem,
    VerifyReport,
    link,
    verify,
)
from bastion.audit.keys import (
    DB_FILE,
    audit_dir,
    load_checkpoint_key,
    load_public_keys,
    rotate_checkpoint_key,
)
from bastion.audit.seal import sign_checkpoint
from bastion.audit.store import SqliteAuditStore
from bastion.audit.trail import open_writer
from bastion.audit.writer import WriterOptions
from bastion.identity.keys import KeySet, SigningKey, generate


async def build_trail(state_dir: Path, count: int = 25, start: int = 0, every: int = 10) -> str:
    """Append `count` records one strict append at a time; checkpoints every `every` records
    and one at stop. Returns the writer id."""
    options = WriterOptions(checkpoint_every=every, checkpoint_seconds=3600, linger=0)
    writer = open_writer(state_dir, options)
    await writer.start()
    for i in range(start, start + count):
        await writer.append(sample(i), durable=True)
    await writer.stop()
    return writer.writer_id


def check(state_dir: Path) -> VerifyReport:
    folder = audit_dir(state_dir)
    with SqliteAuditStore(folder / DB_FILE, create=False) as store:
        return verify(store.read(), store.checkpoints(), load_public_keys(folder))


def found(report: VerifyReport) -> list[tuple[Problem, int]]:
    return [(f.problem, f.seq) for f in report.findings]


# --- tampering, one function per attack: (database, writer id) -> None ------------------------


def _hash_of(db: sqlite3.Connection, seq: int) -> str:
    return str(db.execute("SELECT hash FROM entries WHERE seq = ?", (seq,)).fetchone()[0])


def modify(db: sqlite3.Connection, wid: str) -> None:
    db.execute(
        'UPDATE entries SET record = replace(record, \'"tenant":"acme"\', \'"tenant":"evil"\')'
        " WHERE seq = 7"
    )


def modify_and_relink(db: sqlite3.Connection, wid: str) -> None:
    """Change record 7 and recompute every hash after it, as someone who read chain.py would."""
    modify(db, wid)
    head = _hash_of(db, 6)
    for seq, record in db.execute("SELECT seq, record FROM entries WHERE seq >= 7 ORDER BY seq"):
        new = link(head, wid, seq, record.encode())
        db.execute("UPDATE entries SET prev_hash = ?, hash = ? WHERE seq = ?", (head, new, seq))
        head = new


def delete(db: sqlite3.Connection, wid: str) -> None:
    db.execute("DELETE FROM entries WHERE seq = 7")


def _forged_row(db: sqlite3.Connection, wid: str, row_id: int, seq: int) -> None:
    record = sample(99, tenant="evil").to_json()
    prev = _hash_of(db, seq - 1)
    db.execute(
        "INSERT INTO entries (id, writer_id, seq, record, prev_hash, hash, time, phase)"
        " VALUES (?, ?, ?, ?, ?, ?, 0, 'decision')",
        (row_id, wid, seq, record.decode(), prev, link(prev, wid, seq, record)),
    )


def insert_duplicate(db: sqlite3.Connection, wid: str) -> None:
    """A forged, well-linked seq 7 stored between 6 and the real 7."""
    db.execute("DROP INDEX entries_chain")
    db.execute("UPDATE entries SET id = id + 1000 WHERE seq >= 7")
    _forged_row(db, wid, 7, 7)


def insert_renumbered(db: sqlite3.Connection, wid: str) -> None:
    """A forged seq 7 with every later record moved up by one."""
    db.execute("UPDATE entries SET id = id + 1000, seq = seq + 1000 WHERE seq >= 7")
    db.execute("UPDATE entries SET id = id - 999, seq = seq - 999 WHERE seq >= 1000")
    _forged_row(db, wid, 7, 7)


def swap_rows(db: sqlite3.Connection, wid: str) -> None:
    """Store record 8 before record 7 (each intact)."""
    db.execute("UPDATE entries SET id = -1 WHERE seq = 7")
    db.execute("UPDATE entries SET id = 7 WHERE seq = 8")
    db.execute("UPDATE entries SET id = 8 WHERE seq = 7")


def swap_records(db: sqlite3.Connection, wid: str) -> None:
    """Exchange the contents of 7 and 8, leaving seqs and hashes in place."""
    seven, eight = (
        db.execute("SELECT record FROM entries WHERE seq = ?", (seq,)).fetchone()[0]
        for seq in (7, 8)
    )
    db.execute("UPDATE entries SET record = ? WHERE seq = 7", (eight,))
    db.execute("UPDATE entries SET record = ? WHERE seq = 8", (seven,))


def truncate(db: sqlite3.Connection, wid: str) -> None:
    db.execute("DELETE FROM entries WHERE seq > 20")


def move_checkpoint(db: sqlite3.Connection, wid: str) -> None:
    """Point the checkpoint of seq 20 at seq 15 (keeping its signature)."""
    db.execute("UPDATE checkpoints SET seq = 15, hash = ? WHERE seq = 20", (_hash_of(db, 15),))


def _resign(db: sqlite3.Connection, wid: str, kid: str | None) -> None:
    attacker = generate("EdDSA")
    if kid is not None:
        attacker = SigningKey(kid, "EdDSA", attacker.private)
    head, when = db.execute("SELECT hash, time FROM checkpoints WHERE seq = 20").fetchone()
    cp = sign_checkpoint(attacker, wid, 20, head, when)
    db.execute(
        "UPDATE checkpoints SET kid = ?, signature = ? WHERE seq = 20", (cp.kid, cp.signature)
    )


def forge_signature(db: sqlite3.Connection, wid: str) -> None:
    """Re-sign the checkpoint of seq 20 with another key under the real key's kid."""
    kid = db.execute("SELECT kid FROM checkpoints WHERE seq = 20").fetchone()[0]
    _resign(db, wid, kid)


def forge_with_own_key(db: sqlite3.Connection, wid: str) -> None:
    _resign(db, wid, None)


CASES: list[tuple[str, Callable[[sqlite3.Connection, str], None], list[tuple[Problem, int]]]] = [
    ("modify", modify, [(Problem.MODIFIED, 7)]),
    (
        "modify_and_relink",
        modify_and_relink,
        [
            (Problem.CHECKPOINT_MISMATCH, 10),
            (Problem.CHECKPOINT_MISMATCH, 20),
            (Problem.CHECKPOINT_MISMATCH, 25),
        ],
    ),  # fmt: skip
    ("delete", delete, [(Problem.MISSING, 7)]),
    ("insert_duplicate", insert_duplicate, [(Problem.DUPLICATE, 7), (Problem.CHAIN_BREAK, 8)]),
    ("swap_rows", swap_rows, [(Problem.REORDERED, 7)]),
    ("swap_records", swap_records, [(Problem.MODIFIED, 7), (Problem.MODIFIED, 8)]),
    ("truncate", truncate, [(Problem.TRUNCATED, 21)]),
    ("move_checkpoint", move_checkpoint, [(Problem.BAD_SIGNATURE, 15)]),
    ("forge_signature", forge_signature, [(Problem.BAD_SIGNATURE, 20)]),
    ("forge_with_own_key", forge_with_own_key, [(Problem.UNKNOWN_KEY, 20)]),
]


@pytest.mark.parametrize(("name", "tamper", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_tampering_is_found_where_it_happened(
    tmp_path: Path,
    name: str,
    tamper: Callable[[sqlite3.Connection, str], None],
    expected: list[tuple[Problem, int]],
) -> None:
    wid = await build_trail(tmp_path)
    assert check(tmp_path).ok
    with sqlite3.connect(audit_dir(tmp_path) / DB_FILE, isolation_level=None) as db:
        tamper(db, wid)
    report = check(tmp_path)
    assert not report.ok
    assert found(report) == expected
    first = report.first
    assert first is not None and first.writer_id == wid
    assert str(first).startswith(f"writer {wid} seq {expected[0][1]}: {expected[0][0]}")


async def test_insert_with_renumbering_breaks_the_chain_right_after_it(tmp_path: Path) -> None:
    wid = await build_trail(tmp_path)
    with sqlite3.connect(audit_dir(tmp_path) / DB_FILE, isolation_level=None) as db:
        insert_renumbered(db, wid)
    report = check(tmp_path)
    assert report.first is not None and (report.first.problem, report.first.seq) == (
        Problem.MODIFIED,
        8,
    )
    assert (Problem.CHAIN_BREAK, 8) in found(report)
    assert (Problem.MODIFIED, 7) not in found(report)  # the forgery itself links well...
    assert (Problem.CHECKPOINT_MISMATCH, 10) in found(report)  # ...but not under a checkpoint


async def test_intact_trail_verifies_and_reports_its_extent(tmp_path: Path) -> None:
    wid = await build_trail(tmp_path)
    report = check(tmp_path)
    assert report.ok and report.first is None and report.findings == []
    summary = report.writers[wid]
    assert (summary.entries, summary.first_seq, summary.last_seq) == (25, 1, 25)
    assert summary.checkpoints == 3  # seq 10, 20 and the one at stop
    assert summary.unsealed == 0


async def test_restarted_writer_continues_its_chain(tmp_path: Path) -> None:
    first = await build_trail(tmp_path, count=15)
    second = await build_trail(tmp_path, count=15, start=15)
    assert first == second
    report = check(tmp_path)
    assert report.ok, found(report)
    assert list(report.writers) == [first]
    assert report.writers[first].last_seq == 30
    with SqliteAuditStore(audit_dir(tmp_path) / DB_FILE) as store:
        seqs = [entry.seq for entry in store.read()]
        assert seqs == list(range(1, 31))
        assert store.last(first) == (30, store.checkpoints()[-1].hash)


async def test_writers_sharing_a_state_dir_keep_separate_chains(tmp_path: Path) -> None:
    options = WriterOptions(checkpoint_every=5, linger=0)
    one, two = open_writer(tmp_path, options), open_writer(tmp_path, options)
    assert one.writer_id != two.writer_id
    await one.start()
    await two.start()
    for i in range(12):
        await one.append(sample(i), durable=True)
        await two.append(sample(100 + i), durable=i % 2 == 0)
    await one.stop()
    await two.stop()
    report = check(tmp_path)
    assert report.ok, found(report)
    assert {wid: s.last_seq for wid, s in report.writers.items()} == {
        one.writer_id: 12,
        two.writer_id: 12,
    }


async def test_rotated_key_keeps_old_checkpoints_verifiable(tmp_path: Path) -> None:
    await build_trail(tmp_path, count=12)
    old = load_checkpoint_key(audit_dir(tmp_path))
    new = rotate_checkpoint_key(audit_dir(tmp_path))
    assert new.kid != old.kid and load_checkpoint_key(audit_dir(tmp_path)).kid == new.kid
    await build_trail(tmp_path, count=12, start=12)
    with SqliteAuditStore(audit_dir(tmp_path) / DB_FILE) as store:
        kids = {cp.kid for cp in store.checkpoints()}
    assert kids == {old.kid, new.kid}
    assert check(tmp_path).ok
    assert set(load_public_keys(audit_dir(tmp_path)).kids) == {old.kid, new.kid}


def test_key_files_are_private(tmp_path: Path) -> None:
    folder = audit_dir(tmp_path)
    key = load_checkpoint_key(folder)
    assert key.alg == "EdDSA"
    assert (folder / "checkpoint-key.pem").stat().st_mode & 0o777 == 0o600
    assert load_checkpoint_key(folder).kid == key.kid  # read back, not made again


# --- the pure core ----------------------------------------------------------------------------


def test_link_is_the_documented_formula() -> None:
    record = b'{"phase":"alert","request_id":"r","time":1,"v":1}'
    expected = hashlib.sha256(
        bytes(32) + bytes([4]) + b"w-01" + (3).to_bytes(8, "big") + record
    ).hexdigest()
    assert link(GENESIS, "w-01", 3, record) == expected


def test_chain_extends_without_moving_until_advanced() -> None:
    chain = Chain("w1")
    entries = chain.extend([b"{}", b"[]"])
    assert [e.seq for e in entries] == [1, 2]
    assert entries[0].prev_hash == GENESIS and entries[1].prev_hash == entries[0].hash
    assert (chain.seq, chain.head) == (0, GENESIS)
    chain.advance(entries[-1])
    assert (chain.seq, chain.head) == (2, entries[1].hash)
    with pytest.raises(ValueError, match="writer id"):
        Chain("no spaces")


def test_interleaved_writers_verify_and_an_unsealed_tail_is_reported() -> None:
    a, b = Chain("a"), Chain("b")
    stored: list[Entry] = []
    for i in range(6):
        for chain in (a, b):
            (entry,) = chain.extend([f'{{"i":{i}}}'.encode()])
            chain.advance(entry)
            stored.append(entry)
    key = generate("EdDSA")
    keys = KeySet.from_jwks({"keys": [key.public_jwk()]})
    checkpoint = sign_checkpoint(key, "a", 4, stored[6].hash, 1.0)
    report = verify(stored, [checkpoint], keys)
    assert report.ok
    assert (report.writers["a"].unsealed, report.writers["b"].unsealed) == (2, 6)


def test_garbage_in_a_row_is_a_finding_not_a_crash() -> None:
    good = Chain("w").extend([b"{}"])[0]
    bad = Entry("w", 1, "{}", "not hex", good.hash)
    report = verify([bad], [], KeySet({}))
    assert found(report) == [(Problem.MODIFIED, 1), (Problem.CHAIN_BREAK, 1)]
