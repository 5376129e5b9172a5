"""The inventory against a deployment whose answers are known by hand: agents of two tenants
(one suspended, one expired, one proving itself by SPIFFE ID), upstreams credentialed every
way (minted, exchanged, secrets in env, file and Vault), reach derived from the policy (one
tool of several, a forbid that removes one, an argument rule that makes one conditional,
environment separation), usage from a real trail, and no secret value anywhere."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from bastion import config
from bastion.audit.record import AuditRecord
from bastion.audit.trail import open_trail_writer
from bastion.cli import cli
from bastion.control.cli.agents import jwk_from_pem
from bastion.control.governance.inventory import (
    CATALOG_FILE,
    Inventory,
    Usage,
    build_inventory,
    load_engine,
    read_usage,
    usage_from_records,
)
from bastion.control.registry.agents import Agent, AgentStatus
from bastion.control.registry.store import SqliteRegistry

DAY = 86400.0
NOW = time.time()

LISTINGS: dict[str, Any] = {
    "crm": {"tools": [{"name": "read_contact"}, {"name": "delete_contact"}]},
    "billing": {"tools": [{"name": "charge"}, {"name": "refund"}]},
    "tickets": {
        "tools": [
            {"name": "list_tickets"},
            {
                "name": "create_ticket",
                "inputSchema": {
                    "type": "object",
                    "properties": {"queue": {"type": "string"}},
                    "required": ["queue"],
                },
            },
        ]
    },
    "reports": {"tools": [{"name": "send"}]},
    "notes": {"tools": [{"name": "write_note"}]},
}

FORBID = """@id("no-refunds")
@reason("refunds go through a person")
forbid (principal, action == Bastion::Action::"billing__refund", resource);
"""


def _upstream(port: int, **extra: Any) -> dict[str, Any]:
    return {"transport": "http", "url": f"http://127.0.0.1:{port}/mcp", **extra}


def _config(tmp: Path, billing_token: Path) -> dict[str, Any]:
    return {
        "state_dir": str(tmp / "state"),
        "environment": "prod",
        "auth": {"mode": "oauth"},
        "upstreams": {
            "crm": _upstream(9301, credentials={"mode": "mint", "audience": "crm-api"}),
            "tickets": _upstream(
                9302,
                credentials={
                    "mode": "token_exchange",
                    "token_endpoint": "https://as.example/token",
                    "client_id": "bastion",
                    "client_secret": "env:TICKETS_CLIENT_SECRET",
                },
            ),
            "billing": _upstream(
                9303, credentials={"mode": "secret", "secret": f"file:{billing_token}"}
            ),
            "reports": _upstream(
                9304,
                credentials={"mode": "secret", "secret": "vault:kv/data/reports#token"},
            ),
            "notes": _upstream(
                9305,
                environment="staging",
                credentials={"mode": "secret", "secret": "env:NOTES_TOKEN", "scheme": ""},
            ),
        },
        "policy": {
            "files": [str(tmp / "policy.cedar")],
            "grants": [
                {"id": "acme-crm", "tenant": "acme", "server": "crm", "tools": ["read_contact"]},
                {
                    "id": "acme-billing",
                    "tenant": "acme",
                    "agents": ["acme-billing-bot"],
                    "server": "billing",
                    "tools": "*",
                },
                {"id": "acme-reports", "tenant": "acme", "server": "reports", "tools": ["send"]},
                {"id": "acme-notes", "tenant": "acme", "server": "notes", "tools": "*"},
                {
                    "id": "globex-read",
                    "tenant": "globex",
                    "server": "tickets",
                    "tools": ["list_tickets"],
                },
                {
                    "id": "globex-write",
                    "tenant": "globex",
                    "server": "tickets",
                    "tools": ["create_ticket"],
                    "arguments": {"queue": {"equals": "support"}},
                    "approval": True,
                },
            ],
        },
    }


def _jwks() -> dict[str, Any]:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {"keys": [jwk_from_pem(pem)]}


def _agent(agent_id: str, tenant: str, owner: str, **extra: Any) -> Agent:
    fields: dict[str, Any] = {
        "id": agent_id,
        "display_name": agent_id,
        "owner": owner,
        "tenant": tenant,
        "purpose": f"{agent_id} at work",
        "environment": "prod",
        "jwks": _jwks(),
        "spiffe_id": None,
        "audiences": (),
        "scopes": (),
        "require_dpop": False,
        "expires_at": None,
        "status": AgentStatus.ACTIVE,
        "created_at": NOW - 10 * DAY,
    }
    return Agent(**{**fields, **extra})


AGENTS = [
    _agent("acme-crm-bot", "acme", "alice", last_used_at=NOW - DAY),
    _agent(
        "acme-billing-bot",
        "acme",
        "alice",
        jwks={},
        spiffe_id="spiffe://corp.example/billing",
    ),
    _agent("acme-expired", "acme", "carol", expires_at=NOW - DAY),
    _agent("globex-desk", "globex", "bob"),
    _agent("globex-old", "globex", "bob", status=AgentStatus.SUSPENDED, status_reason="replaced"),
]

# Worked out by hand from the grants above: (upstream, tool) -> access.
ACME = {("crm", "read_contact"): "allowed", ("reports", "send"): "allowed"}
REACH = {
    # read_contact only (not delete_contact); nothing of notes: it is staging, the agents prod.
    "acme-crm-bot": ACME,
    "acme-expired": ACME,
    # charge, and not refund: the forbid removes it.
    "acme-billing-bot": {**ACME, ("billing", "charge"): "allowed"},
    # create_ticket only for queue "support": conditional.
    "globex-desk": {
        ("tickets", "list_tickets"): "allowed",
        ("tickets", "create_ticket"): "conditional",
    },
    "globex-old": {
        ("tickets", "list_tickets"): "allowed",
        ("tickets", "create_ticket"): "conditional",
    },
}


class Deployment:
    """A config file, its registry, its saved catalog and its secrets' values."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.values = {
            "env": "tickets-client-" + secrets.token_hex(16),
            "file": "billing-token-" + secrets.token_hex(16),
            "notes": "notes-token-" + secrets.token_hex(16),
        }
        monkeypatch.setenv("TICKETS_CLIENT_SECRET", self.values["env"])
        monkeypatch.setenv("NOTES_TOKEN", self.values["notes"])
        self.billing_token = tmp / "billing-token"
        self.billing_token.write_text(self.values["file"])
        (tmp / "policy.cedar").write_text(FORBID)
        self.path = tmp / "bastion.yaml"
        self.path.write_text(yaml.safe_dump(_config(tmp, self.billing_token)))
        self.settings = config.load(self.path)
        state = Path(self.settings.state_dir)
        state.mkdir(parents=True)
        (state / CATALOG_FILE).write_text(json.dumps(LISTINGS))
        with SqliteRegistry(state / "registry.db") as registry:
            for agent in AGENTS:
                registry.add(agent)

    def inventory(self, usage: Usage | None = None) -> Inventory:
        with SqliteRegistry(Path(self.settings.state_dir) / "registry.db") as registry:
            agents = registry.list()
        engine = load_engine(self.settings)
        return build_inventory(self.settings, agents, engine, usage or Usage(), NOW)


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    return Deployment(tmp_path, monkeypatch)


def _reach(found: Inventory, agent: str) -> dict[tuple[str, str], str]:
    entry = found.agent(agent)
    assert entry is not None
    return {(up.upstream, t.tool): t.access for up in entry.reach for t in up.tools}


def test_reach_is_derived_from_the_policy(deployment: Deployment) -> None:
    found = deployment.inventory()
    assert found.reach_known
    assert {agent: _reach(found, agent) for agent in REACH} == REACH
    desk = found.agent("globex-desk")
    assert desk is not None
    (tickets,) = desk.reach
    create = next(t for t in tickets.tools if t.tool == "create_ticket")
    assert create.permits == ("grant:globex-write",) and create.approval
    listing = next(t for t in tickets.tools if t.tool == "list_tickets")
    assert listing.permits == ("grant:globex-read",) and not listing.approval


def test_a_forbid_removes_a_tool_and_names_itself_when_conditional(
    deployment: Deployment,
) -> None:
    # Unconditional: refund is gone for the billing bot (above). Made conditional, it stays,
    # with the forbid named as what may stop it.
    conditional = FORBID.replace("resource);", "resource)\nwhen { context.request.time.hour < 8 };")
    Path(deployment.settings.policy.files[0]).write_text(conditional)
    found = deployment.inventory()
    entry = found.agent("acme-billing-bot")
    assert entry is not None
    billing = next(up for up in entry.reach if up.upstream == "billing")
    refund = next(t for t in billing.tools if t.tool == "refund")
    assert (refund.access, refund.permits, refund.forbids) == (
        "conditional",
        ("grant:acme-billing",),
        ("no-refunds",),
    )


def test_agents_statuses_keys_and_owners(deployment: Deployment) -> None:
    found = deployment.inventory()
    statuses = {entry.id: entry.status for entry in found.agents}
    assert statuses == {
        "acme-billing-bot": "active",
        "acme-crm-bot": "active",
        "acme-expired": "expired",
        "globex-desk": "active",
        "globex-old": "suspended",
    }
    assert [entry.id for entry in found.agents] == sorted(
        statuses, key=lambda a: (a.split("-")[0], a)
    )
    assert {owner: [a.id for a in agents] for owner, agents in found.by_owner().items()} == {
        "alice": ["acme-billing-bot", "acme-crm-bot"],
        "bob": ["globex-desk", "globex-old"],
        "carol": ["acme-expired"],
    }
    bot = found.agent("acme-crm-bot")
    billing = found.agent("acme-billing-bot")
    assert bot is not None and billing is not None
    assert [(k.algorithm, round(k.age_s / DAY)) for k in bot.keys] == [("ES256", 10)]
    assert bot.last_used_at == pytest.approx(NOW - DAY)
    assert billing.keys == () and billing.spiffe_id == "spiffe://corp.example/billing"


def test_upstreams_credentials_and_environments(deployment: Deployment) -> None:
    found = deployment.inventory()
    shown = {
        up.name: (up.environment, up.credential.mode, up.credential.secret_source,
                  up.credential.secret_ref or up.credential.client_secret_ref)
        for up in found.upstreams
    }  # fmt: skip
    assert shown == {
        "billing": ("prod", "secret", "file", f"file:{deployment.billing_token}"),
        "crm": ("prod", "mint", None, None),
        "notes": ("staging", "secret", "env", "env:NOTES_TOKEN"),
        "reports": ("prod", "secret", "vault", "vault:kv/data/reports#token"),
        "tickets": ("prod", "token_exchange", None, "env:TICKETS_CLIENT_SECRET"),
    }


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize("form", ["text", "--json", "--csv"])
def test_secrets_show_where_they_live_never_their_value(deployment: Deployment, form: str) -> None:
    """The attack: an operator shares the inventory (a ticket, a spreadsheet); a secret's
    value in it would be a leak. Every form names the references and holds no value."""
    result = _cli(
        "inventory", "--config", str(deployment.path), *([form] if form[0] == "-" else [])
    )
    assert result.exit_code == 0, result.output
    out = result.output
    for reference in (
        "env:TICKETS_CLIENT_SECRET",
        f"file:{deployment.billing_token}",
        "vault:kv/data/reports#token",
    ):
        assert reference in out
    for value in deployment.values.values():
        assert value not in out


def test_text_shows_the_chain_owner_agent_credential_upstream(deployment: Deployment) -> None:
    result = _cli("inventory", "--config", str(deployment.path))
    assert result.exit_code == 0, result.output
    text = result.output
    alice = text.index("owner alice")
    bot = text.index("agent acme-billing-bot", alice)
    proves = text.index("SPIFFE ID spiffe://corp.example/billing", bot)
    reaches = text.index("billing [prod] via secret from file:", proves)
    assert text.index("charge  allowed  (permit grant:acme-billing)", reaches) > reaches
    assert "refund" not in text
    assert "agent acme-expired  tenant acme  [prod]  expired" in text
    assert "agent globex-old  tenant globex  [prod]  suspended (replaced)" in text
    assert "notes  [staging]  http  secret from env:NOTES_TOKEN" in text


def test_csv_is_a_row_per_agent_and_tool(deployment: Deployment) -> None:
    result = _cli("inventory", "--config", str(deployment.path), "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert {(r["agent"], r["upstream"], r["tool"], r["access"]) for r in rows} == {
        (agent, up, tool, access)
        for agent, reach in REACH.items()
        for (up, tool), access in reach.items()
    }
    desk = next(r for r in rows if r["tool"] == "create_ticket" and r["agent"] == "globex-desk")
    assert desk["credential"] == "token_exchange"
    assert desk["secret_location"] == "env:TICKETS_CLIENT_SECRET"


def test_json_matches_the_inventory_and_errors_are_one_line(
    deployment: Deployment, tmp_path: Path
) -> None:
    result = _cli("inventory", "--config", str(deployment.path), "--json", "--days", "7")
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["days"] == 7 and body["reach_known"] is True
    assert [a["id"] for a in body["agents"]] == [a.id for a in deployment.inventory().agents]
    both = _cli("inventory", "--config", str(deployment.path), "--json", "--csv")
    assert both.exit_code == 2 and "at most one of --json and --csv" in both.output
    missing = _cli("inventory", "--config", str(deployment.path), "--catalog", str(tmp_path))
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert "no tool catalog" in missing.output


def test_without_a_catalog_reach_is_unknown_not_empty(deployment: Deployment) -> None:
    (Path(deployment.settings.state_dir) / CATALOG_FILE).unlink()
    result = _cli("inventory", "--config", str(deployment.path))
    assert result.exit_code == 0, result.output
    assert "reach unknown: no tool catalog" in result.output
    assert "reaches   (unknown)" in result.output and "reaches   nothing" not in result.output


def _record(agent: str | None, tool: str, decision: str, when: float, **extra: Any) -> AuditRecord:
    server, _, name = tool.partition("__")
    fields: dict[str, Any] = {
        "time": when,
        "request_id": secrets.token_hex(8),
        "phase": "decision",
        "tenant": "acme",
        "agent": agent,
        "method": "tools/call",
        "server": server,
        "tool_original": name,
        "tool_exposed": tool,
        "decision": decision,
    }
    return AuditRecord(**{**fields, **extra})


TRAIL = [
    _record("acme-crm-bot", "crm__read_contact", "allow", NOW - 2 * DAY),
    _record("acme-crm-bot", "crm__read_contact", "allow", NOW - 3600),
    _record("acme-crm-bot", "crm__delete_contact", "deny", NOW - 7200),
    _record("acme-crm-bot", "crm__read_contact", "allow", NOW - 40 * DAY),  # outside 30 days
    _record("acme-crm-bot", "crm__read_contact", "allow", NOW - 60, phase="outcome"),
    _record("acme-crm-bot", "crm__read_contact", "allow", NOW - 60, method="prompts/get"),
    # An operator's act on the agent names it in detail: not a use of it.
    _record(None, "crm__read_contact", "allow", NOW - 60, detail={"target_agent": "globex-desk"}),
    _record("globex-desk", "tickets__list_tickets", "allow", NOW - 5 * DAY),
]


def test_usage_counts_the_window_from_the_trail(deployment: Deployment) -> None:
    writer = open_trail_writer(deployment.settings)

    async def write() -> None:
        await writer.start()
        for record in TRAIL:
            await writer.append(record, True)
        await writer.stop()

    asyncio.run(write())
    usage = read_usage(deployment.settings, NOW - 30 * DAY)
    assert usage == usage_from_records(TRAIL, NOW - 30 * DAY)
    found = deployment.inventory(usage)
    bot = found.agent("acme-crm-bot")
    desk = found.agent("globex-desk")
    assert bot is not None and desk is not None
    assert [(u.upstream, u.tool, u.allowed, u.denied) for u in bot.used] == [
        ("crm", "read_contact", 2, 0),
        ("crm", "delete_contact", 0, 1),
    ]
    assert bot.used[0].last_at == pytest.approx(NOW - 3600)
    assert [(u.tool, u.allowed) for u in desk.used] == [("list_tickets", 1)]
    assert found.agent("acme-billing-bot").used == ()  # type: ignore[union-attr]
    text = _cli("inventory", "--config", str(deployment.path)).output
    assert "crm/read_contact  2 allowed, 0 denied" in text


def test_usage_without_a_trail_says_so(deployment: Deployment) -> None:
    usage = read_usage(deployment.settings, NOW - DAY)
    assert usage.by_agent == {} and usage.note is not None and "no audit trail" in usage.note
