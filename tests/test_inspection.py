"""The inspection stage in process: what an upstream sends back, checked rule by rule.

Each rule is shown to hold (the attack is contained) and to fail open when it is off (the same
answer reaches the client untouched), so a test cannot pass with the check removed. The
tenant matcher is also driven by hypothesis through the spellings an upstream could use.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncGenerator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion import config
from bastion.audit.detect import Alert
from bastion.inspect.content import strings, withhold
from bastion.inspect.tenants import TenantGuard
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.history import History, history_key
from bastion.pipeline.inspection import Inspection
from bastion.types import JSON, MODERN_VERSION, Era, Principal, Target
from bastion.upstream.base import Answer

PATTERNS = ["{tenant}-t*", "{tenant}-p*", "workspace://{tenant}/*"]


def settings_with(**inspect: Any) -> config.Settings:
    """Two tenants' agents, the workspace upstream with its naming patterns."""
    return config.parse(
        orjson.dumps(
            {
                "auth": {
                    "mode": "oauth",
                    "agents": [
                        {"id": "acme-reader", "tenant": "acme", "owner": "t", "purpose": "test"},
                        {
                            "id": "globex-reader",
                            "tenant": "globex",
                            "owner": "t",
                            "purpose": "test",
                        },
                    ],
                },
                "upstreams": {
                    "workspace": {
                        "transport": "http",
                        "url": "http://127.0.0.1:9/mcp",
                        "tenant_arguments": {
                            "task_id": "{tenant}-t*",
                            "project_id": "{tenant}-p*",
                            "uri": "workspace://{tenant}/*",
                        },
                        "inspect": inspect,
                    }
                },
            }
        ).decode()
    )


def exchange(tenant: str = "globex", method: str = "tools/call") -> Exchange:
    message = {"jsonrpc": "2.0", "id": 7, "method": method, "params": {"name": "search_tasks"}}
    ex = Exchange(message, Era.MODERN, MODERN_VERSION, "default", "127.0.0.1:1")
    ex.principal = Principal(tenant=tenant, agent=f"{tenant}-reader")
    ex.target = Target("workspace", "search_tasks")
    return ex


LEAK = {
    "jsonrpc": "2.0",
    "id": 7,
    "result": {
        "content": [
            {
                "type": "text",
                "text": orjson.dumps(
                    {"tasks": [{"id": "acme-t1", "title": "Draft new homepage copy"}]}
                ).decode(),
            }
        ],
        "structuredContent": {
            "tasks": [
                {"id": "acme-t1", "title": "Draft new homepage copy"},
                {"id": "globex-t1", "title": "Update OSHA incident log"},
            ]
        },
    },
}


async def run(inspection: Inspection, ex: Exchange, answer: Answer) -> list[JSON]:
    out = await inspection.inspect(ex, answer, ("workspace",))
    messages = [out.first]
    if out.rest is not None:
        messages += [m async for m in out.rest]
    return messages


class Alerts:
    def __init__(self) -> None:
        self.raised: list[Alert] = []
        self.quarantined: list[tuple[str, str]] = []

    async def alert(self, alert: Alert) -> None:
        self.raised.append(alert)

    async def quarantine(self, upstream: str, reason: str) -> None:
        self.quarantined.append((upstream, reason))


def stage(**inspect: Any) -> tuple[Inspection, Alerts, History]:
    history = History()
    inspection = Inspection(settings_with(**inspect), history)
    alerts = Alerts()
    inspection.alert = alerts.alert
    inspection.quarantine = alerts.quarantine
    return inspection, alerts, history


# -- the tenant guard ----------------------------------------------------------------------


async def test_another_tenants_objects_are_blocked_and_the_upstream_alerted() -> None:
    inspection, alerts, history = stage()
    ex = exchange("globex")
    [answer] = await run(inspection, ex, Answer(LEAK))
    assert answer["error"]["data"]["code"] == "inspection.foreign_tenant"
    assert "acme" not in orjson.dumps(answer).decode()
    assert ex.blocked and ex.answer_tenants == ("acme",)
    assert {f["rule"] for f in ex.findings} == {"tenant"}
    [alert] = alerts.raised
    assert alert.facts["upstream"] == "workspace" and alert.facts["suspect"] == "upstream"
    assert alert.suspend is False
    assert "foreign" in history.get(history_key(ex, ex.principal))[1]  # type: ignore[arg-type]


async def test_off_the_same_answer_reaches_the_other_tenant() -> None:
    inspection, alerts, _ = stage(tenants="off")
    [answer] = await run(inspection, exchange("globex"), Answer(LEAK))
    assert answer == LEAK
    assert not alerts.raised


async def test_the_callers_own_objects_pass_untouched() -> None:
    inspection, alerts, _ = stage()
    own = {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {"structuredContent": {"tasks": [{"id": "acme-t1", "owner": "x@acme.example"}]}},
    }
    ex = exchange("acme")
    [answer] = await run(inspection, ex, Answer(own))
    assert answer == own and not ex.findings and not alerts.raised


async def test_redact_withholds_the_foreign_items_only() -> None:
    inspection, alerts, _ = stage(tenants="redact")
    ex = exchange("globex")
    [answer] = await run(inspection, ex, Answer(LEAK))
    structured = answer["result"]["structuredContent"]["tasks"]
    assert structured == [{"id": "globex-t1", "title": "Update OSHA incident log"}]
    text = orjson.loads(answer["result"]["content"][0]["text"])
    assert text == {"tasks": []}
    assert "homepage" not in orjson.dumps(answer).decode()
    assert not ex.blocked and alerts.raised


async def test_flag_delivers_records_and_alerts() -> None:
    inspection, alerts, _ = stage(tenants="flag")
    ex = exchange("globex")
    [answer] = await run(inspection, ex, Answer(LEAK))
    assert answer == LEAK
    assert ex.answer_tenants == ("acme",) and alerts.raised and not ex.blocked


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (
            "resources/list",
            {"result": {"resources": [{"uri": "workspace://acme/p/1", "name": "a"}]}},
        ),
        ("resource contents", {"result": {"contents": [{"uri": "x://1", "text": "acme-t2 due"}]}}),
        (
            "embedded resource",
            {
                "result": {
                    "content": [
                        {"type": "resource", "resource": {"uri": "workspace://acme/t", "text": "."}}
                    ]
                }
            },
        ),
        (
            "resource_link",
            {
                "result": {
                    "content": [{"type": "resource_link", "uri": "workspace://acme/x", "name": "n"}]
                }
            },
        ),
        (
            "prompt messages",
            {
                "result": {
                    "messages": [
                        {"role": "user", "content": {"type": "text", "text": "see acme-p1"}}
                    ]
                }
            },
        ),
        ("completion", {"result": {"completion": {"values": ["acme-t3"], "total": 1}}}),
        (
            "upstream error",
            {"error": {"code": -1, "message": "no such task; did you mean acme-t1?"}},
        ),
    ],
)
async def test_every_kind_of_answer_is_guarded(where: str, message: JSON) -> None:
    inspection, _, _ = stage()
    ex = exchange("globex")
    [answer] = await run(inspection, ex, Answer({"jsonrpc": "2.0", "id": 7, **message}))
    assert answer["error"]["data"]["code"] == "inspection.foreign_tenant", where
    off, _, _ = stage(tenants="off")
    [untouched] = await run(off, exchange("globex"), Answer({"jsonrpc": "2.0", "id": 7, **message}))
    assert untouched == {"jsonrpc": "2.0", "id": 7, **message}


async def test_notifications_and_server_requests_in_a_stream_are_dropped() -> None:
    inspection, alerts, _ = stage()
    progress = {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": 1, "progress": 1, "message": "found acme-t4"},
    }
    log = {
        "jsonrpc": "2.0",
        "method": "notifications/message",
        "params": {"level": "info", "data": "ok"},
    }
    sampling = {
        "jsonrpc": "2.0",
        "id": 99,
        "method": "sampling/createMessage",
        "params": {"messages": [{"role": "user", "content": {"type": "text", "text": "acme-p2?"}}]},
    }
    final = {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "done"}]}}

    async def rest() -> AsyncGenerator[JSON, None]:
        for message in (log, sampling, final):
            yield message

    ex = exchange("globex")
    delivered = await run(inspection, ex, Answer(progress, rest()))
    assert delivered[1:] == [log, final]
    assert "acme" not in orjson.dumps(delivered).decode()
    assert ex.blocked and len(alerts.raised) == 2


async def test_definitions_are_not_read_as_tenant_data() -> None:
    inspection, _, _ = stage()
    tools = {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {
            "tools": [{"name": "get_task", "description": "Fetch a task by id (e.g. acme-t1)."}]
        },
    }
    [answer] = await run(inspection, exchange("globex", "tools/list"), Answer(tools))
    assert answer == tools


async def test_quarantine_after_n_leaks() -> None:
    inspection, alerts, _ = stage(quarantine={"after": 2})
    await run(inspection, exchange("globex"), Answer(LEAK))
    assert not alerts.quarantined
    await run(inspection, exchange("globex"), Answer(LEAK))
    assert [u for u, _ in alerts.quarantined] == ["workspace"]


async def test_an_unknown_tenant_named_in_config_is_recognised() -> None:
    settings = settings_with()
    data = settings.model_dump()
    data["inspection"] = {"tenants": ["initech"]}
    inspection = Inspection(config.Settings.model_validate(data))
    ex = exchange("globex")
    leak = {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {"content": [{"type": "text", "text": "initech-t9"}]},
    }
    [answer] = await run(inspection, ex, Answer(leak))
    assert answer["error"]["data"]["code"] == "inspection.foreign_tenant"


# -- the matcher through spellings ---------------------------------------------------------

GUARD = TenantGuard(PATTERNS, ["acme", "globex"])
CONFUSABLE = {
    "a": "\u0430",
    "e": "\u0435",
    "o": "\u043e",
    "c": "\u0441",
    "x": "\u0445",
    "p": "\u0440",
}


def _spell(text: str, how: str) -> str:
    if how == "upper":
        return text.upper()
    if how == "confusable":
        return "".join(CONFUSABLE.get(ch, ch) for ch in text)
    if how == "url":
        return urllib.parse.quote(text, safe="")
    if how == "url-all":
        return "".join(f"%{b:02X}" for b in text.encode())
    if how == "json":
        return "".join(f"\\u{ord(ch):04x}" for ch in text)
    if how == "zero-width":
        return "\u200b".join(text)
    if how == "fullwidth":
        return "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in text)
    return text


@settings(max_examples=200, deadline=None)
@given(
    tenant=st.sampled_from(["acme", "globex"]),
    kind=st.sampled_from(["t", "p"]),
    number=st.integers(min_value=1, max_value=99999),
    how=st.sampled_from(
        ["plain", "upper", "confusable", "url", "url-all", "json", "zero-width", "fullwidth"]
    ),
    before=st.text(alphabet=" .,:;\n", max_size=5),
    after=st.text(alphabet=" .,:;\n", max_size=5),
)
def test_an_id_is_found_however_it_is_spelled(
    tenant: str, kind: str, number: int, how: str, before: str, after: str
) -> None:
    spelled = _spell(f"{tenant}-{kind}{number}", how)
    text = f"see{before or ' '}{spelled}{after}"
    assert tenant in {hit.kind for hit in GUARD.scan(text)}
    assert GUARD.may_name(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_the_matcher_never_raises(text: str) -> None:
    GUARD.scan(text)


@pytest.mark.parametrize(
    "text", ["acmetool", "myacme-t1", "acme.example", "globexcorp-p", "a cme-t1"]
)
def test_words_that_only_contain_a_name_are_not_objects(text: str) -> None:
    assert GUARD.scan(text) == []


def test_withholding_keeps_the_rest_of_a_json_text() -> None:
    message = {"result": {"content": [{"type": "text", "text": '{"a": ["acme-t1", "globex-t1"]}'}]}}
    places = {
        p
        for p, s in strings(message, open_json=True)
        if GUARD.scan(s) and "acme" in s and "globex" not in s
    }
    out, count = withhold(message, places, "x")
    assert count == 1
    assert orjson.loads(out["result"]["content"][0]["text"]) == {"a": ["globex-t1"]}


async def test_the_tenant_guard_builds_the_other_tenants_once_per_registry_view(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The set of other tenants is as large as the registry's tenants; built per answer it
    cost O(tenants) on every call (issue 17). Counts the builds of a set that size: one per
    caller tenant and published view, none per answer; a new view is seen at once."""
    import bastion.pipeline.inspection as module

    builds: list[int] = []
    builtin = frozenset

    def counting(*args: Any) -> frozenset[Any]:
        made = builtin(*args)
        if len(made) >= 1000:
            builds.append(len(made))
        return made

    views = [builtin(f"t{i:04d}" for i in range(2000)) | {"acme", "globex"}]
    monkeypatch.setattr(module, "frozenset", counting, raising=False)
    inspection = Inspection(settings_with(), History(), lambda: views[-1])
    for _ in range(10):
        [answer] = await run(inspection, exchange("globex"), Answer(LEAK))
        assert answer["error"]["data"]["code"] == "inspection.foreign_tenant"
    assert len(builds) == 1
    views.append(views[-1] | {"initech"})  # the registry changed: a new view is published
    [answer] = await run(inspection, exchange("globex"), Answer(LEAK))
    assert answer["error"]["data"]["code"] == "inspection.foreign_tenant"
    assert len(builds) == 2
