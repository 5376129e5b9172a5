"""Attacks on the scale-out (issue 16): replicas sharing Redis, each shown to fail.

- A Last-Event-ID whose "digits" are Latin-1 superscripts (`²`, `³`, `¹`: `str.isdigit` says
  yes, `int` says no) must be a 400 naming the header, never a 500, on a shared session and on
  a one-process one alike.
- A DPoP proof (or approval state) used on replica A and replayed to replica B whose clock
  lags A's by a few seconds (within the clock skew the gateway tolerates) must still be
  refused: the shared replay entry has to outlive the proof on every replica's clock.
- A client holding a resumed GET open on a replica that does not feed the stream makes that
  replica poll the shared buffer every 0.25 s; each poll must read only what is new, not the
  whole buffer (256 events by default), or an idle client amplifies into Redis traffic.
- A Redis that may evict keys under memory pressure (`maxmemory` with a policy other than
  `noeviction`) silently forgets used replay ids, rate counters and sessions: replays are
  accepted. A gateway must refuse to start on such a Redis.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.conftest import until_async
from tests.redis_server import RedisServer, redis_server, start_redis  # noqa: F401
from tests.test_shared_sessions import (
    ROUTE,
    Upstream,
    _headers,
    _initialize,
    _settings,
    fleet,
)
from tests.test_shared_state import connected

from bastion.app import Gateway
from bastion.errors import StateUnavailable
from bastion.pipeline.session import session_hash
from bastion.state.memory import SKEW_LEEWAY
from bastion.state.shared import RedisReplays, SharedStateService
from bastion.transport.server import HttpServer

# Latin-1 decodable header values whose parts pass `str.isdigit()` but not `int()`.
HOSTILE_IDS = [b"0-\xb2", b"0-\xb9\xb3", b"\xb2-1", b"\xb9-\xb9"]


@contextlib.asynccontextmanager
async def one_process(tmp: Path) -> AsyncIterator[str]:
    """One gateway without shared state (the embedded default), in front of the test
    upstream of tests/test_shared_sessions.py; its MCP URL."""
    upstream = Upstream()
    up_server = HttpServer(upstream, max_body=1 << 20, keepalive_timeout=60)
    up_port = await up_server.start("127.0.0.1", 0)
    gateway = Gateway(_settings(tmp, up_port, "agent-1", "session_idle_seconds: 3600"))
    await gateway.start()
    server = HttpServer(gateway.front, max_body=1 << 20, keepalive_timeout=60)
    try:
        port = await server.start("127.0.0.1", 0)
        yield f"http://127.0.0.1:{port}{ROUTE}"
    finally:
        await server.stop(grace=0)
        await gateway.stop()
        await up_server.stop(grace=0)


async def _resume(client: httpx.AsyncClient, url: str, session: str, last: bytes) -> None:
    """A GET naming `last` is refused with 400 -32600 naming the header (and only a short
    prefix of it), never a 500."""
    plain = {**_headers(session), "Accept": "text/event-stream"}
    headers = {k.encode(): v.encode() for k, v in plain.items()}
    headers[b"Last-Event-ID"] = last  # raw bytes: the server decodes them as Latin-1
    got = await client.get(url, headers=headers, timeout=5)
    assert got.status_code == 400, (last, got.status_code, got.text)
    error = got.json()["error"]
    assert error["code"] == -32600, error
    assert error["message"].startswith("Last-Event-ID") and "names no stream" in error["message"]


@pytest.mark.parametrize("last", HOSTILE_IDS, ids=repr)
async def test_a_superscript_digit_in_last_event_id_is_a_400_on_every_replica(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    last: bytes,
) -> None:
    """Before the fix: 500 `internal error` (ValueError from int('²')) on A and B."""
    async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
        session = await _initialize(client, f["A"].url)
        for replica in ("A", "B"):  # the holder, and one that re-attaches it
            await _resume(client, f[replica].url, session, last)


@pytest.mark.parametrize("last", HOSTILE_IDS, ids=repr)
async def test_a_superscript_digit_in_last_event_id_is_a_400_in_one_process(
    tmp_path: Path, last: bytes
) -> None:
    """The embedded default parses the header the same way (before the fix: 500 for
    `0-²`, and for `²-1` a 400 only because no such stream exists)."""
    async with one_process(tmp_path) as url, httpx.AsyncClient() as client:
        session = await _initialize(client, url)
        await _resume(client, url, session, last)


async def test_a_proof_replayed_to_a_replica_whose_clock_lags_is_refused(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """A uses a DPoP proof near the end of its acceptance window (`until`); B's clock is
    3 s behind A's, less than the skew the gateway allows anywhere (SKEW_LEEWAY), so by
    B's clock the proof is still acceptable for 3 s more. The shared entry must still be
    there: kept only 1 s past `until` (the code before the fix), it is gone by then and B
    accepts the replay."""
    lag = 3.0
    assert lag < SKEW_LEEWAY
    url = redis_server.url()
    async with connected(url) as a_state, connected(url) as b_state:
        replica_a, replica_b = RedisReplays(a_state, "dpop"), RedisReplays(b_state, "dpop")
        key = f"jkt:{secrets.token_urlsafe(16)}"
        start = time.time()
        until = start + 0.2  # the proof's iat + max_age + leeway, as authn computes it
        assert await replica_a.first_use(key, until, start)
        # Real time moves past what the old 1 s margin kept; B's clock still reads < until.
        await until_async(lambda: time.time() > until + 1.5, "the old entry's expiry")
        b_now = time.time() - lag
        assert b_now <= until  # B's authn would accept the proof by its iat
        assert not await replica_b.first_use(key, until, b_now), "replay accepted on B"


@contextlib.asynccontextmanager
async def evicting_redis(policy: str) -> AsyncIterator[RedisServer]:
    """A private Redis capped at 2 MB, evicting by `policy` (an operator's choice)."""
    with start_redis() as server:
        async with connected(server.url(0)) as state:
            await state.client.config_set("maxmemory", "2mb")
            await state.client.config_set("maxmemory-policy", policy)
        yield server


async def test_a_redis_that_evicts_forgets_used_proofs_and_is_refused_at_start() -> None:
    """The attack: with `volatile-lru` (the default of several managed Redis offerings),
    keys with an expiry, i.e. every replay id, rate counter and session, are evicted once
    memory runs short, which a client drives by storing events; the epoch key (no expiry)
    stays, so nothing tells the replicas and a used proof is accepted again. The gateway
    must not start on such a Redis (before the fix it did)."""
    async with evicting_redis("volatile-lru") as server, connected(server.url(0)) as state:
        replays = RedisReplays(state, "dpop")
        key = f"jkt:{secrets.token_urlsafe(16)}"
        now = time.time()
        assert await replays.first_use(key, now + 60, now)
        filler = b"x" * 4096
        for n in range(2000):  # ~8 MB of expiring data: session events, say
            await state.client.set(f"t:fill:{n}", filler, px=600_000)
        assert await replays.first_use(key, now + 60, now), "the id was not evicted"
        with pytest.raises(StateUnavailable) as refused:
            await SharedStateService(state).start()
        message = refused.value.message
        assert "maxmemory-policy" in message and "volatile-lru" in message, message
        assert server.password not in message


async def test_a_redis_capped_without_eviction_is_accepted(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """`noeviction` (refuses writes when full: StateUnavailable, fail closed) is fine, and
    so is the default uncapped server."""
    async with connected(redis_server.url()) as state:
        await SharedStateService(state).start()
    async with evicting_redis("noeviction") as server, connected(server.url(0)) as state:
        await SharedStateService(state).start()


async def test_an_idle_resumed_stream_does_not_reread_the_whole_buffer_each_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's GET buffer holds 200 events of 4 KB; the client resumes on B naming the
    newest and then sends nothing. B polls the store every 0.25 s: before the fix each poll
    read the whole buffer (800 KB), so five polls pulled 4 MB out of Redis for a client that
    asked for nothing; now each reads only the events after the client's."""
    events, size = 200, 4096
    with start_redis() as server:
        url = server.url(0)
        async with fleet(tmp_path, url) as f, httpx.AsyncClient() as client:
            session = await _initialize(client, f["A"].url)
            records = f["A"].gateway.pipeline.sessions.records
            assert records is not None
            digest = session_hash(session)
            for _ in range(events):
                last = await records.append(digest, "0", b"x" * size, 256)
            reader = f["B"].gateway.pipeline.sessions.records
            assert reader is not None
            polls = 0
            since = reader.since

            async def counted(
                digest: str, stream: str, seq: int
            ) -> tuple[list[tuple[int, bytes]], bool]:
                nonlocal polls
                polls += 1
                return await since(digest, stream, seq)

            monkeypatch.setattr(reader, "since", counted)
            headers = {**_headers(session), "Accept": "text/event-stream"}
            headers["Last-Event-ID"] = f"0-{last}"
            async with connected(url) as probe:
                async with client.stream("GET", f["B"].url, headers=headers, timeout=15) as got:
                    assert got.status_code == 200
                    await until_async(lambda: polls >= 2, "B's first polls")
                    before = (await probe.client.info("stats"))["total_net_output_bytes"]
                    start = polls
                    await until_async(lambda: polls >= start + 5, "five more polls")
                    after = (await probe.client.info("stats"))["total_net_output_bytes"]
            assert after - before < events * size / 4, f"{after - before} bytes for 5 polls"
