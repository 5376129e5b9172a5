"""The registry's PostgreSQL store: `PostgresDatabase`, the `Database` every replica shares.

What differs from SQLite comes from several processes on one server:

- **One writer at a time.** A write transaction first takes one transaction-level advisory
  lock, as SQLite's BEGIN IMMEDIATE takes the file's write lock: a read-check-write (an id
  taken, an agent already offboarded, a pin already approved) never races another replica's,
  and `revision` moves in commit order. Advisory locks need no privilege.
- **Snapshots are REPEATABLE READ**: the agents, revocations and killed sessions the view
  loads, and the version it stamps them with, are of one committed state.
- **The server may go away.** Errors leave as `RegistryUnavailable` naming the server but
  never the password; a broken connection is replaced on the next call, so the gateway's
  watcher resumes by itself when the server returns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus

from bastion.control.registry.db import _CONFLICT, Database, _Busy
from bastion.control.registry.schema import POSTGRES_MIGRATIONS
from bastion.errors import RegistryConflict, RegistryUnavailable
from bastion.postgres import Server, bound_waits, close_if_interrupted

__all__ = ["PostgresDatabase"]

# "BASR": the registry's write lock, apart from the audit store's "BAST"/"BASU" keys.
_WRITE_LOCK = (0x42415352, 0)


def _server(dsn: str) -> Server:
    """The registry's server (`registry.dsn`); unless the DSN says otherwise: fail fast (the
    view refuses after 5 s without a read, so a watcher must not hang longer than that on a
    dead server), and notice a dead peer."""
    return Server.parse(
        dsn,
        key="registry.dsn",
        error=RegistryUnavailable,
        application_name="bastion-registry",
        connect_timeout=3,
        tcp_user_timeout_ms=5000,
    )


def _alive(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection is still open, without a round trip: reads what the server
    sent meanwhile (on a restart, its goodbye and the end of the stream). Without it, the
    first call after the server came back would fail on the connection it had closed."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        return True  # inside a transaction: its statements will tell
    try:
        for _ in range(2):  # the first read takes the server's goodbye, the second its EOF
            conn.pgconn.consume_input()
    except psycopg.OperationalError:
        return False
    return conn.pgconn.status == ConnStatus.OK


class PostgresDatabase(Database):
    """The registry's tables in a PostgreSQL database, migrated on open; one connection per
    instance, opened again after the server went away."""

    def __init__(self, dsn: str, *, create: bool = True) -> None:
        self._server = _server(dsn)
        self.where = self._server.where
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False
        self.migrate(POSTGRES_MIGRATIONS, "registry_schema", create=create)

    def count(self, sql: str) -> int:
        """One integer read: one round trip to the server."""
        with self.read():
            row = self.one(sql)
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise RegistryUnavailable(f"the registry {self.where} is closed")
        if self._conn is not None and not self._conn.closed and not _alive(self._conn):
            self._conn.close()
        if self._conn is None or self._conn.closed:
            self._conn = None
            conn = self._server.connect()
            bound_waits(conn)  # a replica cut off inside a write holds the others briefly
            self._conn = conn
        return self._conn

    def _execute(self, sql: str, params: Sequence[Any]) -> psycopg.Cursor[Any]:
        # The shared statements use `?` and hold no other `?` or `%`.
        return self._connection().execute(sql.replace("?", "%s"), tuple(params))

    def _has_table(self, table: str) -> bool:
        row = self._execute("SELECT to_regclass(?) IS NOT NULL", (table,)).fetchone()
        return bool(row and row[0])

    @contextlib.contextmanager
    def _transaction(self, kind: str) -> Iterator[None]:
        with self._connection().transaction():
            if kind == "snapshot":
                self._execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY", ())
            elif kind == "try":
                row = self._execute("SELECT pg_try_advisory_xact_lock(?, ?)", _WRITE_LOCK)
                if not (row.fetchone() or (False,))[0]:
                    raise _Busy(f"another writer holds the registry {self.where}")
            else:
                self._execute("SELECT pg_advisory_xact_lock(?, ?)", _WRITE_LOCK)
            yield

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            close_if_interrupted(self._conn)
            if isinstance(exc, psycopg.errors.IntegrityError):
                raise RegistryConflict(_CONFLICT) from exc
            if isinstance(exc, psycopg.Error):
                detail = self._server.detail(exc)
                raise RegistryUnavailable(f"registry {self.where}: {detail}") from exc
            raise
