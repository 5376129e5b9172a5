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
- An upstream sending server→client requests the client never answers must not grow the
  session's Redis hash without bound (one process drops the oldest past a cap; so must Redis).
- A Last-Event-ID naming a stream the session never had must be a 400, as in one process, not
  a stream that ends at once; one with a number too long to be one a 400 on both paths (one
  process gave a 500 past 4300 digits, and held the GET open for ever past every event).
- An upstream that forgets its sessions (a restart) must not split one client session over
  two upstream sessions, one per replica (each with its own state and server stream), whether
  the replicas reopen one after the other or at the same moment; nor may two replicas opening
  an upstream for the first time at the same moment. The loser of the compare-and-set on the
  record uses the winner's upstream session and ends its own.
- A client's GET stream on one replica relays what an upstream sends in an upstream session
  another replica opened or reopened, without any call through the replica serving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from tests.conftest import until_async
from tests.redis_server import RedisServer, redis_server, start_redis  # noqa: F401
from tests.test_shared_sessions import (
    ROUTE,
    Fleet,
    Upstream,
    _call,
    _events,
    _headers,
    _initialize,
    _note,
    _settings,
    _upstream_session,
    fleet,
)
from tests.test_shared_state import connected

from bastion.app import Gateway
from bastion.errors import StateUnavailable
from bastion.pipeline import client_session
from bastion.pipeline.session import session_hash
from bastion.state import sessions
from bastion.state.memory import SKEW_LEEWAY
from bastion.state.shared import RedisReplays, SharedStateService
from bastion.transport.server import HttpServer

# Last-Event-ID values that are no event id: Latin-1 decodable parts that pass
# `str.isdigit()` but not `int()`, and event numbers too long to be one (past 4300 digits
# `int` refuses them; 19 digits is beyond every event, so a GET would wait for ever).
HOSTILE_IDS = [b"0-\xb2", b"0-\xb9\xb3", b"\xb2-1", b"\xb9-\xb9"]
HOSTILE_IDS += [b"0-" + b"9" * 5000, b"0-" + b"1" * 19]


def _shown_id(last: bytes) -> str:
    return repr(last) if len(last) < 20 else f"{len(last) - 2} digits"


@contextlib.asynccontextmanager
async def _one_process_with_upstream(tmp: Path) -> AsyncIterator[tuple[str, Upstream]]:
    """One gateway without shared state (the embedded default), in front of the test
    upstream of tests/test_shared_sessions.py: its MCP URL and the upstream (to push on
    its GET stream)."""
    upstream = Upstream()
    up_server = HttpServer(upstream, max_body=1 << 20, keepalive_timeout=60)
    up_port = await up_server.start("127.0.0.1", 0)
    gateway = Gateway(_settings(tmp, up_port, "agent-1", "session_idle_seconds: 3600"))
    await gateway.start()
    server = HttpServer(gateway.front, max_body=1 << 20, keepalive_timeout=60)
    try:
        port = await server.start("127.0.0.1", 0)
        yield f"http://127.0.0.1:{port}{ROUTE}", upstream
    finally:
        await server.stop(grace=0)
        await gateway.stop()
        await up_server.stop(grace=0)


@contextlib.asynccontextmanager
async def one_process(tmp: Path) -> AsyncIterator[str]:
    """One gateway without shared state (the embedded default), in front of the test
    upstream of tests/test_shared_sessions.py; its MCP URL."""
    async with _one_process_with_upstream(tmp) as (url, _):
        yield url


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


@pytest.mark.parametrize("last", HOSTILE_IDS, ids=_shown_id)
async def test_a_hostile_last_event_id_is_a_400_on_every_replica(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    last: bytes,
) -> None:
    """Before the fix: 500 `internal error` (ValueError from int('²')) on A and B."""
    async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
        session = await _initialize(client, f["A"].url)
        for replica in ("A", "B"):  # the holder, and one that re-attaches it
            async with asyncio.timeout(10):
                await _resume(client, f[replica].url, session, last)


@pytest.mark.parametrize("last", HOSTILE_IDS, ids=_shown_id)
async def test_a_hostile_last_event_id_is_a_400_in_one_process(tmp_path: Path, last: bytes) -> None:
    """The embedded default parses the header the same way. Before the fix: 500 for `0-²`
    (for `²-1` a 400 only because no such stream exists); past 4300 digits a 500 and a
    traceback in the log; a number beyond every event held the GET open for ever. A replica
    sharing its sessions already refused more than 18 digits; now both do."""
    async with one_process(tmp_path) as url, httpx.AsyncClient() as client:
        session = await _initialize(client, url)
        async with asyncio.timeout(10):  # keepalives would hold the GET open for ever
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


# -- a hostile upstream asking the client endlessly -----------------------------------------


def _question(n: int) -> dict[str, Any]:
    """A server→client request (sampling) as an upstream sends it on its GET stream."""
    params = {"messages": [], "maxTokens": 1}
    return {"jsonrpc": "2.0", "id": f"q-{n}", "method": "sampling/createMessage", "params": params}


async def _flood(
    client: httpx.AsyncClient, url: str, upstream: Upstream, session: str, count: int
) -> list[str]:
    """The upstream sends `count` server requests on its GET stream while the client reads
    the session's GET stream at `url`; the gateway ids the client got them under."""
    upstream_sid = upstream.client_sessions()[0]
    headers = {**_headers(session), "Accept": "text/event-stream"}
    async with client.stream("GET", url, headers=headers, timeout=15) as got:
        assert got.status_code == 200
        await until_async(lambda: upstream_sid in upstream.listening, "the gateway listening")
        for n in range(count):
            upstream.push(upstream_sid, _question(n))
        seen = await _events(got.aiter_lines(), count)
    assert [m["params"] for _, m in seen] == [_question(0)["params"]] * count
    return [str(m["id"]) for _, m in seen]


async def _answer(client: httpx.AsyncClient, url: str, session: str, gateway_id: str) -> int:
    """The client answers a server request; the HTTP status (202: delivered upstream)."""
    reply = {"jsonrpc": "2.0", "id": gateway_id, "result": {"role": "assistant"}}
    sent = await client.post(url, json=reply, headers=_headers(session))
    if sent.status_code != 202:
        error = sent.json()["error"]
        assert "no server request" in error["message"] and "is pending" in error["message"]
    return sent.status_code


async def test_an_upstream_flooding_server_requests_cannot_grow_the_shared_session(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack: an upstream sends server→client requests the client never answers, one
    after another. Each is mapped in the session's Redis hash so another replica can route
    the answer; before the fix nothing capped them there (one process drops the oldest past
    MAX_PENDING_SERVER_REQUESTS), so the hash grew by one field per request until Redis was
    full and every replica answered 503. Now the Redis write drops the oldest past the same
    constant: the hash stays bounded, the newest request is still answerable on another
    replica, and the dropped oldest is refused as nothing pending, as in one process. (The
    cap is lowered here so the flood stays small; it is the one constant both paths read.)"""
    cap = 8
    monkeypatch.setattr(client_session, "MAX_PENDING_SERVER_REQUESTS", cap)
    flood = 6 * cap
    async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
        session = await _initialize(client, f["A"].url)
        ids = await _flood(client, f["A"].url, f.upstream, session, flood)
        records = f["A"].gateway.pipeline.sessions.records
        assert records is not None
        fields = await records.load(session_hash(session))
        assert fields is not None
        mapped = sorted(k for k in fields if k.startswith("request:"))
        assert mapped == sorted(f"request:{gid}" for gid in ids[-cap:]), mapped
        # The record, its upstream, the GET stream's counters and the mapping's bookkeeping:
        # a handful of fields besides two per pending request, however long the flood.
        assert len(fields) <= 2 * cap + 12, sorted(fields)
        assert await _answer(client, f["B"].url, session, ids[-1]) == 202
        assert await _answer(client, f["B"].url, session, ids[0]) != 202
        await until_async(lambda: len(f.upstream.answers) == 1, "the answer upstream")
        assert [m["id"] for _, m in f.upstream.answers] == [f"q-{flood - 1}"]
        fields = await records.load(session_hash(session))
        assert fields is not None and f"request:{ids[-1]}" not in fields
        assert fields["pending:held"] == str(cap - 1).encode()


async def test_one_process_drops_the_oldest_server_request_past_the_same_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded default under the same flood: the same constant bounds the session's
    pending server requests, the newest is answerable and the oldest dropped."""
    cap = 8
    monkeypatch.setattr(client_session, "MAX_PENDING_SERVER_REQUESTS", cap)
    async with _one_process_with_upstream(tmp_path) as (url, upstream):
        async with httpx.AsyncClient() as client:
            session = await _initialize(client, url)
            ids = await _flood(client, url, upstream, session, 6 * cap)
            assert await _answer(client, url, session, ids[-1]) == 202
            assert await _answer(client, url, session, ids[0]) != 202
            assert await _answer(client, url, session, ids[-cap]) == 202


# -- Last-Event-ID naming a stream the session never had -----------------------------------

UNKNOWN_STREAMS = [b"7-1", b"7-0", b"123456789012345678901234567890-1"]


async def _still_open(client: httpx.AsyncClient, url: str, session: str, last: str) -> None:
    """A GET resuming `last` is a stream that stays open: its keepalive (every second here)
    arrives before any end."""
    headers = {**_headers(session), "Accept": "text/event-stream", "Last-Event-ID": last}
    async with client.stream("GET", url, headers=headers, timeout=15) as got:
        assert got.status_code == 200, await got.aread()
        async with asyncio.timeout(10):
            async for line in got.aiter_lines():
                if line.startswith(":"):  # a comment: the keepalive
                    return
    raise AssertionError(f"the stream resumed at {last} ended at once")


@pytest.mark.parametrize("last", UNKNOWN_STREAMS, ids=repr)
async def test_a_stream_the_session_never_had_is_a_400_on_every_replica(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    last: bytes,
) -> None:
    """Well-formed digits naming a stream id the session never opened. One process answers
    400 naming Last-Event-ID; before the fix a replica sharing its sessions read the unknown
    stream as closed and empty and answered 200 with a stream that ended at once, so a
    client could not tell a wrong id from a finished stream. The standalone stream ("0")
    still resumes and stays open."""
    async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
        session = await _initialize(client, f["A"].url)
        for replica in ("A", "B"):  # the holder, and one that re-attaches it
            await _resume(client, f[replica].url, session, last)
        await _still_open(client, f["B"].url, session, "0-0")


@pytest.mark.parametrize("last", UNKNOWN_STREAMS, ids=repr)
async def test_a_stream_the_session_never_had_is_a_400_in_one_process(
    tmp_path: Path, last: bytes
) -> None:
    async with one_process(tmp_path) as url, httpx.AsyncClient() as client:
        session = await _initialize(client, url)
        await _resume(client, url, session, last)
        await _still_open(client, url, session, "0-0")


# -- one upstream session per client session, whichever replicas open it -------------------


async def _recorded(f: Fleet, session: str, upstream: str) -> str:
    """The upstream session the shared record names for `upstream`."""
    records = f["A"].gateway.pipeline.sessions.records
    assert records is not None
    found = await records.fields(session_hash(session), [f"up:{upstream}"])
    return str(orjson.loads(found[f"up:{upstream}"])["session"])


@pytest.mark.parametrize("at_once", [False, True], ids=["one-after-the-other", "at-once"])
async def test_replicas_reopening_a_forgotten_upstream_session_agree_on_one(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    at_once: bool,
) -> None:
    """A and B both use upstream session X1; the upstream restarts (forgets X1) and a call
    lands on each, one after the other or at the same moment (the upstream answers neither
    initialize before both arrived). Before the fix each replica reopened and recorded its own
    (last writer wins): two upstream sessions for one client session, each replica calling
    its own. Now the second to record loses the compare-and-set, ends its own (no request
    went into it) and uses the winner's."""
    async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
        session = await _initialize(client, f["A"].url)
        first = _upstream_session(await _call(client, f["A"].url, session))
        assert _upstream_session(await _call(client, f["B"].url, session)) == first
        f.upstream.forget()
        if at_once:
            f.upstream.hold(2)
            answers = await asyncio.gather(
                _call(client, f["A"].url, session), _call(client, f["B"].url, session)
            )
            assert f.upstream.arrived == 2  # both replicas did reopen at the same moment
        else:
            answers = [await _call(client, f[r].url, session) for r in ("A", "B")]
        reached = {_upstream_session(answer) for answer in answers}
        assert len(reached) == 1, f"each replica reopened its own upstream session: {reached}"
        [now] = reached
        assert f.upstream.client_sessions() == [now]
        assert len(f.upstream.deleted) == 1 and f.upstream.deleted[0] != now  # the loser's
        assert await _recorded(f, session, "up") == now
        for replica in ("A", "B", "A"):
            assert _upstream_session(await _call(client, f[replica].url, session)) == now
        assert {sid for sid, _ in f.upstream.calls[2:]} == {now}


async def test_replicas_opening_an_upstream_at_the_same_moment_open_one_session(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """`x` is down when the session opens on A (on the virtual server of `up` and `x`); B
    re-attaches the session. Once `x` is back, calls to it land on A and B at the same moment:
    neither finds an upstream session recorded, both open one (the upstream answers neither
    initialize before both arrived). Before the fix both were recorded, last writer wins, and
    each replica went on calling its own. Now one is recorded and used by both; the other is
    ended."""
    async with (
        fleet(tmp_path, redis_server.url(), others=("x",)) as f,
        httpx.AsyncClient() as client,
    ):
        x = f.others["x"]
        x.refusing = True
        session = await _initialize(client, f.both("A"))
        _upstream_session(await _call(client, f.both("B"), session, "up__whoami"))
        assert x.client_sessions() == []
        x.refusing = False
        x.hold(2)
        answers = await asyncio.gather(
            *(_call(client, f.both(r), session, "x__whoami") for r in ("A", "B"))
        )
        assert x.arrived == 2  # both replicas did open one at the same moment
        reached = {_upstream_session(answer) for answer in answers}
        assert len(reached) == 1, f"two upstream sessions for one client session: {reached}"
        [winner] = reached
        assert x.client_sessions() == [winner]
        assert len(x.deleted) == 1 and x.deleted[0] != winner
        assert await _recorded(f, session, "x") == winner
        assert [sid for sid, _ in x.calls] == [winner, winner]


async def test_a_get_stream_relays_an_upstream_session_another_replica_reopened(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The client's GET stream is on B, relaying upstream session X1; the upstream restarts
    and only A is called, reopening X2. Before the fix B went on with X1 (gone) and nothing
    X2 sent reached the client. Now B, serving the stream, follows the record to X2 and
    relays it."""
    async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
        session = await _initialize(client, f["A"].url)
        [first] = f.upstream.client_sessions()
        headers = {**_headers(session), "Accept": "text/event-stream"}
        async with client.stream("GET", f["B"].url, headers=headers, timeout=15) as got:
            assert got.status_code == 200
            await until_async(lambda: first in f.upstream.listening, "B listening to X1")
            f.upstream.forget()
            await until_async(lambda: first not in f.upstream.listening, "X1's stream ended")
            now = _upstream_session(await _call(client, f["A"].url, session))
            await until_async(lambda: now in f.upstream.listening, "B listening to X2")
            f.upstream.push(now, _note(7))
            [(_, note)] = await _events(got.aiter_lines(), 1)
        assert note["params"]["data"] == 7
        assert f.upstream.client_sessions() == [now]


async def test_a_get_stream_relays_an_upstream_only_another_replica_calls(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """`x` is down when the session opens on A; the client's GET stream is on B (which
    re-attaches the session without `x`). `x` comes back and is called only through A.
    Before the fix B relayed `x`'s stream only once B itself called `x`: what `x` sent on
    its own stream never reached the client. Now B joins what A recorded and relays it."""
    async with (
        fleet(tmp_path, redis_server.url(), others=("x",)) as f,
        httpx.AsyncClient() as client,
    ):
        x = f.others["x"]
        x.refusing = True
        session = await _initialize(client, f.both("A"))
        headers = {**_headers(session), "Accept": "text/event-stream"}
        async with client.stream("GET", f.both("B"), headers=headers, timeout=15) as got:
            assert got.status_code == 200
            x.refusing = False
            opened = _upstream_session(await _call(client, f.both("A"), session, "x__whoami"))
            await until_async(lambda: opened in x.listening, "B listening to x")
            x.push(opened, _note(8))
            [(_, note)] = await _events(got.aiter_lines(), 1)
        assert note["params"]["data"] == 8
        assert x.client_sessions() == [opened]


async def test_in_one_process_a_reopened_upstream_session_is_relayed_on_the_get_stream(
    tmp_path: Path,
) -> None:
    """One process, no Redis: the upstream restarts; the next call reopens (one upstream
    session, as before). Before the fix the GET stream relayed only the first upstream
    session (its relay ended with it and was never started again)."""
    async with fleet(tmp_path, None, {"A": "agent-1"}) as f, httpx.AsyncClient() as client:
        session = await _initialize(client, f["A"].url)
        [first] = f.upstream.client_sessions()
        headers = {**_headers(session), "Accept": "text/event-stream"}
        async with client.stream("GET", f["A"].url, headers=headers, timeout=15) as got:
            assert got.status_code == 200
            await until_async(lambda: first in f.upstream.listening, "A listening to X1")
            f.upstream.forget()
            answers = [await _call(client, f["A"].url, session) for _ in range(2)]
            [now] = {_upstream_session(answer) for answer in answers}
            assert f.upstream.client_sessions() == [now] and f.upstream.deleted == []
            await until_async(lambda: now in f.upstream.listening, "A listening to X2")
            f.upstream.push(now, _note(9))
            [(_, note)] = await _events(got.aiter_lines(), 1)
        assert note["params"]["data"] == 9


async def test_in_one_process_calls_finding_their_upstream_session_forgotten_reopen_it_once(
    tmp_path: Path,
) -> None:
    """One process: two calls in a session the upstream forgot get their 404 at the same
    moment (the upstream answers neither before both arrived). Before the fix each reopened
    in turn: two upstream sessions, the first left open upstream and never ended. Now the
    second finds it reopened already and uses that one."""
    async with fleet(tmp_path, None, {"A": "agent-1"}) as f, httpx.AsyncClient() as client:
        session = await _initialize(client, f["A"].url)
        _upstream_session(await _call(client, f["A"].url, session))
        f.upstream.forget()
        f.upstream.hold(2, "forgotten")
        answers = await asyncio.gather(*(_call(client, f["A"].url, session) for _ in range(2)))
        assert f.upstream.arrived == 2  # both found it forgotten
        reached = {_upstream_session(answer) for answer in answers}
        assert len(reached) == 1, reached
        assert f.upstream.client_sessions() == list(reached)


async def test_a_session_ended_while_its_upstream_session_reopens_leaves_none_open(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """A call on A finds its upstream session forgotten and reopens it; while the upstream
    holds the new session's initialize, the client's DELETE lands on B. Recording the new
    upstream session must fail (the session is gone): A ends that upstream session and
    answers 'session not found' with 404 (it was a 200 carrying the error). Before the fix
    the write was skipped silently and the call served in an upstream session no replica
    would ever end (B ended the one it knew)."""
    async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
        session = await _initialize(client, f["A"].url)
        _upstream_session(await _call(client, f["B"].url, session))
        f.upstream.forget()
        f.upstream.hold(2)  # only A's arrives: let go of by hand once the DELETE is done
        call = asyncio.create_task(_call(client, f["A"].url, session))
        await until_async(lambda: f.upstream.arrived == 1, "A reopening")
        deleted = await client.delete(f["B"].url, headers=_headers(session))
        assert deleted.status_code == 200
        f.upstream.all_in.set()
        answered = await call
        refused = answered.json()
        assert "error" in refused, f"served after the session ended: {refused}"
        assert answered.status_code == 404, "the session ended: 404, as for the next request"
        assert refused["error"]["data"]["code"] == "protocol.session", refused
        assert refused["error"]["message"].startswith("session not found")
        assert f.upstream.client_sessions() == []  # the one A opened was ended


# -- review of 825ff72: what an ended session leaves behind --------------------------------


async def test_a_delete_on_one_replica_ends_the_upstream_session_only_another_opened(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """`x` is down when the session opens on A; B re-attaches the session and opens (and
    records) an upstream session of `x`; the client's DELETE lands on A. Before the fix A
    ended only the upstream sessions it held (none of `x`), and B, told of the DELETE by the
    client's next request, only let go of its copy: the upstream session of `x` stayed open
    and no replica would ever end it. Now the replica ending a session ends every upstream
    session its record names."""
    async with (
        fleet(tmp_path, redis_server.url(), others=("x",)) as f,
        httpx.AsyncClient() as client,
    ):
        x = f.others["x"]
        x.refusing = True
        session = await _initialize(client, f.both("A"))
        x.refusing = False
        opened = _upstream_session(await _call(client, f.both("B"), session, "x__whoami"))
        assert x.client_sessions() == [opened]
        deleted = await client.delete(f.both("A"), headers=_headers(session))
        assert deleted.status_code == 200
        after = await _call(client, f.both("B"), session, "x__whoami")
        assert after.status_code == 404, after.text
        assert x.client_sessions() == [], "an upstream session no replica will end"
        assert x.deleted == [opened]


async def _streamed_call(client: httpx.AsyncClient, url: str, session: str) -> str:
    """A call answered over SSE (the upstream's `slow`, released at once): the id of its
    last event."""
    got = await _call(client, url, session, "slow")
    assert got.status_code == 200, got.text
    ids = [line[3:].strip() for line in got.text.splitlines() if line.startswith("id:")]
    assert ids, got.text
    return ids[-1]


async def test_a_client_streaming_answers_cannot_grow_the_shared_session(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The attack: a client makes call after call answered over SSE in one session. Each
    answer's stream gets a counter and a closed mark in the session's Redis hash, so another
    replica can resume it; before the fix neither was ever removed (one process forgets all
    but its newest finished streams), so the hash grew by two fields per call for as long as
    the client kept the session alive. Now a finished stream is forgotten once
    KEPT_STREAMS newer ones opened: the hash stays bounded, the newest answer can still be
    resumed on another replica, and resuming a forgotten one is a 400, as in one process."""
    calls = 2 * sessions.KEPT_STREAMS + 10
    async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
        f.upstream.release.set()
        session = await _initialize(client, f["A"].url)
        first = await _streamed_call(client, f["A"].url, session)
        for _ in range(calls - 2):
            await _streamed_call(client, f["A"].url, session)
        last = await _streamed_call(client, f["A"].url, session)
        records = f["A"].gateway.pipeline.sessions.records
        assert records is not None
        fields = await records.load(session_hash(session))
        assert fields is not None
        assert len(fields) <= 2 * sessions.KEPT_STREAMS + 12, len(fields)
        await _resume(client, f["B"].url, session, first.encode())
        stream, _, seq = last.rpartition("-")
        headers = {**_headers(session), "Accept": "text/event-stream"}
        headers["Last-Event-ID"] = f"{stream}-{int(seq) - 1}"
        async with client.stream("GET", f["B"].url, headers=headers, timeout=15) as got:
            assert got.status_code == 200
            [(event_id, answer)] = await _events(got.aiter_lines(), 1)
        assert event_id == last and answer["result"]["content"][0]["text"] == "done"


async def _refused_at_once(client: httpx.AsyncClient, url: str, session: str, last: str) -> None:
    """A GET naming `last` is answered 400 at once; a stream held open instead (200) fails."""
    headers = {**_headers(session), "Accept": "text/event-stream", "Last-Event-ID": last}
    async with client.stream("GET", url, headers=headers, timeout=5) as got:
        assert got.status_code == 400, f"{last!r}: {got.status_code}, the GET held open"
        error = orjson.loads(await got.aread())["error"]
    assert error["code"] == -32600, error
    assert error["message"].startswith("Last-Event-ID"), error
    assert "names no stream" in error["message"] or "names an event never sent" in error["message"]


async def test_a_last_event_id_past_the_streams_newest_event_is_a_400_on_every_replica(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The attack: a Last-Event-ID naming an event the stream never had (past its newest,
    18 digits or 2). Before the fix the GET was a 200 that waited for an event after that
    number: no event the stream will ever send, so the client got nothing for ever (and on
    the standalone stream, its next plain GET was a 409). Now it is a 400, as for a stream
    the session never had; the stream's own newest id still resumes."""
    async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
        f.upstream.release.set()
        session = await _initialize(client, f["A"].url)
        last = await _streamed_call(client, f["A"].url, session)
        stream, _, seq = last.rpartition("-")
        for replica in ("A", "B"):
            for hostile in ("0-" + "9" * 18, "0-2", f"{stream}-{int(seq) + 1}"):
                await _refused_at_once(client, f[replica].url, session, hostile)
            await _still_open(client, f[replica].url, session, "0-0")


async def test_a_last_event_id_past_the_streams_newest_event_is_a_400_in_one_process(
    tmp_path: Path,
) -> None:
    """As on every replica, in one process."""
    async with fleet(tmp_path, None, {"A": "agent-1"}) as f, httpx.AsyncClient() as client:
        f.upstream.release.set()
        session = await _initialize(client, f["A"].url)
        last = await _streamed_call(client, f["A"].url, session)
        stream, _, seq = last.rpartition("-")
        for hostile in ("0-" + "9" * 18, "0-2", f"{stream}-{int(seq) + 1}"):
            await _refused_at_once(client, f["A"].url, session, hostile)
        await _still_open(client, f["A"].url, session, "0-0")


async def test_a_stream_finishing_after_newer_ones_opened_is_forgotten_as_it_ends(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The same attack with one answer held open (the upstream asks the client first) while
    KEPT_STREAMS newer ones open and finish: forgetting only streams finished by then would
    keep the held one's fields for ever once it ends. It is forgotten as it ends."""
    async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
        f.upstream.release.set()
        session = await _initialize(client, f["A"].url)
        message = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "ask"}}
        async with client.stream(
            "POST", f["A"].url, json=message, headers=_headers(session), timeout=15
        ) as held:
            assert held.status_code == 200
            lines = held.aiter_lines()
            [(event_id, question)] = await _events(lines, 1)
            stream = event_id.rpartition("-")[0]
            for _ in range(sessions.KEPT_STREAMS + 1):
                await _streamed_call(client, f["A"].url, session)
            assert await _answer(client, f["A"].url, session, str(question["id"])) == 202
            [(_, answer)] = await _events(lines, 1)
        assert answer["result"]["content"][0]["text"] == "thanks"
        records = f["A"].gateway.pipeline.sessions.records
        assert records is not None
        names = [f"seq:{stream}", f"closed:{stream}"]
        await until_async(lambda: _no_fields(records, session, names), f"stream {stream} forgotten")
        await _resume(client, f["B"].url, session, f"{stream}-1".encode())


async def _no_fields(records: sessions.SessionRecords, session: str, names: list[str]) -> bool:
    return await records.fields(session_hash(session), names) == {}
