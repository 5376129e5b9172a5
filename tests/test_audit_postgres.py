"""The audit trail in a real PostgreSQL server: the SQLite store's contract, strict appends,
`bastion audit` against it, writer-id claims across processes, and failing closed while the
server is down without losing a record."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tests.test_audit_store as sqlite_contract
from tests import pg
from tests.pg import PgServer, start_server
from tests.test_audit_record import sample
from tests.test_audit_writer import until
from typer.testing import CliRunner

from bastion.audit.chain import Chain, VerifyReport, verify
from bastion.audit.keys import audit_dir, load_public_keys
from bastion.audit.postgres import PostgresAuditStore
from bastion.audit.trail import open_trail_reader, open_trail_writer
from bastion.audit.writer import AuditWriter
from bastion.config import Settings, parse
from bastion.control.assembly import open_audit
from bastion.control.cli.audit import app
from bastion.errors import AuditUnavailable, ConfigError

postgres = pg.postgres  # the session's server (a fixture)

ROOT = Path(__file__).resolve().parent.parent
DSN_VAR = "BASTION_TEST_AUDIT_DSN"


@pytest.fixture
def dsn(postgres: PgServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database's DSN, also in the environment variable the configs below name."""
    value = postgres.database()
    monkeypatch.setenv(DSN_VAR, value)
    return value


@pytest.fixture
def store(dsn: str) -> Iterator[PostgresAuditStore]:
    with PostgresAuditStore(dsn) as opened:
        yield opened


def settings(tmp_path: Path, state: str = "state", **audit: Any) -> Settings:
    fields = {"store": "postgres", "dsn": f"env:{DSN_VAR}", **audit}
    body = ", ".join(f"{key}: {value}" for key, value in fields.items())
    return parse(f"state_dir: {state}\naudit: {{{body}}}\n", base=tmp_path)


def verified(tmp_path: Path) -> VerifyReport:
    """The verify report of the trail `settings(tmp_path)` names."""
    with open_trail_reader(settings(tmp_path)) as store:
        keys = load_public_keys(audit_dir(tmp_path / "state"))
        return verify(store.read(), store.checkpoints(), keys)


def request_ids(dsn: str) -> list[str]:
    """Request ids in append order, read over a connection of the test's own."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT record::json->>'request_id' FROM entries ORDER BY id")
        return [str(row[0]) for row in rows]


# --- the configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "literal",
    [
        "postgresql://bastion:hunter2-secret@db.internal:5432/audit",
        "postgres://bastion:hunter2-secret@db.internal/audit?sslmode=require",
        "host=db.internal user=bastion password=hunter2-secret dbname=audit",
        "postgresql://bastion@db.internal/audit?password=hunter2-secret",
    ],
)
def test_a_literal_password_in_the_dsn_is_refused(literal: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"audit:\n  store: postgres\n  dsn: '{literal}'\n")
    (problem,) = caught.value.problems
    assert problem.startswith("audit.dsn (line 3): ")
    assert "literal secrets are refused" in problem and "hunter2" not in problem


@pytest.mark.parametrize(
    ("audit", "problem"),
    [
        ("{store: postgres}", "store postgres needs audit.dsn"),
        ("{store: postgres, dsn: 'vault:kv/audit#dsn'}", "audit.dsn (line 2): expected env:"),
        ("{store: postgres, dsn: 'env:X', max_bytes: 100000}", "applies to store sqlite only"),
        ("{store: mysql, dsn: 'env:X'}", "audit.store (line 2)"),
    ],
)
def test_postgres_settings_that_cannot_work_are_refused(audit: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse(f"state_dir: s\naudit: {audit}\n")


def test_references_and_password_free_dsns_are_accepted(tmp_path: Path) -> None:
    for dsn in ("env:AUDIT_DSN", "file:/run/secrets/audit-dsn", "postgresql://bastion@db/audit"):
        parsed = parse(f"audit: {{store: postgres, dsn: '{dsn}'}}\n")
        assert parsed.audit.dsn == dsn
    assert parse("audit: {}\n").audit.store == "sqlite"


def test_an_unset_reference_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DSN_VAR, raising=False)
    with pytest.raises(ConfigError, match=f"audit.dsn: environment variable '{DSN_VAR}'"):
        open_trail_writer(settings(tmp_path))
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://nobody@127.0.0.1:1/none\n")
    config = settings(tmp_path, dsn=f"'file:{secret}'")
    with pytest.raises(AuditUnavailable) as caught:
        open_trail_reader(config)  # the file was read: its DSN is what failed to connect
    assert "postgresql://nobody@127.0.0.1:1/none" in caught.value.message


# --- the store: the SQLite store's contract, and what only PostgreSQL needs -----------------

CONTRACT: list[Callable[[Any], None]] = [
    sqlite_contract.test_append_read_and_resume,
    sqlite_contract.test_a_batch_is_one_transaction,
    sqlite_contract.test_read_streams_in_chunks,
    sqlite_contract.test_query_returns_the_newest_matches_oldest_first,
    sqlite_contract.test_checkpoint_round_trips_through_the_store,
]


@pytest.mark.parametrize("case", CONTRACT, ids=[c.__name__.removeprefix("test_") for c in CONTRACT])
def test_the_sqlite_store_contract_holds(case: Callable[[Any], None], store: Any) -> None:
    case(store)


def test_a_missing_trail_or_server_is_a_clear_error_without_the_password(
    postgres: PgServer, dsn: str
) -> None:
    with pytest.raises(AuditUnavailable, match=r"no audit trail in postgresql://bastion_test@"):
        PostgresAuditStore(dsn, create=False)
    wrong = dsn.replace(postgres.password, "not-the-password-42")
    with pytest.raises(AuditUnavailable) as caught:
        PostgresAuditStore(wrong)
    assert "password authentication failed" in caught.value.message
    assert "not-the-password-42" not in caught.value.message
    with pytest.raises(AuditUnavailable) as caught:
        PostgresAuditStore("host=127.0.0.1 port=1 password=s3cr3t-pw connect_timeout=2")
    assert caught.value.message.startswith("cannot open the audit store postgresql://127.0.0.1:1/")
    assert "s3cr3t-pw" not in caught.value.message
    with pytest.raises(AuditUnavailable, match="is not a PostgreSQL DSN") as caught:
        PostgresAuditStore("host=127.0.0.1 password='s3cr3t-pw")
    assert "s3cr3t-pw" not in caught.value.message


def test_readers_paging_by_position_miss_nothing_while_writers_commit(dsn: str) -> None:
    """Positions are visible in order: a reader following `after` sees every row once."""
    writers = [PostgresAuditStore(dsn) for _ in range(2)]
    reader = PostgresAuditStore(dsn)
    seen: list[tuple[str, int]] = []
    done = threading.Event()

    def write(store: PostgresAuditStore, wid: str) -> None:
        chain = Chain(wid)
        for i in range(60):
            sqlite_contract.append(store, chain, *(sample(i * 3 + k).to_json() for k in range(3)))

    def follow() -> None:
        position, deadline = 0, time.monotonic() + 60
        while time.monotonic() < deadline:
            finished = done.is_set()  # read before the page: the last page follows the writes
            page = reader.after(position)
            seen.extend((entry.writer_id, entry.seq) for _, entry in page)
            if page:
                position = page[-1][0]
            elif finished:
                return
            else:
                time.sleep(0.002)

    threads = [threading.Thread(target=write, args=(s, f"w{n}")) for n, s in enumerate(writers)]
    follower = threading.Thread(target=follow)
    follower.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    done.set()
    follower.join(60)
    assert sorted(seen) == sorted((f"w{n}", seq) for n in range(2) for seq in range(1, 181))
    for store in (*writers, reader):
        store.close()


def test_a_batch_whose_commit_answer_was_lost_is_not_stored_twice(
    postgres: PgServer, store: PostgresAuditStore, dsn: str
) -> None:
    chain = Chain("w")
    records = [sample(i).to_json() for i in range(3)]
    first = chain.extend(records[:2])
    store.append_batch(first)  # committed; suppose its answer never arrived
    with postgres.connect() as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = 'bastion-audit' AND datname = %s",
            (dsn.rsplit("/", 1)[1],),
        )
    retried = chain.extend(records)  # the writer re-queues a failed batch in front
    with pytest.raises(AuditUnavailable, match="cannot append to the audit store"):
        store.append_batch(retried)  # the connection is gone
    store.append_batch(retried)  # a new one; the two records stored already are skipped
    assert [e.seq for e in store.read()] == [1, 2, 3]
    assert request_ids(dsn) == ["req-0", "req-1", "req-2"]
    chain.advance(retried[-1])
    forked = Chain("w").extend([sample(7).to_json()])
    store._uncertain = True  # as after another lost answer
    with pytest.raises(AuditUnavailable, match="holds another record at writer w seq 1"):
        store.append_batch(forked)


# --- the writer ------------------------------------------------------------------------------


async def test_strict_appends_are_committed_to_postgres_when_they_return(
    tmp_path: Path, dsn: str
) -> None:
    writer = open_audit(settings(tmp_path, checkpoint_every=3))
    assert writer is not None
    await writer.start()
    for i in range(5):
        await writer.append(sample(i), durable=True)
        assert request_ids(dsn)[-1] == f"req-{i}"  # visible to another session already
    await writer.stop()
    report = verified(tmp_path)
    assert report.ok, report.findings
    assert report.writers[writer.writer_id].checkpoints == 2  # at seq 3 and at stop
    with open_trail_reader(settings(tmp_path)) as store:
        assert store.last(writer.writer_id) == writer.head


# --- bastion audit --config against PostgreSQL ------------------------------------------------


def cli(*args: str | Path) -> Any:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


@pytest.fixture
def config(tmp_path: Path, dsn: str) -> Path:
    """A config whose audit.store is postgres, with six records in its trail."""

    async def fill() -> None:
        writer = open_trail_writer(settings(tmp_path, checkpoint_every=4))
        await writer.start()
        for i in range(6):
            decision = "deny" if i == 2 else "allow"
            await writer.append(sample(i, decision=decision, time=1000.0 + i), durable=True)
        await writer.stop()

    asyncio.run(fill())
    path = tmp_path / "bastion.yaml"
    path.write_text(f"state_dir: state\naudit:\n  store: postgres\n  dsn: env:{DSN_VAR}\n")
    return path


def test_cli_reads_verifies_and_finds_tampering_in_postgres(
    config: Path, postgres: PgServer, dsn: str
) -> None:
    result = cli("verify", "--config", config)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("intact: 6 records in 1 chain(s), 2 checkpoint(s)")
    denied = cli("query", "--config", config, "--decision", "deny", "--json")
    lines = denied.stdout.splitlines()
    assert [json.loads(line)["record"]["request_id"] for line in lines] == ["req-2"]
    assert len(cli("tail", "--config", config, "-n", "2").stdout.splitlines()) == 2
    assert len(cli("export", "--config", config).stdout.splitlines()) == 6

    with postgres.connect(dsn.rsplit("/", 1)[1]) as db:
        wid = db.execute("SELECT writer_id FROM entries LIMIT 1").fetchone()[0]
        db.execute("UPDATE entries SET record = replace(record, 'deny', 'allow') WHERE seq = 3")
        db.execute("DELETE FROM entries WHERE seq = 5")
    result = cli("verify", "--config", config)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"TAMPERED: writer {wid} seq 3: modified: the record does not match its hash: altered"
    )
    assert any(f"writer {wid} seq 5: missing" in line for line in lines[1:])


def test_cli_reports_an_unreachable_database_in_one_line_without_the_password(
    config: Path, postgres: PgServer, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DSN_VAR, dsn.replace(postgres.password, "wrong-password-99"))
    result = cli("verify", "--config", config)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot open the audit store postgresql://")
    assert "wrong-password-99" not in result.output + result.stderr
    monkeypatch.delenv(DSN_VAR)
    result = cli("tail", "--config", config)
    assert result.exit_code == 2 and "audit.dsn: environment variable" in result.stderr


# --- writer ids: one live process per chain, across machines ----------------------------------


def clone_state(source: Path, target: Path) -> None:
    """Another machine's state directory, copied from this one (same writer-id file)."""
    shutil.copytree(source, target)


async def test_a_writer_id_held_elsewhere_is_not_taken(tmp_path: Path, dsn: str) -> None:
    first = open_trail_writer(settings(tmp_path, "a"))
    await first.start()
    await first.append(sample(0), durable=True)
    clone_state(tmp_path / "a", tmp_path / "b")  # its writer-id file has first's id
    second = open_trail_writer(settings(tmp_path, "b"))
    assert second.writer_id != first.writer_id  # the database refused the clone's slot 0
    await second.start()
    await second.append(sample(1), durable=True)
    await second.stop()
    await first.stop()
    third = open_trail_writer(settings(tmp_path, "b"))  # first is gone: its id is free
    assert third.writer_id == first.writer_id
    await third.start()
    await third.append(sample(2), durable=True)
    await third.stop()
    with open_trail_reader(settings(tmp_path, "a")) as store:
        assert store.last(first.writer_id) is not None
        assert [e.seq for e in store.read(first.writer_id)] == [1, 2]


HOLDER = """
import asyncio, sys
from bastion.audit.trail import open_trail_writer
from bastion.config import parse

async def main():
    writer = open_trail_writer(parse(sys.argv[1], base=__import__("pathlib").Path(sys.argv[2])))
    await writer.start()
    print(writer.writer_id, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def claimed_id(tmp_path: Path, state: str) -> str:
    """The writer id a new writer of `state` claims; the writer is started and stopped."""
    writer = open_trail_writer(settings(tmp_path, state))
    await writer.start()
    await writer.stop()
    return writer.writer_id


async def test_a_crashed_process_s_writer_id_can_be_claimed_again(tmp_path: Path, dsn: str) -> None:
    config = f"state_dir: a\naudit: {{store: postgres, dsn: 'env:{DSN_VAR}'}}\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, config, str(tmp_path)], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert holder.stdout is not None
        held = (await asyncio.to_thread(holder.stdout.readline)).decode().strip()
        assert held, "the holder did not start"
        clone_state(tmp_path / "a", tmp_path / "b")
        assert await claimed_id(tmp_path, "b") != held  # the live holder keeps it
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 15
        # The server ends the dead process's session, and its claim, once it notices.
        while (again := await claimed_id(tmp_path, "b")) != held:
            assert time.monotonic() < deadline, f"{held} was not free again: {again}"
            await asyncio.sleep(0.05)
    finally:
        holder.kill()
        holder.wait(10)


def test_a_reconnected_store_does_not_write_a_chain_claimed_meanwhile(
    postgres: PgServer, dsn: str
) -> None:
    first, second = PostgresAuditStore(dsn), PostgresAuditStore(dsn)
    assert first.hold("w1") is not None
    assert second.hold("w1") is None
    with postgres.connect() as admin:  # first loses its connection, and so its claim
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = 'bastion-audit' AND pid <> pg_backend_pid() "
            "AND datname = %s AND pid = ANY(SELECT pid FROM pg_locks WHERE locktype = 'advisory')",
            (dsn.rsplit("/", 1)[1],),
        )
    assert second.hold("w1") is not None
    entries = Chain("w1").extend([sample(0).to_json()])
    with pytest.raises(AuditUnavailable, match="cannot append to the audit store"):
        first.append_batch(entries)  # its connection is gone
    for _ in range(2):  # a new one cannot take the claim back: it fails closed, and stays so
        with pytest.raises(AuditUnavailable, match="writer id w1 was claimed in .* by another"):
            first.append_batch(entries)
    second.append_batch(entries)
    first.close()
    second.close()


# --- the server goes away and comes back -----------------------------------------------------


@pytest.fixture
def private_server() -> Iterator[PgServer]:
    """A server of the test's own, which it may stop."""
    with start_server() as server:
        yield server


async def test_the_writer_fails_closed_while_the_server_is_down_and_recovers(
    tmp_path: Path, private_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = private_server.database()
    monkeypatch.setenv(DSN_VAR, dsn)
    writer: AuditWriter = open_trail_writer(settings(tmp_path))
    await writer.start()
    await writer.append(sample(0), durable=True)

    await asyncio.to_thread(private_server.stop)
    with pytest.raises(AuditUnavailable, match="cannot append to the audit store"):
        await writer.append(sample(1), durable=True)
    assert not writer.healthy
    assert private_server.password not in writer.problem
    with pytest.raises(AuditUnavailable, match="the audit trail is unavailable"):
        await writer.append(sample(2), durable=True)  # refused at once, kept queued
    for i in range(3, 6):
        await writer.append(sample(i), durable=False)
    await asyncio.sleep(0.3)  # a few retries against the stopped server
    assert not writer.healthy and writer.queue_depth == 5

    await asyncio.to_thread(private_server.start)
    await until(lambda: writer.healthy and writer.queue_depth == 0, deadline=20)
    await writer.append(sample(6), durable=True)
    await writer.stop()
    assert request_ids(dsn) == [f"req-{i}" for i in range(7)]
    report = verified(tmp_path)
    assert report.ok, report.findings


# --- durability levels --------------------------------------------------------------------------


@pytest.mark.parametrize(("survives", "expected"), [("process", "off"), ("power", "on")])
def test_the_level_sets_what_a_commit_waits_for(dsn: str, survives: Any, expected: str) -> None:
    """`survives: process` commits without waiting for the server's WAL flush (the record is
    in the server, safe from the gateway's death); `power` waits for it, even when the server's
    own default is `off`."""
    with PostgresAuditStore(dsn, survives=survives) as opened:
        with opened._lock:
            conn = opened._connection()
            assert conn.execute("SHOW synchronous_commit").fetchone() == (expected,)


def test_power_overrides_a_server_default_of_off(dsn: str) -> None:
    with PostgresAuditStore(dsn) as first:
        with first._lock:
            conn = first._connection()
            database = conn.execute("SELECT current_database()").fetchone()[0]
            conn.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    with PostgresAuditStore(dsn, survives="power") as opened, opened._lock:
        assert opened._connection().execute("SHOW synchronous_commit").fetchone() == ("on",)
