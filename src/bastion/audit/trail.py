"""The trail a configuration names: opened for writing by the gateway, for reading by operators.

`audit.store: sqlite` keeps `<state_dir>/audit/audit.db`; `postgres` keeps the records in the
database `audit.dsn` names (postgres.py, imported only then). Either way the checkpoint key and
the writer-id files stay in `<state_dir>/audit/`. `audit.dsn` is read here, when the trail
opens: `env:NAME` (an environment variable), `file:PATH` (a file's content, trimmed;
relative to the working directory, like the upstreams' secret references, so better absolute),
or a literal DSN without a password.

The checkpoints are signed by `audit.signer` (signer.py; the key in the state directory when
none is configured, which startup warns about) and sent to `audit.anchor` and to sinks that
take the `checkpoint` phase (anchor.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bastion.audit.ahead import WriteAhead
from bastion.audit.anchor import Anchor
from bastion.audit.keys import DB_FILE, KEY_FILE, audit_dir, claim_writer_id, load_checkpoint_key
from bastion.audit.seal import Signer
from bastion.audit.signer import open_signer
from bastion.audit.store import SqliteAuditStore, Survives, Synchronous
from bastion.audit.writer import AuditWriter, WriterOptions
from bastion.config import AuditSettings, Settings
from bastion.errors import AuditUnavailable, ConfigError

if TYPE_CHECKING:
    from bastion.audit.postgres import PostgresAuditStore

log = logging.getLogger("bastion.audit")
HEARTBEAT_SECONDS = 60.0  # for sinks taking checkpoints when there is no anchor file


def open_writer(
    state_dir: str | os.PathLike[str],
    options: WriterOptions | None = None,
    *,
    synchronous: Synchronous = "FULL",
    survives: Survives | None = None,
    max_bytes: int | None = None,
    signer: Signer | None = None,
    anchor: Anchor | None = None,
) -> AuditWriter:
    """A writer for `<state_dir>/audit/`: claims a writer id, loads the checkpoint key (unless
    a `signer` is given) and anchors its checkpoints in `anchor`, when given.

    `survives` (when given, it decides `synchronous`): `process`, a write-ahead and commits
    without fsync; `power`, an fsync per commit, strict appends waiting for it. Without it,
    strict appends wait for a commit at `synchronous`. `max_bytes` caps the store's size; past
    it, writes fail and the writer turns unhealthy; strict appends then wait for commits even
    at `process`, so that no call passes on a record the full store will not take.
    """
    if survives is not None:
        synchronous = "FULL" if survives == "power" else "NORMAL"
    directory = audit_dir(state_dir)
    claim = claim_writer_id(directory)
    try:
        key = signer if signer is not None else load_checkpoint_key(directory)
        store = SqliteAuditStore(directory / DB_FILE, synchronous=synchronous, max_bytes=max_bytes)
    except BaseException:
        claim.release()
        raise
    ahead = None
    if survives == "process" and max_bytes is None:
        ahead = WriteAhead(directory, claim.writer_id)
    return AuditWriter(
        store, claim.writer_id, key, options, claim=claim, anchor=anchor, ahead=ahead
    )


def open_trail_writer(settings: Settings) -> AuditWriter:
    """The writer of this process's chain in the configured store (not started yet)."""
    audit = settings.audit
    options = WriterOptions(
        checkpoint_every=audit.checkpoint_every, checkpoint_seconds=audit.checkpoint_seconds
    )
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = audit_dir(settings.state_dir)
    signer = open_signer(audit.signer, directory)
    anchor = open_anchor(settings)
    _warn_weak(settings, directory)
    if audit.store == "sqlite":
        return open_writer(
            settings.state_dir,
            options,
            survives=audit.survives,
            max_bytes=audit.max_bytes,
            signer=signer,
            anchor=anchor,
        )
    from bastion.audit.postgres import PostgresAuditStore

    store = PostgresAuditStore(resolve_dsn(audit), survives=audit.survives)
    try:
        claim = claim_writer_id(directory, hold=store.hold)
    except BaseException:
        store.close()
        raise
    return AuditWriter(store, claim.writer_id, signer, options, claim=claim, anchor=anchor)


def open_anchor(settings: Settings) -> Anchor | None:
    """Where checkpoints and heartbeats go besides the store: the anchor file and the sinks
    that list the `checkpoint` phase; None when nothing takes them."""
    anchor = settings.audit.anchor
    if anchor is not None:
        return Anchor(anchor.path, anchor.heartbeat_seconds)
    if any("checkpoint" in sink.phases for sink in settings.audit.sinks):
        return Anchor(None, HEARTBEAT_SECONDS)
    return None


def _warn_weak(settings: Settings, directory: Path) -> None:
    """Say at startup what the trail's defaults leave open (README: the audit threat model)."""
    if settings.audit.signer is None:
        log.warning(
            "audit checkpoints are signed with %s, beside the data: whoever can write the state "
            "directory can rewrite the trail and re-sign it unnoticed; set audit.signer (a key "
            "file outside it, or Vault transit)",
            directory / KEY_FILE,
        )
    if settings.audit.anchor is None:
        log.warning(
            "audit checkpoints are anchored nowhere outside the store: a cut tail or a deleted "
            "writer's chain goes unnoticed by `bastion audit verify`; set audit.anchor"
        )


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
