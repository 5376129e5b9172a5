"""Legacy sessions every replica serves: two (or three) gateways on their own ports share one
real Redis and one real loopback upstream, as replicas behind a load balancer do.

A session opened on A is served by B with the same upstream session; A dropped without closing
anything (as `kill -9` would) does not end it; a GET stream resumed on B with Last-Event-ID
replays exactly what the client missed, then goes on live; another principal presenting the
id is told it does not exist; DELETE on one replica ends it on all; with Redis out of reach a
session request is refused (503 `state.unavailable`) and served again once Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ALLOW_ALL_YAML, until_async
from tests.redis_server import RedisServer, redis_server, start_redis  # noqa: F401

from bastion import config
from bastion.app import Gateway
from bastion.asgi import Receive, Scope, Send
from bastion.errors import SessionNotFound
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.session import session_hash
from bastion.state.redis import RedisState
from bastion.transport.server import HttpServer
from bastion.types import LEGACY_VERSIONS, Era

VERSION = "2025-06-18"
ROUTE = "/servers/up/mcp"
BOTH = "/both/mcp"  # the virtual server of `up` and the fleet's other upstreams
ACCEPT = "application/json, text/event-stream"
CLIENT = "shared-sessions-test"  # the client's name, as the upstream hears it at initialize


@dataclass
class Upstream:
    """A 2025-era MCP server with sessions: what it was asked, in which of its sessions, and
    a queue per session of what its GET stream sends next."""

    sessions: dict[str, str] = field(default_factory=dict)  # its session id → client name
    calls: list[tuple[str, str]] = field(default_factory=list)  # (session id, tool)
    deleted: list[str] = field(default_factory=list)
    # What each session's GET stream sent or would have (its event ids: 1, 2, …), kept as an
    # SDK server's event store keeps them: one listening later gets only newer events, unless
    # it names the last one it got (Last-Event-ID).
    sent: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    pushed: dict[str, asyncio.Event] = field(default_factory=dict)
    listening: set[str] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # `slow` finishes after it
    answers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # client → it
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    refusing: bool = False  # initialize is answered 503 (the upstream is down) while set
    # With `together` set (`hold`), the client's initializes (or requests in a session it
    # forgot) are answered only once that many arrived: replicas opening an upstream session
    # at the same moment, or calls finding it forgotten at the same moment, deterministically.
    together: int = 0
    holding: str = "initialize"
    arrived: int = 0
    all_in: asyncio.Event = field(default_factory=asyncio.Event)

    def client_sessions(self) -> list[str]:
        """The upstream sessions the test client's initialize opened (not the catalog's)."""
        return [sid for sid, name in self.sessions.items() if name == CLIENT]

    def hold(self, together: int, holding: str = "initialize") -> None:
        """Answer the client's next initializes (`holding` "forgotten": requests in a session
        it forgot) only once `together` of them arrived."""
        self.together, self.arrived, self.all_in = together, 0, asyncio.Event()
        self.holding = holding

    def forget(self) -> None:
        """Forget every session, as a restart does: requests in them are answered 404, their
        GET streams end."""
        self.sessions.clear()
        for pushed in self.pushed.values():
            pushed.set()

    async def _gather(self, holding: str, name: str = CLIENT) -> None:
        """Hold a client's initialize (or a request in a forgotten session) until `together`
        arrived (at most 10 s: a test that expects them all fails on `arrived`, never hangs)."""
        if not self.together or holding != self.holding or name != CLIENT:
            return
        self.arrived += 1
        if self.arrived >= self.together:
            self.all_in.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self.all_in.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        sid = headers.get("mcp-session-id", "")
        if scope["method"] == "POST":
            await self._post(receive, send, sid)
        elif sid not in self.sessions:
            await _reply(send, 404, {"error": "no such session"})
        elif scope["method"] == "GET":
            await self._stream(receive, send, sid, headers.get("last-event-id"))
        else:  # DELETE
            self.sessions.pop(sid, None)
            self.deleted.append(sid)
            await _reply(send, 200, {})

    async def _post(self, receive: Receive, send: Send, sid: str) -> None:
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        message = json.loads(body)
        method = message.get("method")
        if method == "initialize" and self.refusing:
            await _reply(send, 503, {"error": "starting"})
            return
        if method == "initialize":
            params = message["params"]
            await self._gather("initialize", params.get("clientInfo", {}).get("name", ""))
            sid = secrets.token_hex(8)
            self.sessions[sid] = params.get("clientInfo", {}).get("name", "")
            self.sent[sid], self.pushed[sid] = [], asyncio.Event()
            result = {
                "protocolVersion": params["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "shared-upstream", "version": "1"},
            }
            reply = {"jsonrpc": "2.0", "id": message["id"], "result": result}
            await _reply(send, 200, reply, [(b"mcp-session-id", sid.encode())])
            return
        if sid not in self.sessions:
            await self._gather("forgotten")
            await _reply(send, 400 if not sid else 404, {"error": "no such session"})
            return
        if "method" not in message:  # the client's answer to this server's request
            self.answers.append((sid, message))
            self.answered.set()
            await _reply(send, 202, None)
            return
        if "id" not in message:
            await _reply(send, 202, None)
            return
        if method == "tools/list":
            names = ("whoami", "slow", "ask")
            tools = [{"name": n, "inputSchema": {"type": "object"}} for n in names]
            result: dict[str, Any] = {"tools": tools}
        elif method == "tools/call" and message["params"]["name"] == "slow":
            await self._slow(send, message["id"])
            return
        elif method == "tools/call" and message["params"]["name"] == "ask":
            await self._ask(send, message["id"])
            return
        elif method == "tools/call":
            self.calls.append((sid, message["params"]["name"]))
            result = {"content": [{"type": "text", "text": sid}]}
        else:
            result = {}
        await _reply(send, 200, {"jsonrpc": "2.0", "id": message["id"], "result": result})

    async def _slow(self, send: Send, id_: Any) -> None:
        """A call answered over SSE: a note at once, another and the result once released."""
        sse = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": sse})
        await _event(send, _note(1))
        await self.release.wait()
        await _event(send, _note(2))
        result = {"content": [{"type": "text", "text": "done"}]}
        await _event(send, {"jsonrpc": "2.0", "id": id_, "result": result})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _ask(self, send: Send, id_: Any) -> None:
        """A call that asks the client something first (sampling), answered once it replied."""
        sse = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": sse})
        params = {"messages": [], "maxTokens": 1}
        question = {"jsonrpc": "2.0", "id": "q-1", "method": "sampling/createMessage"}
        await _event(send, {**question, "params": params})
        await self.answered.wait()
        result = {"content": [{"type": "text", "text": "thanks"}]}
        await _event(send, {"jsonrpc": "2.0", "id": id_, "result": result})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def push(self, sid: str, message: dict[str, Any]) -> None:
        """Send `message` on the session's GET stream (kept for a listener resuming)."""
        self.sent[sid].append(message)
        self.pushed[sid].set()

    async def _stream(self, receive: Receive, send: Send, sid: str, last: str | None) -> None:
        """The session's GET stream: what is pushed while a gateway reads it, and what was
        after `last` when it names an event."""
        sse = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": sse})
        sent, pushed = self.sent[sid], self.pushed[sid]
        cursor = int(last) if last is not None and last.isdigit() else len(sent)
        gone = asyncio.create_task(_disconnected(receive))
        self.listening.add(sid)
        try:
            while not gone.done() and sid in self.sessions:
                pushed.clear()
                while cursor < len(sent):
                    cursor += 1
                    await _event(send, sent[cursor - 1], str(cursor))
                waiting = asyncio.create_task(pushed.wait())
                await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
            if not gone.done():  # forgotten: the stream ends
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.listening.discard(sid)
            gone.cancel()


async def _event(send: Send, message: dict[str, Any], event_id: str | None = None) -> None:
    body = b"data: " + json.dumps(message).encode() + b"\n\n"
    if event_id is not None:
        body = f"id: {event_id}\n".encode() + body
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _disconnected(receive: Receive) -> None:
    """Return when the gateway let go of a stream (its request's empty body comes first)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _reply(
    send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode() if body is not None else b""
    all_headers = [(b"content-type", b"application/json"), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": payload})


@dataclass
class Replica:
    """One gateway on its own port."""

    gateway: Gateway
    server: HttpServer
    url: str
    running: bool = True

    async def drop(self) -> None:
        """Stop answering, ending nothing: as `kill -9` leaves the session's record behind.
        (Its local copy is let go of, so it no longer reads its upstream stream either.)"""
        if self.running:
            self.running = False
            await self.server.stop(grace=0)
            await self.gateway.pipeline.sessions.close()


@dataclass
class Fleet:
    upstream: Upstream
    replicas: dict[str, Replica]
    redis_url: str | None
    others: dict[str, Upstream] = field(default_factory=dict)  # with `up`, behind BOTH

    def __getitem__(self, name: str) -> Replica:
        return self.replicas[name]

    def both(self, replica: str) -> str:
        """The replica's URL of the virtual server joining `up` and the other upstreams."""
        return self.replicas[replica].url.removesuffix(ROUTE) + BOTH


def _settings(
    tmp: Path, up_port: int, agent: str, limits: str, others: dict[str, int] | None = None
) -> config.Settings:
    """One replica's settings: the upstream `up` (its own route), and with `others` (name →
    port) those upstreams too, joined with `up` on the virtual server at BOTH."""
    state = tmp / agent
    state.mkdir(exist_ok=True)
    upstreams = {"up": up_port, **(others or {})}
    listed = "".join(
        f"""  {name}: {{transport: http, url: "http://127.0.0.1:{port}/mcp", protocol: legacy,
       timeout_seconds: 5, credentials: {{mode: none}}}}\n"""
        for name, port in upstreams.items()
    )
    joined = f"virtual_servers:\n  both: {{path: {BOTH}, upstreams: {list(upstreams)}}}\n"
    return config.parse(
        f"""
state_dir: {state}
auth: {{mode: none, tenant: acme, agent: {agent}}}
limits: {{sse_keepalive_seconds: 1, {limits}}}
{ALLOW_ALL_YAML}upstreams:
{listed}{joined if others else ""}"""
    )


@contextlib.asynccontextmanager
async def fleet(
    tmp: Path,
    redis_url: str | None,
    agents: dict[str, str] | None = None,
    timeout: float = 1.0,
    limits: str = "session_idle_seconds: 3600",
    others: tuple[str, ...] = (),
) -> AsyncIterator[Fleet]:
    """Replicas (name → agent each serves as) sharing one Redis and one upstream (and with
    `others`, more upstreams, joined with it on the virtual server at BOTH). Without
    `redis_url`, one gateway on its own: the embedded default, to compare with."""
    upstream = Upstream()
    up_servers = [HttpServer(upstream, max_body=1 << 20, keepalive_timeout=60)]
    up_port = await up_servers[0].start("127.0.0.1", 0)
    more = {name: Upstream() for name in others}
    ports: dict[str, int] = {}
    replicas: dict[str, Replica] = {}
    states: list[RedisState] = []
    try:
        for name, other in more.items():
            up_servers.append(HttpServer(other, max_body=1 << 20, keepalive_timeout=60))
            ports[name] = await up_servers[-1].start("127.0.0.1", 0)
        for name, agent in (agents or {"A": "agent-1", "B": "agent-1"}).items():
            shared = RedisState(redis_url, timeout=timeout) if redis_url else None
            states += [shared] if shared else []
            settings = _settings(tmp, up_port, agent, limits, ports)
            gateway = Gateway(settings, shared=shared)
            await gateway.start()
            server = HttpServer(gateway.front, max_body=1 << 20, keepalive_timeout=60)
            port = await server.start("127.0.0.1", 0)
            replicas[name] = Replica(gateway, server, f"http://127.0.0.1:{port}{ROUTE}")
        yield Fleet(upstream, replicas, redis_url, more)
    finally:
        for replica in replicas.values():
            await replica.drop()
            await replica.gateway.stop()
        for shared in states:
            await shared.close()
        for up_server in up_servers:
            await up_server.stop(grace=0)


def _headers(session: str | None = None) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "Accept": ACCEPT,
        "MCP-Protocol-Version": VERSION,
    }
    if session is not None:
        headers["Mcp-Session-Id"] = session
    return headers


async def _initialize(client: httpx.AsyncClient, url: str) -> str:
    hello = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": CLIENT}}
    message = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello}
    response = await client.post(url, json=message, headers=_headers())
    assert response.status_code == 200, response.text
    return response.headers["mcp-session-id"]


async def _call(
    client: httpx.AsyncClient, url: str, session: str, tool: str = "whoami"
) -> httpx.Response:
    message = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": tool}}
    return await client.post(url, json=message, headers=_headers(session))


def _upstream_session(response: httpx.Response) -> str:
    """The upstream session a tools/call reached (the upstream answers with its id)."""
    assert response.status_code == 200, response.text
    return str(response.json()["result"]["content"][0]["text"])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- any replica serves any request of a session --------------------------------------------


def test_a_session_opened_on_one_replica_is_served_by_another(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Without the record and the re-attachment, B answers 'session not found' (or opens an
    upstream session of its own)."""

    async def scenario() -> None:
        async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
            session = await _initialize(client, f["A"].url)
            note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
            sent = await client.post(f["B"].url, json=note, headers=_headers(session))
            assert sent.status_code == 202
            reached = _upstream_session(await _call(client, f["B"].url, session))
            assert f.upstream.client_sessions() == [reached]  # one upstream session, joined
            assert [sid for sid, _ in f.upstream.calls] == [reached]
            held = f["B"].gateway.pipeline.sessions.all()
            assert [s.id for s in held] == [session] and held[0].initialized

    run(scenario())


def test_concurrent_first_requests_on_a_replica_re_attach_once(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
            session = await _initialize(client, f["A"].url)
            with caplog.at_level(logging.INFO, logger="bastion.session"):
                answers = await asyncio.gather(
                    *(_call(client, f["B"].url, session) for _ in range(6))
                )
            assert len({_upstream_session(a) for a in answers}) == 1
            attached = [r for r in caplog.records if "re-attached" in r.getMessage()]
            assert len(attached) == 1
            assert len(f.upstream.client_sessions()) == 1

    run(scenario())


def test_a_session_survives_its_replica_dropped_without_closing(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async def scenario() -> None:
        async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
            session = await _initialize(client, f["A"].url)
            before = _upstream_session(await _call(client, f["A"].url, session))
            await f["A"].drop()
            after = _upstream_session(await _call(client, f["B"].url, session))
            assert after == before
            assert f.upstream.deleted == []  # nothing ended the upstream session

    run(scenario())


@pytest.mark.parametrize("opener", ["A", "B"])
def test_an_upstream_opened_after_a_replica_re_attached_is_joined_there_not_reopened(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    opener: str,
) -> None:
    """A opens the session on the virtual server of `up` and `x` while `x` is down (the
    session opens with `up` only); the client's first call lands on B, which re-attaches it
    (with `up` only) and serves the client's GET stream. `x` comes back; a call to it through
    `opener` (A, which holds an unopened channel to `x` from the initialize, or B) opens the
    upstream session; then a call to `x` lands on the other replica. Before the fix, that
    replica opened an upstream session of its own (two upstream sessions for one client
    session, each replica calling its own), and the server stream of `x` never reached the
    client's GET stream on B. Now the other replica joins the recorded upstream session, and
    B, listening, relays what `x` sends on it."""
    other = "B" if opener == "A" else "A"

    async def scenario() -> None:
        async with (
            fleet(tmp_path, redis_server.url(), others=("x",)) as f,
            httpx.AsyncClient() as client,
        ):
            x = f.others["x"]
            x.refusing = True
            session = await _initialize(client, f.both("A"))
            assert x.client_sessions() == []
            _upstream_session(await _call(client, f.both("B"), session, "up__whoami"))
            headers = {**_headers(session), "Accept": "text/event-stream"}
            async with client.stream("GET", f.both("B"), headers=headers, timeout=15) as got:
                assert got.status_code == 200
                x.refusing = False
                opened = _upstream_session(
                    await _call(client, f.both(opener), session, "x__whoami")
                )
                assert x.client_sessions() == [opened]
                joined = _upstream_session(await _call(client, f.both(other), session, "x__whoami"))
                assert joined == opened, "a second upstream session for one client session"
                assert x.client_sessions() == [opened]
                assert [sid for sid, _ in x.calls] == [opened, opened]
                await until_async(lambda: opened in x.listening, "B listening to x")
                x.push(opened, _note(5))
                [(_, note)] = await _events(got.aiter_lines(), 1)
            assert note["params"]["data"] == 5

    run(scenario())


def test_in_one_process_an_upstream_opened_after_the_get_stream_is_relayed_on_it(
    tmp_path: Path,
) -> None:
    """The same upstream `x`, down at initialize, in one process: the client's GET stream
    opened while `x` was down; the first call to `x` opens its upstream session. Before the
    fix the GET's relay of `x` had tried once (and failed) as the stream opened and was never
    started again, so nothing `x` sent on its own stream reached the client."""

    async def scenario() -> None:
        agents = {"A": "agent-1"}
        async with (
            fleet(tmp_path, None, agents, others=("x",)) as f,
            httpx.AsyncClient() as client,
        ):
            x = f.others["x"]
            x.refusing = True
            session = await _initialize(client, f.both("A"))
            headers = {**_headers(session), "Accept": "text/event-stream"}
            [held] = f["A"].gateway.pipeline.sessions.all()
            up_sid = f.upstream.client_sessions()[0]

            def relaying_up_only() -> bool:  # whatever the GET tried with `x` is over
                return up_sid in f.upstream.listening and len(held.tasks) == 1

            async with client.stream("GET", f.both("A"), headers=headers, timeout=15) as got:
                assert got.status_code == 200
                await until_async(relaying_up_only, "the GET relaying `up` alone")
                x.refusing = False
                opened = _upstream_session(await _call(client, f.both("A"), session, "x__whoami"))
                await until_async(lambda: opened in x.listening, "A listening to x")
                x.push(opened, _note(6))
                [(_, note)] = await _events(got.aiter_lines(), 1)
            assert note["params"]["data"] == 6

    run(scenario())


# -- resumption on another replica ----------------------------------------------------------


async def _events(lines: AsyncIterator[str], count: int) -> list[tuple[str, dict[str, Any]]]:
    """The next `count` SSE events with data of a stream's lines: (id, message)."""
    found: list[tuple[str, dict[str, Any]]] = []
    event_id, data = "", ""
    try:
        async with asyncio.timeout(10):  # keepalives come every second: a deadline of its own
            async for line in lines:
                if line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif line == "" and data:
                    found.append((event_id, json.loads(data)))
                    event_id, data = "", ""
                    if len(found) == count:
                        return found
    except TimeoutError:
        pass
    raise AssertionError(f"got {[m for _, m in found]}, {len(found)} of {count} events")


def _note(n: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": n}}


def test_a_get_stream_resumes_on_another_replica_with_exactly_the_missed_events(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The client saw event 1 of A's stream before A went; B replays 2 (stored by A), not 1,
    then relays 3 (sent by the upstream while no replica listened: B resumes the upstream's
    stream where A's left off) and 4, live, from the same upstream session. Without the
    shared buffer B has nothing to replay and 2 is lost; without the upstream stream's
    position, 3 is."""

    async def scenario() -> None:
        async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
            session = await _initialize(client, f["A"].url)
            upstream_sid = f.upstream.client_sessions()[0]

            def push(n: int) -> None:
                f.upstream.push(upstream_sid, _note(n))

            headers = {**_headers(session), "Accept": "text/event-stream"}
            async with client.stream("GET", f["A"].url, headers=headers, timeout=15) as got:
                assert got.status_code == 200
                await until_async(lambda: upstream_sid in f.upstream.listening, "A listening")
                push(1)
                push(2)
                seen = await _events(got.aiter_lines(), 2)
            assert [m["params"]["data"] for _, m in seen] == [1, 2]
            await f["A"].drop()
            await until_async(lambda: upstream_sid not in f.upstream.listening, "A gone")
            push(3)
            last = seen[0][0]  # the client only got event 1 before its replica died
            resume = {**headers, "Last-Event-ID": last}
            async with client.stream("GET", f["B"].url, headers=resume, timeout=15) as got:
                assert got.status_code == 200
                lines = got.aiter_lines()
                replayed = await _events(lines, 2)  # 2 from the buffer, 3 live
                push(4)
                replayed += await _events(lines, 1)
            assert [m["params"]["data"] for _, m in replayed] == [2, 3, 4]
            ids = [last] + [i for i, _ in replayed]
            numbers = [int(i.rpartition("-")[2]) for i in ids]
            assert numbers == sorted(set(numbers)), ids  # no duplicate, in order

    run(scenario())


def test_a_post_answer_resumes_on_another_replica_while_its_replica_finishes_it(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The client's connection to A drops mid-answer and it resumes on B: A goes on relaying
    the upstream's answer into the shared buffer, and B relays what follows the client's last
    event, the response included, then ends the stream. Without the shared buffer B knows no
    such stream."""

    async def scenario() -> None:
        async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
            session = await _initialize(client, f["A"].url)
            call = {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "slow"}}
            post = client.stream("POST", f["A"].url, json=call, headers=_headers(session))
            async with post as got:
                assert got.headers["content-type"].startswith("text/event-stream")
                first = await _events(got.aiter_lines(), 1)
            assert first[0][1]["params"]["data"] == 1
            headers = {
                **_headers(session),
                "Accept": "text/event-stream",
                "Last-Event-ID": first[0][0],
            }
            async with client.stream("GET", f["B"].url, headers=headers, timeout=15) as got:
                assert got.status_code == 200
                lines = got.aiter_lines()
                f.upstream.release.set()
                rest = await _events(lines, 2)
                assert [line async for line in lines if line.startswith("data:")] == []  # ended
            assert rest[0][1]["params"]["data"] == 2
            assert rest[1][1]["id"] == 8 and rest[1][1]["result"]["content"][0]["text"] == "done"

    run(scenario())


def test_the_answer_to_a_server_request_reaches_its_upstream_from_another_replica(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """A relays the upstream's sampling request under a gateway id; the client's answer lands
    on B, which finds whose request it was and delivers it, under the upstream's own id, in
    the same upstream session. Without the shared mapping B refuses the answer as unknown."""

    async def scenario() -> None:
        async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
            session = await _initialize(client, f["A"].url)
            upstream_sid = f.upstream.client_sessions()[0]
            call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "ask"}}
            post = client.stream("POST", f["A"].url, json=call, headers=_headers(session))
            async with post as got:
                lines = got.aiter_lines()
                [(_, question)] = await _events(lines, 1)
                assert question["method"] == "sampling/createMessage"
                assert question["id"] != "q-1"  # the gateway's own id
                reply = {"jsonrpc": "2.0", "id": question["id"], "result": {"role": "assistant"}}
                sent = await client.post(f["B"].url, json=reply, headers=_headers(session))
                assert sent.status_code == 202, sent.text
                [(_, result)] = await _events(lines, 1)
            assert result["id"] == 9 and result["result"]["content"][0]["text"] == "thanks"
            [(sid, answer)] = f.upstream.answers
            assert sid == upstream_sid and answer["id"] == "q-1"
            again = await client.post(f["B"].url, json=reply, headers=_headers(session))
            assert again.status_code != 202  # taken once: a replayed answer goes nowhere

    run(scenario())


# -- ownership and ending -------------------------------------------------------------------


def test_another_principal_presenting_the_session_is_told_it_does_not_exist(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """C serves another agent: the session id alone gets it nothing, however it learnt it;
    the refusal is the one for an unknown id and the decision marks the session foreign.
    Without the binding check on re-attachment, C serves the call in A's upstream session."""
    agents = {"A": "agent-1", "C": "mallory"}

    async def scenario() -> None:
        async with fleet(tmp_path, redis_server.url(), agents) as f, httpx.AsyncClient() as client:
            session = await _initialize(client, f["A"].url)
            refused = await _call(client, f["C"].url, session)
            assert refused.status_code == 404, refused.text
            assert refused.json()["error"]["message"].startswith("session not found")
            assert f.upstream.calls == []
            pipeline = f["C"].gateway.pipeline
            assert len(pipeline.sessions) == 0  # nothing was re-attached for mallory
            route = next(r for r in f["C"].gateway.routes if r.path == ROUTE)
            exchange = Exchange({}, Era.LEGACY, LEGACY_VERSIONS[0], route.name, "")
            exchange.headers = _headers(session)
            exchange.http_method = "GET"
            exchange.url = f["C"].url
            exchange.session_id = session
            with pytest.raises(SessionNotFound):
                await pipeline.session_for(exchange, route)
            assert exchange.foreign_session

    run(scenario())


def test_a_session_deleted_on_one_replica_is_refused_by_every_replica(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """A holds the session (it served a call); DELETE lands on B. Without A checking the
    shared record, A goes on serving a session its client ended."""

    async def scenario() -> None:
        async with fleet(tmp_path, redis_server.url()) as f, httpx.AsyncClient() as client:
            session = await _initialize(client, f["A"].url)
            upstream_sid = _upstream_session(await _call(client, f["A"].url, session))
            deleted = await client.delete(f["B"].url, headers=_headers(session))
            assert deleted.status_code == 200
            assert f.upstream.deleted == [upstream_sid]
            for replica in ("A", "B"):
                refused = await _call(client, f[replica].url, session)
                assert refused.status_code == 404, (replica, refused.text)
            assert len(f["A"].gateway.pipeline.sessions) == 0

    run(scenario())


def test_a_session_unused_for_the_idle_limit_ends_on_every_replica(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The record expires with the idle limit; the replica holding the session then ends its
    upstream session, and no replica serves it. Without the expiry the record (and the
    upstream session) would live for ever."""

    async def scenario() -> None:
        idle = "session_idle_seconds: 1"
        async with fleet(tmp_path, redis_server.url(), limits=idle) as f, httpx.AsyncClient() as c:
            session = await _initialize(c, f["A"].url)
            upstream_sid = f.upstream.client_sessions()[0]
            records = f["A"].gateway.pipeline.sessions.records
            assert records is not None
            await until_async(lambda: f.upstream.deleted == [upstream_sid], "the upstream end")
            assert await records.load(session_hash(session)) is None
            refused = await _call(c, f["B"].url, session)
            assert refused.status_code == 404, refused.text

    run(scenario())


def test_an_agents_session_quota_counts_its_sessions_on_every_replica(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Two sessions allowed per agent: one on A and one on B fill the quota, so a third on A
    is refused although A holds one; ending one (on B) makes room again. Counted per replica,
    each replica would allow two: four in all."""
    limits = "max_sessions_per_agent: 2, session_reclaim_seconds: 3600"

    async def scenario() -> None:
        async with (
            fleet(tmp_path, redis_server.url(), limits=limits) as f,
            httpx.AsyncClient() as c,
        ):
            await _initialize(c, f["A"].url)
            second = await _initialize(c, f["B"].url)
            hello = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": CLIENT}}
            message = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello}
            refused = await c.post(f["A"].url, json=message, headers=_headers())
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["data"]["quota"] == "agent" and error["data"]["limit"] == 2
            assert "has 2 open sessions" in error["message"]
            assert len(f["A"].gateway.pipeline.sessions) == 1
            deleted = await c.delete(f["B"].url, headers=_headers(second))
            assert deleted.status_code == 200
            await _initialize(c, f["A"].url)

    run(scenario())


# -- the shared state out of reach ----------------------------------------------------------


def test_with_redis_out_of_reach_session_requests_are_refused_then_served_again(
    tmp_path: Path,
) -> None:
    """Redis stops answering (SIGSTOP: its data kept) and comes back (SIGCONT). A session
    request on the replica that holds the session and on one that does not is refused with
    503 state.unavailable, never served from a guess; afterwards both serve it again. A
    2026-07-28 request never asks Redis: it is served meanwhile."""

    async def scenario(server: RedisServer) -> None:
        url = server.url(0)
        async with fleet(tmp_path, url, timeout=0.3) as f, httpx.AsyncClient() as client:
            session = await _initialize(client, f["A"].url)
            reached = _upstream_session(await _call(client, f["A"].url, session))
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                for replica in ("A", "B"):
                    refused = await _call(client, f[replica].url, session)
                    assert refused.status_code == 503, (replica, refused.text)
                    error = refused.json()["error"]
                    assert error["code"] == -32603
                    assert error["data"]["code"] == "state.unavailable", error
                    assert server.password not in refused.text
                    sse = {**_headers(session), "Accept": "text/event-stream"}
                    stream = await client.get(f[replica].url, headers=sse)
                    assert stream.status_code == 503, (replica, stream.text)
                modern = await client.post(f["B"].url, json=_modern_call(), headers=_modern())
                assert modern.status_code == 200, modern.text
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            for replica in ("A", "B"):
                assert _upstream_session(await _call(client, f[replica].url, session)) == reached

    with start_redis() as server:
        run(scenario(server))


def _modern() -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Accept": ACCEPT,
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "whoami",
    }


def _modern_call() -> dict[str, Any]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "modern", "version": "1"},
    }
    params = {"name": "whoami", "arguments": {}, "_meta": meta}
    return {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": params}
