"""The audit stage: a tamper-evident, durable trail of every request Bastion handles.

`record` (what is written), `chain` (hash links and `verify`; pure), `seal` (signed
checkpoints and heartbeats; pure), `store` (the port and its SQLite adapter), `postgres` (the
PostgreSQL adapter, imported only when configured), `writer` (batching, durability,
back-pressure, sealing), `ahead` (the write-ahead that makes a record safe from kill -9
without an fsync), `keys` (files in the state directory), `signer` (who signs: the state
directory's key, a key file outside it, or Vault transit), `anchor` (checkpoints and heartbeats
kept outside the store), `trail` (the store the configuration names, for writing or reading),
`recover` (outcomes lost to a crash), `detect` (anomaly detectors), `sinks` (what sinks send),
`read` (operators' filters and verification), `ocsf` and `export` (for other tools).
"""

from bastion.audit.chain import Entry, Finding, Problem, VerifyReport, verify
from bastion.audit.record import SCHEMA_VERSION, AuditRecord, digest
from bastion.audit.seal import Checkpoint
from bastion.audit.store import AuditStore, Query, SqliteAuditStore
from bastion.audit.trail import open_writer
from bastion.audit.writer import AuditWriter, WriterOptions

__all__ = [
    "SCHEMA_VERSION",
    "AuditRecord",
    "AuditStore",
    "AuditWriter",
    "Checkpoint",
    "Entry",
    "Finding",
    "Problem",
    "Query",
    "SqliteAuditStore",
    "VerifyReport",
    "WriterOptions",
    "digest",
    "open_writer",
    "verify",
]
