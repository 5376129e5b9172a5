"""Hypothesis against the HTTP front, in process: whatever arrives, the answer is a precise
4xx/2xx with a JSON-RPC body, never a 500, a traceback or a hang."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import ALLOW_ALL_YAML, MODERN, free_port

from bastion import config
from bastion.app import Gateway

ALLOWED = {200, 202, 400, 403, 404, 405, 406, 409, 413, 415}


@pytest.fixture(scope="module")
def front() -> Iterator[tuple[asyncio.AbstractEventLoop, Gateway]]:
    dead = free_port()  # nothing listens: forwarded calls fail fast with upstream.unavailable
    settings_ = config.parse(
        f"""
auth: {{mode: none}}
limits: {{max_body_bytes: 4096}}
{ALLOW_ALL_YAML}upstreams:
  up: {{transport: http, url: "http://127.0.0.1:{dead}/mcp", timeout_seconds: 1}}
virtual_servers:
  v: {{path: /mcp, upstreams: [up]}}
"""
    )
    loop = asyncio.new_event_loop()
    gateway = Gateway(settings_)
    loop.run_until_complete(gateway.start())
    yield loop, gateway
    loop.run_until_complete(gateway.stop())
    loop.close()


async def call(
    app: Gateway, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, bytes, dict[bytes, bytes]]:
    sent: list[dict[str, Any]] = []
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]
    queue = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("more_body"):
            raise OSError("test client hangs up after the first streamed chunk")

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": headers,
        "client": ("127.0.0.1", 5555),
        "query_string": b"",
    }
    async with asyncio.timeout(5):
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body_out, dict(start["headers"])


_header_names = st.sampled_from(
    [
        b"content-type",
        b"accept",
        b"mcp-protocol-version",
        b"mcp-method",
        b"mcp-name",
        b"mcp-session-id",
        b"origin",
        b"host",
        b"last-event-id",
        b"content-length",
        b"mcp-param-x",
    ]
)
_header_values = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/json, text/event-stream",
            b"text/event-stream",
            MODERN.encode(),
            b"2025-11-25",
            b"tools/call",
            b"tools/list",
            b"echo",
            b"=?base64?ZWNobw==?=",
            b"=?base64?%%?=",
            b"127.0.0.1",
            b"http://evil",
            b"0-1",
            b"99999999",
        ]
    ),
    st.binary(max_size=20).map(lambda b: bytes(c for c in b if c not in (10, 13))),
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def mcp_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return json.dumps(draw(_json_values)).encode()
    message: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0", "1.0", 2]))}
    if draw(st.booleans()):
        message["id"] = draw(st.one_of(st.integers(), st.text(max_size=4), st.none()))
    message["method"] = draw(
        st.sampled_from(
            [
                "initialize",
                "tools/list",
                "tools/call",
                "resources/read",
                "prompts/get",
                "ping",
                "server/discover",
                "notifications/initialized",
                "subscriptions/listen",
                "x/y",
            ]
        )
    )
    params = draw(
        st.dictionaries(
            st.sampled_from(["name", "uri", "cursor", "arguments"]), _json_values, max_size=3
        )
    )
    if draw(st.booleans()):
        params["_meta"] = {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    message["params"] = params
    raw = json.dumps(message).encode()
    if kind == 3:
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    method=st.sampled_from(["POST", "POST", "POST", "GET", "DELETE", "PUT"]),
    path=st.sampled_from(["/mcp", "/servers/up/mcp", "/mcp/", "/other"]),
    headers=st.lists(st.tuples(_header_names, _header_values), max_size=8),
    body=mcp_bodies(),
)
def test_front_never_fails_badly(
    front: tuple[asyncio.AbstractEventLoop, Gateway],
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    loop, gateway = front
    status, out, response_headers = loop.run_until_complete(
        call(gateway, method, path, headers, body)
    )
    assert status in ALLOWED, (status, out)
    if response_headers.get(b"content-type") == b"application/json" and out:
        parsed = json.loads(out)
        if "error" in parsed and isinstance(parsed["error"], dict):
            assert isinstance(parsed["error"]["code"], int)
            assert parsed["error"]["message"]
