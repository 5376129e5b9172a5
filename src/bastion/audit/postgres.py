"""The audit store in PostgreSQL, shared by every replica of a gateway: `PostgresAuditStore`.

The tables and columns are those of the SQLite store (store.py), `id` an identity column giving
the append order. What differs comes from several processes appending to one database:

- **Append order is commit order.** An identity value is taken when a row is inserted, not when
  it commits, so two replicas committing side by side could make id 101 visible before id 100
  and a reader paging by id (`read`, `after`, `tail --follow`, `verify`) would skip 100 for
  good. Each append transaction therefore first takes one transaction-level advisory lock:
  the batches of all replicas commit one after another (group commit keeps them large under
  load). Advisory locks need no privilege, so the gateway's role may hold only INSERT and
  SELECT on the tables once an administrator has created them.
- **Writer ids are claimed in the database.** `hold(writer_id)` takes a session-level advisory
  lock on the id over the store's own connection, so a store appends only while it holds its
  writer's claim. The lock dies with the connection, so a crashed process's id is free again;
  after a reconnect the store takes it back, and fails closed if another process took it first.
- **What a commit survives is `synchronous_commit`.** `survives: power` keeps the server's
  setting unless it is `off` (then `on`): every other value waits for the WAL flush on the
  server, so a commit survives a crash or power loss of the database machine (and, with
  synchronous standbys configured, what the operator's value promises). `survives: process`
  sets `off` for the store's session: the server acknowledges the commit before flushing it,
  which survives any death of the gateway (the record is in the server) but not a crash of the
  PostgreSQL server or its machine within about 3 × `wal_writer_delay` (0.6 s by default).
- **A commit can fail without saying whether it happened** (the server went away after the
  COMMIT was sent). The next append then skips the records already stored with the same hash,
  so the writer's retry neither forks nor blocks its chain; any other clash fails loudly.

Errors leave as `AuditUnavailable`, naming the server but never the password. A broken
connection is replaced on the next call, so a restarted server is survived (the writer retries
failed batches). Advisory locks need a direct connection or a pooler in session mode.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any, TypeVar

import psycopg

from bastion.audit.chain import Entry
from bastion.audit.seal import Checkpoint
from bastion.audit.store import SqlReads, Survives, _row
from bastion.errors import AuditUnavailable
from bastion.postgres import Server, bound_waits, close_if_interrupted

__all__ = ["PostgresAuditStore", "audit_server"]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        writer_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        record TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        phase TEXT NOT NULL,
        tenant TEXT,
        agent TEXT,
        tool TEXT,
        decision TEXT
    )""",
    # Unique: a second process extending the same chain fails loudly instead of forking it.
    "CREATE UNIQUE INDEX IF NOT EXISTS entries_chain ON entries (writer_id, seq)",
    "CREATE INDEX IF NOT EXISTS entries_time ON entries (time)",
    "CREATE INDEX IF NOT EXISTS entries_tenant ON entries (tenant, time)",
    "CREATE INDEX IF NOT EXISTS entries_agent ON entries (agent, time)",
    "CREATE INDEX IF NOT EXISTS entries_tool ON entries (tool, time)",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        writer_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        kid TEXT NOT NULL,
        signature TEXT NOT NULL,
        PRIMARY KEY (writer_id, seq)
    )""",
)
_INSERT_ENTRY = """INSERT INTO entries (writer_id, seq, record, prev_hash, hash, time, phase,
    tenant, agent, tool, decision) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""
_INSERT_CHECKPOINT = """INSERT INTO checkpoints (writer_id, seq, hash, time, kid, signature)
    VALUES (%s, %s, %s, %s, %s, %s)"""
# Advisory lock keys (two int4 each, a space apart from single-bigint locks of other software):
# "BAST" + 0 orders appends and schema creation; "BASU" + a hash of the id claims a writer id.
_APPEND_LOCK = (0x42415354, 0)
_CLAIM_SPACE = 0x42415355
_Item = TypeVar("_Item", Entry, Checkpoint)


class PostgresAuditStore(SqlReads):
    """The audit store in a PostgreSQL database; thread-safe, one connection per instance."""

    def __init__(self, dsn: str, *, create: bool = True, survives: Survives = "power") -> None:
        self._server = audit_server(dsn, "bastion-audit")
        self.where = self._server.where
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._held: str | None = None  # the writer id this store's connection claims
        self._uncertain = False  # an append failed without knowing whether it committed
        self._closed = False
        if survives not in ("process", "power"):
            raise ValueError(f"expected survives process or power, found {survives!r}")
        self._flush = survives == "power"  # commits wait for the server's WAL flush
        with self._lock, self._guard("open"):
            conn = self._connection()
            if create:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _APPEND_LOCK)
                    if not _exists(conn):  # CREATE … IF NOT EXISTS needs CREATE even then
                        for statement in _SCHEMA:
                            conn.execute(statement)
            elif not _exists(conn):
                raise AuditUnavailable(f"no audit trail in {self.where} (has the gateway run?)")

    # --- writing ----------------------------------------------------------------------------

    def append_batch(
        self, entries: Sequence[Entry], checkpoints: Sequence[Checkpoint] = ()
    ) -> None:
        """Store entries and checkpoints in one transaction; durable when this returns."""
        with self._lock, self._guard("append to"):
            conn = self._connection()
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _APPEND_LOCK)
                    if self._uncertain:
                        entries, checkpoints = _unstored(conn, entries, checkpoints)
                    with conn.cursor() as cursor:
                        if entries:
                            cursor.executemany(_INSERT_ENTRY, [_row(e) for e in entries])
                        if checkpoints:
                            cursor.executemany(
                                _INSERT_CHECKPOINT,
                                [
                                    (c.writer_id, c.seq, c.hash, c.time, c.kid, c.signature)
                                    for c in checkpoints
                                ],
                            )
            except BaseException:
                if conn.closed:  # the COMMIT may or may not have reached the server
                    self._uncertain = True
                raise
            self._uncertain = False

    def hold(self, writer_id: str) -> _Held | None:
        """Claim `writer_id` for this store's connection; None when another session holds it.

        For `claim_writer_id(..., hold=store.hold)`. The claim is taken again after a reconnect.
        """
        with self._lock, self._guard("claim a writer id in"):
            if self._held is not None:
                raise RuntimeError(f"this store claims writer id {self._held} already")
            if not _try_claim(self._connection(), writer_id):
                return None
            self._held = writer_id
        return _Held(self)

    def close(self) -> None:
        """Close the connection, which also gives up a claimed writer id."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> PostgresAuditStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, or a new one (claiming the writer id again); under `_lock`."""
        if self._closed:
            raise AuditUnavailable(f"the audit store {self.where} is closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn = None
        conn = self._server.connect()
        try:
            # power: the commit waits for the WAL flush, whatever the default; process: the
            # server holding the commit is enough (module docstring).
            if not self._flush:
                conn.execute("SET synchronous_commit = off")
            elif conn.execute("SHOW synchronous_commit").fetchone() == ("off",):
                conn.execute("SET synchronous_commit = on")
            bound_waits(conn)  # a replica cut off inside its append holds the others briefly
            if self._held is not None and not _try_claim(conn, self._held):
                raise AuditUnavailable(
                    f"audit writer id {self._held} was claimed in {self.where} by another "
                    "process while this one was disconnected; this writer stops"
                )
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _release(self) -> None:
        with self._lock:
            held, self._held = self._held, None
            conn = self._conn
            if held is None or conn is None or conn.closed:
                return
            try:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_CLAIM_SPACE, _key(held)))
            except psycopg.Error:
                conn.close()  # the claim goes with the connection

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        with self._lock, self._guard("read"):
            return self._connection().execute(_placeholders(sql), params).fetchone()

    def _all(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self._lock, self._guard("read"):
            return self._connection().execute(_placeholders(sql), params).fetchall()

    def _guard(self, verb: str) -> _Translate:
        return _Translate(self, verb)


class _Held:
    """A writer id claimed by a store's connection (see `PostgresAuditStore.hold`)."""

    def __init__(self, store: PostgresAuditStore) -> None:
        self._store: PostgresAuditStore | None = store

    def release(self) -> None:
        """Give the id up (closing the store gives it up too)."""
        if self._store is not None:
            self._store._release()
            self._store = None


class _Translate:
    """Turn psycopg errors into `AuditUnavailable` at the adapter's edge, password removed."""

    def __init__(self, store: PostgresAuditStore, verb: str) -> None:
        self._store, self._verb = store, verb

    def __enter__(self) -> None:
        return None

    def __exit__(self, _: object, exc: BaseException | None, __: object) -> None:
        store = self._store
        if exc is not None:
            close_if_interrupted(store._conn)
        if isinstance(exc, psycopg.Error):
            detail = store._server.detail(exc)
            raise AuditUnavailable(
                f"cannot {self._verb} the audit store {store.where}: {detail}"
            ) from exc


def audit_server(dsn: str, application_name: str) -> Server:
    """The audit trail's server (`audit.dsn`), connected to as `application_name`.

    Unless the DSN says otherwise: fail fast, notice a dead peer (the fleet's detectors share
    these settings).
    """
    return Server.parse(
        dsn,
        key="audit.dsn",
        error=AuditUnavailable,
        application_name=application_name,
        connect_timeout=5,
        tcp_user_timeout_ms=15000,
    )


def _exists(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT to_regclass('entries') IS NOT NULL AND to_regclass('checkpoints') IS NOT NULL"
    ).fetchone()
    return bool(row and row[0])


def _key(writer_id: str) -> int:
    """The writer id's claim key: 32 bits of its SHA-256 (a collision only skips a slot)."""
    return int.from_bytes(hashlib.sha256(writer_id.encode()).digest()[:4], "big", signed=True)


def _try_claim(conn: psycopg.Connection[Any], writer_id: str) -> bool:
    row = conn.execute(
        "SELECT pg_try_advisory_lock(%s, %s)", (_CLAIM_SPACE, _key(writer_id))
    ).fetchone()
    return bool(row and row[0])


def _unstored(
    conn: psycopg.Connection[Any], entries: Sequence[Entry], checkpoints: Sequence[Checkpoint]
) -> tuple[list[Entry], list[Checkpoint]]:
    """The entries and checkpoints not stored yet.

    After a commit whose outcome is unknown, the retried batch starts with the records it held
    (the writer re-queues them in front): those already stored with the same hash are skipped.
    """
    return _fresh(conn, "entries", entries), _fresh(conn, "checkpoints", checkpoints)


def _fresh(conn: psycopg.Connection[Any], table: str, items: Sequence[_Item]) -> list[_Item]:
    """`items` not in `table`; AuditUnavailable when one's place holds another hash."""
    if not items:
        return []
    rows = conn.execute(
        f"SELECT writer_id, seq, hash FROM {table} "  # noqa: S608 - a fixed table name
        "WHERE (writer_id, seq) IN (SELECT * FROM unnest(%s::text[], %s::bigint[]))",
        ([i.writer_id for i in items], [i.seq for i in items]),
    ).fetchall()
    stored = {(str(w), int(s)): str(h) for w, s, h in rows}
    fresh = []
    for item in items:
        found = stored.get((item.writer_id, item.seq))
        if found is None:
            fresh.append(item)
        elif found != item.hash:
            raise AuditUnavailable(
                f"the audit store holds another record at writer {item.writer_id} "
                f"seq {item.seq}; this writer's chain cannot continue"
            )
    return fresh


def _placeholders(sql: str) -> str:
    """SqlReads' `?` placeholders in psycopg's style (the statements hold no other `?` or `%`)."""
    return sql.replace("?", "%s")
