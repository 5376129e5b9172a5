"""The trail a configuration names: opened for writing by the gateway, for reading by operators.

`audit.store: sqlite` keeps `<state_dir>/audit/audit.db`; `postgres` keeps the records in the
database `audit.dsn` names (postgres.py, imported only then). Either way the checkpoint key and
the writer-id files stay in `<state_dir>/audit/`. `audit.dsn` is read here, when the trail
opens: `env:NAME` (an environment variable), `file:PATH` (a file's content, trimmed;
relative to the working directory, like the upstreams' secret references, so better absolute),
or a literal DSN without a password.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bastion.audit.errors import AuditUnavailable
from bastion.audit.keys import DB_FILE, audit_dir, claim_writer_id, load_checkpoint_key
from bastion.audit.store import SqliteAuditStore
from bastion.audit.writer import AuditWriter, WriterOptions, open_writer
from bastion.config import AuditSettings, Settings
from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.audit.postgres import PostgresAuditStore


def open_trail_writer(settings: Settings) -> AuditWriter:
    """The writer of this process's chain in the configured store (not started yet)."""
    audit = settings.audit
    options = WriterOptions(
        checkpoint_every=audit.checkpoint_every, checkpoint_seconds=audit.checkpoint_seconds
    )
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    if audit.store == "sqlite":
        return open_writer(
            settings.state_dir, options, synchronous=audit.synchronous, max_bytes=audit.max_bytes
        )
    from bastion.audit.postgres import PostgresAuditStore

    directory = audit_dir(settings.state_dir)
    store = PostgresAuditStore(resolve_dsn(audit))
    try:
        claim = claim_writer_id(directory, hold=store.hold)
    except BaseException:
        store.close()
        raise
    try:
        key = load_checkpoint_key(directory)
    except BaseException:
        store.close()
        claim.release()
        raise
    return AuditWriter(store, claim.writer_id, key, options, claim=claim)


def open_trail_reader(settings: Settings) -> SqliteAuditStore | PostgresAuditStore:
    """The configured store, to read (never created here); AuditUnavailable when absent."""
    if settings.audit.store == "sqlite":
        path = audit_dir(settings.state_dir) / DB_FILE
        if not path.is_file():
            raise AuditUnavailable(f"no audit trail at {path} (has the gateway run?)")
        return SqliteAuditStore(path, create=False)
    from bastion.audit.postgres import PostgresAuditStore

    return PostgresAuditStore(resolve_dsn(settings.audit), create=False)


def resolve_dsn(audit: AuditSettings) -> str:
    """The DSN `audit.dsn` names; ConfigError naming the key when it cannot be read."""
    reference = audit.dsn
    if reference is None:
        raise ConfigError(["audit.dsn: store postgres needs a DSN"])
    kind, _, rest = reference.partition(":")
    if kind == "env":
        value = os.environ.get(rest)
        if not value:
            raise ConfigError([f"audit.dsn: environment variable {rest!r} is not set"])
        return value
    if kind == "file":
        try:
            value = Path(rest).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError([f"audit.dsn: cannot read {rest}: {exc.strerror}"]) from exc
        if not value:
            raise ConfigError([f"audit.dsn: {rest} is empty"])
        return value
    return reference  # a literal DSN; the config schema refused one with a password
