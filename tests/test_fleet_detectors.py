"""The anomaly detectors over the whole fleet (audit/fleet.py), with a real PostgreSQL trail.

Each "replica" here is what a gateway process contributes to the trail: its own writer (its
own chain) on one PostgreSQL store, its `Trail` writing decision records, and its
`FleetDetectors` campaigning for the lead. A rate spike split over replicas stays below every
replica's own threshold: the fleet's leader alone sees it whole, alerts once and suspends once;
when the leader dies another one takes over and the next spike alerts, still once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests import pg
from tests.conftest import until_async
from tests.pg import PgServer, start_server

from bastion.app import Gateway
from bastion.audit import AuditRecord, AuditWriter, Query
from bastion.audit.fleet import FleetDetectors, open_fleet
from bastion.audit.trail import open_trail_writer
from bastion.config import Settings, parse
from bastion.errors import AuditUnavailable
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.pipeline.trail import Trail
from bastion.types import Era, Principal, Target

postgres = pg.postgres  # the session's server (a fixture)

DSN_VAR = "BASTION_TEST_FLEET_DSN"
ROUTE = Route(name="main", path="/mcp", upstreams=("workspace",), multiplex=True)
LIMIT = 12  # rate_spike.min_calls: the 13th call of a minute alerts
SPIKE = 15  # calls in the spike: 5 per replica of three, each far below the limit
HISTORY_MINUTES = 12  # two calls a minute before the spike: the agent's baseline
LEADER_LOCK_CLASS = 0x42415356  # the first key of the leader's advisory lock (fleet.py)


@pytest.fixture
def dsn(postgres: PgServer, monkeypatch: pytest.MonkeyPatch) -> str:
    value = postgres.database()
    monkeypatch.setenv(DSN_VAR, value)
    return value


def settings(
    tmp_path: Path, state: str, *, store: str = "postgres", suspend: bool = False
) -> Settings:
    """Rate spikes only (the other rules off), over a trail in `store`."""
    off, flag = "{enabled: false}", "true" if suspend else "false"
    return parse(
        f"""
state_dir: {state}
audit:
  store: {store}
  dsn: env:{DSN_VAR}
  alerts:
    rate_spike: {{factor: 5, min_calls: {LIMIT}, warmup_minutes: 10, suspend: {flag}}}
    denial_burst: {off}
    cross_tenant: {off}
    first_use: {off}
    unusual_hours: {off}
    new_client: {off}
""",
        base=tmp_path,
    )


@dataclass
class Replica:
    """One replica's share of the fleet: its writer, trail, and fleet detectors (when run)."""

    writer: AuditWriter
    trail: Trail
    fleet: FleetDetectors | None = None
    task: asyncio.Task[None] | None = None
    suspended: list[str] = field(default_factory=list)
    alerted: list[str] = field(default_factory=list)  # (agent) of each alert raised here

    async def call(self, agent: str) -> None:
        """One allowed tools/call of `agent` through this replica's trail (committed)."""
        message = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "workspace__list_tasks", "arguments": {}},
        }
        exchange = Exchange(
            message=message,
            era=Era.MODERN,
            protocol_version="2026-07-28",
            route=ROUTE.path,
            client="127.0.0.1:40000",
            principal=Principal(tenant="acme", agent=agent),
            target=Target("workspace", "list_tasks"),
        )
        await self.trail.decision(exchange, ROUTE)

    def lead(self) -> None:
        """Run the fleet detectors, as the gateway's background work does."""
        assert self.fleet is not None
        self.task = asyncio.create_task(self.fleet.run())

    async def die(self) -> None:
        """Stop the fleet detectors (the gateway stopping: their connection closes)."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None


@contextlib.asynccontextmanager
async def fleet(
    tmp_path: Path, count: int, *, detect: bool = True, suspend: bool = False
) -> AsyncIterator[list[Replica]]:
    """`count` replicas on one PostgreSQL trail; with `detect`, each runs fleet detectors
    (and its own detectors are off, as the gateway does), else each detects on its own."""
    replicas = []
    for i in range(count):
        config = settings(tmp_path, f"replica-{i}", suspend=suspend)
        writer = open_trail_writer(config)
        await writer.start()
        replica = Replica(writer, Trail(config, writer))

        async def suspend_agent(
            agent: str, reason: str, into: list[str] = replica.suspended
        ) -> None:
            into.append(agent)

        replica.trail.suspend = suspend_agent
        replica.trail.alerted = lambda alert, into=replica.alerted: into.append(alert.agent)
        if detect:
            replica.fleet = open_fleet(config, replica.trail)
            replica.trail.leave_detection()
        replicas.append(replica)
    try:
        yield replicas
    finally:
        for replica in replicas:
            if replica.task is not None:
                await replica.die()
            await replica.writer.stop()


async def seed_history(replica: Replica, *agents: str) -> None:
    """Two calls a minute in each of the last minutes: the baseline of each agent."""
    minute = int(time.time() // 60)
    for agent in agents:
        for back in range(HISTORY_MINUTES, 0, -1):
            for second in (1, 2):
                at = (minute - back) * 60 + second
                record = AuditRecord(
                    time=at,
                    request_id=f"history-{agent}-{back}-{second}",
                    phase="decision",
                    tenant="acme",
                    agent=agent,
                    decision="allow",
                    server="workspace",
                    tool_exposed="workspace__list_tasks",
                    client="127.0.0.1",
                )
                await replica.writer.append(record, durable=True)


def warm_locally(replicas: list[Replica]) -> list[int]:
    """What a starting gateway does: its own detectors' baselines from the shared history
    (nothing to warm when they are off); how many records each replayed."""
    entries = replicas[0].writer.store.read()
    history = [AuditRecord.from_json(entry.record) for entry in entries]
    return [replica.trail.warm(history) for replica in replicas]


async def room_in_this_minute() -> None:
    """Wait until a spike (well under a second) cannot straddle two minutes."""
    await until_async(lambda: time.time() % 60 < 50, "a minute with room for a spike", 15)


async def spike(replicas: list[Replica], agent: str) -> float:
    """SPIKE calls of `agent`, dealt round-robin over `replicas`; when the one that crosses
    the limit was committed (monotonic)."""
    await room_in_this_minute()
    crossed = 0.0
    for i in range(SPIKE):
        await replicas[i % len(replicas)].call(agent)
        if i == LIMIT:  # the 13th call: the first over the limit
            crossed = time.monotonic()
    return crossed


def alerts(replica: Replica, agent: str | None = None) -> list[AuditRecord]:
    """The rate-spike alert records in the shared trail (of `agent`)."""
    entries = replica.writer.store.query(Query(phase="alert", agent=agent, limit=1000))
    records = [AuditRecord.from_json(entry.record) for entry in entries]
    return [record for record in records if record.detail.get("rule") == "rate_spike"]


def end(replica: Replica) -> int:
    """The trail's last position."""
    return replica.writer.store.tail(1)[0][0]


async def leader(replicas: list[Replica]) -> Replica:
    """The one replica leading (waiting until one does)."""

    def leading() -> list[Replica]:
        return [r for r in replicas if r.fleet is not None and r.fleet.leading]

    # A leader whose lock went with its connection notices at its next query, before it
    # handles anything more (its successor takes the lead only once the lock is free).
    found: list[Replica] = await until_async(
        lambda: len(leading()) == 1 and leading(), "one leader", 15
    )
    return found[0]


async def settled(replicas: list[Replica]) -> list[AuditRecord]:
    """Once the leader handled everything in the trail (its alerts are committed by then):
    the rate-spike alerts recorded."""
    last = end(replicas[0])
    await leader(replicas)

    def caught_up() -> bool:
        # Whichever replica leads by then: the one `leader` saw may be stepping down still
        # (its last save failed), and its successor is the one that catches up.
        return any(
            r.fleet is not None and r.fleet.leading and r.fleet.position >= last for r in replicas
        )

    await until_async(caught_up, "caught up")
    return alerts(replicas[0])


# --- the attack without fleet detection -----------------------------------------------------


async def test_per_replica_detectors_miss_a_spike_split_over_replicas(
    tmp_path: Path, dsn: str
) -> None:
    """What fleet detection fixes: each replica's own detectors see a third of the spike."""
    async with fleet(tmp_path, 3, detect=False) as replicas:
        await seed_history(replicas[0], "a1", "a2")
        assert warm_locally(replicas) == [2 * 2 * HISTORY_MINUTES] * 3

        await spike(replicas, "a1")
        assert [r.alerted for r in replicas] == [[], [], []]  # 5 calls each: nobody alerts

        await spike(replicas[:1], "a2")  # the same spike through one replica does alert
        assert [r.alerted for r in replicas] == [["a2"], [], []]
        await until_async(lambda: alerts(replicas[0], "a2"), "the single replica's alert")


# --- one alert per fleet --------------------------------------------------------------------


async def test_a_spike_split_over_three_replicas_alerts_once(
    tmp_path: Path, dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with fleet(tmp_path, 3) as replicas:
        assert all(r.trail.detectors is None for r in replicas)  # the fleet's leader detects
        await seed_history(replicas[0], "a1", "a2")
        warm_locally(replicas)
        raised: list[float] = []
        for replica in replicas:
            assert replica.fleet is not None
            replica.fleet._raise = _timed(replica.fleet._raise, raised)
            replica.lead()
        lead = await leader(replicas)
        assert lead.fleet is not None and lead.fleet.takeovers == 1

        crossed = await spike(replicas, "a1")
        (alert,) = [a for a in await settled(replicas) if a.agent == "a1"]
        assert alert.detail["calls"] == LIMIT + 1 and alert.detail["average"] == pytest.approx(2)
        assert alert.detail["position"] > 0  # the record that crossed the limit
        delay = raised[0] - crossed
        with capsys.disabled():
            print(
                f"\nfleet detection delay (commit of the crossing record to alert): {delay:.3f} s"
            )
        assert delay < 5

        # Through one replica only: the fleet alerts, that replica's own detectors do not too.
        await spike(replicas[1:2], "a2")
        assert [a.agent for a in await settled(replicas)] == ["a1", "a2"]
        assert sorted(agent for r in replicas for agent in r.alerted) == ["a1", "a2"]
        assert sum(r.fleet.takeovers for r in replicas if r.fleet is not None) == 1


def _timed(raise_alert: Any, raised: list[float]) -> Any:
    async def timed(alert: Any) -> None:
        raised.append(time.monotonic())
        await raise_alert(alert)

    return timed


async def test_a_suspending_alert_suspends_the_agent_once(tmp_path: Path, dsn: str) -> None:
    async with fleet(tmp_path, 3, suspend=True) as replicas:
        await seed_history(replicas[0], "a1")
        for replica in replicas:
            replica.lead()
        await leader(replicas)
        await spike(replicas, "a1")
        (alert,) = await settled(replicas)
        assert alert.detail["suspend"] is True and alert.detail["suspended"] is True
        assert [agent for r in replicas for agent in r.suspended] == ["a1"]


# --- the lead passes on ---------------------------------------------------------------------


def leader_pid(dsn: str) -> int:
    """The server process of the connection holding the leader's lock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
            "AND objid = 0 AND granted",
            (LEADER_LOCK_CLASS,),
        ).fetchone()
    assert row is not None, "nobody holds the leader's lock"
    return int(row[0])


async def test_when_the_leader_dies_another_takes_over_and_alerts_stay_single(
    tmp_path: Path, dsn: str
) -> None:
    async with fleet(tmp_path, 2) as replicas:
        await seed_history(replicas[0], "a1", "a2", "a3")
        for replica in replicas:
            replica.lead()
        first = await leader(replicas)
        await spike(replicas, "a1")
        assert [a.agent for a in await settled(replicas)] == ["a1"]

        # The leader's connection dies (as when its process is killed): the other leads.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (leader_pid(dsn),))
        other = replicas[1] if first is replicas[0] else replicas[0]
        await until_async(lambda: other.fleet is not None and other.fleet.leading, "a new leader")
        await spike(replicas, "a2")
        # One alert each: a2's from the new leader, a1's not raised again by it; the old
        # leader, alive but without its lock, raised nothing.
        assert [a.agent for a in await settled(replicas)] == ["a1", "a2"]

        # The new leader's replica stops: the first one (a follower again) takes the lead.
        await other.die()
        await until_async(lambda: first.fleet is not None and first.fleet.leading, "a leader")
        await spike(replicas, "a3")
        assert [a.agent for a in await settled([first])] == ["a1", "a2", "a3"]


async def test_a_batch_left_unfinished_by_a_dying_leader_is_not_alerted_twice(
    tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader raised the alert, then lost its connection before saving the cursor: its
    successor handles the batch again and skips the alert already in the trail."""
    async with fleet(tmp_path, 2) as replicas:
        await seed_history(replicas[0], "a1")
        for replica in replicas:
            replica.lead()
        first = await leader(replicas)
        assert first.fleet is not None
        link = first.fleet._link
        save = link.save

        def lost(position: int, now: float) -> None:
            link.drop()  # the connection, and the lead with it, are gone
            raise AuditUnavailable("fleet detectors: the connection was lost")

        monkeypatch.setattr(link, "save", lost)
        await spike(replicas, "a1")
        await until_async(lambda: alerts(first, "a1"), "the first leader's alert")
        monkeypatch.setattr(link, "save", save)
        (alert,) = await settled(replicas)
        assert alert.agent == "a1"
        # Someone took the lead again from the old cursor, saw the spike again, and skipped
        # the alert already in the trail.
        assert sum(r.fleet.takeovers for r in replicas if r.fleet is not None) == 2
        assert sum(r.fleet.skipped for r in replicas if r.fleet is not None) == 1


async def test_the_fleet_leads_and_detects_again_once_postgresql_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with start_server() as server:
        monkeypatch.setenv(DSN_VAR, server.database())
        async with fleet(tmp_path, 2) as replicas:
            await seed_history(replicas[0], "a1")
            for replica in replicas:
                replica.lead()
            await leader(replicas)

            await asyncio.to_thread(server.stop)
            await until_async(
                lambda: not any(r.fleet is not None and r.fleet.leading for r in replicas),
                "the lead given up with the connection",
            )
            await asyncio.to_thread(server.start)
            await leader(replicas)
            for replica in replicas:  # each writer's first append after the outage may fail
                await until_async(lambda r=replica: writes(r), "the writer working again")
            await spike(replicas, "a1")
            (alert,) = await settled(replicas)
            assert alert.agent == "a1"


async def test_a_replica_whose_trail_cannot_be_written_gives_up_the_lead(
    tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its alerts would not be recorded: a replica that can write the trail leads instead."""
    async with fleet(tmp_path, 2) as replicas:
        await seed_history(replicas[0], "a1")
        for replica in replicas:
            replica.lead()
        first = await leader(replicas)
        other = replicas[1] if first is replicas[0] else replicas[0]
        assert first.fleet is not None and other.fleet is not None
        monkeypatch.setattr(first.fleet, "_writable", lambda: False)  # as its writer fails
        await until_async(lambda: other.fleet is not None and other.fleet.leading, "the other")
        await spike([other], "a1")
        (alert,) = await settled(replicas)
        assert not first.fleet.leading and first.fleet.takeovers == 1


class LosingTrail:
    """A trail whose writer fails as the first alert is being recorded: the alert is lost."""

    def __init__(self) -> None:
        self.lost: list[str] = []

    @property
    def writable(self) -> bool:
        return not self.lost

    async def alert(self, alert: Any, *, durable: bool = False) -> None:
        self.lost.append(alert.rule)


async def test_an_alert_its_leader_could_not_record_is_raised_by_the_next(
    tmp_path: Path, dsn: str
) -> None:
    async with fleet(tmp_path, 2) as replicas:
        await seed_history(replicas[0], "a1")
        losing = LosingTrail()
        replicas[0].fleet = open_fleet(settings(tmp_path, "replica-0"), losing)
        replicas[0].lead()
        await leader(replicas)  # the first replica, alone so far
        replicas[1].lead()
        await spike(replicas, "a1")
        await until_async(lambda: replicas[1].fleet is not None and replicas[1].fleet.leading)
        (alert,) = await settled(replicas)
        assert losing.lost == ["rate_spike"]
        entries = replicas[0].writer.store.query(Query(phase="alert", limit=10))
        assert [entry.writer_id for entry in entries] == [replicas[1].writer.writer_id]


async def writes(replica: Replica) -> bool:
    """Whether a record (of no agent: no detector counts it) could be committed."""
    probe = AuditRecord(time=time.time(), request_id="probe", phase="decision")
    try:
        await replica.writer.append(probe, durable=True)
    except AuditUnavailable:
        return False
    return True


async def test_an_entry_that_is_not_a_record_does_not_stop_the_leader(
    tmp_path: Path, dsn: str
) -> None:
    async with fleet(tmp_path, 1) as replicas:
        replicas[0].lead()
        lead = await leader(replicas)
        with psycopg.connect(dsn, autocommit=True) as conn:  # written around the writer
            row = conn.execute(
                "INSERT INTO entries (writer_id, seq, record, prev_hash, hash, time, phase) "
                "VALUES ('forged', 1, 'not a record', '', '', 0, 'decision') RETURNING id"
            ).fetchone()
        assert row is not None
        await until_async(lambda: lead.fleet is not None and lead.fleet.position >= row[0])


# --- the gateway runs it with a shared trail only --------------------------------------------


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
async def test_the_gateway_runs_fleet_detection_only_over_a_shared_trail(
    tmp_path: Path, dsn: str, store: str
) -> None:
    config = settings(tmp_path, "gateway", store=store)
    writer = open_trail_writer(config)
    try:
        gateway = Gateway(config, audit=writer)
        shared = store == "postgres"
        assert ("fleet detectors" in gateway.background.names) is shared
        assert (gateway.pipeline.trail.detectors is None) is shared
    finally:
        writer.store.close()


def test_fleet_detection_is_off_without_a_shared_trail_or_alerts(tmp_path: Path) -> None:
    class Sink:
        writable = True

        async def alert(self, alert: Any, *, durable: bool = False) -> None: ...

    assert open_fleet(settings(tmp_path, "s", store="sqlite"), Sink()) is None
    off = parse(f"audit: {{store: postgres, dsn: 'env:{DSN_VAR}', alerts: {{enabled: false}}}}\n")
    assert open_fleet(off, Sink()) is None


async def test_a_page_of_large_records_is_cut_by_size_and_the_leader_still_sees_all(
    tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `audit.record_arguments` a record can be as large as a request body: a page of a
    thousand such records would take each new leader down in turn. A page stops once its
    bytes pass the budget (here: one record per statement), and no record is skipped."""
    from bastion.audit import fleet as fleet_module

    monkeypatch.setattr(fleet_module, "_PAGE_BYTES", 1)
    async with fleet(tmp_path, 2) as replicas:
        await seed_history(replicas[0], "a1")
        lead_candidate = replicas[0].fleet
        assert lead_candidate is not None
        page = await asyncio.to_thread(lead_candidate._link.after, 0, 1000)
        assert len(page) == 1  # cut by size, not by count
        following = await asyncio.to_thread(lead_candidate._link.after, page[0][0], 1000)
        assert len(following) == 1 and following[0][0] > page[0][0]  # the next, not a gap
        warm_locally(replicas)
        for replica in replicas:
            replica.lead()
        await leader(replicas)
        await spike(replicas, "a1")
        assert [a.agent for a in await settled(replicas)] == ["a1"]
