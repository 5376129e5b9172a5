"""Alerts through the real quickstart gateway: an agent reaching into another tenant is
alerted on every attempt and suspended at the third, its next call is refused; the alerts are
in the trail, in /metrics and in the sink that takes alerts. Another principal presenting a
session is recorded and alerted as well. Outcome records carry the id of the credential
minted for the upstream and, for streamed answers too, the digest of the result."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.conftest import GatewayProcess, free_port, legacy_session, modern_body, start_gateway
from tests.test_policy_gateway import STEP, modern_call, quickstart

from bastion.audit import digest

BASTION = [sys.executable, "-m", "bastion.cli"]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("alerts")
    port = free_port()
    config = yaml.safe_load(quickstart(tmp, port))
    config["audit"] = {
        # The product's defaults for the cross-tenant rule (alert each, suspend at 3 in 10 min).
        "sinks": [
            {
                "name": "alerts",
                "type": "jsonl",
                "path": str(tmp / "alerts.jsonl"),
                "phases": ["alert"],
            }
        ],
    }
    gw = start_gateway(tmp, yaml.safe_dump(config), port)
    yield gw
    gw.stop()


def trail(gw: GatewayProcess, *args: str) -> list[dict[str, Any]]:
    run = subprocess.run(
        [
            *BASTION,
            "audit",
            "query",
            "--json",
            "--limit",
            "1000",
            *args,
            "--config",
            str(gw.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return [json.loads(line)["record"] for line in run.stdout.splitlines() if line.strip()]


def until(check: Any, what: str, seconds: float = 15.0) -> Any:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_cross_tenant_attempts_alert_and_the_third_suspends_the_agent(
    guarded: GatewayProcess,
) -> None:
    bearer = guarded.token("acme-reader")  # taken before the suspension
    assert "result" in modern_call(guarded, "acme-reader", "workspace__list_projects")
    for _ in range(3):
        error = modern_call(guarded, "acme-reader", "workspace__get_task", task_id="globex-t1")
        assert "tenant-binding" in error["error"]["data"]["policies"]

    alerts = until(
        lambda: [
            a for a in trail(guarded, "--phase", "alert") if a["detail"]["rule"] == "cross_tenant"
        ],
        "three cross-tenant alerts",
    )
    assert len(alerts) == 3
    assert [a["detail"]["suspended"] for a in alerts] == [False, False, True]
    assert all(a["agent"] == "acme-reader" and a["tenant"] == "acme" for a in alerts)
    assert all(a["detail"]["tenants"] == ["globex"] for a in alerts)

    # The agent is suspended: a valid token and an allowed call are now refused.
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "workspace__list_projects",
        "Authorization": f"Bearer {bearer}",
    }
    body = modern_body("tools/call", {"name": "workspace__list_projects", "arguments": {}})
    refused = httpx.post(guarded.url("/mcp"), headers=headers, json=body, timeout=STEP)
    assert refused.status_code == 401, refused.text
    assert "suspended" in refused.text

    show = subprocess.run(
        [*BASTION, "agents", "show", "acme-reader", "--config", str(guarded.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "suspended" in show.stdout and "cross_tenant" in show.stdout

    metrics = httpx.get(guarded.url("/metrics"), timeout=STEP).text
    assert 'bastion_alerts_total{rule="cross_tenant",severity="high"} 2.0' in metrics
    assert 'bastion_alerts_total{rule="cross_tenant",severity="critical"} 1.0' in metrics

    sink = Path(guarded.config_path).parent / "alerts.jsonl"
    until(lambda: sink.exists() and len(sink.read_text().splitlines()) >= 3, "the alert sink")
    phases = {json.loads(line)["record"]["phase"] for line in sink.read_text().splitlines()}
    assert phases == {"alert"}


def test_a_session_presented_by_another_tenant_is_recorded_and_alerted(
    guarded: GatewayProcess,
) -> None:
    url = guarded.url("/mcp")
    with httpx.Client(timeout=STEP) as client:
        owner = {"Authorization": f"Bearer {guarded.token('acme-admin')}"}
        client.headers.update(owner)
        session = legacy_session(client, url)
        thief = {**session, "Authorization": f"Bearer {guarded.token('globex-reader')}"}
        call = {"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {}}
        stolen = client.post(url, json=call, headers=thief)
    assert stolen.status_code == 404  # the same answer as an unknown session
    records = until(
        lambda: [
            r
            for r in trail(guarded, "--agent", "globex-reader")
            if r["phase"] in ("decision", "alert")
        ],
        "the refusal and its alert",
    )
    refusal = next(r for r in records if r["phase"] == "decision")
    assert refusal["decision"] == "deny"
    assert refusal["detail"] == {"error": "session.foreign", "foreign_tenants": ["acme"]}
    alert = next(r for r in records if r["phase"] == "alert")
    assert (
        alert["detail"]["rule"] == "cross_tenant" and alert["request_id"] == refusal["request_id"]
    )


def test_outcome_records_name_the_minted_credential(guarded: GatewayProcess) -> None:
    assert "result" in modern_call(guarded, "acme-admin", "workspace__list_projects")
    outcomes = [
        r
        for r in trail(guarded, "--agent", "acme-admin", "--phase", "outcome")
        if r.get("tool_exposed") == "workspace__list_projects"
    ]
    assert outcomes and all(len(r["credential_id"]) == 32 for r in outcomes)


def test_a_streamed_answer_has_its_result_digest(gateway: GatewayProcess) -> None:
    tool = "everything__test_tool_with_progress"
    body = modern_body("tools/call", {"name": tool, "arguments": {}})
    body["params"]["_meta"]["progressToken"] = "p1"  # progress notifications: an SSE answer
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": tool,
    }
    response = httpx.post(gateway.url("/mcp"), json=body, headers=headers, timeout=STEP)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")
    ]
    result = events[-1]["result"]
    outcome = until(
        lambda: [r for r in trail(gateway, "--tool", tool, "--phase", "outcome")],
        "the outcome record",
    )[-1]
    assert outcome["result_digest"] == digest(result)
    assert outcome["outcome"] == "ok"
