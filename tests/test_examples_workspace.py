"""End-to-end tests of the demo upstream ``examples/workspace_server.py``.

The server runs as a real subprocess on a free loopback port and is driven with
the official SDK client (``mcp==2.3.0``) over Streamable HTTP in both protocol
eras -- a handshake-era session (``mode="legacy"``: initialize, Mcp-Session-Id)
and a stateless 2026-07-28 client (``mode="2026-07-28"``) -- plus over stdio.
A few raw-HTTP tests pin down wire behaviour a gateway has to reproduce.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "examples" / "workspace_server.py"
MODERN = "2026-07-28"
ERAS = ["legacy", MODERN]
STEP_TIMEOUT = 20.0  # seconds; bound on any single test body
START_DEADLINE = 30.0  # seconds for a subprocess to answer /healthz

# --------------------------------------------------------------------------- #
# Subprocess helpers
# --------------------------------------------------------------------------- #


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def stderr_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return bytes(self.log.read()).decode(errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(*extra: str) -> RunningServer:
    last_error: Exception | None = None
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = _free_port()
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--port", str(port), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={k: v for k, v in os.environ.items() if k != "WORKSPACE_TENANT"},
        )
        server = RunningServer(proc, port, log)
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0)
                if r.status_code == 200:
                    return server
            except httpx.HTTPError as exc:
                last_error = exc
            time.sleep(0.05)
        _stop(server)
        last_error = RuntimeError(f"server did not come up: {server.stderr_text()}")
    raise RuntimeError(f"could not start {SERVER.name}: {last_error}")


def _stop(server: RunningServer) -> int | None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=5)
    server.log.close()
    return server.proc.returncode


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    s = _start()
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def leaky_server() -> Iterator[RunningServer]:
    s = _start("--leaky")
    yield s
    _stop(s)


@pytest.fixture(params=ERAS)
def era(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --------------------------------------------------------------------------- #
# Client helpers
# --------------------------------------------------------------------------- #


@asynccontextmanager
async def connect(url: str, tenant: str | None, mode: str) -> AsyncIterator[Client]:
    """An SDK client for `url` whose every HTTP request carries X-Bastion-Tenant (if given)."""
    headers = {"X-Bastion-Tenant": tenant} if tenant else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(10.0)) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=10.0) as client:
            yield client


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    """Call a tool that must succeed; return its structured content."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} failed: {result.content}"
    return result.structured_content


async def call_error(client: Client, tool: str, **arguments: Any) -> str:
    """Call a tool that must fail with a tool error (isError); return its text."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, f"{tool} unexpectedly succeeded: {result.structured_content}"
    return " ".join(getattr(c, "text", "") for c in result.content)


def _ids(items: list[dict[str, Any]]) -> set[str]:
    return {item["id"] for item in items}


# --------------------------------------------------------------------------- #
# Tests over Streamable HTTP, both eras
# --------------------------------------------------------------------------- #

EXPECTED_ANNOTATIONS = {
    # name: (readOnly, destructive, idempotent, openWorld)
    "list_projects": (True, False, True, False),
    "search_tasks": (True, False, True, False),
    "get_task": (True, False, True, False),
    "create_task": (False, False, False, False),
    "update_task": (False, False, True, False),
    "delete_project": (False, True, True, False),
    "send_report": (False, False, False, True),
}


async def test_negotiated_era(server: RunningServer, era: str) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        async with connect(server.url, "acme", era) as client:
            expected = "2025-11-25" if era == "legacy" else MODERN
            assert client.protocol_version == expected
        async with connect(server.url, "acme", "auto") as client:
            assert client.protocol_version == MODERN  # auto probes server/discover first


async def test_list_tools_and_annotations(server: RunningServer, era: str) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        async with connect(server.url, "acme", era) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == set(EXPECTED_ANNOTATIONS)
    for name, (ro, destructive, idempotent, open_world) in EXPECTED_ANNOTATIONS.items():
        tool = tools[name]
        assert tool.title and tool.description, name
        ann = tool.annotations
        assert ann is not None, name
        assert (
            ann.read_only_hint,
            ann.destructive_hint,
            ann.idempotent_hint,
            ann.open_world_hint,
        ) == (
            ro,
            destructive,
            idempotent,
            open_world,
        ), name
    status_schema = tools["update_task"].input_schema["properties"]["status"]
    assert set(status_schema["enum"]) == {"todo", "in_progress", "done"}


async def test_read_tools(server: RunningServer, era: str) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        async with connect(server.url, "acme", era) as client:
            projects = (await call(client, "list_projects"))["projects"]
            assert {"acme-p1", "acme-p2"} <= _ids(projects)
            assert all(p["id"].startswith("acme-") for p in projects)

            found = (await call(client, "search_tasks", query="homepage"))["tasks"]
            assert _ids(found) == {"acme-t1"}
            everything = (await call(client, "search_tasks", query=""))["tasks"]
            assert everything and all(t["id"].startswith("acme-t") for t in everything)

            task = await call(client, "get_task", task_id="acme-t1")
            assert task["title"] == "Draft new homepage copy"
            assert task["project_id"] == "acme-p1"
            assert task["status"] in {"todo", "in_progress", "done"}

        async with connect(server.url, "globex", era) as client:
            projects = (await call(client, "list_projects"))["projects"]
            assert all(p["id"].startswith("globex-") for p in projects)
            task = await call(client, "get_task", task_id="globex-t3")
            assert task["title"] == "Q3 merger plan — confidential"


async def test_create_and_update_task(server: RunningServer, era: str) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        async with connect(server.url, "acme", era) as client:
            created = await call(
                client, "create_task", project_id="acme-p2", title=f"Follow-up ({era})"
            )
            assert created["id"].startswith("acme-t")
            assert created["project_id"] == "acme-p2"
            assert created["status"] == "todo"

            fetched = await call(client, "get_task", task_id=created["id"])
            assert fetched["title"] == f"Follow-up ({era})"
            # New tasks are searchable (writes invalidate the search cache).
            hits = (await call(client, "search_tasks", query=f"follow-up ({era})"))["tasks"]
            assert _ids(hits) == {created["id"]}

            updated = await call(client, "update_task", task_id=created["id"], status="done")
            assert updated["status"] == "done"
            assert (await call(client, "get_task", task_id=created["id"]))["status"] == "done"

            # Invalid input is a tool error, not a crash.
            await call_error(client, "update_task", task_id=created["id"], status="archived")
            assert "not found" in await call_error(
                client, "create_task", project_id="acme-p9", title="x"
            )


async def test_acme_cannot_touch_globex(server: RunningServer, era: str) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        async with connect(server.url, "acme", era) as client:
            for task_id in ("globex-t3", "globex-t4"):
                assert "not found" in await call_error(client, "get_task", task_id=task_id)
            assert "not found" in await call_error(
                client, "update_task", task_id="globex-t3", status="done"
            )
            assert "not found" in await call_error(
                client, "create_task", project_id="globex-p1", title="pwned"
            )
            assert "not found" in await call_error(client, "delete_project", project_id="globex-p1")
            hits = (await call(client, "search_tasks", query="merger"))["tasks"]
            assert hits == []
            with pytest.raises(MCPError):
                await client.read_resource("workspace://globex/projects/globex-p1")
            with pytest.raises(MCPError):
                await client.get_prompt("summarize_project", {"project_id": "globex-p1"})

        async with connect(server.url, "globex", era) as client:
            task = await call(client, "get_task", task_id="globex-t3")
            assert task["status"] == "in_progress"  # the failed acme update changed nothing
            projects = _ids((await call(client, "list_projects"))["projects"])
            assert "globex-p1" in projects


async def test_request_without_tenant_is_a_tool_error(server: RunningServer, era: str) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        async with connect(server.url, None, era) as client:
            for tool, args in (("list_projects", {}), ("get_task", {"task_id": "acme-t1"})):
                text = await call_error(client, tool, **args)
                assert "no tenant in the credential" in text
            # The server is still fine afterwards.
            assert len((await client.list_tools()).tools) == len(EXPECTED_ANNOTATIONS)


async def test_resources_and_prompt(server: RunningServer, era: str) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        async with connect(server.url, "acme", era) as client:
            resources = (await client.list_resources()).resources
            assert [r.uri for r in resources] == ["workspace://about"]
            templates = (await client.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == [
                "workspace://{tenant}/projects/{project_id}"
            ]

            read = await client.read_resource("workspace://acme/projects/acme-p1")
            body = json.loads(read.contents[0].text)  # type: ignore[union-attr]
            assert body["id"] == "acme-p1"
            assert body["tasks"] and all(t["id"].startswith("acme-t") for t in body["tasks"])

            prompts = (await client.list_prompts()).prompts
            assert [p.name for p in prompts] == ["summarize_project"]
            prompt = await client.get_prompt("summarize_project", {"project_id": "acme-p1"})
            text = prompt.messages[0].content.text  # type: ignore[union-attr]
            assert "Website relaunch" in text and "acme-t1" in text


# --------------------------------------------------------------------------- #
# The Asana bug class: --leaky serves globex's cached search to acme
# --------------------------------------------------------------------------- #


async def _merger_search(url: str, era: str) -> tuple[set[str], set[str]]:
    async with connect(url, "globex", era) as globex:
        globex_hits = _ids((await call(globex, "search_tasks", query="merger"))["tasks"])
    async with connect(url, "acme", era) as acme:
        acme_hits = _ids((await call(acme, "search_tasks", query="Merger"))["tasks"])
    return globex_hits, acme_hits


async def test_no_cross_tenant_leak_without_leaky(server: RunningServer, era: str) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        globex_hits, acme_hits = await _merger_search(server.url, era)
    assert globex_hits == {"globex-t3"}
    assert acme_hits == set()


async def test_cross_tenant_leak_with_leaky(leaky_server: RunningServer, era: str) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        globex_hits, acme_hits = await _merger_search(leaky_server.url, era)
        async with connect(leaky_server.url, "acme", era) as acme:
            leaked = (await call(acme, "search_tasks", query="merger"))["tasks"]
            # Direct access is still denied: only the shared cache leaks.
            assert "not found" in await call_error(acme, "get_task", task_id="globex-t3")
    assert globex_hits == {"globex-t3"}
    assert acme_hits == {"globex-t3"}  # acme sees globex's confidential task
    assert leaked[0]["title"] == "Q3 merger plan — confidential"


# --------------------------------------------------------------------------- #
# Destructive and egress tools (state-changing: run once, on globex-p2 only)
# --------------------------------------------------------------------------- #


async def test_delete_project_and_send_report(server: RunningServer) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        async with connect(server.url, "globex", MODERN) as client:
            deleted = await call(client, "delete_project", project_id="globex-p2")
            assert deleted["deleted_project"] == "globex-p2"
            assert set(deleted["deleted_tasks"]) == {"globex-t1", "globex-t2"}
            assert "not found" in await call_error(client, "get_task", task_id="globex-t1")
            assert "globex-p2" not in _ids((await call(client, "list_projects"))["projects"])
            assert "not found" in await call_error(client, "delete_project", project_id="globex-p2")

        async with connect(server.url, "globex", "legacy") as client:
            report = await call(client, "send_report", to="investor@example.com", body="Q3 status")
            assert report["queued"] is True
            assert report["report_id"].startswith("globex-r")


# --------------------------------------------------------------------------- #
# Raw wire behaviour a gateway must reproduce
# --------------------------------------------------------------------------- #


def _sse_or_json(response: httpx.Response) -> dict[str, Any]:
    if response.headers["content-type"].startswith("application/json"):
        return dict(response.json())
    for line in response.text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            message = json.loads(line[5:])
            if "id" in message:
                return dict(message)
    raise AssertionError(f"no JSON-RPC response in {response.text!r}")


async def test_raw_handshake_2025_06_18(server: RunningServer) -> None:
    accept = {"Accept": "application/json, text/event-stream", "X-Bastion-Tenant": "acme"}
    async with httpx.AsyncClient(timeout=10.0, headers=accept) as http:
        init = await http.post(
            server.url,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"},
                },
            },
        )
        assert init.status_code == 200
        assert _sse_or_json(init)["result"]["protocolVersion"] == "2025-06-18"
        session = {
            "Mcp-Session-Id": init.headers["mcp-session-id"],
            "MCP-Protocol-Version": "2025-06-18",
        }
        note = await http.post(
            server.url,
            headers=session,
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
        )
        assert note.status_code == 202
        call_resp = await http.post(
            server.url,
            headers=session,
            json={
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "get_task", "arguments": {"task_id": "acme-t2"}},
            },
        )
        result = _sse_or_json(call_resp)["result"]
        assert result["isError"] is False
        assert result["structuredContent"]["id"] == "acme-t2"
        assert (await http.delete(server.url, headers=session)).status_code == 200


async def test_raw_modern_request_needs_routing_headers(server: RunningServer) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "get_task",
            "arguments": {"task_id": "acme-t1"},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }
    base = {
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": "tools/call",
        "X-Bastion-Tenant": "acme",
    }
    async with httpx.AsyncClient(timeout=10.0) as http:
        missing_name = await http.post(server.url, headers=base, json=body)
        assert missing_name.status_code == 400
        assert missing_name.json()["error"]["code"] == -32020  # HEADER_MISMATCH

        ok = await http.post(server.url, headers={**base, "Mcp-Name": "get_task"}, json=body)
        assert ok.status_code == 200
        assert ok.headers["content-type"].startswith("application/json")
        assert "mcp-session-id" not in ok.headers
        assert ok.json()["result"]["structuredContent"]["id"] == "acme-t1"

        # DNS-rebinding protection (SDK default for a loopback bind): Host must be a
        # loopback name *with* a port, Origin (if any) a loopback origin.
        foreign_host = await http.post(
            server.url,
            headers={**base, "Mcp-Name": "get_task", "Host": "bastion.example"},
            json=body,
        )
        assert foreign_host.status_code == 421
        foreign_origin = await http.post(
            server.url,
            headers={**base, "Mcp-Name": "get_task", "Origin": "https://evil.example"},
            json=body,
        )
        assert foreign_origin.status_code == 403


# --------------------------------------------------------------------------- #
# stdio and shutdown
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("mode", ERAS)
async def test_stdio_with_env_tenant(mode: str) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=[str(SERVER), "--transport", "stdio"],
        env={"WORKSPACE_TENANT": "globex"},
        cwd=str(ROOT),
    )
    with anyio.fail_after(STEP_TIMEOUT):
        async with Client(params, mode=mode, read_timeout_seconds=10.0) as client:
            assert len((await client.list_tools()).tools) == len(EXPECTED_ANNOTATIONS)
            hits = (await call(client, "search_tasks", query="merger"))["tasks"]
            assert _ids(hits) == {"globex-t3"}
            assert "not found" in await call_error(client, "get_task", task_id="acme-t1")


async def test_sigterm_with_open_session_exits_cleanly() -> None:
    s = _start()
    try:
        with anyio.fail_after(STEP_TIMEOUT):
            stack = AsyncExitStack()
            client = await stack.enter_async_context(connect(s.url, "acme", "legacy"))
            await call(client, "list_projects")  # a live session (with its GET stream) is open
            s.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            while s.proc.poll() is None and time.monotonic() < deadline:
                await anyio.sleep(0.05)
            returncode = s.proc.poll()
            try:
                await stack.aclose()
            except Exception:  # noqa: S110 - the client's goodbye to a stopped server may fail
                pass
        assert returncode == 0, s.stderr_text()
    finally:
        _stop(s)
