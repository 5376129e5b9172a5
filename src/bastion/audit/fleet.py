"""Anomaly detection over the whole fleet's trail: `FleetDetectors`.

With `audit.store: postgres` every replica appends its own chain to one database, and each
replica's detectors would see only its own share of the traffic: a rate spike split over
three replicas stays under every threshold. So the detectors run once, for the fleet:

- **One leader.** Every replica runs a `FleetDetectors`; exactly one at a time holds a
  session-level PostgreSQL advisory lock on its own connection and is the leader. The lock
  dies with the connection, so when the leader's process dies (or its connection does) another
  replica takes it within `elect_seconds`; when its machine vanishes or it freezes, once the
  server ended the session (keepalives, about 25 s; idle for 10 s). A leader whose connection
  fails steps down at its next query, before it handles anything more; so does one whose own
  trail cannot be written (its alerts would not be recorded).
- **It tails the shared trail** in commit order (positions never skip: see postgres.py),
  `batch` entries at a time every `poll_seconds`, feeding every replica's records to its
  `Detectors`. Its alerts go through the normal trail path (`raise_alert`: logged, counted,
  written to the trail, the agent suspended when due): recorded once, acted on once. The local
  detectors of every replica are off meanwhile (`Trail.leave_detection`).
- **A cursor in the database** (`detector_cursor`, one row) keeps the position the leader has
  handled. A new leader rebuilds the baselines by replaying the history up to the cursor
  (`baseline_days`, at most `warm_records` entries; no alerts) and goes on from there, so no
  record falls between two leaders. The cursor is saved after a batch's alerts were raised
  and their records committed: a leader dying in between leaves the batch to its successor,
  which skips the alerts already in the trail (each alert names the `position` of the record
  that raised it). An entry that is not a record (`bastion audit verify` reports it) is passed.

Alerts raised outside the detectors (an upstream's foreign-tenant answer, a claimed URI, a
changed tool) stay with the replica that sees them. The detection delay is the commit of the
record plus at most one poll (0.25 s by default) and the batch's handling: about 0.25 s
measured (tests/test_fleet_detectors.py prints it).

The connection needs SELECT on `entries` and, on `detector_cursor`, SELECT, INSERT and UPDATE
(the table is created on first use when the role may create tables).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

import psycopg

from bastion.audit.detect import Alert, Detectors
from bastion.audit.postgres import audit_server
from bastion.audit.record import AuditRecord
from bastion.audit.trail import resolve_dsn
from bastion.config import Alerts, Settings
from bastion.errors import AuditUnavailable

__all__ = ["Alerting", "FleetDetectors", "RaiseAlert", "open_fleet"]

log = logging.getLogger("bastion.audit")

RaiseAlert = Callable[[Alert], Awaitable[None]]  # the trail's `alert`: record, count, act

# "BASV" + 0: a space apart from the audit store's append ("BAST") and writer-id ("BASU") locks.
_LEADER_LOCK = (0x42415356, 0)
_CURSOR = "fleet"  # the cursor row's name
_CURSOR_TABLE = """CREATE TABLE IF NOT EXISTS detector_cursor (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    time DOUBLE PRECISION NOT NULL
)"""
_SAVE = """INSERT INTO detector_cursor (name, position, time) VALUES (%s, %s, %s)
    ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, time = EXCLUDED.time"""
_WARM_FLOOR = """SELECT COALESCE(MIN(id), %s + 1) - 1 FROM (
    SELECT id FROM entries WHERE id <= %s AND time >= %s ORDER BY id DESC LIMIT %s) AS newest"""
_PAGE = 1000  # history rows per statement while warming
# At most about this many bytes of records per statement (plus one record): with
# `audit.record_arguments` a record may carry a call's whole arguments (up to the body limit),
# and a page of a thousand of those must not be what takes each new leader down in turn.
_PAGE_BYTES = 32 * 1024 * 1024
# Rows `WHERE <condition> ORDER BY id LIMIT n`, cut once the bytes before a row pass the budget
# (the first row always comes: the tail moves on however large one record is).
_SIZED_PAGE = """SELECT id, record FROM (
    SELECT id, record, SUM(octet_length(record)) OVER (ORDER BY id) AS upto FROM (
        SELECT id, record FROM entries WHERE {condition} ORDER BY id LIMIT %s) AS page
    ) AS sized WHERE upto - octet_length(record) < %s ORDER BY id"""
_AFTER = _SIZED_PAGE.format(condition="id > %s")
_BETWEEN = _SIZED_PAGE.format(condition="id > %s AND id <= %s")
_Row = tuple[int, AuditRecord | None]  # a trail position and its record (None: unreadable)
_DEDUPE_ALERTS = 10_000  # alert records read at takeover to skip those already raised
_IDLE_SESSION_TIMEOUT_SINCE = 140000  # PostgreSQL 14
_MAX_PAUSE = 5.0  # seconds between two queries at most: the server ends a session idle for 10


class FleetDetectors:
    """The detectors over every replica's records, run by whichever replica leads.

    `run` is the gateway's background job: it campaigns for the lead every `elect_seconds`
    and, leading, tails the trail every `poll_seconds`. Until cancelled; the connection (and
    with it the lead) is given up when it ends."""

    name = "fleet detectors"

    def __init__(
        self,
        dsn: str,
        alerts: Alerts,
        raise_alert: RaiseAlert,
        *,
        poll_seconds: float = 0.25,
        elect_seconds: float = 1.0,
        batch: int = 1000,
        warm_records: int = 200_000,
        clock: Callable[[], float] = time.time,
        writable: Callable[[], bool] = lambda: True,
    ) -> None:
        if max(poll_seconds, elect_seconds) > _MAX_PAUSE:
            raise ValueError(f"expected polls at most {_MAX_PAUSE:g} s apart (idle sessions end)")
        self._link = _Link(dsn)
        self._alerts = alerts
        self._raise = raise_alert
        self._poll = poll_seconds
        self._elect = elect_seconds
        self._batch = batch
        self._warm_records = warm_records
        self._clock = clock
        self._writable = writable  # whether this replica's trail takes records now
        self._detectors: Detectors | None = None  # the leader's, rebuilt at each takeover
        self._raised: set[tuple[str, str, int]] = set()  # (rule, agent, position) in the trail
        self._failing = False
        self.leading = False
        self.position = 0  # the last trail position handled (while leading)
        self.takeovers = 0
        self.skipped = 0  # alerts not raised again: the last leader had raised them

    async def run(self) -> None:
        """Campaign, lead, tail; until cancelled."""
        try:
            while True:
                full = False
                try:
                    if not self._writable():
                        self._abstain()
                    elif not self.leading:
                        await self._campaign()
                    if self.leading:
                        full = await self._tail()
                    self._recovered()
                except (psycopg.Error, AuditUnavailable, OSError) as exc:
                    self._step_down(exc)
                if not full:  # a full batch means more is waiting: go on at once
                    await asyncio.sleep(self._poll if self.leading else self._elect)  # pacing
        finally:
            self.leading = False
            await asyncio.to_thread(self._link.close)

    async def _campaign(self) -> None:
        """Take the lead when it is free; then rebuild the baselines up to the cursor."""
        if not await asyncio.to_thread(self._link.claim):
            return
        self._detectors, self.position, self._raised = await asyncio.to_thread(self._take_over)
        self.leading = True
        self.takeovers += 1
        log.info("fleet detectors: this replica leads from trail position %d", self.position)

    def _take_over(self) -> tuple[Detectors, int, set[tuple[str, str, int]]]:
        """A fresh `Detectors` warmed with the history before the cursor, the cursor, and the
        alerts already raised past it (in a worker thread: the history may be long)."""
        position = self._link.cursor()
        detectors = Detectors(self._alerts)
        days = self._alerts.baseline_days
        if days > 0:
            since = self._clock() - days * 86400
            for record in self._link.history(position, since, self._warm_records):
                detectors.observe(record, replay=True)
        return detectors, position, self._link.raised_after(position)

    async def _tail(self) -> bool:
        """Handle the entries after the cursor; True when the batch was full."""
        rows = await asyncio.to_thread(self._link.after, self.position, self._batch)
        if not rows:
            return False
        alerts = self._observe(rows)
        for alert in alerts:
            await self._raise(alert)
        last = rows[-1][0]
        await asyncio.to_thread(self._link.save, last, self._clock())
        self.position = last
        if self._raised and last >= max(position for _, _, position in self._raised):
            self._raised = set()  # past every alert the last leader left: nothing to skip
        return len(rows) >= self._batch

    def _observe(self, rows: list[_Row]) -> list[Alert]:
        """The alerts these records raise, each naming its record's position, less those a
        previous leader raised already."""
        assert self._detectors is not None  # noqa: S101 - set when the lead was taken
        alerts = []
        for position, record in rows:
            if record is None:
                continue
            for alert in self._detectors.observe(record):
                if (alert.rule, alert.agent, position) in self._raised:
                    self.skipped += 1
                    continue
                alerts.append(replace(alert, facts={**alert.facts, "position": position}))
        return alerts

    def _abstain(self) -> None:
        """This replica's trail cannot be written: it neither leads nor campaigns, so that the
        lead goes to a replica whose alerts are recorded (and handles the batch again)."""
        if self.leading:
            log.warning("fleet detectors: this replica's trail cannot be written; lead given up")
            self.leading = False
            self._detectors = None
        self._link.drop()  # an idle connection would be ended by the server anyway

    def _step_down(self, exc: BaseException) -> None:
        """The connection failed: the lead (if held) is gone with it."""
        was = self.leading
        self.leading = False
        self._detectors = None
        self._link.drop()
        if was:
            log.warning("fleet detectors: lost the lead (%s); another replica takes it", exc)
        elif not self._failing:
            log.warning("fleet detectors: cannot reach the trail (%s); trying again", exc)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("fleet detectors: the trail is reachable again")
            self._failing = False


class _Link:
    """The leader's connection: the lock, the cursor and the reads; thread-safe."""

    def __init__(self, dsn: str) -> None:
        self._server = audit_server(dsn, "bastion-fleet-detectors")
        self.where = self._server.where
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._leading = False

    def claim(self) -> bool:
        """Take the leader's lock when free (connecting first); whether this link holds it."""
        with self._lock, self._guard():
            conn = self._connection()
            row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", _LEADER_LOCK).fetchone()
            self._leading = bool(row and row[0])
            return self._leading

    def cursor(self) -> int:
        """The position the last leader handled; the trail's end when none ever led."""
        with self._lock, self._guard():
            conn = self._connection()
            missing = conn.execute("SELECT to_regclass('detector_cursor') IS NULL").fetchone()
            if missing == (True,):  # CREATE … IF NOT EXISTS needs the privilege even then
                conn.execute(_CURSOR_TABLE)
            row = conn.execute(
                "SELECT position FROM detector_cursor WHERE name = %s", (_CURSOR,)
            ).fetchone()
            if row is not None:
                return int(row[0])
            # The first leader starts at the end; kept at once, so that a successor taking over
            # before it saved a batch starts there too, not past the batch.
            end = conn.execute("SELECT COALESCE(MAX(id), 0) FROM entries").fetchone()
            position = int(end[0]) if end else 0
            conn.execute(_SAVE, (_CURSOR, position, time.time()))
            return position

    def history(self, upto: int, since: float, limit: int) -> Iterator[AuditRecord]:
        """The newest `limit` records at or before `upto` written since `since`, in order."""
        with self._lock, self._guard():
            row = self._connection().execute(_WARM_FLOOR, (upto, upto, since, limit)).fetchone()
        position = int(row[0]) if row else upto
        while position < upto:
            rows = self._rows(_BETWEEN, (position, upto, _PAGE, _PAGE_BYTES))
            if not rows:
                return
            yield from (record for _, record in rows if record is not None)
            position = rows[-1][0]

    def raised_after(self, position: int) -> set[tuple[str, str, int]]:
        """(rule, agent, position) of the detectors' alerts recorded past `position`."""
        rows = self._rows(
            "SELECT id, record FROM entries WHERE id > %s AND phase = %s ORDER BY id LIMIT %s",
            (position, "alert", _DEDUPE_ALERTS),
        )
        raised = set()
        for _, record in rows:
            source = record.detail.get("position") if record is not None else None
            if isinstance(source, int) and record is not None and record.agent is not None:
                raised.add((str(record.detail.get("rule")), record.agent, source))
        return raised

    def after(self, position: int, limit: int) -> list[_Row]:
        """Up to `limit` entries after `position`: their positions and records (None for
        one that is not a record)."""
        return self._rows(_AFTER, (position, limit, _PAGE_BYTES))

    def save(self, position: int, now: float) -> None:
        """Keep the position handled, for the next leader."""
        with self._lock, self._guard():
            self._connection().execute(_SAVE, (_CURSOR, position, now))

    def drop(self) -> None:
        """Forget a failed connection (and the lock, which went with it)."""
        with self._lock:
            self._leading = False
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def close(self) -> None:
        """Close the connection, which gives up the lead."""
        self.drop()

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[_Row]:
        with self._lock, self._guard():
            found = self._connection().execute(sql, params).fetchall()
        rows: list[_Row] = []
        for position, text in found:
            try:
                rows.append((int(position), AuditRecord.from_json(text)))
            except ValueError:  # `bastion audit verify` reports it; the detectors go past it
                log.warning("fleet detectors: entry %d is not an audit record", position)
                rows.append((int(position), None))
        return rows

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, or a new one; a lost one takes the lead with it (under _lock)."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._leading = False
        conn = self._server.connect()
        try:
            # No statement may hold a worker thread (and the gateway's stop) for long.
            conn.execute("SET statement_timeout = '10s'")
            # The server ends the session, and the lead with it, when this replica's machine or
            # network vanished (keepalives: about 25 s) or when it froze: a leader queries
            # every poll, a candidate every election.
            conn.execute("SET tcp_keepalives_idle = 10")
            conn.execute("SET tcp_keepalives_interval = 5")
            conn.execute("SET tcp_keepalives_count = 3")
            if conn.info.server_version >= _IDLE_SESSION_TIMEOUT_SINCE:
                conn.execute("SET idle_session_timeout = '10s'")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _guard(self) -> _Translate:
        return _Translate(self)


class _Translate:
    """psycopg errors as `AuditUnavailable` naming the server, never the password; a
    connection left mid-statement is closed (and the lead with it)."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    def __enter__(self) -> None:
        return None

    def __exit__(self, _: object, exc: BaseException | None, __: object) -> None:
        if not isinstance(exc, psycopg.Error):
            return
        link = self._link
        if link._conn is not None and (link._conn.closed or link._conn.broken):
            link._conn.close()
            link._conn = None
            link._leading = False
        detail = link._server.detail(exc)
        raise AuditUnavailable(f"fleet detectors: {link.where}: {detail}") from exc


class Alerting(Protocol):
    """Where the leader's alerts go: the trail's `alert` (pipeline/trail.py)."""

    @property
    def writable(self) -> bool: ...

    async def alert(self, alert: Alert, *, durable: bool = False) -> None: ...


def open_fleet(settings: Settings, trail: Alerting) -> FleetDetectors | None:
    """The fleet's detectors when the trail is shared (`audit.store: postgres`) and alerts
    are on; None otherwise (one process: its trail's own detectors see everything)."""
    audit = settings.audit
    if not audit.enabled or audit.store != "postgres" or not audit.alerts.enabled:
        return None

    async def raise_alert(alert: Alert) -> None:
        # Committed before the cursor moves past its record: the next leader sees it raised.
        await trail.alert(alert, durable=True)
        if not trail.writable:  # not recorded: the batch is left to the next leader
            raise AuditUnavailable(f"fleet detectors: alert {alert.rule} was not recorded")

    return FleetDetectors(
        resolve_dsn(audit), audit.alerts, raise_alert, writable=lambda: trail.writable
    )
