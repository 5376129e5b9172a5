"""Offboarding owners and agents' expiry through a real `bastion serve`: `bastion owners
offboard` suspends every agent of a departing owner, the gateway ends their sessions at once,
and the act is in the audit trail; reassigning keeps the agents working under a new owner; an
agent past its expiry stops working and the inventory (CLI and admin API) says so."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.conftest import ALLOW_ALL, EXAMPLES, GatewayProcess, start_gateway, until
from tests.test_admin_api import admin, agent_token, echo, list_tools, open_session, records

from bastion.control.registry.store import SqliteRegistry

SEEDS = [
    {"id": "alice-bot", "tenant": "acme", "owner": "alice", "purpose": "files acme reports"},
    {"id": "alice-helper", "tenant": "globex", "owner": "alice", "purpose": "helps globex"},
    {"id": "bob-bot", "tenant": "acme", "owner": "bob", "purpose": "stays"},
    {"id": "carol-bot", "tenant": "acme", "owner": "carol", "purpose": "changes hands"},
]
OFFBOARD = "admin/owners/offboard/"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("offboard")
    command = [sys.executable, str(EXAMPLES / "echo_server.py"), "--transport", "stdio"]
    settings = {
        "state_dir": str(tmp / "state"),
        "auth": {"mode": "oauth", "agents": SEEDS},
        "policy": ALLOW_ALL,
        "upstreams": {"echo": {"transport": "stdio", "command": command}},
    }
    gateway = start_gateway(tmp, yaml.safe_dump(settings))
    yield gateway
    gateway.stop()


def _registry(gw: GatewayProcess) -> SqliteRegistry:
    return SqliteRegistry(gw.config_path.parent / "state" / "registry.db", create=False)


def _offboard_records(gw: GatewayProcess) -> list[tuple[str, str, str, str | None]]:
    return sorted(
        (r["method"], r["detail"]["target_agent"], r["detail"]["actor"], r.get("reason"))
        for r in records(gw, phase="decision")
        if r.get("method", "").startswith(OFFBOARD)
    )


def test_offboard_suspends_every_agent_and_ends_their_sessions(gw: GatewayProcess) -> None:
    """The attack: a person leaves, and the agents they ran keep calling with the tokens and
    the session they hold. After `bastion owners offboard`, none of them gets through."""
    bot, helper, bob = (agent_token(gw, a) for a in ("alice-bot", "alice-helper", "bob-bot"))
    session = open_session(gw, bot)
    assert list_tools(gw, session).status_code == 200
    assert echo(gw, helper, "before").status_code == 200

    done = gw.cli("owners", "offboard", "alice", "--reason", "left the company")
    assert done.returncode == 0, done.stderr
    assert "suspended: agent 'alice-bot'" in done.stdout
    assert "suspended: agent 'alice-helper'" in done.stdout

    # The gateway's registry watcher ends the session and drops the cached credentials.
    until(lambda: "ending session of agent 'alice-bot'" in gw.log(), "the session to end")
    assert list_tools(gw, session).status_code in (401, 404)
    refused = echo(gw, helper, "after")
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["data"]["reason"] == "suspended"
    assert echo(gw, bob, "unaffected").status_code == 200

    with _registry(gw) as registry:
        agents = {a.id: a for a in registry.list()}
    assert {agents[a].status for a in ("alice-bot", "alice-helper")} == {"suspended"}
    assert agents["alice-bot"].owner == "alice"  # suspended, not handed to anyone
    assert agents["bob-bot"].status == "active"

    audited = until(lambda: _offboard_records(gw), "the offboarding's audit records")
    assert [(m, a, r) for m, a, _, r in audited] == [
        (OFFBOARD + "suspend", "alice-bot", "left the company"),
        (OFFBOARD + "suspend", "alice-helper", "left the company"),
    ]
    assert all(actor.startswith("cli:") for _, _, actor, _ in audited)

    # Again: nothing left to change, nothing recorded twice.
    again = gw.cli("owners", "offboard", "alice")
    assert again.returncode == 0, again.stderr
    assert "left as it is: agent 'alice-bot' (suspended)" in again.stdout
    assert _offboard_records(gw) == audited


def test_reassign_keeps_the_agents_working_under_the_new_owner(gw: GatewayProcess) -> None:
    token = agent_token(gw, "carol-bot")
    session = open_session(gw, token)
    assert list_tools(gw, session).status_code == 200
    body = {"reassign": "dana", "reason": "team change"}
    moved = admin(gw, "/owners/carol/offboard", "POST", json=body)
    assert moved.status_code == 200, moved.text
    result = moved.json()
    assert result["audited"] is True
    assert [(a["id"], a["owner"], a["status"]) for a in result["offboarding"]["changed"]] == [
        ("carol-bot", "dana", "active")
    ]
    assert list_tools(gw, session).status_code == 200
    assert echo(gw, token, "still here").status_code == 200
    assert admin(gw, "/agents/carol-bot").json()["agent"]["owner"] == "dana"
    assert "ending session of agent 'carol-bot'" not in gw.log()
    assert (OFFBOARD + "reassign", "carol-bot", "admin", "team change") in _offboard_records(gw)
    owners = gw.cli("owners", "list", "--json")
    assert json.loads(owners.stdout)["dana"] == {"active": ["carol-bot"]}


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/owners/nobody/offboard", {}, 404, "no agent is owned by 'nobody'"),
        ("/owners/bob/offboard", {"reassign": "bob"}, 400, "is the owner being offboarded"),
        ("/owners/bob/offboard", {"reassign": " "}, 400, "new_owner"),
        ("/owners/bob/offboard", {"to": "x"}, 400, "expected a JSON object with only"),
        ("/owners/bob/offboard", {"reason": 7}, 400, "expected text"),
    ],
)
def test_offboard_refusals_name_the_problem(
    gw: GatewayProcess, path: str, body: dict[str, Any], status: int, fragment: str
) -> None:
    response = admin(gw, path, "POST", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["message"]
    with _registry(gw) as registry:
        assert registry.get("bob-bot").status == "active"  # nothing changed


def test_cli_refusals_are_one_line(gw: GatewayProcess) -> None:
    both = gw.cli("owners", "offboard", "bob", "--suspend", "--reassign", "erin")
    assert both.returncode == 1 and "not both" in both.stderr
    nobody = gw.cli("owners", "offboard", "nobody")
    assert nobody.returncode == 1 and "no agent is owned by 'nobody'" in nobody.stderr
    assert "Traceback" not in both.stderr + nobody.stderr


def _add_expiring_agent(gw: GatewayProcess, agent: str, seconds: float) -> None:
    """Register `agent` with a key whose private half goes where `agent_token` reads it."""
    key = ec.generate_private_key(ec.SECP256R1())
    state = gw.config_path.parent / "state"
    (state / "agents" / f"{agent}.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = state / f"{agent}.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    expires = dt.datetime.fromtimestamp(time.time() + seconds, dt.UTC).isoformat()
    added = gw.cli(
        "agents", "add", agent, "--tenant", "acme", "--owner", "erin", "--purpose", "expires",
        "--public-key-pem", str(public), "--expires", expires,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr


def test_an_expired_agent_stops_working_and_is_reported(gw: GatewayProcess) -> None:
    _add_expiring_agent(gw, "short-lived", 8)
    token = agent_token(gw, "short-lived")
    assert echo(gw, token, "in time").status_code == 200

    def refused() -> Any:
        response = echo(gw, token, "late")
        return response if response.status_code == 401 else None

    late = until(refused, "the agent's expiry", seconds=40)
    assert "agent 'short-lived' is expired" in late.json()["error"]["message"]

    listed = gw.cli("agents", "list")
    row = next(line for line in listed.stdout.splitlines() if "short-lived" in line)
    assert "expired" in row
    inventory = admin(gw, "/inventory", params={"days": "1"})
    assert inventory.status_code == 200, inventory.text
    statuses = {a["id"]: a["status"] for a in inventory.json()["agents"]}
    assert statuses["short-lived"] == "expired" and statuses["bob-bot"] == "active"
    text = gw.cli("inventory")
    assert text.returncode == 0, text.stderr
    assert "agent short-lived  tenant acme  [dev]  expired" in text.stdout


def test_admin_inventory_is_the_cli_inventory(gw: GatewayProcess) -> None:
    assert echo(gw, agent_token(gw, "bob-bot"), "counted").status_code == 200

    def used() -> Any:
        response = admin(gw, "/inventory")
        bob = next(a for a in response.json()["agents"] if a["id"] == "bob-bot")
        return response if bob["used"] else None

    served = until(used, "bob-bot's call in the trail")
    printed = gw.cli("inventory", "--json")
    assert printed.returncode == 0, printed.stderr

    def essence(body: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
        return [(a["id"], a["owner"], a["status"], a["reach"]) for a in body["agents"]]

    api, cli = served.json(), json.loads(printed.stdout)
    assert api["reach_known"] and essence(api) == essence(cli)
    bob = next(a for a in api["agents"] if a["id"] == "bob-bot")
    assert [(u["upstream"], [t["tool"] for t in u["tools"]]) for u in bob["reach"]] == [
        ("echo", ["echo"])
    ]
    assert bob["used"][0]["tool"] == "echo" and bob["used"][0]["allowed"] >= 1
    for days, fragment in (("0", "expected an integer"), ("5000", "at most 3650")):
        bad = admin(gw, "/inventory", params={"days": days})
        assert bad.status_code == 400 and fragment in bad.json()["message"]


def test_offboard_needs_the_admin_token(gw: GatewayProcess) -> None:
    refused = admin(gw, "/owners/bob/offboard", "POST", token="not-the-admin-token-at-all")
    assert refused.status_code == 401
    with _registry(gw) as registry:
        assert registry.get("bob-bot").status == "active"
