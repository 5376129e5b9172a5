"""The registry on PostgreSQL (`registry.store: postgres`), against a real server (tests/pg.py).

The registry's contract runs against both adapters in test_registry.py; here is what only a
shared server shows: its errors (never the password), its write lock, a server that stops and
comes back, pins/quarantines and reviews on it, the CLI reading it through `--config`, and two
gateways on one registry seeing each other's suspensions and revocations within one second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import psycopg
import pytest
import yaml
from tests import pg, test_app
from tests.conftest import until_async
from tests.pg import PgServer, start_server
from tests.test_app import Recorder, Running, settings_for
from tests.test_registry import NOW, make_agent
from typer.testing import CliRunner

from bastion import config
from bastion.cli import cli
from bastion.config.shared import RegistrySettings
from bastion.control.assembly import build_gateway
from bastion.control.governance.review import Finding
from bastion.control.governance.reviews import Decision, ReviewStore
from bastion.control.registry.agents import AgentStatus
from bastion.control.registry.locator import RegistryLocator, locate
from bastion.control.registry.pg import PostgresDatabase
from bastion.control.registry.store import PostgresRegistry
from bastion.control.registry.trust import SqlTrustStore, TrustView
from bastion.control.registry.view import RegistryView
from bastion.errors import RegistryConflict, RegistryNotFound, RegistryUnavailable

postgres = pg.postgres  # the session's server (a fixture)
recorder = test_app.recorder  # a recording MCP upstream (a fixture)

DSN_VAR = "BASTION_TEST_REGISTRY_DSN"
ADMIN_VAR = "BASTION_TEST_REGISTRY_ADMIN"
BOUND_S = 1.0  # the bound: a change through one replica is in force on all within it


@pytest.fixture
def dsn(postgres: PgServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database, also named by $BASTION_TEST_REGISTRY_DSN for configs."""
    value = postgres.database()
    monkeypatch.setenv(DSN_VAR, value)
    return value


# --- the adapter's own behaviour ---


def test_errors_name_the_server_never_the_password(postgres: PgServer) -> None:
    wrong = postgres.dsn("postgres").replace(postgres.password, "not-the-Secret-42")
    with pytest.raises(RegistryUnavailable) as raised:
        PostgresRegistry(wrong)
    message = raised.value.message
    assert f"postgresql://{pg.SUPERUSER}@127.0.0.1:{postgres.port}/postgres" in message
    assert "not-the-Secret-42" not in message and raised.value.http_status == 503
    with pytest.raises(RegistryUnavailable, match="not a PostgreSQL DSN") as bad:
        PostgresRegistry("host=db password=hunter22-secret dbname")  # libpq: missing "="
    assert "hunter22" not in bad.value.message


def test_an_empty_database_is_no_registry_without_create(dsn: str) -> None:
    with pytest.raises(RegistryUnavailable, match="no registry in postgresql://"):
        PostgresRegistry(dsn, create=False)
    PostgresRegistry(dsn).close()  # the gateway's first run makes the tables
    with PostgresRegistry(dsn, create=False) as cli:
        assert cli.list() == []


def test_a_newer_schema_is_refused(dsn: str) -> None:
    PostgresRegistry(dsn).close()
    with pg_connect(dsn) as conn:
        conn.execute("UPDATE registry_schema SET version = 99")
    with pytest.raises(RegistryUnavailable, match="schema version 99; this Bastion knows up to 1"):
        PostgresRegistry(dsn)


def test_flush_never_waits_for_another_writer(dsn: str) -> None:
    with PostgresRegistry(dsn) as gateway, pg_connect(dsn) as other:
        gateway.add(make_agent())
        with other.transaction():  # a CLI in the middle of a write holds the write lock
            other.execute("SELECT pg_advisory_xact_lock(%s, %s)", (0x42415352, 0))
            started = time.monotonic()
            gateway.touch("billing-bot", NOW + 3)
            assert gateway.flush_touches() == 0  # busy: kept for the next round
            assert time.monotonic() - started < 5  # did not wait out the 10 s lock timeout
        gateway.touch("billing-bot", NOW + 1)  # older than the kept time
        assert gateway.flush_touches() == 1
        assert gateway.get("billing-bot").last_used_at == NOW + 3


def test_writers_on_several_replicas_are_serialized(dsn: str) -> None:
    # Eight replicas suspend one agent at once: each reads "active" then writes. Without one
    # write lock all of them would pass the check (read committed) and each would report the
    # suspension as its own; with it, exactly one does and the others are told it is done.
    replicas = [PostgresRegistry(dsn) for _ in range(8)]
    replicas[0].add(make_agent())
    start = threading.Barrier(len(replicas))

    def suspend(registry: PostgresRegistry) -> str:
        start.wait(timeout=10)
        try:
            registry.set_status("billing-bot", AgentStatus.SUSPENDED, "incident")
        except RegistryConflict:
            return "conflict"
        return "suspended"

    try:
        with ThreadPoolExecutor(len(replicas)) as pool:
            outcomes = sorted(pool.map(suspend, replicas))
    finally:
        for registry in replicas:
            registry.close()
    assert outcomes == ["conflict"] * 7 + ["suspended"]


def test_a_stopped_server_fails_closed_and_the_view_resumes_when_it_returns() -> None:
    with start_server() as server:
        dsn = server.dsn("postgres")
        with PostgresRegistry(dsn) as cli, PostgresRegistry(dsn) as gateway:
            cli.add(make_agent())
            now = [100.0]
            view = RegistryView(gateway, stale_after=5.0, clock=lambda: now[0])
            server.stop()
            with pytest.raises(RegistryUnavailable) as raised:
                view.refresh()  # the watcher's round while the server is down
            assert f"127.0.0.1:{server.port}" in raised.value.message
            assert server.password not in raised.value.message
            now[0] += 5.5
            with pytest.raises(RegistryUnavailable, match="last read 6 s ago"):
                view.require_current()  # the request path refuses rather than judge stale
            server.start()
            # Both handles reconnect on their next call: the CLI's change is seen.
            cli.set_status("billing-bot", AgentStatus.SUSPENDED, "compromised")
            assert view.refresh() is True
            view.require_current()
            agent = view.agent("billing-bot")
            assert agent is not None and agent.status is AgentStatus.SUSPENDED


# --- pins, quarantines and reviews on the same database ---


def test_pins_and_quarantines_are_shared_by_every_gateway(dsn: str) -> None:
    with SqlTrustStore(PostgresDatabase(dsn)) as ours, SqlTrustStore(PostgresDatabase(dsn)) as cli:
        assert ours.offer("up", "tool", "t", "sha256:a", {"v": 1}, NOW) == ("approved", None)
        assert cli.offer("up", "tool", "t", "sha256:a", {"v": 1}, NOW) == ("known", None)
        state, pin = cli.offer("up", "tool", "t", "sha256:b", {"v": 2}, NOW + 1)
        assert state == "pending" and pin is not None and pin.digest == "sha256:a"
        theirs = TrustView(SqlTrustStore(PostgresDatabase(dsn)))
        assert theirs.check("up", "tool", "t", {"v": 2}) == "changed"  # type: ignore[arg-type]
        approved = cli.approve("up", "tool", "t", "sha256:b", "alice")
        assert approved.state == "approved" and [p.digest for p in ours.pins("approved")] == [
            "sha256:b"
        ]
        assert ours.quarantine("up", "leaked", NOW) is True
        assert cli.quarantine("up", "again", NOW) is False
        assert theirs.refresh() is True and theirs.quarantined("up") == "leaked"
        assert cli.release("up", "bob").released_by == "bob"
        assert theirs.refresh() is True and theirs.quarantined("up") is None
        with pytest.raises(RegistryNotFound):
            cli.release("up", "bob")


def test_reviews_keep_one_open_and_decide_each_finding_once(dsn: str) -> None:
    finding = Finding("f1", "stale_agent", "agent", "billing-bot", "unused 90 days", "suspend")
    with ReviewStore(PostgresDatabase(dsn)) as one, ReviewStore(PostgresDatabase(dsn)) as two:
        review = one.start([finding], {"since": "30d"}, "alice", NOW)
        with pytest.raises(RegistryConflict, match="is open; close it first"):
            two.start([finding], {}, "bob", NOW)
        with pytest.raises(RegistryConflict, match="undecided"):
            two.close_review(review.id, "bob", NOW + 1)
        two.decide(review.id, Decision("f1", "keep", "still needed", "bob", NOW + 1, "none"))
        with pytest.raises(RegistryConflict, match="decided already"):
            one.decide(review.id, Decision("f1", "revoke", None, "alice", NOW + 2, "x"))
        closed = one.close_review(review.id, "alice", NOW + 3)
        assert closed.status == "closed" and two.last_closed_at() == NOW + 3
        assert [d.by for d in two.get(review.id).decisions] == ["bob"]
        with pytest.raises(RegistryNotFound, match="no review is open"):
            two.current()


# --- the CLI through --config ---


def test_the_cli_uses_the_configured_postgres_registry(dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "bastion.yaml"
    document = {
        "state_dir": str(tmp_path / "state"),
        "registry": {"store": "postgres", "dsn": f"env:{DSN_VAR}"},
    }
    path.write_text(yaml.safe_dump(document))
    assert locate(config.load(path)) == RegistryLocator(dsn=dsn)
    with PostgresRegistry(dsn) as gateway:
        gateway.add(make_agent())
        listed = CliRunner().invoke(cli, ["agents", "list", "--config", str(path), "--json"])
        assert listed.exit_code == 0, listed.output
        assert [a["id"] for a in yaml.safe_load(listed.output)] == ["billing-bot"]
        args = ["agents", "suspend", "billing-bot", "--reason", "incident 9", "--config", str(path)]
        suspended = CliRunner().invoke(cli, args)
        assert suspended.exit_code == 0, suspended.output
        assert gateway.get("billing-bot").status is AgentStatus.SUSPENDED
    with SqlTrustStore(PostgresDatabase(dsn)) as store:
        store.quarantine("leaky", "answered with another tenant's data", NOW)
        listed = CliRunner().invoke(cli, ["quarantine", "list", "--config", str(path)])
        assert listed.exit_code == 0 and "leaky" in listed.output, listed.output
        args = ["quarantine", "release", "leaky", "--by", "alice", "--config", str(path)]
        released = CliRunner().invoke(cli, args)
        assert released.exit_code == 0, released.output
        assert store.quarantines() == []
    assert not (tmp_path / "state" / "registry.db").exists()  # no SQLite file on the side


# --- two gateways on one registry ---


@pytest.fixture
async def replicas(
    tmp_path: Path,
    recorder: Recorder,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Running, ...]]:
    """Two gateways on one PostgreSQL registry (the session's server)."""
    async with gateways(tmp_path, recorder.url, monkeypatch, 2) as started:
        yield started


@contextlib.asynccontextmanager
async def gateways(
    tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch, count: int
) -> AsyncIterator[tuple[Running, ...]]:
    """`count` gateways with state directories of their own (machines of their own: the same
    signing keys deployed to each) on the registry $BASTION_TEST_REGISTRY_DSN names, each
    with its admin API; requests go in process, one base URL for all, as behind a balancer."""
    monkeypatch.setenv(ADMIN_VAR, "an-admin-token-for-the-replicas-" + "x" * 16)
    started: list[Running] = []
    try:
        for index in range(count):
            root = tmp_path / f"replica-{index}"
            root.mkdir()
            base = settings_for(root, upstream, 8000)  # no listener is opened on the port
            admin = base.admin.model_copy(update={"enabled": True, "token": f"env:{ADMIN_VAR}"})
            registry = RegistrySettings(store="postgres", dsn=f"env:{DSN_VAR}")
            settings = base.model_copy(update={"registry": registry, "admin": admin})
            if started:
                shutil.copytree(started[0].state / "keys", root / "state" / "keys")
            gateway = await build_gateway(settings)
            await gateway.start()
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=gateway), base_url=settings.base_url()
            )
            started.append(Running(gateway, settings, client))
        yield tuple(started)
    finally:
        for running in started:
            await running.http.aclose()
            await running.gateway.stop()


async def refused_within(replica: Running, token: str, reason: str) -> float:
    """Seconds until `replica` refuses `token` for `reason` (polled; fails after 10 s)."""
    started = time.monotonic()

    async def refused() -> bool:
        status, reply = await replica.call(token)
        assert status in (200, 401), reply  # served until the change reaches it, then refused
        return status == 401 and reply["error"]["data"].get("reason") == reason

    await until_async(refused, f"the replica to refuse the token ({reason})", seconds=10)
    return time.monotonic() - started


async def test_a_suspension_through_one_gateway_is_refused_by_the_other_within_a_second(
    replicas: tuple[Running, ...],
) -> None:
    a, b = replicas
    token = b.token("acme-reader", "acme")
    for replica in (a, b):
        status, reply = await replica.call(token)
        assert status == 200 and reply["result"]["content"][0]["text"] == "noted"
    headers = {"Authorization": f"Bearer {os.environ[ADMIN_VAR]}"}
    response = await a.http.post(
        "/admin/agents/acme-reader/suspend", json={"reason": "incident 12"}, headers=headers
    )
    assert response.status_code == 200, response.text
    elapsed = await refused_within(b, token, "suspended")
    assert elapsed < BOUND_S, f"the other gateway refused only after {elapsed:.2f} s"
    status, _ = await a.call(token)
    assert status == 401  # in force at once on the gateway that made the change


async def test_a_token_revoked_through_one_gateway_is_refused_by_the_other(
    replicas: tuple[Running, ...],
) -> None:
    a, b = replicas
    token = b.token("acme-reader", "acme")
    status, _ = await b.call(token)
    assert status == 200
    jti = pyjwt.decode(token, options={"verify_signature": False})["jti"]
    view: Any = a.gateway.pipeline.agents
    await asyncio.to_thread(view._registry.revoke_token, jti, time.time() + 600, "leaked")
    await view.reread()
    elapsed = await refused_within(b, token, "revoked")
    assert elapsed < BOUND_S, f"the other gateway refused only after {elapsed:.2f} s"
    other = b.token("acme-reader", "acme")  # another token of the same agent still works
    status, _ = await b.call(other)
    assert status == 200


def pg_connect(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit connection of the test's own (another process, as it were)."""
    return psycopg.connect(dsn, autocommit=True, connect_timeout=5)


async def test_requests_are_refused_while_postgres_is_down_and_served_when_it_returns(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    with start_server() as server:
        monkeypatch.setenv(DSN_VAR, server.dsn("postgres"))
        async with gateways(tmp_path, recorder.url, monkeypatch, 1) as (gateway,):
            token = gateway.token("acme-reader", "acme")
            assert (await gateway.call(token))[0] == 200
            server.stop()

            async def refused() -> Any:
                status, reply = await gateway.call(token)
                assert status in (200, 503), reply  # served from a fresh view, then refused
                return reply if status == 503 else None

            reply = await until_async(refused, "the stale registry view to refuse")
            assert reply["error"]["data"]["code"] == "registry.unavailable"
            assert server.password not in str(reply)
            server.start()

            async def served() -> bool:
                return (await gateway.call(token))[0] == 200

            await until_async(served, "the gateway to serve again once PostgreSQL is back")
