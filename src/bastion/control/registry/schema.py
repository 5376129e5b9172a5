"""The registry's schema in each store: SQLite's migrations (released, never edited) and
PostgreSQL's, which start from the schema SQLite's reached (PostgreSQL has no older users).

Both hold the same tables and columns, so the registry's statements (written once, with `?`
placeholders) run on either; only the column types and the identity column differ.
"""

from __future__ import annotations

__all__ = ["POSTGRES_MIGRATIONS", "SQLITE_MIGRATIONS"]

# Each entry moves the schema one version up; never edit a released entry, append a new one.
SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (
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


# PostgreSQL's: its own table `registry_schema` counts them (the database may hold the audit
# trail too). Times are DOUBLE PRECISION (SQLite's REAL), flags INTEGER as in SQLite.
POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE agents (
            id TEXT PRIMARY KEY, display_name TEXT NOT NULL, owner TEXT NOT NULL,
            tenant TEXT NOT NULL, purpose TEXT NOT NULL, environment TEXT NOT NULL,
            jwks TEXT NOT NULL, spiffe_id TEXT, audiences TEXT NOT NULL, scopes TEXT NOT NULL,
            require_dpop INTEGER NOT NULL, expires_at DOUBLE PRECISION, status TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, last_used_at DOUBLE PRECISION,
            status_reason TEXT, keys_rotated_at DOUBLE PRECISION,
            status_changed_at DOUBLE PRECISION)""",
        "CREATE INDEX agents_tenant ON agents (tenant, id)",
        "CREATE UNIQUE INDEX agents_spiffe_id ON agents (spiffe_id) WHERE spiffe_id IS NOT NULL",
        """CREATE TABLE revoked_tokens (
            jti TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL, reason TEXT NOT NULL,
            revoked_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at)",
        """CREATE TABLE killed_sessions (
            session_id_hash TEXT PRIMARY KEY, killed_at DOUBLE PRECISION NOT NULL)""",
        "CREATE TABLE revision (id INTEGER PRIMARY KEY CHECK (id = 1), value BIGINT NOT NULL)",
        "INSERT INTO revision (id, value) VALUES (1, 0)",
        """CREATE TABLE pins (
            upstream TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
            digest TEXT NOT NULL, definition TEXT NOT NULL, state TEXT NOT NULL,
            first_seen DOUBLE PRECISION NOT NULL, approved_by TEXT,
            approved_at DOUBLE PRECISION, PRIMARY KEY (upstream, kind, name, digest))""",
        "CREATE UNIQUE INDEX pins_approved ON pins (upstream, kind, name) WHERE state = 'approved'",
        """CREATE TABLE quarantines (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, upstream TEXT NOT NULL,
            reason TEXT NOT NULL, since DOUBLE PRECISION NOT NULL,
            released_at DOUBLE PRECISION, released_by TEXT)""",
        "CREATE UNIQUE INDEX quarantines_active ON quarantines (upstream) "
        "WHERE released_at IS NULL",
        "CREATE TABLE trust_revision (id INTEGER PRIMARY KEY CHECK (id = 1), value BIGINT)",
        "INSERT INTO trust_revision (id, value) VALUES (1, 0)",
        """CREATE TABLE reviews (
            id TEXT PRIMARY KEY, started_at DOUBLE PRECISION NOT NULL, started_by TEXT NOT NULL,
            status TEXT NOT NULL, params TEXT NOT NULL, findings TEXT NOT NULL,
            closed_at DOUBLE PRECISION, closed_by TEXT)""",
        "CREATE UNIQUE INDEX reviews_open ON reviews (status) WHERE status = 'open'",
        """CREATE TABLE review_decisions (
            review_id TEXT NOT NULL REFERENCES reviews (id), finding_id TEXT NOT NULL,
            decision TEXT NOT NULL, reason TEXT, by TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
            effect TEXT NOT NULL, PRIMARY KEY (review_id, finding_id))""",
    ),
)
