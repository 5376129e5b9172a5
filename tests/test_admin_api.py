"""The admin API: a real `bastion serve` process for the token, the refusals, the trail's
filters, export and verify, and registry changes taking effect on live agents; an in-process
gateway (ASGI client) for tampering found by verify and for the configuration of the token."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from tests.conftest import (
    ALLOW_ALL,
    EXAMPLES,
    GatewayProcess,
    free_port,
    legacy_session,
    modern_body,
    modern_headers,
    start_gateway,
    until_async,
)

from bastion import config
from bastion.app import Gateway
from bastion.control.admin.auth import admin_token
from bastion.control.assembly import build_gateway
from bastion.errors import ConfigError
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey

BASTION = [sys.executable, "-m", "bastion.cli"]
ECHO = "/servers/echo/mcp"
SEEDS = [
    {"id": "acme-reader", "tenant": "acme", "owner": "tests", "purpose": "reads acme"},
    {"id": "globex-reader", "tenant": "globex", "owner": "tests", "purpose": "reads globex"},
    {"id": "pausable", "tenant": "acme", "owner": "tests", "purpose": "gets suspended"},
    {"id": "doomed", "tenant": "acme", "owner": "tests", "purpose": "gets offboarded"},
]
T = TypeVar("T")


def _echo_upstream() -> dict[str, Any]:
    command = [sys.executable, str(EXAMPLES / "echo_server.py"), "--transport", "stdio"]
    return {"echo": {"transport": "stdio", "command": command}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("admin")
    port = free_port()
    settings = {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_dir": str(tmp / "state"),
        "auth": {"mode": "oauth", "agents": SEEDS},
        "audit": {"checkpoint_every": 5},
        "policy": ALLOW_ALL,
        "upstreams": _echo_upstream(),
    }
    gateway = start_gateway(tmp, yaml.safe_dump(settings), port)
    yield gateway
    gateway.stop()


# -- helpers ------------------------------------------------------------------------------------


def token_of(gw: GatewayProcess) -> str:
    return (gw.config_path.parent / "state" / "admin-token").read_text().strip()


def admin(
    gw: GatewayProcess, path: str, method: str = "GET", token: str | None = None, **kw: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or token_of(gw)}"}
    return httpx.request(method, gw.url("/admin" + path), headers=headers, timeout=20, **kw)


def records(gw: GatewayProcess, **params: str) -> list[dict[str, Any]]:
    response = admin(gw, "/audit/records", params={"limit": "10000", **params})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["records"])
    return [line["record"] for line in body["records"]]


def eventually(check: Callable[[], T], deadline_s: float = 10) -> T:
    """Poll `check` until it returns something truthy (records are written behind answers)."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def agent_token(gw: GatewayProcess, agent: str) -> str:
    """An access token for ECHO from the gateway's token endpoint (private_key_jwt)."""
    jwk = admin(gw, f"/agents/{agent}").json()["agent"]["jwks"]["keys"][0]
    pem = (gw.config_path.parent / "state" / "agents" / f"{agent}.pem").read_bytes()
    now = int(time.time())
    claims = {"iss": agent, "sub": agent, "aud": gw.base, "iat": now, "exp": now + 60}
    assertion = mint(
        SigningKey.from_pem(pem, jwk["kid"], "ES256"),
        {**claims, "jti": uuid.uuid4().hex},
        typ="JWT",
    )
    form = {
        "grant_type": "client_credentials",
        "client_assertion": assertion,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "resource": gw.url(ECHO),
    }
    response = httpx.post(gw.url("/oauth/token"), data=form, timeout=20)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def echo(gw: GatewayProcess, token: str, text: str, tool: str = "echo") -> httpx.Response:
    headers = {**modern_headers("tools/call", tool), "Authorization": f"Bearer {token}"}
    body = modern_body("tools/call", {"name": tool, "arguments": {"text": text}})
    return httpx.post(gw.url(ECHO), json=body, headers=headers, timeout=20)


def open_session(gw: GatewayProcess, token: str) -> dict[str, str]:
    with httpx.Client(timeout=20) as client:
        return legacy_session(client, gw.url(ECHO), "2025-11-25", token)


def list_tools(gw: GatewayProcess, session: dict[str, str]) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    return httpx.post(gw.url(ECHO), json=body, headers=session, timeout=20)


# -- the token ----------------------------------------------------------------------------------


def test_token_is_generated_private_and_announced(gw: GatewayProcess) -> None:
    path = gw.config_path.parent / "state" / "admin-token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(token_of(gw)) >= 32
    assert f"{gw.base}/admin/" in gw.log() and str(path) in gw.log()
    assert token_of(gw) not in gw.log()


@pytest.mark.parametrize("presented", ["none", "wrong", "basic", "agent"])
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/agents"), ("GET", "/audit/records"), ("POST", "/agents/acme-reader/suspend")],
)
def test_only_the_admin_token_opens_the_api(
    gw: GatewayProcess, presented: str, method: str, path: str
) -> None:
    secret = {
        "none": None,
        "wrong": "x" * 43,
        "basic": None,
        "agent": agent_token(gw, "acme-reader"),  # a valid MCP token is no admin token
    }[presented]
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    if presented == "basic":
        headers = {"Authorization": f"Basic {token_of(gw)}"}
    response = httpx.request(
        method, gw.url("/admin" + path), headers=headers, json={"reason": "r"}, timeout=20
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer realm="bastion-admin"')
    assert response.json()["error"] == "admin.unauthorized"
    assert token_of(gw) not in response.text and (secret is None or secret not in response.text)
    assert admin(gw, "/agents/acme-reader").json()["agent"]["status"] == "active"


# -- the trail ----------------------------------------------------------------------------------


def test_records_filters(gw: GatewayProcess) -> None:
    acme, globex = agent_token(gw, "acme-reader"), agent_token(gw, "globex-reader")
    assert echo(gw, acme, "from acme").status_code == 200
    assert echo(gw, globex, "from globex").status_code == 200
    refused = echo(gw, acme, "nothing", tool="nope")
    assert "error" in refused.json()
    denials = eventually(lambda: records(gw, agent="acme-reader", decision="deny"))
    assert [r["tool_exposed"] for r in denials] == ["nope"]
    assert {r["agent"] for r in records(gw, tenant="globex")} == {"globex-reader"}
    decisions = records(gw, agent="acme-reader", tool="echo", phase="decision")
    assert len(decisions) == 1 and decisions[0]["decision"] == "allow"
    assert len(records(gw, since="1h", agent="globex-reader")) >= 1
    assert records(gw, until="2000-01-01T00:00:00Z") == []
    assert len(records(gw, limit="1")) == 1
    # The same filters as `bastion audit query`, with the same answers.
    run = gw.cli("audit", "query", "--json", "--agent", "acme-reader", "--phase", "decision")
    assert run.returncode == 0, run.stderr
    by_cli = [json.loads(line)["record"] for line in run.stdout.splitlines()]
    assert by_cli == records(gw, agent="acme-reader", phase="decision")


@pytest.mark.parametrize(
    ("path", "params", "parameter"),
    [
        ("/audit/records", {"since": "yesterday"}, "since"),
        ("/audit/records", {"until": "soon"}, "until"),
        ("/audit/records", {"decision": "maybe"}, "decision"),
        ("/audit/records", {"phase": "lunch"}, "phase"),
        ("/audit/records", {"limit": "0"}, "limit"),
        ("/audit/records", {"limit": "many"}, "limit"),
        ("/audit/records", {"limit": "99999999"}, "limit"),
        ("/audit/records", {"agnet": "acme-reader"}, "agnet"),
        ("/audit/records", [("agent", "a"), ("agent", "b")], "agent"),
        ("/audit/tail", {"count": "-1"}, "count"),
        ("/audit/export", {"format": "csv"}, "format"),
        ("/audit/export", {"since": "last tuesday"}, "since"),
        ("/audit/verify", {"deep": "1"}, "deep"),
        ("/agents", {"status": "sleeping"}, "status"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    gw: GatewayProcess, path: str, params: Any, parameter: str
) -> None:
    response = admin(gw, path, params=params)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["parameter"] == parameter and body["message"].startswith(f"{parameter}: ")
    assert body["error"] in ("admin.bad_request", "audit.filter")


def test_tail(gw: GatewayProcess) -> None:
    echo(gw, agent_token(gw, "acme-reader"), "for the tail")
    body = admin(gw, "/audit/tail", params={"count": "3"}).json()
    assert body["count"] == 3 and len(body["records"]) == 3
    seqs = [(line["writer"], line["seq"]) for line in body["records"]]
    assert seqs == sorted(seqs)
    assert admin(gw, "/audit/tail").json()["count"] <= 20


def test_export_jsonl_and_ocsf(gw: GatewayProcess) -> None:
    echo(gw, agent_token(gw, "globex-reader"), "for the export")
    eventually(lambda: records(gw, agent="globex-reader", phase="outcome"))
    with httpx.stream(
        "GET",
        gw.url("/admin/audit/export"),
        headers={"Authorization": f"Bearer {token_of(gw)}"},
        timeout=20,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        assert "content-length" not in response.headers  # streamed
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert {"writer", "seq", "prev_hash", "hash", "record"} <= set(lines[0])
    assert len(lines) >= len(records(gw))
    mine = admin(gw, "/audit/export", params={"agent": "globex-reader"}).text.splitlines()
    assert [json.loads(line)["record"] for line in mine] == records(gw, agent="globex-reader")
    ocsf = admin(gw, "/audit/export", params={"format": "ocsf", "agent": "globex-reader"})
    events = [json.loads(line) for line in ocsf.text.splitlines()]
    assert len(events) == len(mine) and {e["class_uid"] for e in events} == {6003}


def test_verify_intact_is_the_clis_report(gw: GatewayProcess) -> None:
    response = admin(gw, "/audit/verify")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True and body["first"] is None and body["problem_count"] == 0
    run = gw.cli("audit", "verify", "--json")
    assert run.returncode == 0, run.stderr
    assert set(json.loads(run.stdout)) == set(body)


# -- agents -------------------------------------------------------------------------------------


def test_agents_list_and_show(gw: GatewayProcess) -> None:
    everyone = admin(gw, "/agents").json()["agents"]
    assert {a["id"] for a in everyone} >= {s["id"] for s in SEEDS}
    globex = admin(gw, "/agents", params={"tenant": "globex"}).json()["agents"]
    assert [a["id"] for a in globex] == ["globex-reader"]
    shown = admin(gw, "/agents/globex-reader").json()["agent"]
    assert shown["tenant"] == "globex" and shown["status"] == "active" and shown["jwks"]["keys"]


def _last_used(gw: GatewayProcess, agent: str) -> float:
    return float(admin(gw, f"/agents/{agent}").json()["agent"]["last_used_at"] or 0)


def test_last_use_is_recorded_and_shown(gw: GatewayProcess) -> None:
    # Access reviews read when each agent was last let in: a token issued, then a call.
    before = time.time()
    token = agent_token(gw, "globex-reader")
    issued = eventually(lambda: _last_used(gw, "globex-reader") >= before)
    assert issued, "the token endpoint's use was never written"
    called = time.time()
    assert called > _last_used(gw, "globex-reader")
    assert echo(gw, token, "seen").status_code == 200
    assert eventually(lambda: _last_used(gw, "globex-reader") >= called), "the call's use"
    last = _last_used(gw, "globex-reader")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last))
    listed = gw.cli("agents", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "globex-reader" in line)
    assert stamp in row
    shown = gw.cli("agents", "show", "globex-reader", "--json")
    assert json.loads(shown.stdout)["last_used_at"] == last


def test_unknown_agent_or_endpoint_is_404(gw: GatewayProcess) -> None:
    for method, path in [
        ("GET", "/agents/nobody"),
        ("POST", "/agents/nobody/suspend"),
    ]:
        response = admin(gw, path, method, json={"reason": "r"})
        assert response.status_code == 404
        assert response.json()["error"] == "registry.not_found"
        assert "nobody" in response.json()["message"]
    for method, path in [("POST", "/agents/acme-reader/explode"), ("GET", "/nothing")]:
        response = admin(gw, path, method)
        assert response.status_code == 404 and response.json()["error"] == "admin.not_found"
    wrong = admin(gw, "/agents/acme-reader/suspend")
    assert wrong.status_code == 405 and wrong.json()["error"] == "admin.method"
    # An unknown path is quoted, never echoed whole (a 6 KB path came back in full).
    long = admin(gw, "/nothing/" + "p" * 6000)
    assert long.status_code == 404 and len(long.content) < 400


def test_suspend_and_resume_take_effect_at_once(gw: GatewayProcess) -> None:
    token = agent_token(gw, "pausable")
    assert echo(gw, token, "before").status_code == 200
    missing = admin(gw, "/agents/pausable/suspend", "POST")
    assert missing.status_code == 400 and "reason" in missing.json()["message"]
    suspended = admin(gw, "/agents/pausable/suspend", "POST", json={"reason": "incident 7"})
    assert suspended.status_code == 200, suspended.text
    assert suspended.json()["agent"]["status"] == "suspended" and suspended.json()["audited"]
    refused = echo(gw, token, "during")
    assert refused.status_code == 401
    assert refused.json()["error"]["data"]["reason"] == "suspended"
    again = admin(gw, "/agents/pausable/suspend", "POST", json={"reason": "twice"})
    assert again.status_code == 409 and again.json()["error"] == "registry.conflict"
    assert admin(gw, "/agents/pausable/resume", "POST").status_code == 200
    assert echo(gw, token, "after").status_code == 200
    changes = [
        (r["method"], r.get("reason"), r["detail"]["status"])
        for r in records(gw, tenant="acme", phase="decision")
        if r.get("detail", {}).get("target_agent") == "pausable"
    ]
    assert changes == [
        ("admin/agents/suspend", "incident 7", "suspended"),
        ("admin/agents/resume", None, "active"),
    ]
    assert "admin suspend agent 'pausable'" in gw.log()


def test_offboard_ends_a_live_session(gw: GatewayProcess) -> None:
    token = agent_token(gw, "doomed")
    session = open_session(gw, token)
    assert list_tools(gw, session).status_code == 200
    gone = admin(gw, "/agents/doomed/offboard", "POST", json={"reason": "project ended"})
    assert gone.status_code == 200 and gone.json()["agent"]["status"] == "offboarded"
    # Ended by the offboarding itself, before the agent sends anything else.
    assert eventually(lambda: "ending session of agent 'doomed'" in gw.log())
    assert list_tools(gw, session).status_code in (401, 404)
    assert echo(gw, token, "still there?").status_code == 401
    final = admin(gw, "/agents/doomed/resume", "POST")
    assert final.status_code == 409 and "final" in final.json()["message"]


# -- in process: tampering, configuration -------------------------------------------------------


@pytest.fixture
async def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    """A gateway without identity (auth: none) and an admin token from the environment."""
    monkeypatch.setenv("BASTION_TEST_ADMIN", "a-configured-admin-token-" + uuid.uuid4().hex)
    port = free_port()
    settings = {
        "listen": {"host": "127.0.0.1", "port": port},
        "auth": {"mode": "none", "tenant": "acme", "agent": "test-agent"},
        "admin": {"token": "env:BASTION_TEST_ADMIN"},
        "audit": {"checkpoint_every": 2},
        "policy": ALLOW_ALL,
        "upstreams": _echo_upstream(),
    }
    path = tmp_path / "bastion.yaml"
    path.write_text(yaml.safe_dump(settings))
    gateway = await build_gateway(config.load(path))
    await gateway.start()
    yield gateway
    await gateway.stop()


def _client(gateway: Gateway, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token or os.environ['BASTION_TEST_ADMIN']}"}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway),
        base_url=gateway.settings.base_url(),
        headers=headers,
    )


async def test_verify_names_the_tampered_record(local: Gateway) -> None:
    async with _client(local) as client:
        for i in range(4):
            body = modern_body("tools/call", {"name": "echo", "arguments": {"text": f"t{i}"}})
            answer = await client.post(
                ECHO, json=body, headers=modern_headers("tools/call", "echo")
            )
            assert answer.status_code == 200 and "error" not in answer.json()
        intact = await client.get("/admin/audit/verify")
        assert intact.status_code == 200 and intact.json()["ok"] is True
        db = Path(local.settings.state_dir) / "audit" / "audit.db"

        def committed() -> Any:
            # Records are safe in the write-ahead before the writer commits them to the store.
            with closing(sqlite3.connect(db)) as conn:
                return conn.execute("SELECT writer_id, seq FROM entries WHERE id = 2").fetchone()

        await until_async(committed, "the second record committed to the store")
        with sqlite3.connect(db) as conn:
            writer, seq = conn.execute("SELECT writer_id, seq FROM entries WHERE id = 2").fetchone()
            conn.execute(
                "UPDATE entries SET record = replace(record, 'test-agent', 'intruder') WHERE id = 2"
            )
        conn.close()
        tampered = await client.get("/admin/audit/verify")
        assert tampered.status_code == 409
        body = tampered.json()
        assert body["error"] == "audit.tampered" and body["ok"] is False
        assert body["first"]["writer"] == writer and body["first"]["seq"] == seq
        assert body["first"]["problem"] == "modified"
        assert f"writer {writer} seq {seq}" in body["message"]
        # No registry without identity: said so, not a 500.
        agents = await client.get("/admin/agents")
        assert agents.status_code == 404 and agents.json()["error"] == "admin.not_available"
    async with _client(local, token="a-configured-admin-token-but-not-this-one") as client:
        assert (await client.get("/admin/audit/verify")).status_code == 401


@pytest.mark.parametrize(
    "token", ["hunter2-hunter2-hunter2", "Bearer abc", "env:1BAD", "vault:secret/admin"]
)
def test_a_literal_token_in_the_config_is_refused(tmp_path: Path, token: str) -> None:
    path = tmp_path / "bastion.yaml"
    path.write_text(yaml.safe_dump({"admin": {"token": token}}))
    with pytest.raises(ConfigError) as refused:
        config.load(path)
    (problem,) = refused.value.problems
    assert problem.startswith("admin.token (line 2): expected a secret reference")
    assert token not in problem


async def test_a_referenced_token_must_exist_and_be_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def settings(reference: str) -> config.Settings:
        path = tmp_path / "bastion.yaml"
        path.write_text(yaml.safe_dump({"admin": {"token": reference}}))
        return config.load(path)

    monkeypatch.delenv("BASTION_NO_SUCH_TOKEN", raising=False)
    monkeypatch.setenv("BASTION_SHORT_TOKEN", "short")
    for reference, needle in [
        ("env:BASTION_NO_SUCH_TOKEN", "is not set"),
        ("env:BASTION_SHORT_TOKEN", "at least 16 characters"),
        (f"file:{tmp_path / 'absent'}", "cannot read"),
    ]:
        with pytest.raises(ConfigError) as refused:
            await admin_token(settings(reference))
        assert refused.value.problems[0].startswith("admin.token: ")
        assert needle in refused.value.problems[0]
    (tmp_path / "token").write_text("from-a-file-0123456789\n")
    assert await admin_token(settings(f"file:{tmp_path / 'token'}")) == "from-a-file-0123456789"


async def test_admin_disabled_serves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bastion.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "auth": {"mode": "none"},
                "admin": {"enabled": False},
                "audit": {"enabled": False},
                "upstreams": _echo_upstream(),
            }
        )
    )
    gateway = await build_gateway(config.load(path))
    async with _client(gateway, token="anything") as client:
        assert (await client.get("/admin/agents")).status_code == 404
    assert not (tmp_path / ".state" / "admin-token").exists()
