"""Broken upstreams: each failure reaches the client as a clear JSON-RPC error, never a hang,
a 500 or a traceback; a crashed stdio server is restarted with backoff."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import GatewayProcess, legacy_session, modern_body, modern_headers


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=20.0) as client:
        yield client


def call_modern(
    http: httpx.Client, gateway: GatewayProcess, server: str, tool: str
) -> httpx.Response:
    return http.post(
        gateway.url(f"/servers/{server}/mcp"),
        json=modern_body("tools/call", {"name": tool, "arguments": {}}),
        headers=modern_headers("tools/call", tool),
    )


def call_legacy(
    http: httpx.Client, gateway: GatewayProcess, server: str, tool: str, progress: bool = False
) -> dict[str, Any]:
    url = gateway.url(f"/servers/{server}/mcp")
    session = legacy_session(http, url)
    params: dict[str, Any] = {"name": tool, "arguments": {}}
    if progress:
        params["_meta"] = {"progressToken": "p1"}
    response = http.post(
        url,
        json={"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params},
        headers=session,
    )
    assert response.status_code == 200
    if response.headers["content-type"].startswith("text/event-stream"):
        import json

        messages = [
            json.loads(line[5:])
            for line in response.text.splitlines()
            if line.startswith("data:") and line[5:].strip()
        ]
        return messages[-1]
    return dict(response.json())


@pytest.mark.parametrize(
    ("tool", "needle"),
    [
        ("hang", "did not answer within 2 s"),
        ("garbage", "sent invalid JSON"),
        ("http500", "answered HTTP 500"),
    ],
)
def test_broken_http_upstream(
    gateway: GatewayProcess, http: httpx.Client, tool: str, needle: str
) -> None:
    started = time.monotonic()
    response = call_modern(http, gateway, "badhttp", tool)
    assert response.status_code == 200
    error = response.json()["error"]
    assert error["code"] == -32603
    assert needle in error["message"] and "badhttp" in error["message"]
    assert error["data"]["code"].startswith("upstream.")
    assert response.json()["id"] == 1
    assert time.monotonic() - started < 10


def test_upstream_dying_mid_stream(gateway: GatewayProcess, http: httpx.Client) -> None:
    """The upstream sends a progress notification, then drops the connection: the client
    gets the progress it was sent and then an error response for its request."""
    last = call_legacy(http, gateway, "badhttp", "midstream", progress=True)
    assert last["id"] == 7
    assert last["error"]["code"] == -32603
    assert "badhttp" in last["error"]["message"]


def test_healthy_call_after_failures(gateway: GatewayProcess, http: httpx.Client) -> None:
    response = call_modern(http, gateway, "badhttp", "ok")
    assert response.json()["result"]["content"][0]["text"] == "ok"


def test_stdio_upstream_gets_only_allowed_environment(
    gateway: GatewayProcess, http: httpx.Client
) -> None:
    last = call_legacy(http, gateway, "badstdio", "whoami")
    assert last["result"]["content"][0]["text"] == "acme"  # {tenant} filled per process


def test_stdio_environment_is_allow_listed_and_stderr_logged(
    gateway: GatewayProcess, http: httpx.Client
) -> None:
    import json

    names = json.loads(
        call_legacy(http, gateway, "badstdio", "env")["result"]["content"][0]["text"]
    )
    assert "GATEWAY_ONLY_SECRET" not in names
    assert {"BAD_TENANT", "BAD_STARTS"} <= set(names)
    assert set(names) <= {
        "BAD_TENANT",
        "BAD_STARTS",
        "PATH",
        "HOME",
        "LANG",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "LC_CTYPE",
    }
    assert "[badstdio] bad-stdio started for tenant acme" in gateway.log()


def test_stdio_crash_then_restart(gateway: GatewayProcess, http: httpx.Client) -> None:
    starts = Path(gateway.config_path).parent / "bad-stdio-starts"
    call_legacy(http, gateway, "badstdio", "echo")
    before = starts.read_text().count("start")
    crashed = call_legacy(http, gateway, "badstdio", "crash")
    assert "exited with code 3" in crashed["error"]["message"]
    deadline = time.monotonic() + 10
    while True:
        answer = call_legacy(http, gateway, "badstdio", "echo")
        if "result" in answer or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert answer["result"]["content"][0]["text"] == "echo"
    assert starts.read_text().count("start") == before + 1


@pytest.mark.parametrize(
    ("tool", "needle"), [("garbage", "sent invalid JSON"), ("hang", "sent nothing for 2 s")]
)
def test_broken_stdio_upstream(
    gateway: GatewayProcess, http: httpx.Client, tool: str, needle: str
) -> None:
    started = time.monotonic()
    answer = call_legacy(http, gateway, "badstdio", tool)
    assert needle in answer["error"]["message"]
    assert time.monotonic() - started < 10


def test_unreachable_upstream(tmp_path: Path, http: httpx.Client) -> None:
    from tests.conftest import ALLOW_ALL_YAML, free_port, start_gateway

    port, dead = free_port(), free_port()
    config = f"""
listen: {{host: 127.0.0.1, port: {port}}}
auth: {{mode: none}}
{ALLOW_ALL_YAML}upstreams:
  gone: {{transport: http, url: "http://127.0.0.1:{dead}/mcp", timeout_seconds: 2}}
"""
    gw = start_gateway(tmp_path, config)
    try:
        response = call_modern(http, gw, "gone", "anything")
        error = response.json()["error"]
        assert error["data"]["code"] == "upstream.unavailable"
        assert "'gone' is unreachable" in error["message"]
        init = http.post(
            gw.url("/servers/gone/mcp"),
            json={
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "0"},
                },
            },
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
            },
        )
        assert init.status_code == 200 and init.json()["error"]["code"] == -32603
        assert "mcp-session-id" not in init.headers
    finally:
        gw.stop()
