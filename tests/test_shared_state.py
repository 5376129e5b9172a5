"""Replicas share their security state in Redis: replay caches, rate counters, held calls.

Each adapter's contract against a real Redis, then the attacks across "replicas" (two
gateways or two pipelines in one test, each with its own Redis client, sharing one server):
a DPoP proof, a client assertion or an approval state used on A and replayed to B; a rate
limit split over A and B. Each attack is shown to work with the per-process (memory)
adapters, and to fail with the shared ones. Then Redis dies: refused with 503
`state.unavailable` (fail closed), never a 500, and served again once it is back; and a Redis
that restarted empty refuses what was made before it, so nothing used before is replayable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
import yaml
from tests.conftest import ALLOW_ALL, EXAMPLES, modern_body, modern_headers, until_async
from tests.redis_server import (
    RedisServer,
    redis_server,  # noqa: F401
    start_redis,
)
from tests.test_pipeline import Key, Log, RecordingAudit, RecordingUpstreams

from bastion import config
from bastion.app import Gateway
from bastion.control.assembly import build_gateway, open_identity
from bastion.control.tokens.service import JWT_BEARER
from bastion.errors import Overloaded, StateUnavailable
from bastion.identity.dpop import make_proof
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey, generate
from bastion.pipeline.approval import APPROVAL_KEY
from bastion.pipeline.chain import Pipeline
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.state.approvals import (
    Decided,
    MemoryPendingApprovals,
    PendingApproval,
    Requester,
)
from bastion.state.memory import ReplayCache
from bastion.state.rates import MemoryRateCounter, RateCounter
from bastion.state.redis import RedisState
from bastion.state.shared import RedisRateCounter, RedisReplays, epoch_key
from bastion.state.shared_approvals import POLL_SECONDS, RedisPendingApprovals
from bastion.types import JSON, META_CAPABILITIES, META_VERSION, MODERN_VERSION, Era

BASE = "http://127.0.0.1:8080"
RESOURCE = BASE + "/servers/echo/mcp"
AGENT = {"id": "bot", "tenant": "acme", "owner": "tests", "purpose": "replays"}


@contextlib.asynccontextmanager
async def connected(url: str, prefix: str = "t:") -> AsyncIterator[RedisState]:
    """One replica's own client of the shared Redis."""
    state = RedisState(url, prefix=prefix, timeout=0.5)
    try:
        yield state
    finally:
        await state.close()


# -- the replay cache ----------------------------------------------------------------------------


async def test_an_id_shown_to_two_replicas_at_once_is_accepted_exactly_once(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    url = redis_server.url()
    async with connected(url) as a, connected(url) as b:
        replicas = [RedisReplays(a, "dpop"), RedisReplays(b, "dpop")]
        now = time.time()
        tries = [replicas[n % 2].first_use("jkt:the-jti", now + 60, now) for n in range(20)]
        assert sum(await asyncio.gather(*tries)) == 1
        # Another cache's ids are apart: the same id is new there.
        assert await RedisReplays(a, "assertion").first_use("jkt:the-jti", now + 60, now)
        # Kept the clock-skew leeway and a second past its expiry, not forever.
        [kept] = await a.client.keys("t:replay:dpop:*")
        assert 65_000 <= await a.client.pttl(kept) <= 66_000
    # The attack is real without the shared store: each process accepts it once.
    caches = [ReplayCache(), ReplayCache()]
    assert [await c.first_use("jkt:the-jti", now + 60, now) for c in caches] == [True, True]


async def test_a_restarted_redis_says_since_when_it_remembers() -> None:
    with start_redis() as server:
        async with connected(server.url(0)) as state:
            replays = RedisReplays(state, "dpop")
            made = time.time()
            assert await replays.first_use("used", made + 60, made)
            assert replays.remembers_since() <= made
            server.stop()
            with pytest.raises(StateUnavailable, match="could not check a dpop id"):
                await replays.first_use("used", made + 60, time.time())
            server.start()
            # Redis forgot the id: alone, the cache would take it as new...
            assert await replays.first_use("used", made + 60, time.time())
            # ...but it now remembers only since after the id was made: callers refuse it.
            assert replays.remembers_since() > made


# -- the rate counter ----------------------------------------------------------------------------


async def test_a_limit_counts_exactly_across_replicas(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    url = redis_server.url()
    async with connected(url) as a, connected(url) as b:
        counters = [RedisRateCounter(a), RedisRateCounter(b)]
        hits = [counters[n % 2].hit("rate:p:acme/bot:echo", 60.0, 10) for n in range(40)]
        counted = [ok for ok, _ in await asyncio.gather(*hits)]
        assert sum(counted) == 10
        assert await counters[1].peek("rate:p:acme/bot:echo", 60.0) == 10
        keys = await a.client.keys("t:rate:*")
        assert keys  # each window's counter expires after two windows
        assert all(0 < left <= 120_000 for left in [await a.client.pttl(k) for k in keys])
    # Per process, each replica allows the whole limit: twice over in total.
    memory = [MemoryRateCounter(), MemoryRateCounter()]
    counted = [(await memory[n % 2].hit("k", 60.0, 10))[0] for n in range(40)]
    assert sum(counted) == 20


async def test_the_shared_counter_slides_as_the_memory_one_does(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    # The same hits at the same (fixed) instants, across window edges: the same answers.
    clock = [6000.0]
    timed = [
        mock.patch(f"bastion.state.{module}.time.time", side_effect=lambda: clock[0])
        for module in ("rates", "shared")
    ]
    async with connected(redis_server.url()) as state:
        shared, memory = RedisRateCounter(state), MemoryRateCounter()
        with timed[0], timed[1]:
            for at in (6000.0, 6001, 6005, 6009.5, 6010, 6012, 6016, 6019, 6026, 6041, 6047):
                clock[0] = at
                for _ in range(3):
                    assert await shared.hit("k", 10.0, 4) == await memory.hit("k", 10.0, 4)
                assert await shared.peek("k", 10.0) == await memory.peek("k", 10.0)


# -- pending approvals ---------------------------------------------------------------------------


def _held(approval_id: str | None = None, lifetime: float = 300.0) -> PendingApproval:
    now = time.time()
    return PendingApproval(
        id=approval_id or uuid.uuid4().hex,
        call="c" * 64,
        policy="acme-admin-report",
        server="workspace",
        tool="send_report",
        called_as="workspace__send_report",
        requester=Requester("bot", "acme", "alice", "jti-1"),
        shown={"text": "send a report to boss@example.org", "values": [], "digest": "d"},
        approvers=("approver",),
        created_at=now,
        expires_at=now + lifetime,
        history={"tools": ["search_tasks"], "labels": []},
    )


async def test_a_held_call_is_seen_and_decided_once_through_any_replica(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    url = redis_server.url()
    async with connected(url) as a, connected(url) as b:
        on_a, on_b = RedisPendingApprovals(a), RedisPendingApprovals(b)
        item = _held()
        await on_a.add(item)
        assert await on_b.get(item.id) == item  # every field, the token id included
        assert [i.id for i in await on_b.list()] == [item.id]
        decisions = [
            store.close(item.id, "approved", Decided(who, "console", time.time()))
            for store, who in ((on_a, "ann"), (on_b, "bob")) * 5
        ]
        won = [closed for closed in await asyncio.gather(*decisions) if closed is not None]
        assert len(won) == 1 and won[0].status == "approved"
        assert (await on_a.get(item.id)) == won[0]
        assert await on_b.list() == [] and await on_b.list("approved") == won
        assert won[0].to_dict()["decision"]["by"] in ("ann", "bob")


async def test_a_call_held_on_one_replica_is_released_by_a_decision_on_another(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    url = redis_server.url()
    async with connected(url) as a, connected(url) as b:
        on_a, on_b = RedisPendingApprovals(a), RedisPendingApprovals(b)
        item = _held()
        await on_a.add(item)
        started = time.monotonic()
        waiting = asyncio.create_task(on_a.wait(item.id, 30.0))
        await on_b.close(item.id, "denied", Decided("bob", "admin-api", time.time(), "no"))
        released = await asyncio.wait_for(waiting, 10.0)
        assert released is not None and released.status == "denied"
        assert time.monotonic() - started < 30.0 / 2  # released by the decision, not the time
        # With a store per process, the decision on B never reaches the call held on A.
        memory_a, memory_b = MemoryPendingApprovals(), MemoryPendingApprovals()
        await memory_a.add(item)
        assert await memory_b.close(item.id, "approved", Decided("bob", "c", 0.0)) is None
        assert (await memory_a.wait(item.id, POLL_SECONDS)).status == "pending"  # type: ignore[union-attr]


async def test_the_fleet_holds_at_most_the_bound_and_a_decision_frees_a_slot(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    url = redis_server.url()
    async with connected(url) as a, connected(url) as b:
        on_a, on_b = RedisPendingApprovals(a, max_items=2), RedisPendingApprovals(b, max_items=2)
        first, second = _held(), _held()
        await on_a.add(first)
        await on_b.add(second)
        with pytest.raises(Overloaded, match="holds 2 calls waiting"):
            await on_a.add(_held())
        await on_b.close(first.id, "approved", Decided("ann", "console", time.time()))
        await on_a.add(_held())
        assert len(await on_b.list(None)) == 3


async def test_a_stale_held_call_is_listed_as_expired(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async with connected(redis_server.url()) as state:
        store = RedisPendingApprovals(state, clock=lambda: time.time() + 3600)
        item = _held(lifetime=1.0)
        await store.add(item)
        assert await store.list() == []
        [expired] = await store.list("expired")
        assert expired.id == item.id and expired.decision is not None
        assert expired.decision.reason == "expired with nobody waiting on it"


# -- attacks across replicas: pipelines in process -----------------------------------------------


def _pipeline_settings(tmp: Path) -> config.Settings:
    """The quickstart as acme-admin (`auth: none`): the report needs the client's approval,
    echo is limited to 3 calls a minute."""
    shutil.copytree(EXAMPLES / "policies", tmp / "policies", dirs_exist_ok=True)
    data = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    data["auth"] = {"mode": "none", "tenant": "acme", "agent": "acme-admin"}
    data["state_dir"] = str(tmp / "state")
    data["upstreams"]["workspace"].pop("launch")
    for grant in data["policy"]["grants"]:
        if grant["id"] == "acme-admin-report":
            grant["approval"] = "client"
        if grant["id"] == "acme-echo":
            grant["rate"] = "3/minute"
    return config.parse(yaml.safe_dump(data), base=tmp)


class Replica:
    """One replica's pipeline over recording parts; `shared` None: per-process state."""

    def __init__(
        self,
        settings: config.Settings,
        shared: RedisState | None,
        key: bytes,
        log: Log,
        upstreams: RecordingUpstreams,
    ) -> None:
        self.log = log
        self.upstreams = upstreams
        self.pipeline = Pipeline(
            settings,
            self.upstreams,
            keys=Key(),  # type: ignore[arg-type]
            audit=RecordingAudit(self.log),  # type: ignore[arg-type]
            shared=shared,
            approval_key=key,
        )
        self.route = Route("default", "/mcp", ("workspace", "echo"), multiplex=True)

    async def call(self, tool: str, arguments: JSON, **extra: Any) -> JSON:
        meta = {META_VERSION: MODERN_VERSION, META_CAPABILITIES: {"elicitation": {"form": {}}}}
        params = {"name": tool, "arguments": arguments, **extra, "_meta": meta}
        message = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}
        exchange = Exchange(message, Era.MODERN, MODERN_VERSION, "default", "127.0.0.1:4000")
        exchange.headers = {"mcp-protocol-version": MODERN_VERSION}
        exchange.url = RESOURCE
        answer = await self.pipeline.handle(exchange, self.route)
        assert answer is not None and answer.rest is None
        await self.pipeline.finish(exchange, self.route, answer.first)
        return answer.first

    def sent(self, tool: str) -> int:
        """Calls of `tool` (its upstream's own name) that reached the upstream."""
        return len([e for e in self.log if e[:3] == ("upstream", "tools/call", tool)])


@contextlib.asynccontextmanager
async def replicas(tmp: Path, url: str | None) -> AsyncIterator[tuple[Replica, Replica]]:
    """Replicas A and B: sharing `url`'s Redis, or each with its own memory (None)."""
    settings = _pipeline_settings(tmp)
    key = os.urandom(32)  # the approval-state key the replicas share (assembly: a file)
    async with contextlib.AsyncExitStack() as stack:
        pair = []
        for _ in range(2):
            shared = await stack.enter_async_context(connected(url)) if url else None
            if shared is not None:  # remembering for a minute already, as a gateway's would be
                await shared.client.set(epoch_key(shared), repr(time.time() - 60), nx=True)
            log = Log()
            # Made off the event loop: it lists the demo servers with an `asyncio.run` of its own.
            upstreams = await asyncio.to_thread(RecordingUpstreams, settings, log)
            replica = Replica(settings, shared, key, log, upstreams)
            await replica.pipeline.start()
            pair.append(replica)
        yield pair[0], pair[1]


REPORT = {"to": "boss@example.org", "body": "weekly"}
YES = {APPROVAL_KEY: {"action": "accept", "content": {"approve": True}}}


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_an_approval_used_on_one_replica_is_refused_on_another(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    store: str,
) -> None:
    url = redis_server.url() if store == "redis" else None
    async with replicas(tmp_path, url) as (a, b):
        for replica in (a, b):  # policy: a report only after reading the workspace
            await replica.call("workspace__list_projects", {})
        asked = await a.call("workspace__send_report", REPORT)
        state = asked["result"]["requestState"]
        used = await a.call(
            "workspace__send_report", REPORT, requestState=state, inputResponses=YES
        )
        assert used["result"]["content"][0]["text"] == "done" and a.sent("send_report") == 1
        replayed = await b.call(
            "workspace__send_report", REPORT, requestState=state, inputResponses=YES
        )
    if store == "memory":  # the attack: B never heard of the use on A, and runs it again
        assert replayed["result"]["content"][0]["text"] == "done" and b.sent("send_report") == 1
        return
    assert "the approval was already used" in replayed["error"]["message"]
    assert b.sent("send_report") == 0


async def test_an_approval_used_before_redis_was_flushed_is_refused_after(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    url = redis_server.url()
    async with replicas(tmp_path, url) as (a, b):
        for replica in (a, b):
            await replica.call("workspace__list_projects", {})
        asked = await a.call("workspace__send_report", REPORT)
        retry = {"requestState": asked["result"]["requestState"], "inputResponses": YES}
        assert "result" in await a.call("workspace__send_report", REPORT, **retry)
        redis_server.flush(int(url.rsplit("/", 1)[1]))  # it forgets every used state
        replayed = await b.call("workspace__send_report", REPORT, **retry)
    assert "issued before the gateway's memory of used ones" in replayed["error"]["message"]
    assert b.sent("send_report") == 0


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_rate_limit_is_one_limit_across_replicas(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    store: str,
) -> None:
    url = redis_server.url() if store == "redis" else None
    async with replicas(tmp_path, url) as (a, b):
        replies = [await (a, b)[n % 2].call("echo__echo", {"text": "hi"}) for n in range(8)]
    allowed = [r for r in replies if "result" in r]
    limited = [r for r in replies if "rate limit 3/minute" in r.get("error", {}).get("message", "")]
    assert len(allowed) + len(limited) == 8
    assert len(allowed) == (6 if store == "memory" else 3)  # memory: 3 on each replica
    assert a.sent("echo") + b.sent("echo") == len(allowed)


async def test_a_limited_call_is_refused_while_redis_is_down_and_served_once_back(
    tmp_path: Path,
) -> None:
    with start_redis() as server:
        async with replicas(tmp_path, server.url(0)) as (a, _):
            assert "result" in await a.call("echo__echo", {"text": "hi"})
            server.stop()
            down = await a.call("echo__echo", {"text": "hi"})
            assert down["error"]["code"] == -32603
            assert down["error"]["data"]["code"] == "state.unavailable"
            assert a.sent("echo") == 1  # the refused call went nowhere
            server.start()
            assert "result" in await a.call("echo__echo", {"text": "hi"})
            assert a.sent("echo") == 2


# -- attacks across replicas: gateways, over HTTP in process -------------------------------------


def _gateway_settings(tmp: Path, store: str) -> config.Settings:
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "state_dir": str(tmp / "state"),  # shared, as `make cluster` shares it
        "auth": {"mode": "oauth", "agents": [AGENT]},
        "audit": {"enabled": False},
        "admin": {"enabled": False},
        "policy": ALLOW_ALL,
        # Never reached: these tests stop at authentication (tools/list answers without it).
        "upstreams": {"echo": {"transport": "http", "url": "http://127.0.0.1:9/mcp"}},
    }
    if store == "redis":
        data["state"] = {"store": "redis", "url": "env:BASTION_TEST_SHARED_REDIS"}
    return config.parse(yaml.safe_dump(data))


@contextlib.asynccontextmanager
async def gateways(
    tmp: Path, url: str | None, count: int = 2
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`count` started gateways of one state directory (and one Redis, unless None), each
    behind its own in-process HTTP client."""
    store = "redis" if url else "memory"
    with mock.patch.dict(os.environ, {"BASTION_TEST_SHARED_REDIS": url or ""}):
        settings = _gateway_settings(tmp, store)
        if url:  # a Redis that has been remembering for a minute already
            async with connected(url, "bastion:") as state:
                await state.client.set(epoch_key(state), repr(time.time() - 60))
        built: list[Gateway] = []
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(count):
                gateway = await build_gateway(settings)
                built.append(gateway)
                stack.push_async_callback(gateway.stop)
                await gateway.start()
            clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url=BASE)
                )
                for gw in built
            ]
            yield clients


def _agent_key(tmp: Path, store: str) -> SigningKey:
    return open_identity(_gateway_settings(tmp, store)).agent_key(str(AGENT["id"]))


def _form(key: SigningKey) -> dict[str, str]:
    now = int(time.time())
    claims = {
        "iss": AGENT["id"],
        "sub": AGENT["id"],
        "aud": BASE,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
    }
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": mint(key, claims, typ="JWT"),
        "resource": RESOURCE,
    }


async def _token(client: httpx.AsyncClient, key: SigningKey, holder: SigningKey) -> str:
    proof = make_proof(holder, "POST", BASE + "/oauth/token", time.time())
    answer = await client.post("/oauth/token", data=_form(key), headers={"DPoP": proof})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


async def _list(client: httpx.AsyncClient, token: str, proof: str) -> httpx.Response:
    headers = {**modern_headers("tools/list"), "Authorization": f"DPoP {token}", "DPoP": proof}
    return await client.post(RESOURCE, json=modern_body("tools/list"), headers=headers)


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_dpop_proof_used_on_one_replica_is_refused_on_another(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    store: str,
) -> None:
    url = redis_server.url() if store == "redis" else None
    holder = generate("ES256")
    async with gateways(tmp_path, url) as (a, b):
        token = await _token(a, _agent_key(tmp_path, store), holder)
        proof = make_proof(holder, "POST", RESOURCE, time.time(), access_token=token)
        assert (await _list(a, token, proof)).status_code == 200
        replayed = await _list(b, token, proof)
    if store == "memory":  # the attack: B accepts the proof A already accepted
        assert replayed.status_code == 200
        return
    assert replayed.status_code == 401
    assert "already used" in replayed.headers["www-authenticate"]


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_client_assertion_used_at_one_token_endpoint_is_refused_at_another(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    store: str,
) -> None:
    url = redis_server.url() if store == "redis" else None
    async with gateways(tmp_path, url) as (a, b):
        form = _form(_agent_key(tmp_path, store))
        assert (await a.post("/oauth/token", data=form)).status_code == 200
        replayed = await b.post("/oauth/token", data=form)
    if store == "memory":  # the attack: B issues a second token for the same assertion
        assert replayed.status_code == 200
        return
    assert replayed.status_code == 401
    assert replayed.json()["error"] == "invalid_client"
    assert "this assertion was already used" in replayed.json()["error_description"]


async def test_redis_down_is_refused_with_503_and_served_again_once_back(
    tmp_path: Path,
) -> None:
    holder = generate("ES256")
    with start_redis() as server:
        async with gateways(tmp_path, server.url(0), count=1) as (gateway,):
            key = _agent_key(tmp_path, "redis")
            token = await _token(gateway, key, holder)
            used = make_proof(holder, "POST", RESOURCE, time.time(), access_token=token)
            assert (await _list(gateway, token, used)).status_code == 200
            assertion = _form(key)
            assert (await gateway.post("/oauth/token", data=assertion)).status_code == 200
            server.stop()
            down = await _list(
                gateway,
                token,
                make_proof(holder, "POST", RESOURCE, time.time(), access_token=token),
            )
            assert down.status_code == 503
            error = down.json()["error"]
            assert error["code"] == -32603 and error["data"]["code"] == "state.unavailable"
            refused = await gateway.post("/oauth/token", data=_form(key))
            assert refused.status_code == 503
            assert refused.json()["error"] == "temporarily_unavailable"
            server.start()  # empty: it forgot every id, so what was used before is refused
            replayed = await _list(gateway, token, used)
            assert replayed.status_code == 401
            assert "before this gateway started remembering" in replayed.headers["www-authenticate"]
            again = await gateway.post("/oauth/token", data=assertion)
            assert again.status_code == 401
            assert "before this server started remembering" in again.json()["error_description"]

            async def served() -> bool:
                proof = make_proof(holder, "POST", RESOURCE, time.time(), access_token=token)
                return (await _list(gateway, token, proof)).status_code == 200

            # Served again with proofs made after the restart (whole-second `iat`s made in
            # the second Redis came back are refused: they may predate it).
            await until_async(served, "a fresh proof accepted after Redis returned", 10.0)
            await until_async(
                lambda: _issued(gateway, key), "a token issued after Redis returned", 10.0
            )


async def _issued(client: httpx.AsyncClient, key: SigningKey) -> bool:
    return (await client.post("/oauth/token", data=_form(key))).status_code == 200


async def test_a_gateway_configured_for_an_unreachable_redis_does_not_start(
    tmp_path: Path,
) -> None:
    with start_redis() as server:
        url = server.url(0)
        server.stop()
        with mock.patch.dict(os.environ, {"BASTION_TEST_SHARED_REDIS": url}):
            settings = _gateway_settings(tmp_path, "redis")
            with pytest.raises(StateUnavailable, match="could not answer a ping") as caught:
                await build_gateway(settings)
    assert server.password not in caught.value.message


def test_the_memory_default_builds_no_redis_adapters(tmp_path: Path) -> None:
    settings = _pipeline_settings(tmp_path)
    log = Log()
    replica = Replica(settings, None, os.urandom(32), log, RecordingUpstreams(settings, log))
    pipeline = replica.pipeline
    assert isinstance(pipeline.authz.rates, MemoryRateCounter)
    assert isinstance(pipeline.approval.approvals.store, MemoryPendingApprovals)


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_quick_run_across_a_window_edge_is_not_let_one_call_over_the_limit(
    redis_server: RedisServer,  # noqa: F811
    store: str,
) -> None:
    """Three calls just before a minute's edge and more just after it: the previous window
    still overlaps by 99.9%, so its weighted count must stay 3, not round down to 2."""
    window, edge = 60.0, 1_800_000_000.0
    clock = mock.Mock(return_value=edge - 0.03)
    shared = RedisState(redis_server.url(), timeout=2.0) if store == "redis" else None
    counter: RateCounter = RedisRateCounter(shared) if shared is not None else MemoryRateCounter()
    try:
        with mock.patch("time.time", clock):
            before = [(await counter.hit("acme:agent", window, 3))[0] for _ in range(3)]
            clock.return_value = edge + 0.03
            after = [(await counter.hit("acme:agent", window, 3))[0] for _ in range(3)]
    finally:
        if shared is not None:
            await shared.close()
    assert before == [True, True, True]
    assert after == [False, False, False]
