"""Session quotas: one principal never pushes another out, and an ended session ends its
upstream sessions.

In process, the store: an agent or tenant over its quota is refused naming the quota; room
comes only from the asker's own idle sessions; a full gateway refuses rather than evict
another tenant. Through a real gateway in front of an upstream that counts its sessions and
(like an upstream behind OAuth) refuses every request without a credential: the attack of the
issue (one tenant filling the store) leaves the other tenant's session working, and ended or
reclaimed sessions end their upstream sessions.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import yaml
from tests.conftest import (
    ACCEPT_BOTH,
    ALLOW_ALL,
    FIXTURES,
    LEGACY,
    GatewayProcess,
    free_port,
    start_gateway,
)
from tests.test_audit_alerts import trail, until

from bastion.config import Limits
from bastion.errors import SessionQuotaExceeded
from bastion.pipeline.session import ClientSession, SessionStore
from bastion.types import Era, Principal
from bastion.upstream.base import Channel

# -- the store, in process ----------------------------------------------------------------------


class RecordingChannel:
    """An upstream channel that remembers how it was closed."""

    era = Era.LEGACY

    def __init__(self) -> None:
        self.inflight: dict[Any, Any] = {}
        self.closed_with: dict[str, str] | None = None

    async def close(self, headers: Mapping[str, str] | None = None) -> None:
        self.closed_with = dict(headers or {})


async def credential(principal: Principal, upstream: str) -> Mapping[str, str]:
    return {"Authorization": f"Bearer {principal.agent}-for-{upstream}"}


def store(**limits: Any) -> SessionStore:
    """A store with these limits; the quotas not given fit under the ones given (the
    settings refuse an agent's quota above its tenant's, or a tenant's above the total)."""
    total = limits.get("max_sessions", 10_000)
    tenant = limits.get("max_sessions_per_tenant", min(1000, total))
    agent = limits.get("max_sessions_per_agent", min(100, tenant))
    settings = {
        "session_reclaim_seconds": 60,
        **limits,
        "max_sessions_per_tenant": tenant,
        "max_sessions_per_agent": agent,
    }
    return SessionStore(Limits.model_validate(settings), credential)


def session(s: SessionStore, tenant: str, agent: str, idle: float = 0.0) -> ClientSession:
    opened = ClientSession(
        id=s.new_id(),
        principal=Principal(tenant=tenant, agent=agent),
        route="default",
        protocol_version=LEGACY,
        hello={},
        keep_events=4,
    )
    opened.channels["up"] = cast(Channel, RecordingChannel())
    opened.last_seen = time.monotonic() - idle
    return opened


def channel(opened: ClientSession) -> RecordingChannel:
    found: object = opened.channels["up"]
    assert isinstance(found, RecordingChannel)
    return found


def held(s: SessionStore) -> set[str]:
    return {x.id for x in s.all()}


async def test_an_agent_over_its_quota_is_refused_naming_the_quota() -> None:
    s = store(max_sessions_per_agent=2)
    for _ in range(2):
        assert await s.open(session(s, "acme", "a1")) is None
    refusal = await s.open(session(s, "acme", "a1"))
    assert isinstance(refusal, SessionQuotaExceeded)
    assert (refusal.quota, refusal.limit, refusal.http_status) == ("agent", 2, 429)
    assert "limits.max_sessions_per_agent" in refusal.message and "'a1'" in refusal.message
    error = refusal.rpc_error()
    assert error["data"] == {
        "code": "session.quota",
        "reason": "agent_quota",
        "quota": "agent",
        "limit": 2,
    }
    assert len(s) == 2
    # Another agent of the same tenant has a quota of its own.
    assert await s.open(session(s, "acme", "a2")) is None


async def test_a_tenant_over_its_quota_is_refused_even_when_another_agents_sessions_idle() -> None:
    s = store(max_sessions_per_tenant=3)
    others = [session(s, "acme", "a1", idle=3600) for _ in range(3)]
    for other in others:
        assert await s.open(other) is None
    refusal = await s.open(session(s, "acme", "a2"))
    assert isinstance(refusal, SessionQuotaExceeded) and refusal.quota == "tenant"
    assert "limits.max_sessions_per_tenant" in refusal.message
    assert held(s) == {o.id for o in others}  # a1's sessions are a1's, however idle
    assert all(channel(o).closed_with is None for o in others)
    assert await s.open(session(s, "globex", "g1")) is None  # another tenant is not affected


async def test_an_own_idle_session_makes_room_and_its_upstream_session_is_ended() -> None:
    s = store(max_sessions_per_agent=2, session_reclaim_seconds=60)
    old, fresh = session(s, "acme", "a1", idle=120), session(s, "acme", "a1", idle=5)
    assert await s.open(old) is None and await s.open(fresh) is None
    new = session(s, "acme", "a1")
    assert await s.open(new) is None
    assert held(s) == {fresh.id, new.id}
    # Ended with a fresh credential for its upstream: an upstream that checks every request
    # would refuse the DELETE without one, and keep the session.
    assert channel(old).closed_with == {"Authorization": "Bearer a1-for-up"}
    assert channel(fresh).closed_with is None


async def test_a_session_with_an_open_stream_is_never_reclaimed() -> None:
    s = store(max_sessions_per_agent=1)
    listening = session(s, "acme", "a1", idle=3600)
    assert await s.open(listening) is None
    listening.streams["0"].attached = True  # a GET stream is being read
    refusal = await s.open(session(s, "acme", "a1"))
    assert isinstance(refusal, SessionQuotaExceeded) and refusal.quota == "agent"
    assert held(s) == {listening.id}


async def test_a_full_gateway_never_ends_another_tenants_session() -> None:
    # The attack of the issue in miniature: globex's session is the least recently used one,
    # which the store used to end for acme's next session.
    s = store(max_sessions=3, max_sessions_per_agent=3, max_sessions_per_tenant=3)
    victim = session(s, "globex", "g1", idle=3000)
    assert await s.open(victim) is None
    for _ in range(2):
        assert await s.open(session(s, "acme", "a1")) is None
    refusal = await s.open(session(s, "acme", "a1"))
    assert isinstance(refusal, SessionQuotaExceeded)
    assert (refusal.quota, refusal.limit) == ("gateway", 3)
    assert "limits.max_sessions" in refusal.message
    assert victim.id in held(s) and channel(victim).closed_with is None


async def test_a_full_gateway_makes_room_from_the_askers_own_idle_session() -> None:
    s = store(max_sessions=3, max_sessions_per_agent=3, max_sessions_per_tenant=3)
    victim = session(s, "globex", "g1", idle=3000)
    mine = session(s, "acme", "a1", idle=600)
    for opened in (victim, mine, session(s, "acme", "a1")):
        assert await s.open(opened) is None
    assert await s.open(session(s, "acme", "a1")) is None
    assert victim.id in held(s) and mine.id not in held(s)
    assert channel(mine).closed_with == {"Authorization": "Bearer a1-for-up"}


async def test_sessions_idle_past_the_limit_expire_for_anyone_when_full() -> None:
    s = store(max_sessions=2, session_idle_seconds=100)
    stale = session(s, "globex", "g1", idle=500)
    assert await s.open(stale) is None
    assert await s.open(session(s, "acme", "a1")) is None
    assert await s.open(session(s, "acme", "a1")) is None
    assert stale.id not in held(s)
    assert channel(stale).closed_with == {"Authorization": "Bearer g1-for-up"}


async def test_concurrent_opens_never_pass_a_quota_together() -> None:
    s = store(max_sessions_per_agent=3)
    outcomes = await asyncio.gather(*(s.open(session(s, "acme", "a1")) for _ in range(20)))
    assert sum(o is None for o in outcomes) == 3 and len(s) == 3


async def test_removed_expired_and_closed_sessions_end_their_upstream_sessions() -> None:
    s = store(session_idle_seconds=100)
    deleted, stale, last = (
        session(s, "acme", "a1"),
        session(s, "acme", "a2", idle=500),
        session(s, "acme", "a3"),
    )
    for opened in (deleted, stale, last):
        assert await s.open(opened) is None
    assert await s.remove(deleted.id) and not await s.remove(deleted.id)
    assert await s.expire() == 1
    await s.close()
    assert [channel(x).closed_with for x in (deleted, stale, last)] == [
        {"Authorization": f"Bearer {agent}-for-up"} for agent in ("a1", "a2", "a3")
    ]
    assert len(s) == 0
    # Counts went back down with the sessions: the quotas are whole again.
    assert await s.open(session(s, "acme", "a1")) is None


# -- through a real gateway -------------------------------------------------------------------


def gateway_config(tmp: Path, port: int, upstream: int, limits: dict[str, Any]) -> str:
    seeds = [
        {"id": agent, "tenant": agent.split("-")[0], "owner": "tests", "purpose": "quota tests"}
        for agent in ("acme-reader", "acme-admin", "globex-reader")
    ]
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_dir": str(tmp / "state"),
        "auth": {"mode": "oauth", "agents": seeds},
        "limits": limits,
        "policy": ALLOW_ALL,
        "upstreams": {
            "counter": {
                "transport": "http",
                "url": f"http://127.0.0.1:{upstream}/mcp",
                "protocol": "legacy",
                # Like an upstream behind OAuth: no request without a credential, DELETE too.
                "launch": [
                    sys.executable,
                    str(FIXTURES / "counting_upstream.py"),
                    "--port",
                    str(upstream),
                    "--require-authorization",
                ],
            }
        },
        "virtual_servers": {"default": {"path": "/mcp", "upstreams": ["counter"]}},
    }
    return str(yaml.safe_dump(config))


class Quota:
    """A gateway in front of the counting upstream, and its agents' bearer tokens."""

    def __init__(self, gw: GatewayProcess, upstream: int) -> None:
        self.gw = gw
        self.upstream = upstream
        self.tokens = {a: gw.token(a) for a in ("acme-reader", "acme-admin", "globex-reader")}

    def live(self) -> int:
        """Sessions the upstream holds open."""
        counts = httpx.get(f"http://127.0.0.1:{self.upstream}/sessions", timeout=5).json()
        return int(counts["live"])

    def initialize(self, agent: str) -> httpx.Response:
        body = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": LEGACY,
                "capabilities": {},
                "clientInfo": {"name": "quota-tests", "version": "0"},
            },
        }
        return httpx.post(self.gw.url(), json=body, headers=self.headers(agent), timeout=20)

    def open(self, agent: str) -> dict[str, str]:
        """A session of `agent`: the headers its requests carry."""
        response = self.initialize(agent)
        assert response.status_code == 200, response.text
        headers = {
            **self.headers(agent),
            "Mcp-Session-Id": response.headers["mcp-session-id"],
            "MCP-Protocol-Version": LEGACY,
        }
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert httpx.post(self.gw.url(), json=note, headers=headers).status_code == 202
        return headers

    def headers(self, agent: str) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Accept": ACCEPT_BOTH,
            "Authorization": f"Bearer {self.tokens[agent]}",
        }

    def works(self, session: dict[str, str]) -> bool:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        response = httpx.post(self.gw.url(), json=body, headers=session, timeout=20)
        return response.status_code == 200 and "result" in response.json()


def start(tmp_path_factory: pytest.TempPathFactory, name: str, limits: dict[str, Any]) -> Quota:
    tmp = tmp_path_factory.mktemp(name)
    port, upstream = free_port(), free_port()
    gw = start_gateway(tmp, gateway_config(tmp, port, upstream, limits), port)
    try:
        return Quota(gw, upstream)
    except BaseException:
        gw.stop()
        raise


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Quota]:
    """A gateway whose store is full at 3 sessions; agent quotas of 2; nothing is reclaimed."""
    limits = {
        "max_sessions": 3,
        "max_sessions_per_agent": 2,
        "max_sessions_per_tenant": 3,
        "session_reclaim_seconds": 3600,
    }
    quota = start(tmp_path_factory, "crowded", limits)
    yield quota
    quota.gw.stop()


@pytest.fixture(scope="module")
def recycling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Quota]:
    """One session per agent; an agent's session idle for 0.5 s makes room for its next."""
    limits = {"max_sessions_per_agent": 1, "session_reclaim_seconds": 0.5}
    quota = start(tmp_path_factory, "recycling", limits)
    yield quota
    quota.gw.stop()


def test_one_tenant_cannot_push_another_out(crowded: Quota) -> None:
    globex = crowded.open("globex-reader")
    assert crowded.works(globex)
    acme = [crowded.open("acme-reader") for _ in range(2)]  # the store is now full

    # Over the agent's own quota: refused, naming it.
    over = crowded.initialize("acme-reader")
    assert over.status_code == 429, over.text
    error = over.json()["error"]
    assert error["data"]["code"] == "session.quota"
    assert (error["data"]["quota"], error["data"]["limit"]) == ("agent", 2)
    assert "limits.max_sessions_per_agent" in error["message"]

    # Another agent of acme, with room in its own quotas, finds the store full. The store used
    # to end its least recently used session for it — globex's; now acme is refused.
    full = crowded.initialize("acme-admin")
    assert full.status_code == 429, full.text
    data = full.json()["error"]["data"]
    assert (data["quota"], data["limit"]) == ("gateway", 3)
    assert crowded.works(globex), "globex's session was ended to make room for acme"
    assert all(crowded.works(s) for s in acme)

    # Both refusals are in the audit trail, as denied decisions that say which quota.
    def refusals() -> list[dict[str, Any]]:
        records = trail(crowded.gw, "--decision", "deny", "--phase", "decision")
        return [r for r in records if r["method"] == "initialize"]

    found = until(lambda: len(refusals()) >= 2 and refusals(), "two recorded refusals")
    assert sorted((r["agent"], r["detail"]["error"]) for r in found) == [
        ("acme-admin", "gateway_quota"),
        ("acme-reader", "agent_quota"),
    ]
    assert all("quota" in r["reason"] or "limit" in r["reason"] for r in found)
    metrics = httpx.get(crowded.gw.url("/metrics"), timeout=5).text
    assert 'outcome="session.quota"' in metrics


def test_deleted_sessions_end_their_upstream_sessions(recycling: Quota) -> None:
    baseline = recycling.live()
    session = recycling.open("globex-reader")
    assert recycling.live() == baseline + 1
    response = httpx.delete(recycling.gw.url(), headers=session, timeout=20)
    assert response.status_code == 200
    # The gateway's DELETE upstream carries a credential: without one this upstream refuses
    # it and keeps the session, so the count would stay up.
    until(lambda: recycling.live() == baseline, "the upstream session to end")


def test_a_reclaimed_session_ends_its_upstream_session(recycling: Quota) -> None:
    baseline = recycling.live()
    first = recycling.open("acme-reader")
    assert recycling.live() == baseline + 1

    # The agent's quota is 1: its next session is refused until the first has idled 0.5 s,
    # then the first is ended to make room.
    def reopened() -> httpx.Response | None:
        response = recycling.initialize("acme-reader")
        if response.status_code == 429:
            assert response.json()["error"]["data"]["quota"] == "agent"
            return None
        return response

    response = until(reopened, "the idle session to be reclaimed")
    assert response.status_code == 200, response.text
    assert not recycling.works(first)  # ended at the gateway ...
    until(lambda: recycling.live() == baseline + 1, "its upstream session to end")  # ... and up
