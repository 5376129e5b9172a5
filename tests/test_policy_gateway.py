"""Policy through the real gateway: the quickstart's config and policy, OAuth tokens from the
embedded authorization server, the demo workspace server behind it, real MCP clients.

- an agent of acme reaching into globex's workspace is denied, with a reason;
- a read-only agent deleting a project is denied; the admin may;
- the egress tool (`send_report`) needs an approval, asked of the client through elicitation in both
  eras, and refused when the client cannot elicit; the approval is in the audit trail;
- lists show each agent only what it may use;
- a broken policy edit keeps the last good policy; a broken policy at start refuses the start.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
import yaml
from mcp import Client, MCPError, types
from mcp.client.streamable_http import streamable_http_client
from tests.conftest import (
    EXAMPLES,
    GatewayProcess,
    free_port,
    modern_body,
    modern_headers,
    start_gateway,
    wait_lists_complete,
)

BASTION = [sys.executable, "-m", "bastion.cli"]
STEP = 20.0


def quickstart(tmp: Path, port: int) -> str:
    """The quickstart config on free ports, its state and policy files under `tmp`."""
    config = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    wp = free_port()
    config["listen"]["port"] = port
    config["state_dir"] = str(tmp / "state")
    workspace = config["upstreams"]["workspace"]
    workspace["url"] = f"http://127.0.0.1:{wp}/mcp"
    workspace["launch"] = [str(a).replace("9101", str(wp)) for a in workspace["launch"]]
    workspace["cwd"] = str(EXAMPLES)
    config["upstreams"]["echo"]["cwd"] = str(EXAMPLES)
    shutil.copytree(EXAMPLES / "policies", tmp / "policies")
    config["policy"]["files"] = [str(tmp / "policies" / "workspace.cedar")]
    config["policy"]["reload_seconds"] = 0.2
    config["policy"]["approval_timeout_seconds"] = 10
    for grant in config["policy"]["grants"]:  # elicitation; a person's: test_human_approval
        if grant["id"] == "acme-admin-report":
            grant["approval"] = "client"
    for grant in config["policy"]["grants"]:
        if grant.get("rate"):  # these tests send many reports; test_policy covers the limit
            grant["rate"] = "100/minute"
    # These tests attack across tenants again and again with the same agents; the suspension
    # that follows repeated attempts is tested in test_audit_alerts.
    config["audit"] = {"alerts": {"cross_tenant": {"suspend": False}}}
    return yaml.safe_dump(config)


@pytest.fixture(scope="module")
def qs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("quickstart")
    port = free_port()
    gw = start_gateway(tmp, quickstart(tmp, port), port)
    try:  # the lists these tests compare need every upstream started (cold on a busy machine)
        wait_lists_complete(gw, ("/mcp",), {"Authorization": f"Bearer {gw.token('acme-admin')}"})
    except BaseException:
        gw.stop()
        raise
    yield gw
    gw.stop()


def modern_call(gw: GatewayProcess, agent: str, tool: str, **arguments: Any) -> dict[str, Any]:
    headers = {**modern_headers("tools/call", tool), "Authorization": f"Bearer {gw.token(agent)}"}
    body = modern_body("tools/call", {"name": tool, "arguments": arguments})
    response = httpx.post(gw.url("/mcp"), headers=headers, json=body, timeout=STEP)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


class Approver:
    """The human at the client: approves or declines, and remembers what was asked."""

    def __init__(self, approve: bool) -> None:
        self.approve = approve
        self.asked: list[str] = []

    async def elicit(self, context: Any, params: types.ElicitRequestParams) -> Any:
        self.asked.append(params.message)
        return types.ElicitResult(action="accept", content={"approve": self.approve})


@asynccontextmanager
async def connect(
    gw: GatewayProcess, agent: str, mode: str, approver: Approver | None = None
) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {gw.token(agent)}"}
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(STEP), headers=headers) as http:
        transport = streamable_http_client(gw.url("/mcp"), http_client=http)
        kwargs: dict[str, Any] = {"mode": mode, "read_timeout_seconds": STEP}
        if approver is not None:
            kwargs["elicitation_callback"] = approver.elicit
        async with Client(transport, **kwargs) as client:
            yield client


def text_of(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


# -- tenant binding and read-only agents ----------------------------------------------------


def test_acme_agent_reaching_into_globex_is_denied_with_a_reason(qs: GatewayProcess) -> None:
    error = modern_call(qs, "acme-reader", "workspace__get_task", task_id="globex-t1")["error"]
    assert error["data"]["code"] == "policy.denied"
    assert "another tenant's project, task or resource" in error["message"]
    assert "tenant-binding" in error["data"]["policies"]
    # Its own task is fine: the denial above is the binding, not a blanket refusal.
    ok = modern_call(qs, "acme-reader", "workspace__get_task", task_id="acme-t1")
    assert "result" in ok and ok["result"].get("isError") is not True


def test_reading_another_tenants_resource_is_denied(qs: GatewayProcess) -> None:
    headers = {
        **modern_headers("resources/read", "workspace://globex/projects/globex-p1"),
        "Authorization": f"Bearer {qs.token('acme-reader')}",
    }
    body = modern_body("resources/read", {"uri": "workspace://globex/projects/globex-p1"})
    error = httpx.post(qs.url("/mcp"), headers=headers, json=body, timeout=STEP).json()["error"]
    assert error["data"]["code"] == "policy.denied"
    assert "another tenant's" in error["message"]


def test_read_only_agent_cannot_delete_but_the_admin_can(qs: GatewayProcess) -> None:
    denied = modern_call(qs, "acme-reader", "workspace__delete_project", project_id="acme-p2")
    assert denied["error"]["data"]["code"] == "policy.denied"
    assert "default deny" in denied["error"]["message"]
    done = modern_call(qs, "acme-admin", "workspace__delete_project", project_id="acme-p2")
    assert done["result"]["structuredContent"]["deleted_project"] == "acme-p2"


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_lists_show_only_what_each_agent_may_use(qs: GatewayProcess, mode: str) -> None:
    with anyio.fail_after(60):
        async with connect(qs, "acme-reader", mode) as client:
            reader = {t.name for t in (await client.list_tools()).tools}
            # The hidden tool called by name anyway is denied like any other.
            with pytest.raises(MCPError) as raised:
                await client.call_tool("workspace__delete_project", {"project_id": "acme-p1"})
            assert "default deny" in str(raised.value)
        async with connect(qs, "acme-admin", mode) as client:
            admin = {t.name for t in (await client.list_tools()).tools}
    assert reader == {
        "workspace__list_projects",
        "workspace__search_tasks",
        "workspace__get_task",
        "echo__echo",
    }
    assert admin == reader | {
        "workspace__create_task",
        "workspace__update_task",
        "workspace__delete_project",
        "workspace__send_report",
    }


# -- approval -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_send_report_needs_approval(qs: GatewayProcess, mode: str) -> None:
    report = {"to": "boss@example.org", "body": f"weekly ({mode})"}
    with anyio.fail_after(60):
        yes = Approver(approve=True)
        async with connect(qs, "acme-admin", mode, yes) as client:
            await client.call_tool("workspace__list_projects", {})  # the history the policy wants
            result = await client.call_tool("workspace__send_report", report)
            assert not result.is_error, text_of(result)
            assert result.structured_content is not None
            assert result.structured_content["queued"] is True
        assert len(yes.asked) == 1
        assert "workspace__send_report" in yes.asked[0] and "boss@example.org" in yes.asked[0]

        no = Approver(approve=False)
        async with connect(qs, "acme-admin", mode, no) as client:
            await client.call_tool("workspace__search_tasks", {"query": "x"})
            with pytest.raises(MCPError) as raised:
                await client.call_tool("workspace__send_report", report)
        assert "approval required by policy grant:acme-admin-report was not given" in str(
            raised.value
        )
        assert "the user did not approve" in str(raised.value)
        assert len(no.asked) == 1

        async with connect(qs, "acme-admin", mode) as client:  # no elicitation capability
            await client.call_tool("workspace__search_tasks", {"query": "x"})
            with pytest.raises(MCPError) as raised:
                await client.call_tool("workspace__send_report", report)
        assert "cannot answer elicitation requests" in str(raised.value)


def test_approval_state_cannot_be_forged_or_replayed(qs: GatewayProcess) -> None:
    bearer = qs.token("acme-admin")
    headers = {
        **modern_headers("tools/call", "workspace__send_report"),
        "Authorization": f"Bearer {bearer}",
    }

    def post(params: dict[str, Any]) -> dict[str, Any]:
        body = modern_body("tools/call", params)
        body["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] = {
            "elicitation": {"form": {}}
        }
        return httpx.post(qs.url("/mcp"), headers=headers, json=body, timeout=STEP).json()

    # The session-less history comes from earlier calls of the same principal.
    search = {
        **modern_headers("tools/call", "workspace__search_tasks"),
        "Authorization": f"Bearer {bearer}",
    }
    httpx.post(
        qs.url("/mcp"),
        headers=search,
        json=modern_body(
            "tools/call", {"name": "workspace__search_tasks", "arguments": {"query": "x"}}
        ),
        timeout=STEP,
    )
    call = {"name": "workspace__send_report", "arguments": {"to": "a@example.org", "body": "b"}}
    first = post(call)["result"]
    assert first["resultType"] == "input_required"
    ask = first["inputRequests"]["bastion.approval"]
    assert ask["method"] == "elicitation/create"
    state = first["requestState"]
    yes = {"bastion.approval": {"action": "accept", "content": {"approve": True}}}

    tampered = state[:-4] + ("0000" if not state.endswith("0000") else "1111")
    refused = post({**call, "inputResponses": yes, "requestState": tampered})["error"]
    assert "altered" in refused["message"]

    other_call = {**call, "arguments": {"to": "evil@example.org", "body": "b"}}
    refused = post({**other_call, "inputResponses": yes, "requestState": state})["error"]
    assert "another call" in refused["message"]

    done = post({**call, "inputResponses": yes, "requestState": state})["result"]
    assert done["structuredContent"]["queued"] is True

    replay = post({**call, "inputResponses": yes, "requestState": state})["error"]
    assert "already used" in replay["message"]


def test_approval_is_in_the_audit_trail(qs: GatewayProcess) -> None:
    run = subprocess.run(
        [*BASTION, "audit", "export", "--config", str(qs.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    records = [json.loads(line)["record"] for line in run.stdout.splitlines() if line.strip()]
    approved = [
        r
        for r in records
        if r.get("phase") == "outcome"
        and (r.get("obligations") or {}).get("approval", {}).get("granted") is True
    ]
    assert approved, "no outcome record carries a granted approval"
    approval = approved[0]["obligations"]["approval"]
    assert approval["policy"] == "grant:acme-admin-report"
    assert "acme-admin" in approval["by"]
    refused = [
        r
        for r in records
        if (r.get("obligations") or {}).get("approval", {}).get("granted") is False
    ]
    assert refused and refused[0]["outcome"] == "denied"
    cross = [r for r in records if "tenant-binding" in (r.get("policies") or [])]
    assert cross and cross[0]["decision"] == "deny"
    assert "another tenant's" in cross[0]["reason"]


# -- reloads and starts ---------------------------------------------------------------------


def test_hot_reload_keeps_the_last_good_policy(tmp_path: Path) -> None:
    port = free_port()
    gw = start_gateway(tmp_path, quickstart(tmp_path, port), port)
    try:
        policy = tmp_path / "policies" / "workspace.cedar"
        good = policy.read_text()
        assert "result" in modern_call(gw, "acme-reader", "workspace__list_projects")

        policy.write_text(good + "\nforbid (principal, action, resource) when { context.nope };\n")
        time.sleep(0.5)
        assert "result" in modern_call(gw, "acme-reader", "workspace__list_projects")
        assert "policy reload failed, the previous policy stays in force" in gw.log()

        policy.write_text(
            good + '\n@id("freeze") @reason("frozen for the audit")\n'
            "forbid (principal, action, resource);\n"
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = modern_call(gw, "acme-reader", "workspace__list_projects")
            if "error" in answer:
                break
            time.sleep(0.3)
        assert answer["error"]["data"]["policies"] == ["freeze"]
        assert "frozen for the audit" in answer["error"]["message"]
    finally:
        gw.stop()


def test_a_broken_policy_refuses_the_start(tmp_path: Path) -> None:
    port = free_port()
    config = quickstart(tmp_path, port)
    (tmp_path / "policies" / "workspace.cedar").write_text(
        'permit (principal, action == Bastion::Action::"workspace__get_task", resource)\n'
        "when { context.input.task == 1 };\n"
    )
    (tmp_path / "bastion.yaml").write_text(config)
    run = subprocess.run(
        [*BASTION, "serve", "--config", str(tmp_path / "bastion.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "workspace.cedar policy 0" in run.stderr
    assert "Traceback" not in run.stderr


def test_completion_on_another_tenants_resource_is_decided_too(qs: GatewayProcess) -> None:
    # The URI was never listed by this route: it is looked up before the decision, and the
    # tenant it names is bound like any argument.
    headers = {
        **modern_headers("completion/complete"),
        "Authorization": f"Bearer {qs.token('acme-reader')}",
    }
    params = {
        "ref": {"type": "ref/resource", "uri": "workspace://globex/projects/{project_id}"},
        "argument": {"name": "project_id", "value": "g"},
    }
    body = modern_body("completion/complete", params)
    error = httpx.post(qs.url("/mcp"), headers=headers, json=body, timeout=STEP).json()["error"]
    assert error["data"]["code"] == "policy.denied"
    assert "tenant-binding" in error["data"]["policies"]
