"""The one seam between the registry's two stores: a `Database` runs the registry's SQL on
SQLite (one machine) or PostgreSQL (every replica), with the same transactions and errors.

```
Database          one connection, one lock; `read()`, `write(wait=…)` and `snapshot()` hold
                  the lock and translate driver errors; `one`/`all`/`run`/`many` run
                  statements written with `?` placeholders in the SQL both dialects share
SqliteDatabase    a WAL file; a write is BEGIN IMMEDIATE (the file's one write lock)
PostgresDatabase  a server; a write takes one transaction-level advisory lock, so writes are
                  serialized exactly as SQLite's are and a read-check-write never races
                  (bastion.control.registry.pg)
```

Errors leave as `RegistryUnavailable` naming the store (the file, or the server without the
password), and `RegistryConflict` for a constraint another writer's change broke.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bastion.control.registry.schema import SQLITE_MIGRATIONS
from bastion.errors import RegistryConflict, RegistryUnavailable

__all__ = ["Database", "SqliteDatabase"]

Row = Sequence[Any]


class _Busy(Exception):
    """A write asked not to wait found another writer holding the registry's write lock."""


class Database:
    """One connection to the registry's store, shared by the threads of one adapter.

    Subclasses open the connection and name the dialect's transactions; every statement runs
    inside `read()`, `write()` or `snapshot()`, which hold the (reentrant) lock.
    """

    where: str  # the store, for messages: a path or a server without its password
    _lock: threading.RLock
    _depth = 0  # contexts entered by the thread holding the lock

    def read(self) -> contextlib.AbstractContextManager[None]:
        """The lock and error translation, no transaction (a single statement)."""
        return self._held(None)

    def write(self) -> contextlib.AbstractContextManager[None]:
        """A write transaction holding the store's write lock (one writer at a time, across
        processes), waiting for it."""
        return self._held("write")

    def write_if_free(self, work: Callable[[], object]) -> bool:
        """Run `work` in a write transaction unless another process holds the write lock:
        then nothing is done and False returned at once (the gateway's periodic writes)."""
        try:
            with self._held("try"):
                work()
        except _Busy:
            return False
        return True

    def snapshot(self) -> contextlib.AbstractContextManager[None]:
        """A read transaction: every statement sees the same committed state."""
        return self._held("snapshot")

    @contextlib.contextmanager
    def _held(self, kind: str | None) -> Iterator[None]:
        with self._lock:
            # Only the outermost context translates: an inner one (a read inside a write)
            # leaves the driver's error to the transaction around it, which rolls back first.
            outer = self._depth == 0
            self._depth += 1
            try:
                with self._translated() if outer else contextlib.nullcontext():
                    if kind is None:
                        yield
                    else:
                        with self._transaction(kind):
                            yield
            finally:
                self._depth -= 1

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """The first row of a query (inside `read`/`write`/`snapshot`)."""
        row: Row | None = self._execute(sql, params).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Every row of a query (inside `read`/`write`/`snapshot`)."""
        return list(self._execute(sql, params).fetchall())

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run a statement (inside `write`)."""
        self._execute(sql, params)

    def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run a statement once per row of parameters (inside `write`)."""
        for params in rows:
            self._execute(sql, params)

    def count(self, sql: str) -> int:
        """One integer read, the cheapest call there is: the watchers' `version()`."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the connection."""
        raise NotImplementedError

    def _execute(self, sql: str, params: Sequence[Any]) -> Any:
        raise NotImplementedError

    def _transaction(self, kind: str) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _translated(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def migrate(self, steps: Sequence[Sequence[str]], table: str, *, create: bool) -> None:
        """Bring the schema to `len(steps)` (each step one version up; released steps never
        change); RegistryUnavailable when the store is newer than this Bastion, or holds no
        registry and `create` is off."""
        current = self._version_of(table)
        if current == len(steps):
            return
        if current == 0 and not create:
            raise RegistryUnavailable(f"no registry in {self.where} (has the gateway run?)")
        with self.write():
            self.run(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER NOT NULL)")
            current = self._version_of(table)  # another process may have migrated meanwhile
            if current > len(steps):
                raise RegistryUnavailable(
                    f"{self.where} has registry schema version {current}; this Bastion knows "
                    f"up to {len(steps)} (upgrade Bastion)"
                )
            for statements in steps[current:]:
                for statement in statements:
                    self.run(statement)
            self.run(f"DELETE FROM {table}")  # noqa: S608 - a fixed table name
            self.run(f"INSERT INTO {table} VALUES (?)", (len(steps),))  # noqa: S608

    def _version_of(self, table: str) -> int:
        with self.read():
            if not self._has_table(table):
                return 0
            row = self.one(f"SELECT max(version) FROM {table}")  # noqa: S608 - fixed name
        return int(row[0] or 0) if row else 0

    def _has_table(self, table: str) -> bool:
        raise NotImplementedError


class SqliteDatabase(Database):
    """The registry's SQLite file (WAL), migrated on open; one connection per instance."""

    def __init__(self, path: Path, *, create: bool = True, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.where = str(path)
        if not create and not path.is_file():
            raise RegistryUnavailable(f"no registry at {path}")
        self._lock = threading.RLock()
        self._busy_ms = int(busy_timeout * 1000)
        try:
            # Autocommit mode: every transaction is an explicit BEGIN ... COMMIT.
            self._db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"cannot open the registry at {path}: {exc}") from exc
        try:
            self.migrate(SQLITE_MIGRATIONS, "schema_version", create=True)
        except RegistryUnavailable:
            self._db.close()
            raise

    def count(self, sql: str) -> int:
        """One integer read (a primary-key read takes about 3 µs): no helper objects."""
        with self._lock:
            try:
                row = self._db.execute(sql).fetchone()
            except sqlite3.Error as exc:
                raise RegistryUnavailable(f"registry {self.where}: {exc}") from exc
        return int(row[0])

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, params: Sequence[Any]) -> sqlite3.Cursor:
        return self._db.execute(sql, tuple(params))

    def _has_table(self, table: str) -> bool:
        found = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        return found is not None

    @contextlib.contextmanager
    def _transaction(self, kind: str) -> Iterator[None]:
        if kind == "try":
            # Never wait for a CLI's write lock: the caller keeps its work for the next round.
            self._db.execute("PRAGMA busy_timeout = 0")
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise _Busy(str(exc)) from exc
            finally:
                self._db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        else:
            self._db.execute("BEGIN" if kind == "snapshot" else "BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._db.execute("ROLLBACK")  # leave no transaction open for the next caller
            raise

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as exc:
            raise RegistryConflict(_CONFLICT) from exc
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"registry {self.where}: {exc}") from exc


# A unique constraint broken by a change another process committed first (a race the checks
# before each write could not see).
_CONFLICT = "the registry was changed the same way at the same time by another writer"
