"""The agent registry: every non-human identity (NHI) that may call Bastion, in SQLite (one
machine) or PostgreSQL (every replica), through one `Database` seam (db.py).

Operators change it from the CLI in one process while gateways read it in others, so changes
are committed transactions and each gateway keeps a `RegistryView` (view.py): an in-memory
copy whose background watcher asks `version()` every 0.2 s (a few µs on SQLite, one round trip
on PostgreSQL) and reloads only when it moved; requests read the copy and never the database.

`version()` is a `revision` row bumped in the same transaction as every change the view holds
(agents, token revocations, killed sessions). A revision row was chosen over
`PRAGMA data_version` because (a) it does not move on `touch()` writes, so several gateway
processes recording last use do not make each other reload every second, (b) it is one
monotonic number shared by all processes, and (c) the same design ports to PostgreSQL.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

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
from bastion.control.registry.db import Database, SqliteDatabase
from bastion.errors import RegistryConflict, RegistryInvalid, RegistryNotFound, shown

__all__ = ["PostgresRegistry", "RegistryTables", "SqlRegistry", "SqliteRegistry"]

# Literal statements (no string building): the column order is `_to_row`'s and `_from_row`'s.
# `CAST(? AS TEXT) IS NULL` rather than `? IS NULL`: PostgreSQL must know a parameter's type.
_INSERT_AGENT = """INSERT INTO agents (id, display_name, owner, tenant, purpose, environment,
    jwks, spiffe_id, audiences, scopes, require_dpop, expires_at, status, created_at,
    last_used_at, status_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_COLUMNS = """SELECT id, display_name, owner, tenant, purpose, environment, jwks,
    spiffe_id, audiences, scopes, require_dpop, expires_at, status, created_at, last_used_at,
    status_reason FROM agents"""
_SELECT_AGENTS = (
    _COLUMNS + " WHERE (CAST(? AS TEXT) IS NULL OR tenant = ?)"
    " AND (CAST(? AS TEXT) IS NULL OR status = ?) ORDER BY tenant, id"
)
_SELECT_AGENT = _COLUMNS + " WHERE id = ?"
_REVOKE = """INSERT INTO revoked_tokens (jti, expires_at, reason, revoked_at)
    VALUES (?, ?, ?, ?) ON CONFLICT (jti) DO UPDATE SET expires_at = CASE
    WHEN excluded.expires_at > revoked_tokens.expires_at THEN excluded.expires_at
    ELSE revoked_tokens.expires_at END"""
_REVISION = "SELECT value FROM revision"


class SqlRegistry:
    """The registry on a `Database` (SQLite or PostgreSQL), shared by gateways and the CLI.

    One connection per instance, guarded by a lock. `touch()` only notes a time in memory;
    `flush_touches()` writes the notes in one transaction, never waiting for a busy store.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.where = db.where
        self._pending: dict[str, float] = {}

    def close(self) -> None:
        """Write pending `touch()` times and close the connection."""
        try:
            with self.db.read():
                self._flush(wait=True)
        finally:
            self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- agents ---

    def add(self, agent: Agent) -> Agent:
        """Register a new agent; `RegistryConflict` when the id is taken."""
        validate_agent(agent)
        with self.db.write():
            if self.db.one("SELECT 1 FROM agents WHERE id = ?", (agent.id,)):
                raise RegistryConflict(f"id: agent {agent.id!r} already exists")
            if agent.spiffe_id is not None:
                owner = self.db.one("SELECT id FROM agents WHERE spiffe_id = ?", (agent.spiffe_id,))
                if owner:
                    raise RegistryConflict(
                        f"spiffe_id: {agent.spiffe_id} is already agent {owner[0]!r}'s"
                    )
            self.db.run(_INSERT_AGENT, _to_row(agent))
            self._bump()
        return agent

    def get(self, agent_id: str) -> Agent:
        """The agent with this id; `RegistryNotFound` when there is none."""
        with self.db.read():
            self._flush(wait=True)
            return self._get(agent_id)

    def _get(self, agent_id: str) -> Agent:
        row = self.db.one(_SELECT_AGENT, (agent_id,))
        if row is None:
            raise RegistryNotFound(f"no agent {shown(agent_id)}")
        return _from_row(row)

    def list(
        self, tenant: str | None = None, status: AgentStatus | None = None
    ) -> builtins.list[Agent]:
        """Agents ordered by tenant and id, optionally of one tenant and/or one status."""
        wanted = None if status is None else str(status)
        with self.db.read():
            self._flush(wait=True)
            rows = self.db.all(_SELECT_AGENTS, (tenant, tenant, wanted, wanted))
        return [_from_row(row) for row in rows]

    def set_status(self, agent_id: str, status: AgentStatus, reason: str | None) -> Agent:
        """Suspend, resume or offboard an agent; offboarded is final (`RegistryConflict`)."""
        status = AgentStatus(status)
        if status is not AgentStatus.ACTIVE:
            check_text("reason", reason, 500)
        with self.db.write():
            agent = self._changeable(agent_id)
            if agent.status is status:
                raise RegistryConflict(f"agent {agent_id!r} is already {status}")
            agent = replace(agent, status=status, status_reason=reason)
            self.db.run(
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
        with self.db.write():
            agent = replace(self._changeable(agent_id), owner=owner)
            self.db.run("UPDATE agents SET owner = ? WHERE id = ?", (owner, agent_id))
            self._bump()
        return agent

    def rotate_key(self, agent_id: str, jwks: dict[str, Any]) -> Agent:
        """Replace the agent's public keys (include the old key too for an overlap period)."""
        with self.db.write():
            agent = self._changeable(agent_id)
            validate_jwks(jwks, allow_empty=agent.spiffe_id is not None)
            agent = replace(agent, jwks=jwks)
            self.db.run(
                "UPDATE agents SET jwks = ?, keys_rotated_at = ? WHERE id = ?",
                (_dumps(jwks), time.time(), agent_id),
            )
            self._bump()
        return agent

    def _changeable(self, agent_id: str) -> Agent:
        agent = self._get(agent_id)
        if agent.status is AgentStatus.OFFBOARDED:
            raise RegistryConflict(f"agent {agent_id!r} is offboarded, which is final")
        return agent

    def lifecycle(self) -> dict[str, tuple[float | None, float | None]]:
        """Agent id -> (keys last rotated at, status last changed at); None: never since it
        was registered (access reviews measure key age and suspensions by these)."""
        with self.db.read():
            rows = self.db.all("SELECT id, keys_rotated_at, status_changed_at FROM agents")
        return {row[0]: (row[1], row[2]) for row in rows}

    def touch(self, agent_id: str, when: float) -> None:
        """Note that the agent was used at `when`, in memory; `flush_touches()` writes it."""
        with self.db.read():
            if when > self._pending.get(agent_id, 0.0):
                self._pending[agent_id] = when

    def flush_touches(self, *, wait: bool = False) -> int:
        """Write the noted last-use times in one transaction (times only move forward, unknown
        ids are ignored, the version does not move); how many were written. Without `wait`, a
        store another process is writing is not waited for: the times stay noted for the
        next call, which returns 0."""
        with self.db.read():
            count = len(self._pending)
            self._flush(wait=wait)
            return count - len(self._pending)

    def _flush(self, *, wait: bool) -> None:
        if not self._pending:
            return
        rows = [(when, agent_id, when) for agent_id, when in self._pending.items()]

        def write() -> None:
            self.db.many(
                "UPDATE agents SET last_used_at = ? WHERE id = ? "
                "AND (last_used_at IS NULL OR last_used_at < ?)",
                rows,
            )

        if wait:
            with self.db.write():
                write()
        elif not self.db.write_if_free(write):
            # The gateway's recorder calls this every few seconds: never wait for a CLI's
            # write (the view's watcher shares this connection's lock); keep the times and
            # try again at the next round.
            return
        self._pending.clear()

    # --- revocations and killed sessions ---

    def revoke_token(self, jti: str, expires_at: float, reason: str) -> None:
        """Refuse the token with this `jti` until it expires; prunes long-expired rows."""
        if not isinstance(jti, str) or not 0 < len(jti) <= 256:
            raise RegistryInvalid(f"jti: expected 1 to 256 characters, found {shown(jti)}")
        check_time("expires_at", expires_at)
        check_text("reason", reason, 500)
        now = time.time()
        with self.db.write():
            self.db.run(_REVOKE, (jti, expires_at, reason, now))
            self.db.run(
                "DELETE FROM revoked_tokens WHERE expires_at < ?", (now - REVOCATION_KEEP_S,)
            )
            self._bump()

    def is_token_revoked(self, jti: str) -> bool:
        """Whether a token with this `jti` was revoked (and its row not yet pruned)."""
        with self.db.read():
            return self.db.one("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,)) is not None

    def kill_session(self, session_id_hash: str) -> None:
        """End a session for good: the gateway refuses every later request on it."""
        if not isinstance(session_id_hash, str) or not PRINTABLE_ASCII.fullmatch(session_id_hash):
            raise RegistryInvalid(
                f"session_id_hash: expected printable ASCII, found {shown(session_id_hash)}"
            )
        with self.db.write():
            self.db.run(
                "INSERT INTO killed_sessions VALUES (?, ?) ON CONFLICT DO NOTHING",
                (session_id_hash, time.time()),
            )
            self._bump()

    def killed_sessions(self) -> set[str]:
        """Hashes of every killed session."""
        with self.db.read():
            rows = self.db.all("SELECT session_id_hash FROM killed_sessions")
        return {row[0] for row in rows}

    # --- change detection ---

    def version(self) -> int:
        """A number that moves whenever any process commits a change the view holds.

        The gateway's watcher asks it several times a second, so it is one primary-key read.
        """
        return self.db.count(_REVISION)

    def snapshot(self) -> RegistrySnapshot:
        """Agents, revoked jtis and killed sessions with their version, in one transaction."""
        with self.db.snapshot():
            version = int(self.db.all(_REVISION)[0][0])
            agents = self.db.all(_SELECT_AGENTS, (None, None, None, None))
            jtis = self.db.all(
                "SELECT jti FROM revoked_tokens WHERE expires_at >= ?",
                (time.time() - REVOCATION_KEEP_S,),
            )
            sessions = self.db.all("SELECT session_id_hash FROM killed_sessions")
        return RegistrySnapshot(
            version=version,
            agents={row[0]: _from_row(row) for row in agents},
            revoked_jtis=frozenset(row[0] for row in jtis),
            killed_sessions=frozenset(row[0] for row in sessions),
        )

    def _bump(self) -> None:
        self.db.run("UPDATE revision SET value = value + 1")


class SqliteRegistry(SqlRegistry):
    """The registry in one SQLite file (WAL), shared by the gateway and the CLI processes."""

    def __init__(self, path: str | Path, *, create: bool = True, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        super().__init__(SqliteDatabase(self.path, create=create, busy_timeout=busy_timeout))


class PostgresRegistry(SqlRegistry):
    """The registry in a PostgreSQL database every replica and the CLI share (`dsn`: a
    libpq DSN, password included, already read from its secret reference)."""

    def __init__(self, dsn: str, *, create: bool = True) -> None:
        from bastion.control.registry.pg import PostgresDatabase  # psycopg only when used

        super().__init__(PostgresDatabase(dsn, create=create))


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
    """The tables kept beside the agents' (pins and quarantines, reviews) on a connection of
    their own: a `Database`, or the path of a SQLite file (opening it creates or migrates the
    schema). Blocking: the gateway calls it from worker threads, the CLI directly."""

    def __init__(self, source: str | Path | Database, *, create: bool = True) -> None:
        if isinstance(source, Database):
            self.db = source
        else:
            self.db = SqliteDatabase(Path(source), create=create)
        self.where = self.db.where

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
