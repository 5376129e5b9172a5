"""The Streamable HTTP front, driven with raw HTTP against a real gateway process.

Each hostile request names the attack it stands for and asserts the precise refusal: HTTP
status, JSON-RPC code and a message naming what was wrong.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.conftest import (
    ACCEPT_BOTH,
    LEGACY,
    MODERN,
    GatewayProcess,
    legacy_session,
    modern_body,
    modern_headers,
)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=15.0) as client:
        yield client


def rpc_error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert "error" in body, body
    return dict(body["error"])


# -- health -----------------------------------------------------------------------------------


def test_health_and_readiness(gateway: GatewayProcess, http: httpx.Client) -> None:
    assert http.get(gateway.url("/healthz")).json() == {"status": "ok"}
    assert http.get(gateway.url("/readyz")).status_code == 200
    assert http.get(gateway.url("/nowhere")).status_code == 404


# -- DNS rebinding, media types, size --------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value"),
    [("Origin", "https://evil.example"), ("Host", "evil.example"), ("Host", "127.0.0.1.evil.io")],
)
def test_dns_rebinding_is_refused(
    gateway: GatewayProcess, http: httpx.Client, header: str, value: str
) -> None:
    headers = {**modern_headers("tools/list"), header: value}
    response = http.post(gateway.url(), json=modern_body("tools/list"), headers=headers)
    assert response.status_code == 403
    error = rpc_error(response)
    assert header in error["message"] and value in error["message"]


def test_loopback_origin_is_allowed(gateway: GatewayProcess, http: httpx.Client) -> None:
    headers = {**modern_headers("tools/list"), "Origin": f"http://localhost:{gateway.port}"}
    response = http.post(gateway.url(), json=modern_body("tools/list"), headers=headers)
    assert response.status_code == 200, response.text


def test_content_type_and_accept_are_checked(gateway: GatewayProcess, http: httpx.Client) -> None:
    body = json.dumps(modern_body("tools/list"))
    plain = {**modern_headers("tools/list"), "Content-Type": "text/plain"}
    response = http.post(gateway.url(), content=body, headers=plain)
    assert response.status_code == 415 and "Content-Type" in rpc_error(response)["message"]
    json_only = {**modern_headers("tools/list"), "Accept": "application/json"}
    response = http.post(gateway.url(), content=body, headers=json_only)
    assert response.status_code == 406 and "text/event-stream" in rpc_error(response)["message"]


def test_oversized_body_is_413(gateway: GatewayProcess, http: httpx.Client) -> None:
    params = {"name": "echo__echo", "arguments": {"text": "x" * 70_000}}
    response = http.post(
        gateway.url(),
        json=modern_body("tools/call", params),
        headers=modern_headers("tools/call", "echo__echo"),
    )
    assert response.status_code == 413
    assert "exceeds the limit of 65536" in rpc_error(response)["message"]


def test_oversized_chunked_body_is_413(gateway: GatewayProcess, http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"pad":"'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}}'

    response = http.post(gateway.url(), content=chunks(), headers=modern_headers("tools/list"))
    assert response.status_code == 413


# -- strict JSON-RPC -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "needle"),
    [
        (b"{not json", -32700, "not valid JSON"),
        (b'{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/list"}', -32700, "repeats a key"),
        (b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]', -32600, "batches"),
        (b'{"jsonrpc":"1.0","id":1,"method":"tools/list"}', -32600, '"jsonrpc": "2.0"'),
        (b'{"jsonrpc":"2.0","id":null,"method":"tools/list"}', -32600, "id must be"),
        (b'{"jsonrpc":"2.0","id":1,"method":7}', -32600, "method must be"),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}', -32600, "params must be"),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","extra":1}', -32600, "unexpected member"),
        (b'"just a string"', -32600, "expected a JSON-RPC object"),
    ],
)
def test_malformed_json_rpc(
    gateway: GatewayProcess, http: httpx.Client, raw: bytes, code: int, needle: str
) -> None:
    headers = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    response = http.post(gateway.url(), content=raw, headers=headers)
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["code"] == code
    assert needle in body["error"]["message"]
    if code == -32700 or b"[" == raw[:1] or b'"' == raw[:1]:
        assert body["id"] is None


def test_deeply_nested_body_is_refused(gateway: GatewayProcess, http: httpx.Client) -> None:
    nested = "[" * 200 + "]" * 200
    raw = f'{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{"x":{nested}}}}}'
    headers = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    response = http.post(gateway.url(), content=raw, headers=headers)
    assert response.status_code == 400
    assert "nests" in rpc_error(response)["message"]


def test_duplicate_key_smuggling_is_refused(gateway: GatewayProcess, http: httpx.Client) -> None:
    """A body whose `name` appears twice: a parser taking the first and one taking the last
    would disagree on which tool runs. Bastion refuses instead of picking one."""
    raw = (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo__echo",'
        '"name":"workspace__delete_project","arguments":{},"_meta":{'
        '"io.modelcontextprotocol/protocolVersion":"2026-07-28",'
        '"io.modelcontextprotocol/clientCapabilities":{}}}}'
    )
    headers = modern_headers("tools/call", "echo__echo")
    response = http.post(gateway.url(), content=raw, headers=headers)
    assert response.status_code == 400
    assert rpc_error(response)["code"] == -32700


# -- 2026-07-28: header/body agreement -------------------------------------------------------


def _call_body(name: str) -> dict[str, Any]:
    return modern_body("tools/call", {"name": name, "arguments": {"text": "hi"}})


@pytest.mark.parametrize(
    ("headers", "body", "needle"),
    [
        # The classic bypass: the header names a harmless tool, the body a destructive one.
        (
            modern_headers("tools/call", "echo__echo"),
            _call_body("workspace__delete_project"),
            "does not match body params.name",
        ),
        (modern_headers("tools/list"), _call_body("echo__echo"), "does not match body method"),
        (modern_headers("tools/call"), _call_body("echo__echo"), "Mcp-Name header is required"),
        (
            {
                k: v
                for k, v in modern_headers("tools/call", "echo__echo").items()
                if k != "Mcp-Method"
            },
            _call_body("echo__echo"),
            "Mcp-Method header is required",
        ),
        (
            modern_headers(
                "tools/call",
                "=?base64?" + base64.b64encode(b"workspace__delete_project").decode() + "?=",
            ),
            _call_body("echo__echo"),
            "does not match body params.name",
        ),
        (modern_headers("tools/call", "=?base64?!!!?="), _call_body("echo__echo"), "base64"),
        (
            {**modern_headers("tools/call", "echo__echo"), "Mcp-Param-Region": b"caf\xe9"},
            _call_body("echo__echo"),
            "characters not allowed",
        ),
    ],
)
def test_header_body_mismatch_is_refused(
    gateway: GatewayProcess, http: httpx.Client, headers: dict[str, str], body: Any, needle: str
) -> None:
    response = http.post(gateway.url(), json=body, headers=headers)
    assert response.status_code == 400, response.text
    error = rpc_error(response)
    assert error["code"] == -32020
    assert needle in error["message"]
    assert response.json()["id"] == 1


def test_base64_mcp_name_is_decoded_and_accepted(
    gateway: GatewayProcess, http: httpx.Client
) -> None:
    encoded = "=?base64?" + base64.b64encode(b"echo__echo").decode() + "?="
    response = http.post(
        gateway.url(), json=_call_body("echo__echo"), headers=modern_headers("tools/call", encoded)
    )
    assert response.status_code == 200, response.text
    assert response.json()["result"]["content"][0]["text"] == "hi"


def test_version_header_must_match_meta(gateway: GatewayProcess, http: httpx.Client) -> None:
    body = _call_body("echo__echo")
    body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = "2025-11-25"
    response = http.post(
        gateway.url(), json=body, headers=modern_headers("tools/call", "echo__echo")
    )
    assert response.status_code == 400
    assert rpc_error(response)["code"] == -32020


def test_missing_envelope_is_invalid_params(gateway: GatewayProcess, http: httpx.Client) -> None:
    body = _call_body("echo__echo")
    del body["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"]
    response = http.post(
        gateway.url(), json=body, headers=modern_headers("tools/call", "echo__echo")
    )
    assert response.status_code == 400
    assert rpc_error(response)["code"] == -32602


def test_unsupported_version_lists_supported(gateway: GatewayProcess, http: httpx.Client) -> None:
    headers = {**modern_headers("tools/list"), "MCP-Protocol-Version": "1999-01-01"}
    response = http.post(gateway.url(), json=modern_body("tools/list"), headers=headers)
    assert response.status_code == 400
    error = rpc_error(response)
    assert error["code"] == -32022
    assert MODERN in error["data"]["supported"] and error["data"]["requested"] == "1999-01-01"


def test_modern_unknown_method_is_404(gateway: GatewayProcess, http: httpx.Client) -> None:
    for method in ("tasks/launch_missiles", "initialize", "ping"):
        response = http.post(
            gateway.url(), json=modern_body(method), headers=modern_headers(method)
        )
        assert response.status_code == 404, method
        assert rpc_error(response)["code"] == -32601


def test_server_discover(gateway: GatewayProcess, http: httpx.Client) -> None:
    response = http.post(
        gateway.url(),
        json=modern_body("server/discover"),
        headers=modern_headers("server/discover"),
    )
    result = response.json()["result"]
    assert MODERN in result["supportedVersions"] and LEGACY in result["supportedVersions"]
    assert {"tools", "resources", "prompts"} <= set(result["capabilities"])
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "bastion"


def test_modern_get_and_session_header_ignored(gateway: GatewayProcess, http: httpx.Client) -> None:
    response = http.get(
        gateway.url(), headers={"MCP-Protocol-Version": MODERN, "Accept": ACCEPT_BOTH}
    )
    assert response.status_code == 405
    response = http.post(
        gateway.url(), json=modern_body("tools/list"), headers=modern_headers("tools/list")
    )
    assert "mcp-session-id" not in response.headers


# -- legacy sessions -------------------------------------------------------------------------


def test_request_without_session_is_400(gateway: GatewayProcess, http: httpx.Client) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    response = http.post(gateway.url(), json=body, headers=headers)
    assert response.status_code == 400
    assert "Mcp-Session-Id" in rpc_error(response)["message"]


def test_session_ids_are_random_and_long(gateway: GatewayProcess, http: httpx.Client) -> None:
    ids = {legacy_session(http, gateway.url())["Mcp-Session-Id"] for _ in range(3)}
    assert len(ids) == 3
    for session_id in ids:
        assert len(session_id) >= 32  # token_urlsafe(32): 256 bits
        assert all(0x21 <= ord(c) <= 0x7E for c in session_id)


def test_session_reused_after_delete_is_404(gateway: GatewayProcess, http: httpx.Client) -> None:
    session = legacy_session(http, gateway.url())
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    assert http.post(gateway.url(), json=body, headers=session).status_code == 200
    assert http.delete(gateway.url(), headers=session).status_code == 200
    for response in (
        http.post(gateway.url(), json=body, headers=session),
        http.get(gateway.url(), headers={**session, "Accept": "text/event-stream"}),
        http.delete(gateway.url(), headers=session),
    ):
        assert response.status_code == 404


def test_unknown_session_is_404(gateway: GatewayProcess, http: httpx.Client) -> None:
    headers = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH, "Mcp-Session-Id": "guess"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    assert http.post(gateway.url(), json=body, headers=headers).status_code == 404


def test_session_of_one_route_is_unknown_on_another(
    gateway: GatewayProcess, http: httpx.Client
) -> None:
    session = legacy_session(http, gateway.url())
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    response = http.post(gateway.url("/servers/echo/mcp"), json=body, headers=session)
    assert response.status_code == 404


def test_protocol_version_must_match_session(gateway: GatewayProcess, http: httpx.Client) -> None:
    session = legacy_session(http, gateway.url())
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {**session, "MCP-Protocol-Version": "2025-06-18"}
    response = http.post(gateway.url(), json=body, headers=headers)
    assert response.status_code == 400
    assert "differs from the session" in rpc_error(response)["message"]


def test_initialize_negotiates_a_supported_version(
    gateway: GatewayProcess, http: httpx.Client
) -> None:
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2099-01-01",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
    headers = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    response = http.post(gateway.url(), json=init, headers=headers)
    result = response.json()["result"]
    assert result["protocolVersion"] == LEGACY
    assert result["serverInfo"]["name"] == "bastion"
    assert result["capabilities"]["tools"]["listChanged"] is True


def read_events(
    url: str,
    headers: dict[str, str],
    count: int,
    on_open: Any = None,
    deadline_s: float = 10.0,
) -> list[tuple[str | None, dict[str, Any]]]:
    """Open a GET stream, return its first `count` data events (id, message), then hang up."""
    events: list[tuple[str | None, dict[str, Any]]] = []
    deadline = time.monotonic() + deadline_s
    with httpx.Client(timeout=5.0) as client, client.stream("GET", url, headers=headers) as resp:
        assert resp.status_code == 200, resp.read()
        event_id: str | None = None
        for line in resp.iter_lines():
            if time.monotonic() > deadline:
                break
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data:"):
                data = line[5:].strip()
                if not data:
                    if on_open is not None:
                        on_open()
                        on_open = None
                    continue
                events.append((event_id, json.loads(data)))
                if len(events) >= count:
                    break
    return events


def test_get_stream_and_resumption(gateway: GatewayProcess, http: httpx.Client) -> None:
    """The GET stream relays list changes; after a dropped connection, Last-Event-ID replays
    exactly what the client missed."""
    url = gateway.url("/servers/everything/mcp")
    session = legacy_session(http, url)
    sse_headers = {**session, "Accept": "text/event-stream"}
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "test_trigger_tool_change", "arguments": {}},
    }

    def trigger() -> None:
        assert http.post(url, json=call, headers=session).status_code == 200

    first = read_events(url, sse_headers, 1, on_open=trigger)
    assert first and first[0][1]["method"] == "notifications/tools/list_changed"
    first_id = first[0][0]
    assert first_id is not None
    trigger()  # while no client is connected: kept for replay
    trigger()
    resumed = read_events(url, {**sse_headers, "Last-Event-ID": first_id}, 2)
    assert [m["method"] for _, m in resumed] == ["notifications/tools/list_changed"] * 2
    stream, seq = first_id.rsplit("-", 1)
    assert [i for i, _ in resumed] == [f"{stream}-{int(seq) + 1}", f"{stream}-{int(seq) + 2}"]


def test_second_get_stream_is_409(gateway: GatewayProcess, http: httpx.Client) -> None:
    url = gateway.url("/servers/everything/mcp")
    session = legacy_session(http, url)
    sse_headers = {**session, "Accept": "text/event-stream"}
    result: dict[str, int] = {}

    def second() -> None:
        result["status"] = http.get(url, headers=sse_headers).status_code

    read_events(url, sse_headers, 0, on_open=second, deadline_s=3)
    assert result["status"] == 409


def test_get_needs_event_stream_accept(gateway: GatewayProcess, http: httpx.Client) -> None:
    session = legacy_session(http, gateway.url())
    response = http.get(gateway.url(), headers={**session, "Accept": "application/json"})
    assert response.status_code == 406


def test_unknown_last_event_id(gateway: GatewayProcess, http: httpx.Client) -> None:
    session = legacy_session(http, gateway.url())
    headers = {**session, "Accept": "text/event-stream", "Last-Event-ID": "999-1"}
    response = http.get(gateway.url(), headers=headers)
    assert response.status_code == 400
    assert "Last-Event-ID" in rpc_error(response)["message"]


# -- relay: pagination, cancellation, subscriptions ------------------------------------------


def test_merged_lists_page_through_every_upstream(
    gateway: GatewayProcess, http: httpx.Client
) -> None:
    names: list[str] = []
    cursor = None
    for _ in range(5):
        params = {"cursor": cursor} if cursor else {}
        response = http.post(
            gateway.url("/paged"),
            json=modern_body("tools/list", params),
            headers=modern_headers("tools/list"),
        )
        page = response.json()["result"]
        assert "_meta" not in page, f"the list lacks upstreams: {page['_meta']}"
        names += [t["name"] for t in page["tools"]]
        cursor = page.get("nextCursor")
        if cursor is None:
            break
    assert names == [
        "badhttp__hang",
        "badhttp__garbage",
        "badhttp__http500",
        "echo__echo",
        "badhttp__midstream",
        "badhttp__ok",
        "badhttp__cancellations",
        "badhttp__headers",
    ]
    bad = http.post(
        gateway.url("/paged"),
        json=modern_body("tools/list", {"cursor": "bm9wZQ"}),
        headers=modern_headers("tools/list"),
    )
    assert bad.json()["error"]["code"] == -32602 and "cursor" in bad.json()["error"]["message"]


def test_cancellation_reaches_the_upstream_under_its_id(
    gateway: GatewayProcess, http: httpx.Client
) -> None:
    url = gateway.url("/servers/badhttp/mcp")
    session = legacy_session(http, url)
    call = {
        "jsonrpc": "2.0",
        "id": "client-call-1",
        "method": "tools/call",
        "params": {"name": "hang", "arguments": {}},
    }
    done = threading.Event()

    def slow_call() -> None:
        with httpx.Client(timeout=20.0) as other:
            other.post(url, json=call, headers=session)
        done.set()

    worker = threading.Thread(target=slow_call)
    worker.start()
    cancel = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": "client-call-1", "reason": "user gave up"},
    }
    seen: list[Any] = []
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        assert http.post(url, json=cancel, headers=session).status_code == 202
        check = {
            "jsonrpc": "2.0",
            "id": 9,
            "method": "tools/call",
            "params": {"name": "cancellations", "arguments": {}},
        }
        text = http.post(url, json=check, headers=session).json()["result"]["content"][0]["text"]
        seen = json.loads(text)
        time.sleep(0.05)
    worker.join(20)
    assert seen, "the upstream never heard of the cancellation"
    assert all(isinstance(i, int) for i in seen)  # the gateway's id, not the client's string


def test_subscriptions_listen_fans_in(gateway: GatewayProcess, http: httpx.Client) -> None:
    """2026-07-28: one listen stream on the virtual server carries list changes from the
    upstream that made them, tagged with the client's subscription id."""
    body = modern_body(
        "subscriptions/listen", {"notifications": {"toolsListChanged": True}}, id_="sub-1"
    )
    trigger = modern_body(
        "tools/call", {"name": "everything__test_trigger_tool_change", "arguments": {}}, id_=2
    )
    got: list[dict[str, Any]] = []
    with (
        httpx.Client(timeout=10.0) as client,
        client.stream(
            "POST", gateway.url(), json=body, headers=modern_headers("subscriptions/listen")
        ) as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + 10
        for line in stream.iter_lines():
            if time.monotonic() > deadline:
                break
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            got.append(message)
            if message["method"] == "notifications/subscriptions/acknowledged":
                http.post(
                    gateway.url(),
                    json=trigger,
                    headers=modern_headers("tools/call", "everything__test_trigger_tool_change"),
                )
            if message["method"] == "notifications/tools/list_changed":
                break
    assert got[0]["method"] == "notifications/subscriptions/acknowledged"
    assert got[-1]["method"] == "notifications/tools/list_changed"
    assert got[-1]["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "sub-1"


def test_2025_06_18_session(gateway: GatewayProcess, http: httpx.Client) -> None:
    """The oldest revision Bastion speaks: a session, a call, no priming events."""
    session = legacy_session(http, gateway.url("/servers/everything/mcp"), version="2025-06-18")
    call = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "test_simple_text", "arguments": {}},
    }
    response = http.post(gateway.url("/servers/everything/mcp"), json=call, headers=session)
    assert response.status_code == 200
    text = response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        assert "data: \n" not in text  # priming events are a 2025-11-25 feature
        text = next(
            line[5:] for line in text.splitlines() if line.startswith("data:") and line[5:].strip()
        )
    assert json.loads(text)["result"]["content"][0]["type"] == "text"


def test_prometheus_metrics(gateway: GatewayProcess, http: httpx.Client) -> None:
    before = http.get(gateway.url("/metrics"))
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain; version=0.0.4")
    http.post(
        gateway.url("/servers/echo/mcp"),
        headers=modern_headers("tools/call", "echo"),
        json=modern_body("tools/call", {"name": "echo", "arguments": {"text": "m"}}),
    )
    http.post(
        gateway.url("/servers/badhttp/mcp"),
        headers=modern_headers("tools/call", "http500"),
        json=modern_body("tools/call", {"name": "http500", "arguments": {}}),
    )
    text = http.get(gateway.url("/metrics")).text
    assert (
        'bastion_requests_total{method="tools/call",outcome="ok",route="/servers/echo/mcp"}' in text
    )
    assert 'bastion_upstream_errors_total{code="upstream.error",upstream="badhttp"}' in text
    assert 'bastion_decisions_total{decision="allow",route="/servers/echo/mcp"}' in text
    assert (
        'bastion_request_seconds_bucket{le="0.005",route="/servers/echo/mcp",stage="total"}' in text
    )
    assert "bastion_audit_queue_depth" in text
