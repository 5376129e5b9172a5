"""Replicas behind a real HAProxy, on a real Redis and PostgreSQL (issue 16): what one replica
knows, every replica knows; a replica's death loses nothing a client saw succeed; a store's
death refuses calls (fail closed) and service resumes when it returns.

One cluster (tests/cluster.py, the launcher of `make cluster`) serves the whole module. Tests
that kill a process start it again before they end, so that the next one finds three
replicas; the store outages run last.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import psycopg
import pytest
from deploy import cluster as launcher
from mcp import Client, types
from mcp.client.streamable_http import streamable_http_client
from tests import cluster as harness
from tests.cluster import (
    EVERYTHING,
    RATE,
    SUSPENDABLE,
    Cluster,
    admin,
    direct,
    restarted,
    token,
    token_form,
)
from tests.conftest import BASTION, legacy_session, modern_body, modern_headers, until
from tests.test_transport import read_events

from bastion.audit.record import digest
from bastion.identity.dpop import make_proof
from bastion.identity.keys import generate

cluster = harness.cluster  # the session's cluster (a fixture)

REPLICAS = ("replica1", "replica2", "replica3")
NAMED = "json_schema_2020_12_tool"  # takes a free `name`: each call's arguments are its own
STEP = 20.0


def call_body(tool: str, arguments: dict[str, Any] | None = None, **params: Any) -> Any:
    """A 2026-07-28 tools/call body."""
    return modern_body("tools/call", {"name": tool, "arguments": arguments or {}, **params})


def confirmable(body: Any) -> Any:
    """`body` from a client that can answer a confirmation (elicitation, form mode)."""
    body["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] = {
        "elicitation": {"form": {}}
    }
    return body


def call_headers(bearer: str, tool: str) -> dict[str, str]:
    """The headers of a 2026-07-28 tools/call with a Bearer token."""
    return {**modern_headers("tools/call", tool), "Authorization": f"Bearer {bearer}"}


def error_code(response: httpx.Response) -> str:
    """The machine-readable code of a refused request (JSON-RPC error data, or OAuth error)."""
    body = response.json()
    if "error" in body and isinstance(body["error"], dict):
        return str((body["error"].get("data") or {}).get("code"))
    return str(body.get("error"))


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=STEP) as client:
        yield client


# --- sessions survive their replica ---------------------------------------------------------


async def test_an_sdk_session_outlives_kill_9_of_each_replica(cluster: Cluster) -> None:
    """The official Python SDK opens a legacy session through the balancer; each replica in
    turn is killed with SIGKILL (so one of them is the one that created the session), and the
    session's next call still works on the others."""
    bearer = token(cluster, "acme-reader")
    headers = {"Authorization": f"Bearer {bearer}"}
    with anyio.fail_after(180):
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(STEP), headers=headers) as http:
            transport = streamable_http_client(cluster.url(EVERYTHING), http_client=http)
            async with Client(transport, mode="legacy", read_timeout_seconds=STEP) as client:
                assert await _simple_text(client)
                for replica in REPLICAS:
                    await anyio.to_thread.run_sync(cluster.kill, replica)
                    assert await _simple_text(client), f"the call after {replica} died failed"
                    assert await _simple_text(client)
                    await anyio.to_thread.run_sync(restarted, cluster, replica)


async def _simple_text(client: Client) -> bool:
    result = await client.call_tool("test_simple_text", {})
    text = " ".join(c.text for c in result.content if isinstance(c, types.TextContent))
    return not result.is_error and "simple text" in text


def test_a_get_stream_resumes_on_another_replica_without_losing_an_event(
    cluster: Cluster, http: httpx.Client
) -> None:
    """A client's GET stream is on replica1. A list change published while the client is
    away is buffered there (the client reads it on replica1 once, then hangs up); replica1
    is killed with SIGKILL and one more change is published (by the other replicas). The
    client resumes from its first event id through the balancer, so on another replica: both
    changes come, in order, with the next ids: the first from the buffer in Redis, the
    second because the session's upstream stream was re-attached."""
    url = cluster.url(EVERYTHING)
    bearer = token(cluster, "acme-reader")
    session = legacy_session(http, url, token=bearer)
    sse = {**session, "Accept": "text/event-stream"}
    trigger = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
               "params": {"name": "test_trigger_tool_change", "arguments": {}}}  # fmt: skip

    def publish(target: str = url) -> None:
        assert http.post(target, json=trigger, headers=session).status_code == 200

    on_replica1 = direct(cluster, "replica1")
    first = read_events(on_replica1, sse, 1, on_open=lambda: publish(on_replica1))
    assert first and first[0][1]["method"] == "notifications/tools/list_changed"
    first_id = first[0][0]
    assert first_id is not None
    publish()  # while the client is away: buffered
    after_first = {**sse, "Last-Event-ID": first_id}
    assert len(read_events(on_replica1, after_first, 1)) == 1  # it was, on replica1
    cluster.kill("replica1")
    try:
        publish()  # while the client is away and its replica is dead
        resumed = read_events(url, after_first, 2)
    finally:
        restarted(cluster, "replica1")
    stream, seq = first_id.rsplit("-", 1)
    ids = [f"{stream}-{int(seq) + 1}", f"{stream}-{int(seq) + 2}"]
    assert resumed, "the event buffered before replica1 died was not replayed elsewhere"
    assert len(resumed) == 2, "the event published after replica1 died never came"
    assert [m["method"] for _, m in resumed] == ["notifications/tools/list_changed"] * 2
    assert [i for i, _ in resumed] == ids


# --- what one replica saw, every replica knows ----------------------------------------------


def test_a_dpop_proof_replayed_to_another_replica_is_refused(
    cluster: Cluster, http: httpx.Client
) -> None:
    holder = generate("ES256")
    bearer = token(cluster, "acme-reader", dpop=holder)
    proof = make_proof(holder, "POST", cluster.url(EVERYTHING), time.time(), access_token=bearer)
    headers = {**modern_headers("tools/call", "test_simple_text"),
               "Authorization": f"DPoP {bearer}", "DPoP": proof}  # fmt: skip
    body = call_body("test_simple_text")
    used = http.post(direct(cluster, "replica1"), json=body, headers=headers)
    assert used.status_code == 200, used.text
    replayed = http.post(direct(cluster, "replica2"), json=body, headers=headers)
    assert replayed.status_code == 401, replayed.text
    assert "already used" in replayed.json()["error"]["message"]
    assert "invalid_token" in replayed.headers["www-authenticate"]


def test_a_client_assertion_replayed_to_another_replica_is_refused(
    cluster: Cluster, http: httpx.Client
) -> None:
    form = token_form(cluster, "acme-reader", EVERYTHING)
    used = http.post(direct(cluster, "replica1", "/oauth/token"), data=form)
    assert used.status_code == 200, used.text
    replayed = http.post(direct(cluster, "replica2", "/oauth/token"), data=form)
    assert replayed.status_code in (400, 401), replayed.text
    assert replayed.json()["error"] == "invalid_client"
    assert "already used" in replayed.json()["error_description"]


def test_an_approval_state_replayed_to_another_replica_is_refused(
    cluster: Cluster, http: httpx.Client
) -> None:
    """A call that needs the client's confirmation (2026-07-28): asked on replica1, confirmed
    on replica2 (it runs), the same confirmation replayed on replica3 is refused."""
    bearer = token(cluster, "globex-reader")
    headers = call_headers(bearer, "test_image_content")
    first = confirmable(call_body("test_image_content"))
    answer = http.post(direct(cluster, "replica1"), json=first, headers=headers).json()
    asked = answer.get("result") or answer
    assert asked.get("resultType") == "input_required", asked
    (key,) = asked["inputRequests"]
    yes = {key: {"action": "accept", "content": {"approve": True}}}
    confirmed = confirmable(
        call_body("test_image_content", requestState=asked["requestState"], inputResponses=yes)
    )
    ran = http.post(direct(cluster, "replica2"), json=confirmed, headers=headers)
    assert ran.status_code == 200 and "result" in ran.json(), ran.text
    assert ran.json()["result"].get("resultType", "complete") == "complete"
    replayed = http.post(direct(cluster, "replica3"), json=confirmed, headers=headers).json()
    assert "already used" in replayed["error"]["message"], replayed


def test_a_rate_limit_holds_across_replicas(cluster: Cluster, http: httpx.Client) -> None:
    """RATE calls a minute for the whole cluster: twice as many, spread over the replicas,
    get exactly RATE answers."""
    bearer = token(cluster, "globex-reader")
    headers = call_headers(bearer, "test_simple_text")
    allowed = 0
    for n in range(2 * RATE):
        url = direct(cluster, REPLICAS[n % len(REPLICAS)])
        response = http.post(url, json=call_body("test_simple_text"), headers=headers)
        body = response.json()
        if response.status_code == 200 and "result" in body:
            allowed += 1
        else:
            assert "rate" in json.dumps(body).lower(), body
    assert allowed == RATE


def test_a_suspension_reaches_every_replica_within_a_second(
    cluster: Cluster, http: httpx.Client
) -> None:
    bearer = token(cluster, SUSPENDABLE)
    headers = call_headers(bearer, "test_simple_text")
    body = call_body("test_simple_text")
    for replica in REPLICAS:
        assert http.post(direct(cluster, replica), json=body, headers=headers).status_code == 200
    suspend = direct(cluster, "replica1", f"/admin/agents/{SUSPENDABLE}/suspend")
    answered = http.post(suspend, json={"reason": "cluster test"}, headers=admin(cluster))
    assert answered.status_code == 200, answered.text
    suspended_at = time.monotonic()
    refused_after: dict[str, float] = {}

    def everyone_refuses() -> bool:
        for replica in REPLICAS:
            if replica in refused_after:
                continue
            status = http.post(direct(cluster, replica), json=body, headers=headers).status_code
            if status in (401, 403):
                refused_after[replica] = time.monotonic() - suspended_at
        return len(refused_after) == len(REPLICAS)

    until(everyone_refuses, "every replica to refuse the suspended agent", seconds=10)
    assert max(refused_after.values()) <= 1.0, refused_after


# --- kill -9 under load ---------------------------------------------------------------------


def test_kill_9_under_load_loses_no_call_a_client_saw_succeed(
    cluster: Cluster, http: httpx.Client
) -> None:
    """4 clients × 200 calls through the balancer; replica2 is killed with SIGKILL while they
    run. Every call a client saw succeed has its decision and outcome records in the
    PostgreSQL trail, and `bastion audit verify` passes over every replica's chain."""
    bearer = token(cluster, "acme-reader")
    headers = call_headers(bearer, NAMED)
    succeeded: list[dict[str, Any]] = []
    failed: list[str] = []
    started = threading.Event()
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(timeout=STEP) as own:
            for i in range(200):
                arguments = {"name": f"load {n}-{i}"}
                try:
                    response = own.post(cluster.url(EVERYTHING), json=call_body(NAMED, arguments),
                                        headers=headers)  # fmt: skip
                    ok = response.status_code == 200 and "result" in response.json()
                    outcome = str(response.status_code)
                except httpx.HTTPError as exc:  # the client saw it fail: allowed, not lost
                    ok, outcome = False, type(exc).__name__
                with lock:
                    (succeeded.append(arguments) if ok else failed.append(outcome))
                    if len(succeeded) >= 100:
                        started.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        assert started.wait(60), "the load did not get going"
        cluster.kill("replica2")
        for thread in threads:
            thread.join(120)
    finally:
        restarted(cluster, "replica2")
    assert len(succeeded) >= 700, f"{len(succeeded)} calls succeeded, failures: {failed[:10]}"
    assert not _unrecorded(cluster, succeeded)
    command = [*BASTION, "audit", "verify", "--config", str(cluster.config)]
    verify = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=cluster.cli_env()
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _unrecorded(cluster: Cluster, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls (by their arguments) whose decision or outcome record is not in the trail,
    once it has had a few seconds to catch up (an outcome is written after its answer)."""
    missing: list[dict[str, Any]] = []

    def recorded() -> bool:
        phases = _phases_by_args(cluster)
        missing[:] = [a for a in calls if {"decision", "outcome"} - phases.get(digest(a), set())]
        return not missing

    try:
        until(recorded, "every succeeded call's records", seconds=15)
    except AssertionError:
        pass
    return missing


def _phases_by_args(cluster: Cluster) -> dict[str, set[str]]:
    """args_digest → the phases the PostgreSQL trail holds for it."""
    query = "SELECT record::json->>'args_digest', phase FROM entries"
    with psycopg.connect(cluster.env["BASTION_AUDIT_DSN"], autocommit=True) as conn:
        rows = conn.execute(query).fetchall()
    found: dict[str, set[str]] = {}
    for args, phase in rows:
        found.setdefault(str(args), set()).add(str(phase))
    return found


# --- a store goes away ----------------------------------------------------------------------


def _roomy_call(cluster: Cluster, http: httpx.Client, bearer: str, name: str) -> httpx.Response:
    """A call whose rate counter lives in Redis, and whose records go to PostgreSQL."""
    body = call_body(NAMED, {"name": name})
    return http.post(cluster.url(EVERYTHING), json=body, headers=call_headers(bearer, NAMED))


@pytest.mark.parametrize(
    ("store", "codes"),
    [
        ("postgres", {"registry.unavailable", "audit.unavailable"}),
        ("redis", {"state.unavailable"}),
    ],
)
def test_a_store_down_refuses_calls_and_service_resumes(
    cluster: Cluster, http: httpx.Client, store: str, codes: set[str]
) -> None:
    bearer = token(cluster, "globex-reader")
    before, after = f"{store} before", f"{store} after"
    assert _roomy_call(cluster, http, bearer, before).status_code == 200
    if store == "redis":
        cluster.kill("redis")  # a crash; persistence is off, so it comes back empty
    else:
        cluster.stop_part("postgres")
    try:
        refused = [_roomy_call(cluster, http, bearer, f"{store} down {n}") for n in range(3)]
    finally:
        cluster.restart(store)
    for response in refused:
        assert response.status_code == 503, response.text
        assert error_code(response) in codes, response.text
        assert "traceback" not in response.text.lower()

    def served() -> bool:
        return _roomy_call(cluster, http, bearer, after).status_code == 200

    until(served, f"service to resume after {store} came back", seconds=30)
    # Nothing lost: the calls answered before the outage and after it are in the trail.
    assert not _unrecorded(cluster, [{"name": before}, {"name": after}])


# --- the launcher stops exactly what it started ---------------------------------------------


def test_down_signals_only_the_processes_it_started(tmp_path: Path) -> None:
    """`make cluster-down` reads state.json: a recorded pid now held by another process (a
    different start time: the pid was reused) is left alone; the recorded one is stopped."""
    ours = subprocess.Popen(["sleep", "60"])
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        started = launcher._start_time(ours.pid)
        recorded = [
            launcher.Process("upstream", "ours", ours.pid, 0, ["sleep", "60"], started, ""),
            # What state.json would say had `stranger` reused the pid of a process now gone.
            launcher.Process("upstream", "gone", stranger.pid, 0, ["sleep", "60"],
                             launcher._start_time(stranger.pid) - 1, ""),
        ]  # fmt: skip
        launcher.Cluster(tmp_path, 0, recorded).save()
        assert launcher.down(tmp_path) == ["ours"]
        assert ours.wait(timeout=30) == -signal.SIGTERM
        assert stranger.poll() is None, "down signalled a process it did not start"
        assert not (tmp_path / "state.json").exists()
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait(timeout=30)
