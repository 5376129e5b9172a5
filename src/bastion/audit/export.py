"""Entries as lines of JSON for other tools: Bastion's own JSONL, or OCSF events."""

from __future__ import annotations

from typing import Any

import orjson

from bastion.audit import ocsf
from bastion.audit.chain import Entry
from bastion.audit.record import AuditRecord

_OPTIONS = orjson.OPT_SORT_KEYS


def jsonl_line(entry: Entry) -> bytes:
    """One JSON object: the chain fields and the record exactly as it was hashed.

    `{"hash", "prev_hash", "record": {...}, "seq", "writer"}`; the record object's bytes are
    the stored canonical JSON, so the line carries what is needed to recompute the hash.
    """
    line: dict[str, Any] = {
        "writer": entry.writer_id,
        "seq": entry.seq,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
        "record": orjson.Fragment(entry.record),
    }
    return orjson.dumps(line, option=_OPTIONS)


def ocsf_line(entry: Entry) -> bytes:
    """One OCSF API Activity event (see `bastion.audit.ocsf`) as a JSON object."""
    return orjson.dumps(ocsf.event(AuditRecord.from_json(entry.record), entry), option=_OPTIONS)
