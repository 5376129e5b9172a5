"""What the console's pages show, read from the trail, the registry and the trust store.

Blocking reads: the console runs each in a worker thread, never on the event loop that
serves MCP. Each returns plain values for a template.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bastion.audit import AuditRecord, Query
from bastion.audit.chain import Entry, link
from bastion.audit.keys import audit_dir
from bastion.audit.read import report_json, verify_trail
from bastion.audit.store import AuditStore
from bastion.audit.trail import open_trail_reader
from bastion.config import Settings
from bastion.control.console.charts import SERIES, bar_chart, count_hourly
from bastion.control.governance.reviews import Review, ReviewStore
from bastion.control.registry.agents import Agent
from bastion.control.registry.locator import RegistryLocator
from bastion.control.registry.trust import SqlTrustStore
from bastion.errors import NotAvailable, RegistryNotFound

__all__ = [
    "Row",
    "agents",
    "alerts",
    "overview",
    "record_view",
    "reviews",
    "search",
    "trust",
    "verify",
]

OVERVIEW_LIMIT = 10_000  # records read for the charts (the newest, when there are more)


@dataclass(frozen=True)
class Row:
    """One record as the audit page lists it, with where it sits in its chain."""

    writer: str
    seq: int
    record: AuditRecord

    @property
    def when(self) -> str:
        """The record's time, UTC."""
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.record.time))


def _open(settings: Settings) -> AuditStore:
    if not settings.audit.enabled:
        raise NotAvailable("the audit trail is off (audit.enabled: false)")
    return open_trail_reader(settings)


def _rows(entries: list[Entry]) -> list[Row]:
    return [Row(e.writer_id, e.seq, AuditRecord.from_json(e.record)) for e in entries]


def overview(settings: Settings, now: float) -> dict[str, Any]:
    """The last day per hour: a chart and a total per series, and the newest alerts."""
    store = _open(settings)
    try:
        entries = store.query(Query(since=now - 86400, limit=OVERVIEW_LIMIT))
    finally:
        store.close()
    rows = _rows(entries)
    hourly = count_hourly((row.record for row in rows), now)
    charts = [
        {"key": key, "label": label, "total": hourly.total(key),
         "svg": bar_chart(hourly, key, label, colour)}
        for key, label, colour in SERIES
    ]  # fmt: skip
    recent = [row for row in rows if row.record.phase == "alert"][-5:]
    return {"charts": charts, "alerts": list(reversed(recent)), "records": len(rows)}


def search(settings: Settings, query: Query) -> list[Row]:
    """Records matching the filters, newest first."""
    store = _open(settings)
    try:
        return list(reversed(_rows(store.query(query))))
    finally:
        store.close()


def alerts(settings: Settings, limit: int = 200) -> list[Row]:
    """The newest alerts, newest first."""
    return search(settings, Query(phase="alert", limit=limit))


def record_view(settings: Settings, writer: str, seq: int) -> dict[str, Any]:
    """One record with its chain position: its link recomputed, and its predecessor's."""
    store = _open(settings)
    try:
        found = _entries_around(store, writer, seq)
    finally:
        store.close()
    if not found or found[-1].seq != seq:
        raise RegistryNotFound(f"no record {seq} of writer {writer[:40]!r} in the trail")
    entry = found[-1]
    previous = found[0] if len(found) == 2 else None
    own = link(entry.prev_hash, entry.writer_id, entry.seq, entry.record.encode()) == entry.hash
    linked = entry.seq == 1 if previous is None else previous.hash == entry.prev_hash
    return {
        "entry": entry,
        "row": Row(entry.writer_id, entry.seq, AuditRecord.from_json(entry.record)),
        "record_json": _pretty(entry.record),
        "hash_ok": own,
        "link_ok": linked,
    }


def _entries_around(store: AuditStore, writer: str, seq: int) -> list[Entry]:
    """The entry `seq` of `writer` and the one before it (when there is one)."""
    found: list[Entry] = []
    for entry in store.read(writer, max(0, seq - 2)):
        if entry.seq > seq:
            break
        found.append(entry)
    return found[-2:]


def verify(settings: Settings) -> dict[str, Any]:
    """`bastion audit verify`'s report of the whole trail."""
    store = _open(settings)
    try:
        return report_json(verify_trail(store, audit_dir(settings.state_dir), settings))
    finally:
        store.close()


def _pretty(record: str) -> str:
    import orjson

    return orjson.dumps(orjson.loads(record), option=orjson.OPT_INDENT_2).decode()


def agents(registry: RegistryLocator | None) -> list[Agent]:
    """Every registered agent, by tenant and id."""
    if registry is None:
        raise NotAvailable("identity is off (auth.mode: none); there is no agent registry")
    with registry.registry() as store:
        return store.list()


def trust(locator: RegistryLocator | None) -> dict[str, Any]:
    """Pending definitions with their diffs, and the quarantines in force."""
    if locator is None:
        return {"pending": [], "quarantines": [], "approved": 0}
    with SqlTrustStore(locator.database()) as store:
        pending = store.pins("pending")
        keys = sorted({(p.upstream, p.kind, p.name) for p in pending})
        versions = [store.versions(*key) for key in keys]
        return {
            "pending": versions,
            "quarantines": store.quarantines(True),
            "approved": len(store.pins("approved")),
        }


def reviews(settings: Settings, registry: RegistryLocator | None) -> Review | None:
    """The open review, else the last one, else None."""
    if registry is None:
        return None
    with ReviewStore(registry.database(create=True)) as store:
        try:
            return store.current()
        except RegistryNotFound:
            return None
