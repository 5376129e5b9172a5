"""Whatever an upstream answers, the call's outcome is recorded and the connection goes on.

A loopback HTTP upstream answers `tools/call odd` with a reply the test scripts: hypothesis
generates them (any JSON type in any member, odd ids, huge and deeply nested values, garbage
and truncated bodies, a disconnect mid-answer, SSE streams with garbage events). Each call is
sent on a raw socket with a second call pipelined behind it on the same connection, and every
time: the first gets a JSON-RPC response with its own id, the second succeeds, the decision
record has its outcome record (same `request_id`), the metrics counted both calls, and the
gateway's catch-all for unexpected failures was never needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import ALLOW_ALL_YAML, LEGACY, MODERN, legacy_session, modern_body

from bastion import config
from bastion.app import Gateway
from bastion.audit import AuditRecord, AuditWriter, digest
from bastion.audit.trail import open_trail_writer
from bastion.transport.server import HttpServer

T = TypeVar("T")
ID = b'"@@ID@@"'  # stands for the id of the request the upstream answers
ROUTE = "/servers/odd/mcp"


@dataclass(frozen=True)
class Reply:
    """What the upstream sends back for `tools/call odd`."""

    status: int = 200
    content_type: str = "application/json"
    body: bytes = b""
    cut: int | None = None  # send only this many bytes of the body, then hang up

    def encode(self, id_: Any) -> bytes:
        body = self.body.replace(ID, json.dumps(id_).encode())
        head = [f"HTTP/1.1 {self.status} Scripted", "Connection: close"]
        if self.content_type:
            head.append(f"Content-Type: {self.content_type}")
        if not self.content_type.startswith("text/event-stream"):
            head.append(f"Content-Length: {len(body)}")
        if self.cut is not None:
            body = body[: self.cut]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def result_body(id_: Any, result: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": id_, "result": result}).encode()


class ScriptedUpstream:
    """A 2026-07-28 HTTP upstream on loopback, one request per connection: tools `odd`
    (answered with `script`) and `ok` (always a text result)."""

    def __init__(self) -> None:
        self.script = Reply(body=b"{}")
        self.lists: Reply | None = None  # the answer to tools/list, once policy has listed
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            message = json.loads(await reader.readexactly(length))
            writer.write(self._answer(message))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _answer(self, message: dict[str, Any]) -> bytes:
        method, id_ = message.get("method"), message.get("id")
        if id_ is None:
            return Reply(status=202, content_type="").encode(None)
        if method == "server/discover":
            found = {"resultType": "complete", "supportedVersions": [MODERN], "capabilities": {}}
            return Reply(body=result_body(id_, found)).encode(id_)
        if method == "tools/list" and self.lists is not None:
            return self.lists.encode(id_)
        if method == "tools/list":
            tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("odd", "ok")]
            return Reply(body=result_body(id_, {"tools": tools})).encode(id_)
        if method == "tools/call" and message["params"]["name"] == "odd":
            return self.script.encode(id_)
        if method == "tools/call":
            text = {"content": [{"type": "text", "text": "ok"}], "resultType": "complete"}
            return Reply(body=result_body(id_, text)).encode(id_)
        missing = {"jsonrpc": "2.0", "id": id_, "error": {"code": -32601, "message": "no"}}
        return Reply(body=json.dumps(missing).encode()).encode(id_)


class Failures(logging.Handler):
    """Collects the gateway's reports of failures its precise handling did not foresee."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None:
            self.seen.append(record.getMessage())


@dataclass
class Running:
    """A gateway (its own HTTP server, its audit trail) in a thread, before the upstream."""

    loop: asyncio.AbstractEventLoop
    gateway: Gateway
    writer: AuditWriter
    upstream: ScriptedUpstream
    port: int
    failures: Failures
    session: str  # a legacy (2025-11-25) session's id
    tags: Iterator[int] = field(default_factory=itertools.count)
    sent: int = 0  # tools/call requests sent to the gateway so far

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    state = tmp_path_factory.mktemp("answers")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    upstream = ScriptedUpstream()
    up_port = asyncio.run_coroutine_threadsafe(upstream.start(), loop).result(10)
    settings_ = config.parse(
        f"""
state_dir: {state}
auth: {{mode: none, tenant: acme, agent: tester}}
audit: {{durability: strict}}
{ALLOW_ALL_YAML}upstreams:
  odd: {{transport: http, url: "http://127.0.0.1:{up_port}/mcp", protocol: modern,
        timeout_seconds: 5}}
virtual_servers:
  v: {{path: /v, upstreams: [odd]}}
"""
    )
    writer = open_trail_writer(settings_)
    gateway = Gateway(settings_, audit=writer)
    failures = Failures()
    logging.getLogger("bastion").addHandler(failures)
    server = HttpServer(gateway.front, max_body=1 << 20, keepalive_timeout=60)
    try:
        asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(60)
        port = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0), loop).result(10)
        with httpx.Client(timeout=30) as client:
            opened = legacy_session(client, f"http://127.0.0.1:{port}{ROUTE}")
        session = opened["Mcp-Session-Id"]
        yield Running(loop, gateway, writer, upstream, port, failures, session)
    finally:
        logging.getLogger("bastion").removeHandler(failures)
        for step in (server.stop(), gateway.stop(), upstream.stop()):
            asyncio.run_coroutine_threadsafe(step, loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def request(port: int, name: str, id_: Any, tag: int, session: str | None) -> bytes:
    """A raw tools/call: 2026-07-28, or in the legacy session `session`."""
    params = {"name": name, "arguments": {"tag": tag}}
    if session is None:
        body = json.dumps(modern_body("tools/call", params, id_))
        era = f"MCP-Protocol-Version: {MODERN}\r\nMcp-Method: tools/call\r\nMcp-Name: {name}"
    else:
        body = json.dumps({"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params})
        era = f"MCP-Protocol-Version: {LEGACY}\r\nMcp-Session-Id: {session}"
    head = (
        f"POST {ROUTE} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        f"{era}\r\nContent-Length: {len(body.encode())}\r\n\r\n"
    )
    return head.encode() + body.encode()


class _Kept(io.BufferedReader):
    """The connection's one reader, which a response must not close (the next one reads on)."""

    def close(self) -> None:
        pass


class _Source:
    def __init__(self, reader: io.BufferedReader) -> None:
        self._reader = reader

    def makefile(self, *_: Any, **__: Any) -> io.BufferedReader:
        return self._reader


def read_response(reader: io.BufferedReader) -> tuple[int, str, bytes]:
    response = http.client.HTTPResponse(_Source(reader), method="POST")  # type: ignore[arg-type]
    response.begin()
    return response.status, response.getheader("content-type") or "", response.read()


def final_message(content_type: str, body: bytes) -> dict[str, Any]:
    """The JSON-RPC message that ends an answer: the body, or an SSE stream's last event."""
    if content_type.startswith("text/event-stream"):
        events = [line[5:] for line in body.split(b"\n") if line.startswith(b"data:")]
        found: dict[str, Any] = json.loads(events[-1])
        return found
    message: dict[str, Any] = json.loads(body)
    return message


def pipelined(
    running: Running, reply: Reply, legacy: bool
) -> tuple[int, dict[str, Any], int, tuple[int, bytes]]:
    """Send `tools/call odd` and, behind it on the same connection, `tools/call ok`."""
    running.upstream.script = reply
    tag = next(running.tags)
    session = running.session if legacy else None
    running.sent += 2
    with socket.create_connection(("127.0.0.1", running.port), timeout=30) as sock:
        sock.sendall(
            request(running.port, "odd", f"odd-{tag}", tag, session)
            + request(running.port, "ok", f"ok-{tag}", tag, session)
        )
        reader = _Kept(socket.SocketIO(sock, "rb"))
        status, ctype, body = read_response(reader)
        first = final_message(ctype, body)
        second_status, _, second = read_response(reader)
    assert first["id"] == f"odd-{tag}", first
    return status, first, tag, (second_status, second)


def trail_of(running: Running, tag: int) -> tuple[AuditRecord, AuditRecord]:
    """The decision and outcome records of the `odd` call tagged `tag` (waits for the outcome,
    which is written behind the answer)."""
    wanted = digest({"tag": tag})
    deadline = time.monotonic() + 15
    while True:
        found = [AuditRecord.from_json(e.record) for e in running.writer.store.read()]
        decision = next(
            (r for r in found if r.phase == "decision" and r.args_digest == wanted), None
        )
        if decision is not None:
            outcome = next(
                (r for r in found if r.phase == "outcome" and r.request_id == decision.request_id),
                None,
            )
            if outcome is not None:
                return decision, outcome
        if time.monotonic() > deadline:
            raise AssertionError(f"no outcome record for the decision of call {tag}: {decision}")
        time.sleep(0.02)


def calls_counted(running: Running) -> dict[str, float]:
    """Answered tools/call requests by outcome label, from the gateway's metrics."""
    counts: dict[str, float] = {}
    for metric in running.gateway.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "bastion_requests_total" and sample.labels["method"] == "tools/call":
                label = sample.labels["outcome"]
                counts[label] = counts.get(label, 0) + sample.value
    return counts


def check(running: Running, reply: Reply, legacy: bool = False) -> dict[str, Any]:
    """Everything that must hold whatever the upstream sent; returns the client's answer."""
    failures = len(running.failures.seen)
    status, first, tag, second = pipelined(running, reply, legacy)
    assert ("result" in first) != ("error" in first), first
    if "error" in first:
        assert isinstance(first["error"]["code"], int) and isinstance(
            first["error"]["message"], str
        )
    # The gateway's own status, or the one the upstream's JSON-RPC error came with.
    assert status in (200, 404, reply.status), (status, first)
    assert second[0] == 200, second
    assert json.loads(second[1])["result"]["content"][0]["text"] == "ok", second
    decision, outcome = trail_of(running, tag)
    code = (first.get("error") or {}).get("data", {})
    code = code.get("code") if isinstance(code, dict) else None
    if "result" in first:
        assert outcome.outcome == "ok"
    elif isinstance(code, str) and code.startswith("upstream."):
        assert outcome.outcome == "upstream_error"
    else:
        assert outcome.outcome == "error"
    assert decision.decision == "allow" and outcome.tool_original == "odd"
    deadline = time.monotonic() + 10
    while sum(calls_counted(running).values()) < running.sent and time.monotonic() < deadline:
        time.sleep(0.01)  # the count follows the answer by a moment: poll for it
    assert sum(calls_counted(running).values()) == running.sent
    assert running.failures.seen[failures:] == [], running.failures.seen
    return first


# -- strategies ----------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
ids = st.just("@@ID@@") | values
errors = st.fixed_dictionaries(
    {},
    optional={
        "code": st.integers(-33000, 0) | values,
        "message": st.text(max_size=40) | values,
        "data": st.text(max_size=40) | values,  # the MCP SDK sends a plain string
    },
)
tool_results = st.fixed_dictionaries(
    {"content": st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()}))},
    optional={"isError": st.booleans(), "structuredContent": values, "_meta": values},
)
huge = st.integers(0, 3_000_000).map(
    lambda n: {"content": [{"type": "text", "text": "x" * n}], "resultType": "complete"}
)
messages = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0") | values, "id": ids},
    optional={
        "result": tool_results | huge | values,
        "error": errors | values,
        "method": st.text(max_size=20) | values,
        "params": values,
        "extra": values,
    },
)


def encoded(message: dict[str, Any]) -> bytes:
    return json.dumps(message).replace('"@@ID@@"', ID.decode()).encode()


def deep(depth: int) -> bytes:
    return b'{"jsonrpc":"2.0","id":' + ID + b',"result":{"v":' + b"[" * depth + b"]" * depth + b"}}"


statuses = st.sampled_from([200, 200, 200, 202, 400, 404, 500, 503])
json_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "text/html", "text/plain", ""]
)
json_replies = st.builds(Reply, statuses, json_types, messages.map(encoded))
raw_replies = st.builds(Reply, statuses, json_types, st.binary(max_size=300) | st.just(b""))
deep_replies = st.integers(100, 2000).map(lambda n: Reply(body=deep(n)))
truncated = st.builds(
    lambda message, fraction: Reply(
        body=encoded(message), cut=int(len(encoded(message)) * fraction)
    ),
    messages,
    st.floats(0, 0.99),
)


def sse_event(data: bytes) -> bytes:
    return b"event: message\ndata: " + data + b"\n\n"


notifications = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"), "method": st.just("notifications/progress") | st.text(max_size=20)},
    optional={"params": values},
).map(lambda n: sse_event(json.dumps(n).encode()))
garbage_events = st.sampled_from(
    [
        b"data: {not json\n\n",
        b"data: [1, 2]\n\n",
        b"event: other\ndata: {}\n\n",
        b": a comment\n\n",
        b"data: \n\n",
        b'data: {"jsonrpc":"2.0","id":999999,"result":{}}\n\n',  # a response to another call
        b"retry: x\nid: 7\n\n",
    ]
)
sse_replies = st.builds(
    lambda events, last: Reply(
        content_type="text/event-stream", body=b"".join(events) + (last or b"")
    ),
    st.lists(notifications | garbage_events, max_size=5),
    st.none() | messages.map(lambda m: sse_event(encoded(m))),
)
replies = json_replies | raw_replies | deep_replies | truncated | sse_replies


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(reply=replies, legacy=st.booleans())
def test_every_upstream_answer_is_recorded_and_the_connection_serves_on(
    running: Running, reply: Reply, legacy: bool
) -> None:
    check(running, reply, legacy)


# -- the cases behind the issue, named ------------------------------------------------------


def test_string_error_data_from_the_mcp_sdk(running: Running) -> None:
    """The MCP SDK puts a plain string in `error.data`; the front used to raise on it, so the
    outcome record and the metrics missed the call and the connection dropped the next one."""
    error = {"code": -32602, "message": "Invalid arguments", "data": "text is required"}
    message = {"jsonrpc": "2.0", "id": "@@ID@@", "error": error}
    first = check(running, Reply(body=encoded(message)))
    assert first["error"] == error
    assert calls_counted(running).get("error", 0) >= 1


def test_upstream_cannot_choose_the_clients_http_status(running: Running) -> None:
    """The member the gateway uses to carry an upstream's error status is its own: an upstream
    that sends it does not pick the status (nor crash the answer with a non-integer)."""
    for value in ("teapot", 999, 302):
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": "@@ID@@", "result": {"content": []}}
        body["__bastion_http_status__"] = value
        check(running, Reply(body=encoded(body)))


def test_an_answer_over_16_mib_is_refused(running: Running) -> None:
    text = "x" * (17 * 1024 * 1024)
    first = check(running, Reply(body=encoded(result_body_dict(text))))
    assert first["error"]["data"]["code"] == "upstream.error"
    assert "over 16 MiB" in first["error"]["message"]


def result_body_dict(text: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": "@@ID@@",
        "result": {"content": [{"type": "text", "text": text}]},
    }


def test_a_response_to_another_call_on_the_stream_is_dropped(running: Running) -> None:
    stray = sse_event(b'{"jsonrpc":"2.0","id":424242,"result":{"stolen":true}}')
    mine = sse_event(encoded({"jsonrpc": "2.0", "id": "@@ID@@", "result": {"content": []}}))
    first = check(running, Reply(content_type="text/event-stream", body=stray + mine))
    assert first["result"] == {"content": []}


def test_an_answer_nested_too_deeply_to_encode(running: Running) -> None:
    first = check(running, Reply(body=deep(600)))
    assert first["error"]["data"]["code"] == "upstream.error"
    assert "nested too deeply" in first["error"]["message"]


def test_an_invalid_response_is_named(running: Running) -> None:
    both = {"jsonrpc": "2.0", "id": "@@ID@@", "result": {}, "error": {"code": 1, "message": "m"}}
    first = check(running, Reply(body=encoded(both)))
    assert "both result and error" in first["error"]["message"]
    odd_code = {"jsonrpc": "2.0", "id": "@@ID@@", "error": {"code": "E1", "message": "m"}}
    first = check(running, Reply(body=encoded(odd_code)))
    assert "error.code is a JSON string" in first["error"]["message"]


def test_a_disconnect_mid_answer(running: Running) -> None:
    body = encoded(result_body_dict("y" * 100_000))
    first = check(running, Reply(body=body, cut=50_000))
    assert first["error"]["data"]["code"] == "upstream.unavailable"


def test_a_merged_list_survives_any_page(running: Running) -> None:
    """A virtual server's list over an upstream whose tools/list page is odd: the client gets
    a list (naming the upstream when its page is unusable) and the connection serves on."""
    pages: list[tuple[Any, list[str], str | None]] = [
        ({"tools": "garbage"}, [], "without a tools array"),
        ({"tools": [1, None, {"name": 5}, {"name": "ok"}]}, ["odd__ok"], None),
        ("a string", [], "refused tools/list"),
        ({"tools": [{"name": "ok"}], "nextCursor": {"odd": [1, {"x": None}]}}, ["odd__ok"], None),
    ]
    error = {"code": -32000, "message": "down", "data": "the SDK's string"}
    for page, names, why in [*pages, (None, [], "refused tools/list: down")]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": "@@ID@@"}
        message.update({"error": error} if page is None else {"result": page})
        running.upstream.lists = Reply(body=encoded(message))
        running.sent += 1  # the tools/call behind the list
        try:
            listed = raw(running.port, "/v", "tools/list", {}, 1)
            call = raw(running.port, ROUTE, "tools/call", {"name": "ok", "arguments": {}}, 2)
            with socket.create_connection(("127.0.0.1", running.port), timeout=30) as sock:
                sock.sendall(listed + call)
                reader = _Kept(socket.SocketIO(sock, "rb"))
                status, ctype, body = read_response(reader)
                second = read_response(reader)
        finally:
            running.upstream.lists = None
        result = final_message(ctype, body)["result"]
        assert status == 200 and [t["name"] for t in result["tools"]] == names, result
        unavailable = result.get("_meta", {}).get("bastion/unavailable", [])
        if why is None:
            assert unavailable == []
        else:
            assert unavailable[0]["upstream"] == "odd" and why in unavailable[0]["reason"]
        assert second[0] == 200 and json.loads(second[2])["result"]["content"][0]["text"] == "ok"


def raw(port: int, path: str, method: str, params: dict[str, Any], id_: Any) -> bytes:
    """A raw 2026-07-28 request."""
    body = json.dumps(modern_body(method, params, id_)).encode()
    name = params.get("name")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        f"MCP-Protocol-Version: {MODERN}\r\nMcp-Method: {method}\r\n"
        + (f"Mcp-Name: {name}\r\n" if name else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_an_upstream_cannot_mint_metrics_labels(running: Running) -> None:
    """`error.data.code` is the upstream's to fill: used as a label, every new value would be a
    new time series kept forever. Only the gateway's own codes become labels."""
    for n in range(3):
        error = {"code": -32000, "message": "m", "data": {"code": f"minted-{n}-label"}}
        check(running, Reply(body=encoded({"jsonrpc": "2.0", "id": "@@ID@@", "error": error})))
    labels = set(calls_counted(running))
    assert not [label for label in labels if label.startswith("minted-")], labels
    assert "error" in labels
