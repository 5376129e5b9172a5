"""The Asana scenario through the real gateway: the quickstart with the workspace demo in leaky
mode (its search cache keyed without the tenant), OAuth tokens from the embedded authorization
server, the Python SDK as the client, both eras, the virtual server and the per-server route.

acme-reader searches; globex-reader runs the same search and the upstream answers with acme's
tasks. Bastion's inspection stage must contain it: globex gets an `inspection.foreign_tenant`
error and none of acme's data, the outcome record says `blocked` and names the foreign tenant,
an alert names the upstream as the suspect, and the agent that asked stays active.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from tests.conftest import (
    GatewayProcess,
    free_port,
    start_gateway,
    until,
    wait_lists_complete,
)
from tests.test_policy_gateway import Approver, modern_call, quickstart
from tests.test_policy_gateway import connect as policy_connect

STEP = 20.0
ROUTES = {"/mcp": "workspace__search_tasks", "/servers/workspace/mcp": "search_tasks"}
# One query per test case, each matching some of acme's task titles and none of globex's: the
# leaky cache then hands acme's hits to globex.
QUERIES = {
    ("legacy", "/mcp"): "homepage",
    ("2026-07-28", "/mcp"): "dns",
    ("legacy", "/servers/workspace/mcp"): "checkout",
    ("2026-07-28", "/servers/workspace/mcp"): "welcome",
}


def leaky_quickstart(tmp: Path, port: int, **inspect: Any) -> str:
    """The quickstart with the workspace demo started `--leaky`."""
    config = yaml.safe_load(quickstart(tmp, port))
    workspace = config["upstreams"]["workspace"]
    workspace["launch"] = [*workspace["launch"], "--leaky"]
    # The quickstart quarantines the workspace after three leaks; these tests leak more often
    # than that (the quarantine has its own test, which sets its own threshold).
    workspace["inspect"] = {**workspace.get("inspect", {}), "quarantine": {"after": None}}
    workspace["inspect"].update(inspect)
    # The cross-tenant detector suspends as it does by default: globex-reader receives acme's
    # objects four times here, and must stay active (the upstream is the suspect, not it).
    config.pop("audit", None)
    return yaml.safe_dump(config)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("leaky")
    port = free_port()
    gw = start_gateway(tmp, leaky_quickstart(tmp, port), port)
    try:
        wait_lists_complete(gw, ("/mcp",), {"Authorization": f"Bearer {gw.token('acme-admin')}"})
    except BaseException:
        gw.stop()
        raise
    yield gw
    gw.stop()


@asynccontextmanager
async def connect(gw: GatewayProcess, agent: str, mode: str, path: str) -> AsyncIterator[Client]:
    token = gw.token(agent, "--resource", path)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(STEP), headers=headers) as http:
        transport = streamable_http_client(gw.url(path), http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=STEP) as client:
            yield client


def records(gw: GatewayProcess) -> list[dict[str, Any]]:
    run = gw.cli("audit", "export")
    assert run.returncode == 0, run.stderr
    return [json.loads(line)["record"] for line in run.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_acme_tasks_do_not_reach_globex(leaky: GatewayProcess, mode: str, path: str) -> None:
    tool, query = ROUTES[path], QUERIES[(mode, path)]
    with anyio.fail_after(60):
        async with connect(leaky, "acme-reader", mode, path) as acme:
            mine = await acme.call_tool(tool, {"query": query})
        assert not mine.is_error
        assert mine.structured_content is not None
        leaked_ids = [t["id"] for t in mine.structured_content["tasks"]]
        assert leaked_ids and all(i.startswith("acme-t") for i in leaked_ids)

        async with connect(leaky, "globex-reader", mode, path) as globex:
            with pytest.raises(MCPError) as raised:
                await globex.call_tool(tool, {"query": query})
            # The agent is not the suspect: it goes on working.
            own = await globex.call_tool(tool, {"query": "osha"})
    error = raised.value.error
    assert error.data["code"] == "inspection.foreign_tenant"
    assert "another tenant's data" in error.message
    shown = json.dumps(error.model_dump())
    assert not any(i in shown for i in leaked_ids) and "acme" not in shown
    assert not own.is_error and own.structured_content is not None
    assert [t["id"] for t in own.structured_content["tasks"]] == ["globex-t1"]

    trail = until(lambda: _contained(leaky, tool), f"the blocked outcome of {tool}")
    outcome, alert = trail
    assert outcome["outcome"] == "blocked"
    assert outcome["detail"]["inspection"]["foreign_tenants"] == ["acme"]
    findings = outcome["detail"]["inspection"]["findings"]
    assert {f["rule"] for f in findings} == {"tenant"} and all(
        f["action"] == "block" for f in findings
    )
    assert all(f["digest"].startswith("sha256:") for f in findings)
    assert not any(i in json.dumps(outcome) for i in leaked_ids)
    assert alert["detail"]["upstream"] == "workspace"
    assert alert["detail"]["suspect"] == "upstream"
    assert alert["detail"]["suspended"] is False


def _contained(gw: GatewayProcess, tool: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    trail = records(gw)
    blocked = [
        r
        for r in trail
        if r["phase"] == "outcome"
        and r.get("agent") == "globex-reader"
        and r.get("tool_exposed") == tool
        and r.get("outcome") == "blocked"
    ]
    if not blocked:
        return None
    request = blocked[-1]["request_id"]
    alerts = [
        r
        for r in trail
        if r["phase"] == "alert"
        and r["request_id"] == request
        and r["detail"].get("rule") == "foreign_tenant_answer"
    ]
    return (blocked[-1], alerts[0]) if alerts else None


def test_the_globex_agent_is_not_suspended(leaky: GatewayProcess) -> None:
    run = leaky.cli("agents", "show", "globex-reader", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["status"] == "active"


# -- toxic flows ------------------------------------------------------------------------------


async def test_no_egress_after_untrusted_content_and_private_data(leaky: GatewayProcess) -> None:
    report = {"to": "boss@example.org", "body": "weekly"}
    with anyio.fail_after(60):
        async with policy_connect(leaky, "acme-admin", "legacy", Approver(approve=True)) as client:
            await client.call_tool("workspace__list_projects", {})  # private
            await client.call_tool("echo__echo", {"text": "hello"})  # untrusted
            with pytest.raises(MCPError) as raised:
                await client.call_tool("workspace__send_report", report)
        # Private data alone is not a toxic flow: the same report goes out (approved).
        async with policy_connect(leaky, "acme-admin", "legacy", Approver(approve=True)) as client:
            await client.call_tool("workspace__list_projects", {})
            sent = await client.call_tool("workspace__send_report", report)
    assert raised.value.error.data["code"] == "policy.denied"
    assert "untrusted content and private data" in raised.value.error.message
    assert "no-egress-after-untrusted-and-private" in raised.value.error.data["policies"]
    assert not sent.is_error


# -- quarantine -----------------------------------------------------------------------------


def test_an_upstream_that_keeps_leaking_is_quarantined_until_released(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("quarantine")
    port = free_port()
    gw = start_gateway(tmp, leaky_quickstart(tmp, port, quarantine={"after": 2}), port)
    try:
        for query in ("dns", "homepage"):
            mine = modern_call(gw, "acme-reader", "workspace__search_tasks", query=query)
            assert "result" in mine, mine
            leak = modern_call(gw, "globex-reader", "workspace__search_tasks", query=query)
            assert leak["error"]["data"]["code"] == "inspection.foreign_tenant", leak
        # Two leaks contained: the workspace is out of service, for acme too.
        refused = modern_call(gw, "acme-reader", "workspace__list_projects")
        assert refused["error"]["data"]["code"] == "upstream.quarantined", refused
        listed = gw.cli("quarantine", "list")
        assert listed.returncode == 0 and "workspace" in listed.stdout, listed
        released = gw.cli("quarantine", "release", "workspace")
        assert released.returncode == 0, released.stderr
        until(
            lambda: "result" in modern_call(gw, "acme-reader", "workspace__list_projects"),
            "the released workspace answering again",
        )
    finally:
        gw.stop()
