"""Access reviews: each rule tripped and not tripped at its boundary (table-driven), the
review store's one-open / decide-once / close-when-decided rules, decisions carried out
(revoke suspends) and written to the trail, the report, the reminder; one real gateway for a
revoke refusing a live agent's token and for the reminder's alert in the trail."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import ALLOW_ALL, BASTION, GatewayProcess, free_port, start_gateway, until_async
from tests.test_admin_api import _echo_upstream, admin, agent_token, echo, eventually, records

from bastion.audit.detect import Alert
from bastion.config import Governance, Grant, Settings, parse
from bastion.control.governance import reviewer
from bastion.control.governance.review import (
    DAY,
    RULES,
    AgentReach,
    Facts,
    Finding,
    GrantUse,
    expiry_too_far,
    find,
    grant_uses,
    long_lived_secret,
    no_expiry,
    no_owner,
    old_key,
    owner_gone,
    stale_suspension,
    tenantless_grant,
    unexercised_grant,
    unused_agent,
    wildcard_grant,
)
from bastion.control.governance.reviews import Decision, SqliteReviewStore
from bastion.control.registry.agents import Agent, AgentStatus
from bastion.control.registry.store import SqliteRegistry
from bastion.errors import RegistryConflict, RegistryInvalid, RegistryNotFound
from bastion.identity.keys import generate

NOW = 1_800_000_000.0
SETTINGS = Governance()  # 30 unused, 365 expiry, 180 key age, 14 suspended, 90 between reviews


def agent(agent_id: str = "bot", **changes: Any) -> Agent:
    """An active agent registered 10 days before NOW, used yesterday, expiring in 30 days."""
    base = Agent(
        id=agent_id, display_name=agent_id, owner="alice", tenant="acme", purpose="tests",
        environment="dev", jwks={"keys": [{"kid": "k1"}]}, spiffe_id=None, audiences=(),
        scopes=(), require_dpop=False, expires_at=NOW + 30 * DAY, status=AgentStatus.ACTIVE,
        created_at=NOW - 10 * DAY, last_used_at=NOW - DAY,
    )  # fmt: skip
    return replace(base, **changes)


def grant(**fields: Any) -> Grant:
    return Grant.model_validate({"id": "g1", "tenant": "acme", "server": "crm", **fields})


def use(permitted: set[str], called: set[str], known: bool = True, calls: int = 0) -> GrantUse:
    def pairs(names: set[str]) -> frozenset[tuple[str, str]]:
        return frozenset(("crm", name) for name in names)

    return GrantUse(grant(tools=["read", "write"]), pairs(permitted), pairs(called), calls, known)


def agents(*items: Agent, rotated: float | None = None, changed: float | None = None) -> Facts:
    return Facts(
        agents=items,
        keys_rotated_at={a.id: rotated for a in items},
        status_changed_at={a.id: changed for a in items},
    )


def grants(*items: Grant) -> Facts:
    return Facts(grants=tuple(GrantUse(g, frozenset(), frozenset(), 1, False) for g in items))


SUSPENDED = AgentStatus.SUSPENDED
# (rule, facts, settings, finding ids expected): each rule with subjects on both sides of its
# threshold.
CASES: list[tuple[Callable[..., Iterator[Finding]], Facts, Governance, list[str]]] = [
    (unused_agent, agents(agent(last_used_at=NOW - 30 * DAY - 1)), SETTINGS,
     ["unused_agent:agent/bot"]),
    (unused_agent, agents(agent(last_used_at=NOW - 30 * DAY)), SETTINGS, []),
    (unused_agent, agents(agent(last_used_at=None, created_at=NOW - 31 * DAY)), SETTINGS,
     ["unused_agent:agent/bot"]),
    (unused_agent, agents(agent(last_used_at=None, created_at=NOW - 29 * DAY)), SETTINGS, []),
    (unused_agent, agents(agent(last_used_at=NOW - 99 * DAY, status=SUSPENDED)), SETTINGS, []),
    (no_owner, agents(agent(owner=" Unknown ")), SETTINGS, ["no_owner:agent/bot"]),
    (no_owner, agents(agent(owner="-")), SETTINGS, ["no_owner:agent/bot"]),
    (no_owner, agents(agent(owner="alice")), SETTINGS, []),
    (owner_gone, agents(agent(owner="bob")), Governance(owners=("Alice",)),
     ["owner_gone:agent/bot"]),
    (owner_gone, agents(agent(owner="alice")), Governance(owners=("Alice",)), []),
    (owner_gone, agents(agent(owner="bob")), Governance(owners=()), []),  # no source: off
    (no_expiry, agents(agent(expires_at=None)), SETTINGS, ["no_expiry:agent/bot"]),
    (no_expiry, agents(agent(expires_at=NOW + DAY)), SETTINGS, []),
    (expiry_too_far, agents(agent(expires_at=NOW + 365 * DAY + 1)), SETTINGS,
     ["expiry_too_far:agent/bot"]),
    (expiry_too_far, agents(agent(expires_at=NOW + 365 * DAY)), SETTINGS, []),
    (old_key, agents(agent(created_at=NOW - 180 * DAY - 1)), SETTINGS, ["old_key:agent/bot"]),
    (old_key, agents(agent(created_at=NOW - 180 * DAY)), SETTINGS, []),
    # A rotation since resets the age; a key's own `iat` wins over both.
    (old_key, agents(agent(created_at=NOW - 400 * DAY), rotated=NOW - DAY), SETTINGS, []),
    (old_key, agents(agent(jwks={"keys": [{"kid": "k1", "iat": NOW - 200 * DAY}]}),
                     rotated=NOW - DAY), SETTINGS, ["old_key:agent/bot"]),
    (stale_suspension, agents(agent(status=SUSPENDED), changed=NOW - 14 * DAY - 1), SETTINGS,
     ["stale_suspension:agent/bot"]),
    (stale_suspension, agents(agent(status=SUSPENDED), changed=NOW - 14 * DAY), SETTINGS, []),
    (stale_suspension, agents(agent(created_at=NOW - 99 * DAY)), SETTINGS, []),  # active
    (wildcard_grant, grants(grant(tools="*")), SETTINGS, ["wildcard_grant:grant/g1"]),
    (wildcard_grant, grants(grant(server="*", tools=["a"])), SETTINGS, ["wildcard_grant:grant/g1"]),
    (wildcard_grant, grants(grant(tools=["read"], resources=["crm://*"])), SETTINGS, []),
    (tenantless_grant, grants(grant(tenant="*", tools=["read"])), SETTINGS,
     ["tenantless_grant:grant/g1"]),
    (tenantless_grant, grants(grant(tools=["read"])), SETTINGS, []),
    (long_lived_secret, Facts(credentials={"crm": {"mode": "secret", "secret": "env:T"}}),
     SETTINGS, ["long_lived_secret:upstream/crm"]),
    (long_lived_secret, Facts(credentials={"crm": {"mode": "mint"}}), SETTINGS, []),
    (unexercised_grant, Facts(grants=(use({"read", "write"}, {"read"}),)), SETTINGS,
     ["unexercised_grant:grant/g1"]),
    (unexercised_grant, Facts(grants=(use({"read"}, {"read"}),)), SETTINGS, []),
    (unexercised_grant, Facts(grants=(use(set(), set(), known=False, calls=0),)), SETTINGS,
     ["unexercised_grant:grant/g1"]),
    (unexercised_grant, Facts(grants=(use(set(), set(), known=False, calls=3),)), SETTINGS, []),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "facts", "settings", "expected"), CASES)
def test_each_rule_trips_past_its_threshold_and_not_at_it(
    rule: Callable[..., Iterator[Finding]], facts: Facts, settings: Governance, expected: list[str]
) -> None:
    assert [f.id for f in rule(facts, settings, NOW)] == expected


def test_every_rule_is_in_the_table_both_ways() -> None:
    tripped = {rule.__name__ for rule, _, _, ids in CASES if ids}
    quiet = {rule.__name__ for rule, _, _, ids in CASES if not ids}
    names = {rule.__name__ for rule in RULES}
    assert tripped == quiet == names


def test_offboarded_agents_are_never_findings() -> None:
    gone = agent(status=AgentStatus.OFFBOARDED, owner="none", expires_at=None, last_used_at=None,
                 created_at=NOW - 999 * DAY)  # fmt: skip
    assert find(agents(gone), Governance(owners=("bob",)), NOW) == []


def test_evidence_names_what_tripped_the_rule() -> None:
    [found] = unexercised_grant(Facts(grants=(use({"read", "write"}, {"read"}),)), SETTINGS, NOW)
    assert found.evidence["unused_tools"] == ["crm/write"]
    assert found.evidence["called_tools"] == ["crm/read"]
    assert found.action == "narrow" and found.tenant == "acme"
    [idle] = unused_agent(agents(agent(last_used_at=NOW - 45 * DAY)), SETTINGS, NOW)
    assert idle.evidence["idle_days"] == 45.0 and idle.evidence["limit_days"] == 30


def _settings(tmp: Path, extra: str = "") -> Settings:
    text = (
        "policy:\n  grants:\n"
        "    - {id: g1, tenant: acme, server: crm, tools: [read, write]}\n"
        '    - {id: g2, tenant: "*", server: "*", tools: "*"}\n'
        "upstreams:\n  crm: {transport: http, url: 'http://127.0.0.1:9/mcp'}\n" + extra
    )
    return parse(text, base=tmp)


def test_grant_uses_count_only_calls_of_the_agents_a_grant_covers(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    reach = [
        AgentReach("a1", "acme", used=(("crm", "read", 4),)),
        AgentReach("b1", "globex", used=(("crm", "write", 9),)),  # another tenant's call
    ]
    g1, g2 = grant_uses(settings, reach, reach_known=False)
    assert g1.permitted == {("crm", "read"), ("crm", "write")}
    assert g1.called == {("crm", "read")} and g1.known
    assert not g2.known and g2.calls == 13  # every tenant: both agents' calls count
    # With the policy engine's reach, a grant permits what it does for the agents it covers.
    known = [AgentReach("a1", "acme", reach=(("crm", "read", ("grant:g1",)),), used=())]
    [g1_known, _] = grant_uses(settings, known, reach_known=True)
    assert g1_known.permitted == {("crm", "read")} and g1_known.called == frozenset()


# -- the store -----------------------------------------------------------------------------------


def _finding(rule: str = "no_expiry", subject: str = "bot", kind: Any = "agent") -> Finding:
    return Finding(f"{rule}:{kind}/{subject}", rule, kind, subject, "never expires", "suspend",
                   {}, "acme")  # fmt: skip


def test_one_review_open_at_a_time_each_finding_decided_once(tmp_path: Path) -> None:
    with SqliteReviewStore(tmp_path / "registry.db") as store:
        review = store.start([_finding()], {"since": "30d"}, "alice", NOW)
        with pytest.raises(RegistryConflict, match=f"review {review.id} is open"):
            store.start([], {}, "bob", NOW)
        with pytest.raises(RegistryConflict, match="1 findings are undecided"):
            store.close_review(review.id, "alice", NOW)
        with pytest.raises(RegistryNotFound, match="has no finding 'nope'"):
            store.decide(review.id, Decision("nope", "keep", "x", "alice", NOW, "none"))
        store.decide(review.id, Decision(_finding().id, "keep", "ok", "alice", NOW, "none"))
        with pytest.raises(RegistryConflict, match="decided already"):
            store.decide(review.id, Decision(_finding().id, "revoke", None, "bob", NOW, "x"))
        closed = store.close_review(review.id, "alice", NOW + 1)
        assert closed.status == "closed" and store.last_closed_at() == NOW + 1
        with pytest.raises(RegistryConflict, match="is closed"):
            store.decide(review.id, Decision(_finding().id, "keep", "x", "a", NOW, "none"))
        store.start([], {}, "bob", NOW + 2)  # closed: the next may start
        with pytest.raises(RegistryNotFound, match="no review 'x"):
            store.get("x" * 500)


def _register(path: Path, *items: Agent) -> None:
    key = generate("ES256").public_jwk()
    with SqliteRegistry(path) as registry:
        for item in items:
            registry.add(replace(item, jwks={"keys": [key]}))


def test_revoke_suspends_an_agent_offboards_a_suspended_one_and_narrows_grants(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, f"state_dir: {tmp_path / 'state'}\n")
    registry = reviewer.registry_file(settings)
    now = time.time()
    _register(registry, agent("idle", created_at=now - 99 * DAY, last_used_at=None,
                              expires_at=now + DAY))  # fmt: skip
    _register(registry, agent("parked", created_at=now - 99 * DAY, expires_at=now + DAY))
    with SqliteRegistry(registry) as store:
        store.set_status("parked", AgentStatus.SUSPENDED, "incident")
        # As if it was suspended three weeks ago.
        db = sqlite3.connect(registry)
        db.execute("UPDATE agents SET status_changed_at = ? WHERE id = 'parked'", (now - 21 * DAY,))
        db.commit()
        db.close()
    with SqliteReviewStore(registry) as reviews:
        opened = reviews.start(reviewer.findings(settings, now - 30 * DAY, now), {}, "me", now)
    ids = {f.id for f in opened.findings}
    assert {"unused_agent:agent/idle", "stale_suspension:agent/parked",
            "unexercised_grant:grant/g1"} <= ids  # fmt: skip
    with pytest.raises(RegistryInvalid, match="reason"):
        reviewer.decide(settings, None, "unused_agent:agent/idle", "keep", None, "me", now)
    with pytest.raises(RegistryInvalid, match="expected keep or revoke"):
        reviewer.decide(settings, None, "unused_agent:agent/idle", "drop", None, "me", now)
    _, _, made = reviewer.decide(
        settings, None, "unused_agent:agent/idle", "revoke", None, "me", now
    )
    assert made.effect == "suspended agent idle"
    _, _, ended = reviewer.decide(
        settings, None, "stale_suspension:agent/parked", "revoke", None, "me", now
    )
    assert ended.effect == "offboarded agent parked"
    _, _, narrowed = reviewer.decide(
        settings, opened.id, "unexercised_grant:grant/g1", "revoke", None, "me", now
    )
    assert "policy.grants" in narrowed.effect and "crm/read, crm/write" in narrowed.effect
    assert "does not write its config file" in narrowed.effect
    with SqliteRegistry(registry) as store:
        assert store.get("idle").status is AgentStatus.SUSPENDED
        assert store.get("idle").status_reason == f"access review {opened.id}: unused_agent"
        assert store.get("parked").status is AgentStatus.OFFBOARDED


def test_key_rotation_and_status_changes_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    _register(path, agent("bot"))
    with SqliteRegistry(path) as store:
        assert store.lifecycle() == {"bot": (None, None)}
        before = time.time()
        store.rotate_key("bot", {"keys": [generate("ES256").public_jwk()]})
        store.set_status("bot", AgentStatus.SUSPENDED, "why")
        rotated, changed = store.lifecycle()["bot"]
    assert rotated is not None and rotated >= before
    assert changed is not None and changed >= before


# -- the report ----------------------------------------------------------------------------------


def test_the_report_holds_every_finding_and_decision_and_escapes_free_text(
    tmp_path: Path,
) -> None:
    hostile = _finding("owner_gone", "bot")
    hostile = replace(hostile, message="owner 'x | y\n# injected <b>' is gone")
    other = _finding("no_expiry", "other")
    with SqliteReviewStore(tmp_path / "registry.db") as store:
        review = store.start([hostile, other], {"since": "7d"}, "alice", NOW)
        store.decide(review.id, Decision(hostile.id, "keep", "a | b", "alice", NOW, "none"))
        review = store.get(review.id)
    markdown = reviewer.report_markdown(review)
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # the header and one row per finding: nothing broke a row apart
    assert all(line.replace("\\|", "").count("|") == 11 for line in rows)
    assert "\n# injected" not in markdown and "<b>" not in markdown
    assert hostile.id in markdown and other.id in markdown and "undecided" in markdown
    data = reviewer.report_json(review)
    assert [f["id"] for f in data["findings"]] == [hostile.id, other.id]
    assert data["findings"][0]["decision"]["reason"] == "a | b"
    assert data["findings"][1]["decision"] is None and data["undecided"] == [other.id]


# -- the reminder ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_closed", "oldest", "due"),
    [
        (NOW - 90 * DAY, None, NOW),  # 90 days after the last closed review: due
        (NOW - 90 * DAY + 1, NOW - 999 * DAY, None),  # a closed review counts, not agents
        (None, NOW - 91 * DAY, NOW - DAY),  # never reviewed: from the oldest agent
        (None, NOW - 89 * DAY, None),
        (None, None, None),  # nothing registered, nothing reviewed: nothing to review
    ],
)
def test_a_review_is_due_every_n_days(
    last_closed: float | None, oldest: float | None, due: float | None
) -> None:
    assert reviewer.review_due(last_closed, oldest, 90, NOW) == due


async def test_the_reminder_alerts_when_a_review_is_due_and_not_after_one(tmp_path: Path) -> None:
    settings = _settings(tmp_path, f"state_dir: {tmp_path / 'state'}\n")
    registry = reviewer.registry_file(settings)
    _register(registry, agent("old", created_at=time.time() - 100 * DAY))
    raised: list[Alert] = []

    async def collect(alert: Alert) -> None:
        raised.append(alert)

    async def one_round() -> None:
        reminder = reviewer.ReviewReminder(settings, collect)
        task = asyncio.create_task(reminder.watch.run())
        await until_async(lambda: reminder.watch.rounds >= 1, "a reminder round")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    await one_round()
    assert [a.rule for a in raised] == ["review_due"]
    assert raised[0].agent == "bastion" and "bastion review start" in raised[0].message
    with SqliteReviewStore(registry) as store:
        store.close_review(store.start([], {}, "me", time.time()).id, "me", time.time())
    await one_round()
    assert len(raised) == 1  # the review just closed: the next is due in 90 days


# -- the CLI and a real gateway ----------------------------------------------------------------


SEEDS = [
    {"id": "worker", "tenant": "acme", "owner": "tests", "purpose": "does work"},
    {"id": "helper", "tenant": "acme", "owner": "tests", "purpose": "helps"},
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("review")
    (tmp / "state").mkdir(mode=0o700)
    # Registered 100 days ago and never reviewed: the gateway's reminder alerts at start.
    _register(tmp / "state" / "registry.db",
              agent("veteran", created_at=time.time() - 100 * DAY, expires_at=None))  # fmt: skip
    port = free_port()
    settings = {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_dir": str(tmp / "state"),
        "auth": {"mode": "oauth", "agents": SEEDS},
        "policy": ALLOW_ALL,
        "upstreams": _echo_upstream(),
    }
    gateway = start_gateway(tmp, yaml.safe_dump(settings), port)
    yield gateway
    gateway.stop()


def test_a_review_due_is_an_alert_in_the_trail(gw: GatewayProcess) -> None:
    alerts = eventually(lambda: [
        r for r in records(gw, phase="alert") if r["detail"]["rule"] == "review_due"
    ])  # fmt: skip
    assert len(alerts) == 1 and alerts[0]["agent"] == "bastion"
    assert alerts[0]["detail"]["review_every_days"] == 90


def test_revoke_through_the_admin_api_refuses_the_agent_at_once_and_is_audited(
    gw: GatewayProcess,
) -> None:
    token = agent_token(gw, "worker")
    assert echo(gw, token, "before").status_code == 200
    listed = admin(gw, "/review", params={"since": "1d"})
    assert listed.status_code == 200 and "no_expiry:agent/worker" in {
        f["id"] for f in listed.json()["findings"]
    }
    started = admin(gw, "/reviews", "POST", json={"since": "1d", "by": "carol"})
    assert started.status_code == 201, started.text
    review = started.json()["review"]
    assert started.json()["audited"]
    assert admin(gw, "/reviews", "POST", json={}).status_code == 409  # one open at a time
    path = f"/reviews/{review['id']}"
    missing = admin(gw, path + "/decisions", "POST", json={"decision": "revoke"})
    assert missing.status_code == 400 and missing.json()["parameter"] == "finding"
    unknown = admin(gw, path + "/decisions", "POST", json={"finding": "x", "decision": "keep",
                                                           "reason": "r"})  # fmt: skip
    assert unknown.status_code == 404
    revoked = admin(
        gw,
        path + "/decisions",
        "POST",
        json={"finding": "no_expiry:agent/worker", "decision": "revoke", "by": "carol"},
    )
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["decision"]["effect"] == "suspended agent worker"
    assert revoked.json()["audited"]
    refused = echo(gw, token, "after")  # in force before the answer: no poll to wait for
    assert refused.status_code == 401
    assert refused.json()["error"]["data"]["reason"] == "suspended"
    kept = admin(
        gw,
        path + "/decisions",
        "POST",
        json={
            "finding": "no_expiry:agent/helper",
            "decision": "keep",
            "reason": "expires with project",
        },
    )
    assert kept.status_code == 200, kept.text
    decided = [
        (r["detail"]["finding"], r["detail"]["verdict"], r["detail"]["actor"], r.get("reason"))
        for r in records(gw, phase="decision")
        if r.get("method") == "admin/reviews/decide"
    ]
    assert decided == [
        ("no_expiry:agent/worker", "revoke", "carol", None),
        ("no_expiry:agent/helper", "keep", "admin", "expires with project"),
    ]
    assert all(r.get("agent") is None for r in records(gw, phase="decision")
               if r.get("method", "").startswith("admin/reviews/"))  # fmt: skip
    report = admin(gw, path + "/report", params={"format": "md"})
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/markdown")
    for finding in review["findings"]:
        assert finding["id"] in report.text
    assert "expires with project" in report.text
    as_json = admin(gw, path + "/report", params={"format": "json"}).json()
    assert {f["id"] for f in as_json["findings"]} == {f["id"] for f in review["findings"]}
    bad = admin(gw, path + "/report", params={"format": "pdf"})
    assert bad.status_code == 400 and bad.json()["parameter"] == "format"
    assert admin(gw, "/reviews/nope/report").status_code == 404
    assert admin(gw, path + "/close", "POST").status_code == 409  # findings left undecided


def test_the_cli_decides_closes_exports_and_audits(gw: GatewayProcess) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return gw.cli("review", *args)

    listed = run("--json", "--since", "2d")  # `bastion review --config F --json`: as of now
    assert listed.returncode == 0, listed.stderr
    assert "no_expiry:agent/veteran" in {f["id"] for f in json.loads(listed.stdout)["findings"]}
    if "no review is open" in run("export").stderr:  # run alone, without the admin API's test
        assert run("start", "--since", "1d").returncode == 0
    current = json.loads(run("export", "--format", "json").stdout)
    assert current["status"] == "open" and current["undecided"]
    for finding in current["undecided"]:
        done = run("decide", finding, "keep", "--reason", "accepted for now", "--by", "dave")
        assert done.returncode == 0, done.stderr
    again = run("decide", current["undecided"][0], "revoke")
    assert again.returncode == 1 and "decided already" in again.stderr
    assert run("close", "--by", "dave").returncode == 0
    report = run("export", "--review", current["id"], "--format", "md")
    assert report.returncode == 0 and "- status: closed" in report.stdout
    for finding in current["findings"]:
        assert finding["id"] in report.stdout
    acts = [
        (r["method"], r["route"], r["detail"]["actor"])
        for r in records(gw, phase="decision")
        if r.get("method") in ("admin/reviews/decide", "admin/reviews/close")
        and r["route"] == "cli"
    ]
    assert acts[-1] == ("admin/reviews/close", "cli", "dave")
    assert len(acts) == len(current["undecided"]) + 1
    assert subprocess.run([*BASTION, "review", "--help"], capture_output=True).returncode == 0
