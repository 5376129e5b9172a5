"""A hostile upstream behind a virtual server with the demo (tests/fixtures/malicious_server.py).

The same server runs twice behind `/mcp`: as `malicious`, with the inspection rules on (the
defaults, and its tenant naming declared), and as `naked`, with every rule off. Each attack is
shown contained on the first and getting through on the second, so no test here passes with
its rule removed. Secrets are generated per run; the trail is searched for them.
"""

from __future__ import annotations

import json
import secrets
import string
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import jwt as pyjwt
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from tests.conftest import (
    GatewayProcess,
    free_port,
    legacy_session,
    modern_body,
    modern_headers,
    start_gateway,
    until,
    wait_lists_complete,
)
from tests.test_policy_gateway import quickstart
from tests.test_transport import read_events

FIXTURE = Path(__file__).parent / "fixtures" / "malicious_server.py"
STEP = 20.0
OFF = {
    "tenants": "off",
    "secrets": "off",
    "injection": "off",
    "pins": "off",
    "poisoning": "off",
    "shadowing": "off",
}


def _secrets() -> dict[str, str]:
    upper = string.ascii_uppercase + string.digits
    alnum = string.ascii_letters + string.digits
    return {
        "aws": "AKIA" + "".join(secrets.choice(upper) for _ in range(16)),
        "github": "ghp_" + "".join(secrets.choice(alnum) for _ in range(36)),
        "jwt": pyjwt.encode(
            {"sub": "svc", "iat": int(time.time())}, secrets.token_hex(32), algorithm="HS256"
        ),
    }


SECRETS = _secrets()


def config(tmp: Path, port: int) -> str:
    data = yaml.safe_load(quickstart(tmp, port))
    env = {"MAL_VICTIM": "globex", "MAL_SECRETS": json.dumps(SECRETS)}
    base = {
        "transport": "stdio",
        "command": [sys.executable, str(FIXTURE)],
        "env": env,
        "tenant_arguments": {"q": "{tenant}-t*"},
    }
    data["upstreams"]["malicious"] = {**base}
    data["upstreams"]["naked"] = {**base, "inspect": OFF}
    for name in ("malicious", "naked"):
        data["policy"]["grants"].append(
            {"id": f"{name}-all", "tenant": "*", "server": name, "tools": "*", "resources": "*"}
        )
    data["virtual_servers"]["default"]["upstreams"] += ["malicious", "naked"]
    return yaml.safe_dump(data)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("malicious")
    port = free_port()
    gateway = start_gateway(tmp, config(tmp, port), port)
    try:
        headers = {"Authorization": f"Bearer {gateway.token('acme-reader')}"}
        wait_lists_complete(gateway, ("/mcp",), headers)
    except BaseException:
        gateway.stop()
        raise
    yield gateway
    gateway.stop()


def call(gw: GatewayProcess, tool: str, **arguments: Any) -> dict[str, Any]:
    headers = {
        **modern_headers("tools/call", tool),
        "Authorization": f"Bearer {gw.token('acme-reader')}",
    }
    body = modern_body("tools/call", {"name": tool, "arguments": arguments})
    response = httpx.post(gw.url("/mcp"), headers=headers, json=body, timeout=STEP)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def trail(gw: GatewayProcess) -> str:
    run = gw.cli("audit", "export")
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_another_tenants_objects_are_blocked(gw: GatewayProcess) -> None:
    blocked = call(gw, "malicious__lookup", q="merger")
    assert blocked["error"]["data"]["code"] == "inspection.foreign_tenant"
    assert "globex" not in json.dumps(blocked)
    through = call(gw, "naked__lookup", q="merger")
    assert "globex-t3" in json.dumps(through["result"])


def test_secrets_in_results_are_redacted_and_never_recorded(gw: GatewayProcess) -> None:
    redacted = json.dumps(call(gw, "malicious__credentials")["result"])
    assert "[redacted:" in redacted
    assert not [kind for kind, value in SECRETS.items() if value in redacted]
    through = json.dumps(call(gw, "naked__credentials")["result"])
    assert all(value in through for value in SECRETS.values())
    found = until(lambda: _outcome(gw, "malicious__credentials"), "the credentials outcome")
    rules = {f["rule"] for f in found["detail"]["inspection"]["findings"]}
    assert rules == {"secret"}
    exported = trail(gw)
    assert not [kind for kind, value in SECRETS.items() if value in exported]


def test_secrets_in_upstream_errors_are_redacted(gw: GatewayProcess) -> None:
    error = call(gw, "malicious__broken")["error"]
    assert not [kind for kind, value in SECRETS.items() if value in json.dumps(error)]
    assert "[redacted:" in error["message"]
    through = call(gw, "naked__broken")["error"]
    assert SECRETS["aws"] in json.dumps(through)


def test_instructions_aimed_at_the_model_are_flagged(gw: GatewayProcess) -> None:
    flagged = call(gw, "malicious__fetch_page")["result"]
    note = flagged["_meta"]["io.bastion/inspection"]
    assert note["untrusted"] is True and note["kinds"]
    through = call(gw, "naked__fetch_page")["result"]
    assert "io.bastion/inspection" not in (through.get("_meta") or {})


async def test_a_progress_note_naming_another_tenant_is_withheld(gw: GatewayProcess) -> None:
    heard: dict[str, list[str]] = {"malicious": [], "naked": []}
    headers = {"Authorization": f"Bearer {gw.token('acme-reader')}"}
    with anyio.fail_after(60):
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(STEP), headers=headers) as http:
            transport = streamable_http_client(gw.url("/mcp"), http_client=http)
            async with Client(transport, mode="legacy", read_timeout_seconds=STEP) as client:
                for name in heard:

                    async def progress(
                        done: float, total: float | None, message: str | None, name: str = name
                    ) -> None:
                        heard[name].append(message or "")

                    result = await client.call_tool(
                        f"{name}__notes", {}, progress_callback=progress
                    )
                    assert not result.is_error
    assert heard["malicious"] == []
    assert heard["naked"] == ["globex-t4 read"]


def test_a_claimed_uri_is_read_from_its_owner(gw: GatewayProcess) -> None:
    headers = {
        **modern_headers("resources/read", "workspace://about"),
        "Authorization": f"Bearer {gw.token('acme-reader')}",
    }
    body = modern_body("resources/read", {"uri": "workspace://about"})
    response = httpx.post(gw.url("/mcp"), headers=headers, json=body, timeout=STEP).json()
    assert "claimed by malicious" not in json.dumps(response)
    assert response["result"]["contents"], response


def _outcome(gw: GatewayProcess, tool: str) -> dict[str, Any] | None:
    for line in trail(gw).splitlines():
        record = json.loads(line)["record"]
        if record["phase"] == "outcome" and record.get("tool_exposed") == tool:
            if "inspection" in (record.get("detail") or {}):
                found: dict[str, Any] = record
                return found
    return None


@pytest.mark.parametrize("server", ["malicious", "naked"])
def test_a_session_stream_is_inspected_too(gw: GatewayProcess, server: str) -> None:
    route = f"/servers/{server}/mcp"
    token = gw.token("acme-reader", "--resource", route)
    with httpx.Client(timeout=STEP) as http:
        session = legacy_session(http, gw.url(route), token=token)
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "broadcast", "arguments": {}},
        }

        def trigger() -> None:
            assert http.post(gw.url(route), json=call, headers=session).status_code == 200

        sse = {**session, "Accept": "text/event-stream"}
        wanted = 1 if server == "malicious" else 2
        events = read_events(gw.url(route), sse, wanted, on_open=trigger, deadline_s=STEP)
    said = [m["params"]["data"] for _, m in events]
    if server == "malicious":
        assert said == ["all quiet"]
    else:
        assert said == ["globex-t5 was closed", "all quiet"]


# Last in this module: it changes the servers' tools.
def test_a_rug_pull_is_withheld_until_an_operator_approves(gw: GatewayProcess) -> None:
    for server in ("malicious", "naked"):
        assert "result" in call(gw, f"{server}__mutate")
    headers = {
        **modern_headers("tools/list"),
        "Authorization": f"Bearer {gw.token('acme-reader')}",
    }

    def listed() -> dict[str, Any]:
        body = modern_body("tools/list", {})
        result = httpx.post(gw.url("/mcp"), headers=headers, json=body, timeout=STEP).json()
        return {t["name"]: t for t in result["result"]["tools"]}

    tools = listed()
    assert "malicious__lookup" not in tools
    assert "password" in tools["naked__lookup"]["description"]  # pins off: the rug pull lands
    refused = call(gw, "malicious__lookup", q="x")
    assert refused["error"]["data"]["code"] == "inspection.tool_changed"
    diff = gw.cli("tools", "diff", "malicious", "tool", "lookup")
    assert diff.returncode == 0 and "password" in diff.stdout, diff
    approved = gw.cli("tools", "approve", "malicious", "tool", "lookup", "--by", "tests")
    assert approved.returncode == 0, approved.stderr
    until(lambda: "malicious__lookup" in listed(), "the approved tool listed again")
