"""Policy decisions, table-driven, against the quickstart's own policy and the demo server's real
tool list (listed from the workspace server built in process, as the gateway lists it).

Every deny case is an attack or a mistake that policy must stop; every allow case proves the
deny cases are not passing because everything is denied.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import EXAMPLES, demo_listings

from bastion import config
from bastion.background import Background
from bastion.errors import PolicyError, PolicyLoadError
from bastion.pipeline.authz import Authorizer
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.tenancy import TenantNames
from bastion.state.rates import MemoryRateCounter
from bastion.types import Era, Principal, Target


def _settings(tmp: Path, extra_cedar: str | None = None) -> config.Settings:
    """The quickstart's config with its policy file copied, so a test may edit it."""
    shutil.copytree(EXAMPLES / "policies", tmp / "policies", dirs_exist_ok=True)
    if extra_cedar is not None:
        (tmp / "policies" / "workspace.cedar").write_text(extra_cedar)
    text = (EXAMPLES / "quickstart.yaml").read_text()
    return config.parse(text, base=tmp)


def _authorizer(settings: config.Settings, listings: dict[str, Any]) -> Authorizer:
    async def lister(upstream: str) -> dict[str, Any]:
        return listings[upstream]

    authz = Authorizer(settings, lister, MemoryRateCounter())
    asyncio.run(authz.start())
    return authz


@pytest.fixture(scope="module")
def listings() -> dict[str, Any]:
    return demo_listings()


@pytest.fixture
def authz(tmp_path: Path, listings: dict[str, Any]) -> Authorizer:
    return _authorizer(_settings(tmp_path), listings)


AGENTS = {
    "acme-reader": "acme",
    "acme-admin": "acme",
    "globex-reader": "globex",
}


def _exchange(
    agent: str, method: str, params: dict[str, Any], target: Target, session_key: str = "s"
) -> Exchange:
    message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    principal = Principal(tenant=AGENTS.get(agent, agent.split("-")[0]), agent=agent, user="alice")
    ex = Exchange(message, Era.MODERN, "2026-07-28", "default", "127.0.0.1:5000", principal)
    ex.target = target
    return ex


def call(authz: Authorizer, agent: str, tool: str, **arguments: Any) -> Exchange:
    server, _, name = tool.partition("__")
    params = {"name": tool, "arguments": arguments}
    ex = _exchange(agent, "tools/call", params, Target(server, name))
    asyncio.run(authz.authorize(ex))
    return ex


CASES = [
    # (what, agent, tool, arguments, allowed, deciding policy or None, reason fragment)
    (
        "reader reads its own task",
        "acme-reader",
        "workspace__get_task",
        {"task_id": "acme-t1"},
        True,
        "grant:acme-read",
        "read their workspace",
    ),
    (
        "reader searches its workspace",
        "acme-reader",
        "workspace__search_tasks",
        {"query": "launch"},
        True,
        "grant:acme-read",
        "",
    ),
    (
        "globex reader reads globex",
        "globex-reader",
        "workspace__get_task",
        {"task_id": "globex-t1"},
        True,
        "grant:globex-read",
        "",
    ),
    (
        "admin deletes an acme project",
        "acme-admin",
        "workspace__delete_project",
        {"project_id": "acme-p1"},
        True,
        "grant:acme-admin-write",
        "",
    ),
    (
        "reader deletes (destructive tool, not admin)",
        "acme-reader",
        "workspace__delete_project",
        {"project_id": "acme-p1"},
        False,
        None,
        "default deny",
    ),
    (
        "reader creates a task (write tool, not admin)",
        "acme-reader",
        "workspace__create_task",
        {"project_id": "acme-p1", "title": "x"},
        False,
        None,
        "default deny",
    ),
    (
        "acme reader names a globex task (cross-tenant argument)",
        "acme-reader",
        "workspace__get_task",
        {"task_id": "globex-t1"},
        False,
        "tenant-binding",
        "another tenant's",
    ),
    (
        "admin deletes globex's project: forbidden despite its permit",
        "acme-admin",
        "workspace__delete_project",
        {"project_id": "globex-p1"},
        False,
        "tenant-binding",
        "another tenant's",
    ),
    (
        "globex reader names an acme task",
        "globex-reader",
        "workspace__get_task",
        {"task_id": "acme-t2"},
        False,
        "tenant-binding",
        "",
    ),
    (
        "unknown agent of acme: no grant names it... but the tenant grant does",
        "acme-intern",
        "workspace__list_projects",
        {},
        True,
        "grant:acme-read",
        "",
    ),
    (
        "a tool the server does not have",
        "acme-admin",
        "workspace__drop_database",
        {},
        False,
        None,
        "not a known action",
    ),
    (
        "argument of the wrong type",
        "acme-reader",
        "workspace__get_task",
        {"task_id": 7},
        False,
        None,
        "arguments.task_id must be a string",
    ),
    (
        "an argument the tool does not declare",
        "acme-reader",
        "workspace__get_task",
        {"task_id": "acme-t1", "tenant": "globex"},
        False,
        None,
        "arguments.tenant is not an argument",
    ),
    (
        "a required argument missing",
        "acme-reader",
        "workspace__get_task",
        {},
        False,
        None,
        "arguments.task_id is required",
    ),
    (
        "enum argument outside its values",
        "acme-admin",
        "workspace__update_task",
        {"task_id": "acme-t1", "status": "deleted"},
        False,
        None,
        "must be one of",
    ),
    (
        "report before reading anything (session history)",
        "acme-admin",
        "workspace__send_report",
        {"to": "a@example.org", "body": "hi"},
        False,
        "report-after-reading",
        "only after reading",
    ),
]


@pytest.mark.parametrize(
    ("what", "agent", "tool", "arguments", "allowed", "policy", "reason"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_decisions(
    authz: Authorizer,
    what: str,
    agent: str,
    tool: str,
    arguments: dict[str, Any],
    allowed: bool,
    policy: str | None,
    reason: str,
) -> None:
    ex = call(authz, agent, tool, **arguments)
    assert ex.decision is not None
    assert ex.decision.allowed is allowed, ex.decision
    if allowed:
        assert ex.denial is None
        assert policy in ex.decision.policies
    else:
        assert isinstance(ex.denial, PolicyError)
        assert ex.denial.rpc_error()["data"]["code"] == "policy.denied"
        if policy is not None:
            assert policy in ex.decision.policies
            assert all(authz.engine.docs[p].effect == "forbid" for p in ex.decision.policies)  # type: ignore[union-attr]
            assert ex.denial.data is not None
            assert ex.denial.data["policies"] == list(ex.decision.policies)
        else:
            assert ex.decision.policies == ()
    assert reason in "; ".join(ex.decision.reasons)


def test_denial_names_only_the_deciding_policies(authz: Authorizer) -> None:
    ex = call(authz, "acme-admin", "workspace__delete_project", project_id="globex-p1")
    assert isinstance(ex.denial, PolicyError)
    # The admin's own permit matched too; the client hears only of the forbid.
    assert "acme-admin-write" not in ex.denial.message
    assert "tenant-binding" not in ex.denial.message  # ids go in data, reasons in the message
    assert "another tenant's project, task or resource" in ex.denial.message


def test_history_opens_the_report_and_it_needs_approval(authz: Authorizer) -> None:
    assert call(authz, "acme-admin", "workspace__list_projects").decision.allowed  # type: ignore[union-attr]
    ex = call(authz, "acme-admin", "workspace__send_report", to="a@example.org", body="hi")
    assert ex.decision is not None and ex.decision.allowed
    assert ex.decision.obligations["approval"]["policy"] == "grant:acme-admin-report"
    assert ex.decision.obligations["rate"] == [
        {"policy": "grant:acme-admin-report", "limit": "5/minute"}
    ]
    # Another principal's history does not count.
    other = call(authz, "acme-reader", "workspace__send_report", to="a@example.org", body="x")
    assert other.decision is not None and not other.decision.allowed


def test_rate_limit_per_principal_and_tool(authz: Authorizer) -> None:
    call(authz, "acme-admin", "workspace__search_tasks", query="x")
    results = [
        call(authz, "acme-admin", "workspace__send_report", to="a@b.c", body=str(i))
        for i in range(7)
    ]
    allowed = [r.decision.allowed for r in results]  # type: ignore[union-attr]
    assert allowed == [True] * 5 + [False] * 2
    denied = results[-1]
    assert denied.decision is not None
    assert (
        "rate limit 5/minute of policy grant:acme-admin-report exceeded"
        in (denied.decision.reasons[0])
    )
    # A different tool of the same agent is not limited by it.
    assert call(authz, "acme-admin", "workspace__search_tasks", query="y").decision.allowed  # type: ignore[union-attr]


def _list(
    authz: Authorizer, agent: str, method: str, key: str, listings: dict[str, Any]
) -> list[str]:
    ex = _exchange(agent, method, {}, Target("workspace", None))
    items = (
        listings["workspace"][key]
        if key != "resources"
        else [
            {"uri": "workspace://about"},
            {"uri": "workspace://acme/projects/acme-p1"},
            {"uri": "workspace://globex/projects/globex-p1"},
        ]
    )
    shown = authz.visible(ex, "workspace", method, items)
    return sorted(i.get("name") or i.get("uri") for i in shown)


def test_lists_show_only_what_the_caller_may_use(
    authz: Authorizer, listings: dict[str, Any]
) -> None:
    reader = _list(authz, "acme-reader", "tools/list", "tools", listings)
    admin = _list(authz, "acme-admin", "tools/list", "tools", listings)
    assert reader == ["get_task", "list_projects", "search_tasks"]
    assert admin == sorted(
        [
            "create_task",
            "delete_project",
            "get_task",
            "list_projects",
            "search_tasks",
            "send_report",
            "update_task",
        ]
    )
    assert _list(authz, "acme-reader", "resources/list", "resources", listings) == [
        "workspace://about",
        "workspace://acme/projects/acme-p1",
    ]
    # An agent of a tenant with no grant on the server sees nothing of it.
    assert _list(authz, "initech-bot", "tools/list", "tools", listings) == []
    # Hidden is not the same as allowed: calling the hidden tool by name is denied too.
    ex = call(authz, "acme-reader", "workspace__delete_project", project_id="acme-p1")
    assert ex.decision is not None and not ex.decision.allowed


@pytest.mark.parametrize(
    ("condition", "named"),
    [
        ('context.input.project == "acme"', "project"),  # get_task has no `project`
        ("context.input.task_id > 3", "expected Long but saw String"),  # String vs number
    ],
    ids=["missing-argument", "wrong-type"],
)
def test_a_policy_the_tool_schema_refutes_fails_at_load(
    tmp_path: Path, listings: dict[str, Any], condition: str, named: str
) -> None:
    bad = (
        'permit (principal, action == Bastion::Action::"workspace__get_task", resource)\n'
        f"when {{ {condition} }};\n"
    )
    with pytest.raises(PolicyLoadError) as raised:
        _authorizer(_settings(tmp_path, bad), listings)
    assert "workspace.cedar policy 0" in raised.value.message
    assert named in raised.value.message


def test_bad_annotations_and_syntax_fail_at_load(tmp_path: Path, listings: dict[str, Any]) -> None:
    for text, expected in (
        ('@rate("lots") permit (principal, action, resource);', "@rate"),
        ('@redact("body") permit (principal, action, resource);', "@redact"),
        ("permit (principal, action, resource", "not valid Cedar"),
        ("permit (principal == ?principal, action, resource);", "templates"),
    ):
        with pytest.raises(PolicyLoadError) as raised:
            _authorizer(_settings(tmp_path, text), listings)
        assert expected in raised.value.message


def test_hot_reload_keeps_the_last_good_policy(tmp_path: Path, listings: dict[str, Any]) -> None:
    settings = _settings(tmp_path)
    authz = _authorizer(settings, listings)
    file = Path(settings.policy.files[0])
    good = file.read_text()
    assert call(authz, "acme-reader", "workspace__get_task", task_id="acme-t1").denial is None
    # A broken edit: the running policy stays, the problem is kept for the operator.
    file.write_text(good + "\nforbid (principal, action, resource) when { context.nope };\n")
    assert authz.reload() is False
    assert authz.problem is not None and "nope" in authz.problem
    assert call(authz, "acme-reader", "workspace__get_task", task_id="acme-t1").denial is None
    # A good edit takes effect.
    file.write_text(
        good + '\n@id("freeze") @reason("frozen")\nforbid (principal, action, resource);\n'
    )
    assert authz.reload() is True
    assert authz.problem is None
    ex = call(authz, "acme-reader", "workspace__get_task", task_id="acme-t1")
    assert ex.decision is not None and ex.decision.policies == ("freeze",)


def test_redaction_of_arguments_and_results(tmp_path: Path, listings: dict[str, Any]) -> None:
    from bastion.pipeline.inspection import Inspection
    from bastion.policy.redaction import REDACTED, paths, redact
    from bastion.upstream.base import Answer

    cedar = (EXAMPLES / "policies" / "workspace.cedar").read_text() + (
        '\n@id("quiet-search")\n'
        '@redact("$.arguments.query, $.result.structuredContent.tasks[*].title")\n'
        'permit (principal in Bastion::Tenant::"acme", '
        'action == Bastion::Action::"workspace__search_tasks", resource);\n'
    )
    settings = _settings(tmp_path, cedar)
    authz = _authorizer(settings, listings)
    ex = call(authz, "acme-reader", "workspace__search_tasks", query="salary of bob")
    assert ex.decision is not None and ex.decision.allowed
    assert ex.params["arguments"] == {"query": REDACTED}  # what the upstream and the trail see
    reply = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"structuredContent": {"tasks": [{"id": "acme-t1", "title": "secret"}]}},
    }
    assert paths(ex.decision.obligations, "result") == [
        ("structuredContent", "tasks", None, "title")
    ]
    answer = asyncio.run(Inspection(settings).inspect(ex, Answer(reply), ("workspace",)))
    shown = answer.first
    assert shown["result"]["structuredContent"]["tasks"] == [{"id": "acme-t1", "title": REDACTED}]
    assert reply["result"]["structuredContent"]["tasks"][0]["title"] == "secret"  # a copy
    # Paths that do not reach anything leave the value as it is.
    assert redact({"a": [1, 2]}, ("b",)) == {"a": [1, 2]}
    assert redact({"a": [1, 2]}, ("a", 5)) == {"a": [1, 2]}
    assert redact({"a": [1, 2]}, ("a", -1)) == {"a": [1, REDACTED]}


@contextlib.asynccontextmanager
async def running(authz: Authorizer) -> AsyncIterator[None]:
    """The stage's background work, run as the gateway runs it."""
    background = Background()
    for name, run in authz.background():
        background.add(name, run)
    await background.start()
    try:
        yield
    finally:
        await background.stop()


def test_an_upstream_down_at_start_delays_its_policies_not_the_start(
    tmp_path: Path, listings: dict[str, Any]
) -> None:
    from bastion.errors import UpstreamUnavailable

    down = {"workspace": True}
    listed: list[str] = []
    ticks = [1000.0]

    async def lister(upstream: str) -> dict[str, Any]:
        listed.append(upstream)
        if down.get(upstream):
            raise UpstreamUnavailable(f"upstream {upstream!r} is unreachable")
        return listings[upstream]

    authz = Authorizer(_settings(tmp_path), lister, MemoryRateCounter(), ticks=lambda: ticks[0])

    async def scenario() -> None:
        await authz.start(save=False)  # the quickstart names workspace tools everywhere
        assert authz.engine is not None
        assert "grant:acme-admin-write" not in authz.engine.docs  # waits for the workspace tools
        assert "acme-task-ids" not in authz.engine.docs
        assert "grant:acme-echo" in authz.engine.docs
        down["workspace"] = False
        ticks[0] += 10.0
        # Without the gateway's background work nothing lists: the request path only asks.
        listed.clear()
        with pytest.raises(UpstreamUnavailable):
            await authz.relist("workspace", "get_task")
        assert listed == []
        async with running(authz):
            ticks[0] -= 8.0  # too soon after the last listing: the last failure stands
            with pytest.raises(UpstreamUnavailable):
                await authz.relist("workspace", "get_task")
            assert listed == []
            ticks[0] += 8.0
            await authz.relist("workspace", "get_task")  # listed again, in the background
            assert listed == ["workspace"]

    asyncio.run(scenario())
    assert authz.engine is not None
    assert "grant:acme-admin-write" in authz.engine.docs and "acme-task-ids" in authz.engine.docs
    assert call(authz, "acme-reader", "workspace__get_task", task_id="acme-t1").denial is None


@pytest.mark.parametrize(
    "task_id",
    [
        "globex-t1",
        "GLOBEX-t1",
        "Globex-T1",
        "ｇｌｏｂｅｘ-t1",
        "%67lobex-t1",
        "globex%2Dt1",
        "%2567lobex-t1",  # encoded twice
        " globex-t1",
        "\u200bglobex-t1",  # a zero-width space in front
    ],
)
def test_tenant_binding_sees_through_spellings(authz: Authorizer, task_id: str) -> None:
    """The client picks the spelling of an id; an upstream that folds case, NFKC or
    percent-decodes would serve globex's task. The binding must name globex either way."""
    ex = call(authz, "acme-reader", "workspace__get_task", task_id=task_id)
    assert ex.decision is not None and not ex.decision.allowed
    assert "tenant-binding" in ex.decision.policies
    assert ex.foreign_tenants == ("globex",)


@pytest.mark.parametrize(
    "uri",
    [
        "workspace://GLOBEX/t1",
        "workspace://%67lobex/t1",
        "workspace://ｇｌｏｂｅｘ/t1",
        "workspace:///globex/t1",
        "workspace://user@globex/t1",
        "workspace://acme/../globex/t1",
    ],
)
def test_tenant_named_by_a_uri_whatever_its_spelling(authz: Authorizer, uri: str) -> None:
    names = TenantNames(authz.settings)
    assert "globex" in names.named("workspace", {"uri": uri})
    assert names.named("workspace", {"uri": "workspace://ACME/t1"}) == ["acme"]


@pytest.mark.parametrize(
    "client, address",
    [
        ("203.0.113.7", "203.0.113.7"),  # forwarded by a trusted proxy: a bare address
        ("203.0.113.7:51000", "203.0.113.7"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("", "0.0.0.0"),
        ("not-an-address:1", "0.0.0.0"),
    ],
)
def test_the_client_address_policy_sees(client: str, address: str) -> None:
    """A deny-list on 203.0.113.0/24 was passed by a proxied client: the bare forwarded
    address became 0.0.0.0."""
    from bastion.pipeline.tenancy import client_ip as _ip

    assert _ip(client) == address


def test_the_decision_takes_its_time_from_the_clock_it_is_given(
    tmp_path: Path, listings: dict[str, Any]
) -> None:
    cedar = (EXAMPLES / "policies" / "workspace.cedar").read_text() + (
        '\n@id("night") @reason("no calls at night")\n'
        "forbid (principal, action, resource) when { context.request.time.hour < 6 };\n"
    )
    now = [1_900_000_000.0 - 1_900_000_000.0 % 86400 + 3 * 3600]  # 03:00 UTC

    async def lister(upstream: str) -> dict[str, Any]:
        return listings[upstream]

    authz = Authorizer(
        _settings(tmp_path, cedar), lister, MemoryRateCounter(), clock=lambda: now[0]
    )
    asyncio.run(authz.start(save=False))
    night = call(authz, "acme-reader", "workspace__get_task", task_id="acme-t1")
    assert night.decision is not None and night.decision.policies == ("night",)
    now[0] += 6 * 3600  # 09:00 UTC
    day = call(authz, "acme-reader", "workspace__get_task", task_id="acme-t1")
    assert day.denial is None
