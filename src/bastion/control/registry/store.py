"""The agent registry: every non-human identity (NHI) that may call Bastion, in SQLite.

Operators change it from the CLI in one process while the gateway reads it in another, so
changes are committed transactions and the gateway keeps a `RegistryView` (view.py): an
in-memory copy whose background watcher asks `version()` every 0.2 s (a few µs) and reloads
only when it moved; requests read the copy and never the database.

`version()` is a `revision` row bumped in the same transaction as every change the view holds
(agents, token revocations, killed sessions). A revision row was chosen over
`PRAGMA data_version` because (a) it does not move on `touch()` writes, so several gateway
processes recording last use do not make each other reload every second, (b) it is one
monotonic number shared by all processes, and (c) the same design ports to PostgreSQL.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Self, TypeVar

from bastion.control.registry.agents import (
    PRINTABLE_ASCII,
    REVOCATION_KEEP_S,
    Agent,
    AgentStatus,
    RegistrySnapshot,
    check_text,
    check_time,
    validate_agent,
    validate_jwks,
)
from bastion.errors import (
    NotAvailable,
    RegistryConflict,
    RegistryInvalid,
    RegistryNotFound,
    RegistryUnavailable,
    shown,
)

_T = TypeVar("_T")

# Each entry moves the schema one version up; never edit a released entry, append a new one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE agents (
            id TEXT PRIMARY KEY, display_name TEXT NOT NULL, owner TEXT NOT NULL,
            tenant TEXT NOT NULL, purpose TEXT NOT NULL, environment TEXT NOT NULL,
            jwks TEXT NOT NULL, spiffe_id TEXT, audiences TEXT NOT NULL, scopes TEXT NOT NULL,
            require_dpop INTEGER NOT NULL, expires_at REAL, status TEXT NOT NULL,
            created_at REAL NOT NULL, last_used_at REAL, status_reason TEXT)""",
        "CREATE INDEX agents_tenant ON agents (tenant, id)",
        "CREATE UNIQUE INDEX agents_spiffe_id ON agents (spiffe_id) WHERE spiffe_id IS NOT NULL",
        """CREATE TABLE revoked_tokens (
            jti TEXT PRIMARY KEY, expires_at REAL NOT NULL, reason TEXT NOT NULL,
            revoked_at REAL NOT NULL)""",
        "CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at)",
        "CREATE TABLE killed_sessions (session_id_hash TEXT PRIMARY KEY, killed_at REAL NOT NULL)",
        "CREATE TABLE revision (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)",
        "INSERT INTO revision (id, value) VALUES (1, 0)",
    ),
    # Upstream trust (control/registry/trust.py): definition pins and quarantines, with
    # their own revision so that pin writes do not make the agent view reload.
    (
        """CREATE TABLE pins (
            upstream TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
            digest TEXT NOT NULL, definition TEXT NOT NULL, state TEXT NOT NULL,
            first_seen REAL NOT NULL, approved_by TEXT, approved_at REAL,
            PRIMARY KEY (upstream, kind, name, digest))""",
        "CREATE UNIQUE INDEX pins_approved ON pins (upstream, kind, name) WHERE state = 'approved'",
        """CREATE TABLE quarantines (
            id INTEGER PRIMARY KEY AUTOINCREMENT, upstream TEXT NOT NULL, reason TEXT NOT NULL,
            since REAL NOT NULL, released_at REAL, released_by TEXT)""",
        "CREATE UNIQUE INDEX quarantines_active ON quarantines (upstream) "
        "WHERE released_at IS NULL",
        "CREATE TABLE trust_revision (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER)",
        "INSERT INTO trust_revision (id, value) VALUES (1, 0)",
    ),
    # Access reviews (control/governance/reviews.py): when keys were last rotated and the
    # status last changed (a status changed before this version counts from the upgrade),
    # the review sessions and their decisions; at most one review is open at a time.
    (
        "ALTER TABLE agents ADD COLUMN keys_rotated_at REAL",
        "ALTER TABLE agents ADD COLUMN status_changed_at REAL",
        "UPDATE agents SET status_changed_at = CAST(strftime('%s', 'now') AS REAL) "
        "WHERE status <> 'active'",
        """CREATE TABLE reviews (
            id TEXT PRIMARY KEY, started_at REAL NOT NULL, started_by TEXT NOT NULL,
            status TEXT NOT NULL, params TEXT NOT NULL, findings TEXT NOT NULL,
            closed_at REAL, closed_by TEXT)""",
        "CREATE UNIQUE INDEX reviews_open ON reviews (status) WHERE status = 'open'",
        """CREATE TABLE review_decisions (
            review_id TEXT NOT NULL REFERENCES reviews (id), finding_id TEXT NOT NULL,
            decision TEXT NOT NULL, reason TEXT, by TEXT NOT NULL, at REAL NOT NULL,
            effect TEXT NOT NULL, PRIMARY KEY (review_id, finding_id))""",
    ),
)
# Literal statements (no string building): the column order is `_to_row`'s and `_from_row`'s.
_INSERT_AGENT = """INSERT INTO agents (id, display_name, owner, tenant, purpose, environment,
    jwks, spiffe_id, audiences, scopes, require_dpop, expires_at, status, created_at,
    last_used_at, status_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_SELECT_AGENTS = """SELECT id, display_name, owner, tenant, purpose, environment, jwks,
    spiffe_id, audiences, scopes, require_dpop, expires_at, status, created_at, last_used_at,
    status_reason FROM agents WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR status = ?2)
    ORDER BY tenant, id"""
_SELECT_AGENT = """SELECT id, display_name, owner, tenant, purpose, environment, jwks,
    spiffe_id, audiences, scopes, require_dpop, expires_at, status, created_at, last_used_at,
    status_reason FROM agents WHERE id = ?"""


class SqliteRegistry:
    """The registry in one SQLite file (WAL), shared by the gateway and the CLI processes.

    One connection per instance, guarded by a lock. `touch()` only notes a time in memory;
    `flush_touches()` writes the notes in one transaction, never waiting for a busy database.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise RegistryUnavailable(f"no registry at {self.path}")
        self._lock = threading.Lock()
        self._busy_ms = int(busy_timeout * 1000)
        self._pending: dict[str, float] = {}
        try:
            # Autocommit mode: every transaction below is an explicit BEGIN ... COMMIT.
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"cannot open the registry at {self.path}: {exc}") from exc

    def _migrate(self) -> None:
        current = self._schema_version()
        if current == len(_MIGRATIONS):
            return
        with self._write():
            current = self._schema_version()  # another process may have migrated meanwhile
            if current > len(_MIGRATIONS):
                raise RegistryUnavailable(
                    f"{self.path} has registry schema version {current}; this Bastion knows "
                    f"up to {len(_MIGRATIONS)} (upgrade Bastion)"
                )
            for statements in _MIGRATIONS[current:]:
                for statement in statements:
                    self._db.execute(statement)
            self._db.execute("DELETE FROM schema_version")
            self._db.execute("INSERT INTO schema_version VALUES (?)", (len(_MIGRATIONS),))

    def _schema_version(self) -> int:
        self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def _write(self) -> _Transaction:
        return _Transaction(self._db, "BEGIN IMMEDIATE")

    def close(self) -> None:
        """Write pending `touch()` times and close the connection."""
        with self._lock, self._guard():
            try:
                self._flush(wait=True)
            finally:
                self._db.close()

    def __enter__(self) -> SqliteRegistry:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- agents ---

    def add(self, agent: Agent) -> Agent:
        """Register a new agent; `RegistryConflict` when the id is taken."""
        validate_agent(agent)
        with self._lock, self._guard(), self._write():
            if self._db.execute("SELECT 1 FROM agents WHERE id = ?", (agent.id,)).fetchone():
                raise RegistryConflict(f"id: agent {agent.id!r} already exists")
            if agent.spiffe_id is not None:
                owner = self._db.execute(
                    "SELECT id FROM agents WHERE spiffe_id = ?", (agent.spiffe_id,)
                ).fetchone()
                if owner:
                    raise RegistryConflict(
                        f"spiffe_id: {agent.spiffe_id} is already agent {owner[0]!r}'s"
                    )
            self._db.execute(_INSERT_AGENT, _to_row(agent))
            self._bump()
        return agent

    def get(self, agent_id: str) -> Agent:
        """The agent with this id; `RegistryNotFound` when there is none."""
        with self._lock, self._guard():
            self._flush(wait=True)
            return self._get(agent_id)

    def _get(self, agent_id: str) -> Agent:
        row = self._db.execute(_SELECT_AGENT, (agent_id,)).fetchone()
        if row is None:
            raise RegistryNotFound(f"no agent {shown(agent_id)}")
        return _from_row(row)

    def list(
        self, tenant: str | None = None, status: AgentStatus | None = None
    ) -> builtins.list[Agent]:
        """Agents ordered by tenant and id, optionally of one tenant and/or one status."""
        args = (tenant, None if status is None else str(status))
        with self._lock, self._guard():
            self._flush(wait=True)
            rows = self._db.execute(_SELECT_AGENTS, args).fetchall()
        return [_from_row(row) for row in rows]

    def set_status(self, agent_id: str, status: AgentStatus, reason: str | None) -> Agent:
        """Suspend, resume or offboard an agent; offboarded is final (`RegistryConflict`)."""
        status = AgentStatus(status)
        if status is not AgentStatus.ACTIVE:
            check_text("reason", reason, 500)
        with self._lock, self._guard(), self._write():
            agent = self._get(agent_id)
            if agent.status is AgentStatus.OFFBOARDED:
                raise RegistryConflict(f"agent {agent_id!r} is offboarded, which is final")
            if agent.status is status:
                raise RegistryConflict(f"agent {agent_id!r} is already {status}")
            agent = replace(agent, status=status, status_reason=reason)
            self._db.execute(
                "UPDATE agents SET status = ?, status_reason = ?, status_changed_at = ? "
                "WHERE id = ?",
                (str(status), reason, time.time(), agent_id),
            )
            self._bump()
        return agent

    def set_owner(self, agent_id: str, owner: str) -> Agent:
        """Make `owner` answerable for the agent (offboarding its old owner); offboarded
        agents keep theirs (`RegistryConflict`)."""
        check_text("owner", owner, 200)
        with self._lock, self._guard(), self._write():
            agent = self._get(agent_id)
            if agent.status is AgentStatus.OFFBOARDED:
                raise RegistryConflict(f"agent {agent_id!r} is offboarded, which is final")
            agent = replace(agent, owner=owner)
            self._db.execute("UPDATE agents SET owner = ? WHERE id = ?", (owner, agent_id))
            self._bump()
        return agent

    def rotate_key(self, agent_id: str, jwks: dict[str, Any]) -> Agent:
        """Replace the agent's public keys (include the old key too for an overlap period)."""
        with self._lock, self._guard(), self._write():
            agent = self._get(agent_id)
            if agent.status is AgentStatus.OFFBOARDED:
                raise RegistryConflict(f"agent {agent_id!r} is offboarded, which is final")
            validate_jwks(jwks, allow_empty=agent.spiffe_id is not None)
            agent = replace(agent, jwks=jwks)
            self._db.execute(
                "UPDATE agents SET jwks = ?, keys_rotated_at = ? WHERE id = ?",
                (_dumps(jwks), time.time(), agent_id),
            )
            self._bump()
        return agent

    def lifecycle(self) -> dict[str, tuple[float | None, float | None]]:
        """Agent id -> (keys last rotated at, status last changed at); None: never since it
        was registered (access reviews measure key age and suspensions by these)."""
        with self._lock, self._guard():
            rows = self._db.execute(
                "SELECT id, keys_rotated_at, status_changed_at FROM agents"
            ).fetchall()
        return {row[0]: (row[1], row[2]) for row in rows}

    def touch(self, agent_id: str, when: float) -> None:
        """Note that the agent was used at `when`, in memory; `flush_touches()` writes it."""
        with self._lock:
            if when > self._pending.get(agent_id, 0.0):
                self._pending[agent_id] = when

    def flush_touches(self, *, wait: bool = False) -> int:
        """Write the noted last-use times in one transaction (times only move forward, unknown
        ids are ignored, the version does not move); how many were written. Without `wait`, a
        database another process is writing is not waited for: the times stay noted for the
        next call, which returns 0."""
        with self._lock, self._guard():
            count = len(self._pending)
            self._flush(wait=wait)
            return count - len(self._pending)

    def _flush(self, *, wait: bool) -> None:
        if not self._pending:
            return
        if not wait:
            # The gateway's recorder calls this every few seconds: never wait for a CLI's
            # write lock (the view's watcher shares this connection's lock); keep the times
            # and try again at the next round.
            self._db.execute("PRAGMA busy_timeout = 0")
        try:
            with self._write():
                self._db.executemany(
                    "UPDATE agents SET last_used_at = ? WHERE id = ? "
                    "AND (last_used_at IS NULL OR last_used_at < ?)",
                    [(when, agent_id, when) for agent_id, when in self._pending.items()],
                )
            self._pending.clear()
        except sqlite3.OperationalError:
            if wait:
                raise
        finally:
            if not wait:
                self._db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")

    # --- revocations and killed sessions ---

    def revoke_token(self, jti: str, expires_at: float, reason: str) -> None:
        """Refuse the token with this `jti` until it expires; prunes long-expired rows."""
        if not isinstance(jti, str) or not 0 < len(jti) <= 256:
            raise RegistryInvalid(f"jti: expected 1 to 256 characters, found {shown(jti)}")
        check_time("expires_at", expires_at)
        check_text("reason", reason, 500)
        now = time.time()
        with self._lock, self._guard(), self._write():
            self._db.execute(
                "INSERT INTO revoked_tokens (jti, expires_at, reason, revoked_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (jti) DO UPDATE SET "
                "expires_at = max(expires_at, excluded.expires_at)",
                (jti, expires_at, reason, now),
            )
            self._db.execute(
                "DELETE FROM revoked_tokens WHERE expires_at < ?", (now - REVOCATION_KEEP_S,)
            )
            self._bump()

    def is_token_revoked(self, jti: str) -> bool:
        """Whether a token with this `jti` was revoked (and its row not yet pruned)."""
        with self._lock, self._guard():
            row = self._db.execute("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,))
            return row.fetchone() is not None

    def kill_session(self, session_id_hash: str) -> None:
        """End a session for good: the gateway refuses every later request on it."""
        if not isinstance(session_id_hash, str) or not PRINTABLE_ASCII.fullmatch(session_id_hash):
            raise RegistryInvalid(
                f"session_id_hash: expected printable ASCII, found {shown(session_id_hash)}"
            )
        with self._lock, self._guard(), self._write():
            self._db.execute(
                "INSERT OR IGNORE INTO killed_sessions VALUES (?, ?)",
                (session_id_hash, time.time()),
            )
            self._bump()

    def killed_sessions(self) -> set[str]:
        """Hashes of every killed session."""
        with self._lock, self._guard():
            rows = self._db.execute("SELECT session_id_hash FROM killed_sessions").fetchall()
        return {row[0] for row in rows}

    # --- change detection ---

    def version(self) -> int:
        """A number that moves whenever any process commits a change the view holds.

        The gateway's watcher asks it several times a second, so it is one primary-key read
        (about 3 µs) with no helper objects around it.
        """
        with self._lock:
            try:
                row = self._db.execute("SELECT value FROM revision").fetchone()
            except sqlite3.Error as exc:
                raise RegistryUnavailable(f"registry {self.path}: {exc}") from exc
        return int(row[0])

    def snapshot(self) -> RegistrySnapshot:
        """Agents, revoked jtis and killed sessions with their version, in one transaction."""
        with self._lock, self._guard(), _Transaction(self._db, "BEGIN"):
            version = int(self._db.execute("SELECT value FROM revision").fetchone()[0])
            agents = self._db.execute(_SELECT_AGENTS, (None, None)).fetchall()
            jtis = self._db.execute(
                "SELECT jti FROM revoked_tokens WHERE expires_at >= ?",
                (time.time() - REVOCATION_KEEP_S,),
            ).fetchall()
            sessions = self._db.execute("SELECT session_id_hash FROM killed_sessions").fetchall()
        return RegistrySnapshot(
            version=version,
            agents={row[0]: _from_row(row) for row in agents},
            revoked_jtis=frozenset(row[0] for row in jtis),
            killed_sessions=frozenset(row[0] for row in sessions),
        )

    def _bump(self) -> None:
        self._db.execute("UPDATE revision SET value = value + 1")

    def _guard(self) -> _Translate:
        return _Translate(self.path)


class _Transaction:
    """BEGIN on enter; COMMIT on success, ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection, begin: str) -> None:
        self._db, self._begin = db, begin

    def __enter__(self) -> None:
        self._db.execute(self._begin)

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self._db.execute("ROLLBACK")
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._db.execute("ROLLBACK")  # leave no transaction open for the next caller
            raise


class _Translate:
    """Turn sqlite3 errors into `RegistryUnavailable` at the adapter's edge."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, _: object, exc: BaseException | None, __: object) -> None:
        if isinstance(exc, sqlite3.Error):
            raise RegistryUnavailable(f"registry {self._path}: {exc}") from exc


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _to_row(agent: Agent) -> tuple[object, ...]:
    return (
        agent.id, agent.display_name, agent.owner, agent.tenant, agent.purpose,
        agent.environment, _dumps(agent.jwks), agent.spiffe_id, _dumps(list(agent.audiences)),
        _dumps(list(agent.scopes)), int(agent.require_dpop), agent.expires_at, str(agent.status),
        agent.created_at, agent.last_used_at, agent.status_reason,
    )  # fmt: skip


def _from_row(row: Sequence[Any]) -> Agent:
    return Agent(
        id=row[0], display_name=row[1], owner=row[2], tenant=row[3], purpose=row[4],
        environment=row[5], jwks=json.loads(row[6]), spiffe_id=row[7],
        audiences=tuple(json.loads(row[8])), scopes=tuple(json.loads(row[9])),
        require_dpop=bool(row[10]), expires_at=row[11], status=AgentStatus(row[12]),
        created_at=row[13], last_used_at=row[14], status_reason=row[15],
    )  # fmt: skip


class RegistryTables:
    """A connection of its own to the registry's SQLite file, for the tables kept beside the
    agents' (pins and quarantines, reviews): opening it creates or migrates the schema.
    Blocking: the gateway calls it from worker threads, the CLI directly."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        SqliteRegistry(self.path, create=create).close()  # creates or migrates the schema
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"cannot open the registry at {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


async def registry_call(path: Path | None, work: Callable[[SqliteRegistry], _T]) -> _T:
    """Run `work` on the registry at `path` in a worker thread (the admin API and the
    console: an operator's act, never the request path); NotAvailable without a registry."""
    if path is None:
        raise NotAvailable("identity is off (auth.mode: none); there is no agent registry")

    def run() -> _T:
        with SqliteRegistry(path, create=False) as registry:
            return work(registry)

    return await asyncio.to_thread(run)
