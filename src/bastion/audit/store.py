"""Where chains are kept: the `AuditStore` port and its SQLite adapter.

`SqliteAuditStore` keeps one file in WAL mode with `synchronous=FULL` by default: a batch
reported committed survives a crash of the process *and* of the machine (an fsync of the WAL
per commit). `NORMAL` (the `survives: process` level) writes the commit into the WAL without
fsync: it survives a process crash, kill -9 included, as the OS page cache holds it, but may
lose the last commits on an OS crash or power loss. Entries are
appended only; besides the chain fields each row keeps a few columns copied from the record
for searching (time, phase, tenant, agent, tool, decision). Those copies are not hashed: the
record JSON is the truth, and query results are always built from it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson

from bastion.audit.chain import Entry
from bastion.audit.seal import Checkpoint
from bastion.errors import AuditUnavailable

Synchronous = Literal["FULL", "NORMAL"]
Survives = Literal["process", "power"]  # what a record survives: a dead gateway; a dead machine

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        id INTEGER PRIMARY KEY,
        writer_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        record TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        time REAL NOT NULL,
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
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL,
        time REAL NOT NULL,
        kid TEXT NOT NULL,
        signature TEXT NOT NULL,
        PRIMARY KEY (writer_id, seq)
    )""",
)
_INSERT_ENTRY = """INSERT INTO entries (writer_id, seq, record, prev_hash, hash, time, phase,
    tenant, agent, tool, decision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_INSERT_CHECKPOINT = """INSERT INTO checkpoints (writer_id, seq, hash, time, kid, signature)
    VALUES (?, ?, ?, ?, ?, ?)"""
_ENTRY_COLUMNS = "id, writer_id, seq, record, prev_hash, hash"
_CHECKPOINT_COLUMNS = "writer_id, seq, hash, time, kid, signature"
_CHUNK = 1000
# Query filters: option name -> SQL condition on an indexed column (fixed text, never input).
_FILTERS = {
    "tenant": "tenant = ?",
    "agent": "agent = ?",
    "tool": "tool = ?",
    "decision": "decision = ?",
    "phase": "phase = ?",
    "since": "time >= ?",
    "until": "time < ?",
}


@dataclass(frozen=True, slots=True)
class Query:
    """Filters for `AuditStore.query`; None means any. `since`/`until` are epoch seconds."""

    tenant: str | None = None
    agent: str | None = None
    tool: str | None = None  # the exposed name (the original when none was exposed)
    decision: str | None = None
    phase: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100


class AuditStore(Protocol):
    """Durable, append-only storage for chain entries and checkpoints."""

    def append_batch(
        self, entries: Sequence[Entry], checkpoints: Sequence[Checkpoint] = ()
    ) -> None:
        """Store entries and checkpoints in one transaction, committed when this returns."""

    def last(self, writer_id: str) -> tuple[int, str] | None:
        """(seq, hash) of the writer's last entry, to continue its chain after a restart."""

    def last_checkpoint(self, writer_id: str) -> Checkpoint | None:
        """The writer's most recent checkpoint."""

    def read(self, writer_id: str | None = None, since_seq: int = 0) -> Iterator[Entry]:
        """Entries in append order; of one writer, only those after `since_seq`."""

    def checkpoints(self, writer_id: str | None = None) -> list[Checkpoint]:
        """Checkpoints, by writer and seq."""

    def query(self, query: Query) -> list[Entry]:
        """The newest `query.limit` entries matching the filters, oldest first."""

    def tail(self, count: int) -> list[tuple[int, Entry]]:
        """The last `count` entries with their positions, oldest first."""

    def after(self, position: int, limit: int = _CHUNK) -> list[tuple[int, Entry]]:
        """Entries appended after `position` (see `tail`), with their positions."""

    def close(self) -> None:
        """Release the store."""


class SqlReads:
    """The read side of both SQL stores, written once: statements use `?` placeholders and the
    subclass's `_one`/`_all` run them (translating the placeholders where its driver needs)."""

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        raise NotImplementedError

    def _all(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        raise NotImplementedError

    def last(self, writer_id: str) -> tuple[int, str] | None:
        """(seq, hash) of the writer's last entry, to continue its chain after a restart."""
        row = self._one(
            "SELECT seq, hash FROM entries WHERE writer_id = ? ORDER BY seq DESC LIMIT 1",
            (writer_id,),
        )
        return None if row is None else (int(row[0]), str(row[1]))

    def last_checkpoint(self, writer_id: str) -> Checkpoint | None:
        """The writer's most recent checkpoint."""
        row = self._one(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE writer_id = ? "  # noqa: S608
            "ORDER BY seq DESC LIMIT 1",
            (writer_id,),
        )
        return None if row is None else Checkpoint(*row)

    def read(self, writer_id: str | None = None, since_seq: int = 0) -> Iterator[Entry]:
        """Entries in append order; of one writer, only those after `since_seq`.

        Rows are fetched in chunks, each in its own statement, so a long read holds no lock
        (nor snapshot) between chunks and a live writer is never blocked by it.
        """
        position = 0
        while True:
            if writer_id is None:
                rows = self._all(
                    f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id > ? "  # noqa: S608
                    "ORDER BY id LIMIT ?",
                    (position, _CHUNK),
                )
            else:
                rows = self._all(
                    f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id > ? "  # noqa: S608
                    "AND writer_id = ? AND seq > ? ORDER BY id LIMIT ?",
                    (position, writer_id, since_seq, _CHUNK),
                )
            for row in rows:
                yield _entry(row)
            if len(rows) < _CHUNK:
                return
            position = int(rows[-1][0])

    def checkpoints(self, writer_id: str | None = None) -> list[Checkpoint]:
        """Checkpoints, by writer and seq."""
        sql = f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints"  # noqa: S608
        if writer_id is None:
            rows = self._all(f"{sql} ORDER BY writer_id, seq", ())
        else:
            rows = self._all(f"{sql} WHERE writer_id = ? ORDER BY seq", (writer_id,))
        return [Checkpoint(*row) for row in rows]

    def query(self, query: Query) -> list[Entry]:
        """The newest `query.limit` entries matching the filters, oldest first."""
        conditions, values = ["1 = 1"], []
        for name, condition in _FILTERS.items():
            value = getattr(query, name)
            if value is not None:
                conditions.append(condition)
                values.append(value)
        sql = (
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE "  # noqa: S608 - fixed fragments only
            + " AND ".join(conditions)
            + " ORDER BY time DESC, id DESC LIMIT ?"
        )
        rows = self._all(sql, (*values, max(0, query.limit)))
        return [_entry(row) for row in reversed(rows)]

    def tail(self, count: int) -> list[tuple[int, Entry]]:
        """The last `count` entries with their positions, oldest first."""
        rows = self._all(
            f"SELECT {_ENTRY_COLUMNS} FROM entries ORDER BY id DESC LIMIT ?",  # noqa: S608
            (max(0, count),),
        )
        return [(int(row[0]), _entry(row)) for row in reversed(rows)]

    def after(self, position: int, limit: int = _CHUNK) -> list[tuple[int, Entry]]:
        """Entries appended after `position` (see `tail`), with their positions."""
        rows = self._all(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id > ? "  # noqa: S608
            "ORDER BY id LIMIT ?",
            (position, max(0, limit)),
        )
        return [(int(row[0]), _entry(row)) for row in rows]


class SqliteAuditStore(SqlReads):
    """The audit store in one SQLite file (WAL); thread-safe, one connection per instance."""

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        synchronous: Synchronous = "FULL",
        max_bytes: int | None = None,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise AuditUnavailable(f"no audit store at {self.path}")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"expected synchronous FULL or NORMAL, found {synchronous!r}")
        self._lock = threading.Lock()
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            if max_bytes is not None:
                page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
                self._db.execute(f"PRAGMA max_page_count={max(1, int(max_bytes) // page)}")
            if create:
                for statement in _SCHEMA:
                    self._db.execute(statement)
        except (sqlite3.Error, OSError) as exc:
            raise AuditUnavailable(f"cannot open the audit store at {self.path}: {exc}") from exc

    # --- writing ----------------------------------------------------------------------------

    def append_batch(
        self, entries: Sequence[Entry], checkpoints: Sequence[Checkpoint] = ()
    ) -> None:
        """Store entries and checkpoints in one transaction, committed when this returns."""
        rows = [_row(entry) for entry in entries]
        marks = [
            (cp.writer_id, cp.seq, cp.hash, cp.time, cp.kid, cp.signature) for cp in checkpoints
        ]
        with self._lock, self._guard("append to"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_INSERT_ENTRY, rows)
                if marks:
                    self._db.executemany(_INSERT_CHECKPOINT, marks)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteAuditStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        with self._lock, self._guard("read"):
            return self._db.execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self._lock, self._guard("read"):
            return self._db.execute(sql, params).fetchall()

    def _guard(self, verb: str) -> _Translate:
        return _Translate(self.path, verb)


class _Translate:
    """Turn sqlite3 errors into `AuditUnavailable` at the adapter's edge."""

    def __init__(self, path: Path, verb: str) -> None:
        self._path, self._verb = path, verb

    def __enter__(self) -> None:
        return None

    def __exit__(self, _: object, exc: BaseException | None, __: object) -> None:
        if isinstance(exc, sqlite3.Error):
            raise AuditUnavailable(
                f"cannot {self._verb} the audit store {self._path}: {exc}"
            ) from exc


def _row(entry: Entry) -> tuple[Any, ...]:
    record = orjson.loads(entry.record)
    tool = record.get("tool_exposed", record.get("tool_original"))
    return (
        entry.writer_id,
        entry.seq,
        entry.record,
        entry.prev_hash,
        entry.hash,
        record["time"],
        record["phase"],
        record.get("tenant"),
        record.get("agent"),
        tool,
        record.get("decision"),
    )


def _entry(row: Any) -> Entry:
    return Entry(str(row[1]), int(row[2]), str(row[3]), str(row[4]), str(row[5]))
