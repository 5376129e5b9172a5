"""Approval obligations: only state the gateway verified relaxes them, and the approver sees
what runs.

Driven in process: the quickstart's real policy decides (Authorizer), the obligations stage
runs over a recording upstream, and each attack is shown to fail:

- a `requestState` that merely looks like Bastion's does not skip `@rate` (in either era, with
  or without `@approval`); only a verified, unused one for exactly this call does;
- after an approval, the upstream's own `input_required` round continues only with the state
  the gateway wrapped around it, once: repeating the approved call is asked again;
- the prompt shows every argument, the ones policy marks `@sensitive` first, long values cut
  in the middle, hidden characters escaped; the record says what was shown and that the
  answer came from the client, not a verified person.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import EXAMPLES, demo_listings
from tests.test_policy import _authorizer, _exchange

from bastion import config
from bastion.errors import PolicyError
from bastion.pipeline.approval import APPROVAL_KEY, CLIENT_CONFIRMED, Approval
from bastion.pipeline.authz import Authorizer
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.session import SessionStore
from bastion.policy.approval import (
    MAX_VALUES,
    PREFIX,
    ApprovalState,
    ApprovalStates,
    Asker,
    Prompt,
    call_digest,
    prompt,
)
from bastion.policy.source import _check_annotations
from bastion.types import JSON, META_CAPABILITIES, Era, Target
from bastion.upstream.base import Answer

CAPABLE = {META_CAPABILITIES: {"elicitation": {"form": {}}}}
YES = {APPROVAL_KEY: {"action": "accept", "content": {"approve": True}}}
FORGED = PREFIX + "eyJjIjogIngifQ.0000"  # the prefix and shape of a state, no valid MAC


def _settings(tmp: Path, rate_only_echo: bool = False) -> config.Settings:
    """The quickstart's config; optionally with a `@rate` on echo and no `@approval`."""
    shutil.copytree(EXAMPLES / "policies", tmp / "policies", dirs_exist_ok=True)
    data = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    for grant in data["policy"]["grants"]:  # these tests are about the client's confirmation
        if grant["id"] == "acme-admin-report":
            grant["approval"] = "client"
    if rate_only_echo:
        for grant in data["policy"]["grants"]:
            if grant["id"] == "acme-echo":
                grant["rate"] = "3/minute"
    return config.parse(yaml.safe_dump(data), base=tmp)


@pytest.fixture(scope="module")
def listings() -> dict[str, Any]:
    return demo_listings()


@pytest.fixture
def authz(tmp_path: Path, listings: dict[str, Any]) -> Authorizer:
    return _authorizer(_settings(tmp_path), listings)


def _call(
    authz: Authorizer,
    tool: str,
    arguments: dict[str, Any],
    agent: str = "acme-admin",
    era: Era = Era.MODERN,
    **params: Any,
) -> Exchange:
    server, _, name = tool.partition("__")
    body = {"name": tool, "arguments": arguments, "_meta": dict(CAPABLE), **params}
    ex = _exchange(agent, "tools/call", body, Target(server, name))
    ex.era = era
    asyncio.run(authz.authorize(ex))
    return ex


def _allowed(ex: Exchange) -> bool:
    return ex.decision is not None and ex.decision.allowed


REPORT = {"to": "boss@example.org", "body": "weekly"}


# -- 1. no obligation is skipped on the client's word ----------------------------------------


@pytest.mark.parametrize("era", [Era.MODERN, Era.LEGACY])
def test_a_forged_state_does_not_skip_the_rate_limit(authz: Authorizer, era: Era) -> None:
    """The attack: every call carries a `requestState` shaped like an approval's. The limit
    of 5/minute still stops the sixth."""
    _call(authz, "workspace__list_projects", {})  # the history the report policy wants
    results = [
        _call(authz, "workspace__send_report", REPORT, era=era, requestState=FORGED)
        for _ in range(7)
    ]
    assert [_allowed(r) for r in results] == [True] * 5 + [False] * 2
    assert "rate limit 5/minute" in results[-1].decision.reasons[0]  # type: ignore[union-attr]
    # Past the decision, the forged state is a refusal, never an approval.
    if era is Era.MODERN:
        assert "altered" in str(results[0].approval_state)


def test_a_forged_state_does_not_skip_a_rate_without_approval(
    tmp_path: Path, listings: dict[str, Any]
) -> None:
    """`@rate` alone (no `@approval`): the state is not the gateway's business at all."""
    authz = _authorizer(_settings(tmp_path, rate_only_echo=True), listings)
    results = [
        _call(authz, "echo__echo", {"text": "x"}, requestState=FORGED + str(i)) for i in range(5)
    ]
    assert [_allowed(r) for r in results] == [True] * 3 + [False] * 2
    assert all(r.approval_state is None for r in results)


def test_only_a_verified_unused_state_for_this_call_counts_once(authz: Authorizer) -> None:
    _call(authz, "workspace__search_tasks", {"query": "x"})
    first = _call(authz, "workspace__send_report", REPORT)
    assert _allowed(first) and first.approval_state is None  # counted: 1 of 5
    assert first.principal is not None
    mine = first.approval_call
    assert mine is not None
    state = authz.approvals.issue(mine, time.time())
    retry = _call(authz, "workspace__send_report", REPORT, requestState=state, inputResponses=YES)
    assert isinstance(retry.approval_state, ApprovalState)  # not counted
    replay = _call(authz, "workspace__send_report", REPORT, requestState=state, inputResponses=YES)
    assert replay.approval_state == "the approval was already used"  # counted: 2
    elsewhere = {**REPORT, "to": "eve@example.org"}
    fresh = authz.approvals.issue(mine, time.time())
    other = _call(authz, "workspace__send_report", elsewhere, requestState=fresh)
    assert "another call or another principal" in str(other.approval_state)  # counted: 3
    place = ("default", "workspace", "send_report")
    theirs = call_digest(("acme", "someone-else", None, None), "tools/call", first.params, place)
    stolen_state = authz.approvals.issue(theirs, time.time())
    stolen = _call(authz, "workspace__send_report", REPORT, requestState=stolen_state)
    assert "another call or another principal" in str(stolen.approval_state)  # counted: 4
    rest = [_call(authz, "workspace__send_report", REPORT) for _ in range(2)]
    assert [_allowed(r) for r in rest] == [True, False]


def test_an_approval_given_on_one_route_is_refused_on_another(authz: Authorizer) -> None:
    """The same tool name on another route is another server's tool: its own approval and
    rate apply. Before, `echo` on /servers/a/mcp and on /servers/b/mcp shared a digest."""
    _call(authz, "workspace__search_tasks", {"query": "x"})
    first = _call(authz, "workspace__send_report", REPORT)
    assert first.approval_call is not None
    state = authz.approvals.issue(first.approval_call, time.time())
    # The same params, the same principal: only the route differs (as `echo` on
    # /servers/a/mcp and on /servers/b/mcp does).
    body = {**first.params, "requestState": state, "inputResponses": YES}
    other = _exchange("acme-admin", "tools/call", body, first.target)  # type: ignore[arg-type]
    other.route = "another-virtual-server"
    asyncio.run(authz.authorize(other))
    assert "another call or another principal" in str(other.approval_state)


def test_an_approval_survives_argument_redaction(tmp_path: Path, listings: dict[str, Any]) -> None:
    """`@redact("$.arguments.body")` rewrites what the upstream gets; the approval is bound
    to what the client sent, so an honest retry is accepted (before: never approvable)."""
    settings = _settings(tmp_path)
    cedar = (tmp_path / "policies" / "workspace.cedar").read_text() + (
        '\n@id("quiet-report")\n@redact("$.arguments.body")\n'
        'permit (principal == Bastion::Agent::"acme-admin", '
        'action == Bastion::Action::"workspace__send_report", resource);\n'
    )
    (tmp_path / "policies" / "workspace.cedar").write_text(cedar)
    authz = _authorizer(settings, listings)
    _call(authz, "workspace__search_tasks", {"query": "x"})
    first = _call(authz, "workspace__send_report", REPORT)
    assert first.params["arguments"]["body"] == "[redacted by policy]"
    assert first.approval_call is not None
    state = authz.approvals.issue(first.approval_call, time.time())
    retry = _call(authz, "workspace__send_report", REPORT, requestState=state, inputResponses=YES)
    assert isinstance(retry.approval_state, ApprovalState), retry.approval_state


@pytest.mark.parametrize(
    "state, why",
    [
        (PREFIX + "x" * 70_000, "too long"),
        (PREFIX + "bm90IGpzb24.", "altered"),
        (PREFIX, "altered"),
        (12, None),
        ("other-server-state", None),
    ],
)
def test_states_that_are_not_ours(state: object, why: str | None) -> None:
    states = ApprovalStates(secrets.token_bytes(32), 60)
    found = states.verify(state, "call", 1000.0)
    assert found is None if why is None else why in str(found)


def test_states_expire_and_bind_the_call() -> None:
    states = ApprovalStates(secrets.token_bytes(32), 60)
    state = states.issue("call-a", 1000.0)
    assert isinstance(states.verify(state, "call-a", 1059.0), ApprovalState)
    assert "expired" in str(states.verify(state, "call-a", 1061.0))
    assert "another call" in str(states.verify(state, "call-b", 1001.0))
    other_process = ApprovalStates(secrets.token_bytes(32), 60)
    assert "another gateway process" in str(other_process.verify(state, "call-a", 1001.0))


# -- the obligations stage over a recording upstream -----------------------------------------


class RecordingUpstream:
    """Stands where the dispatcher stands: records every message sent, answers from a script."""

    def __init__(self, *answers: JSON) -> None:
        self.sent: list[JSON] = []
        self.answers = list(answers)

    async def run(self, exchange: Exchange, route: Any) -> Answer:
        self.sent.append(exchange.message)
        body = self.answers.pop(0) if self.answers else {"content": [], "isError": False}
        return Answer({"jsonrpc": "2.0", "id": exchange.id, "result": body})


class Stage:
    """The approval stage around a recording upstream, composed as the pipeline does: the
    gate, then (when it lets the call through) the upstream, then the stage's `after`."""

    def __init__(self, authz: Authorizer, upstream: RecordingUpstream) -> None:
        self.approval = Approval(authz.settings, authz.approvals)
        self.upstream = upstream

    def run(self, ex: Exchange) -> Answer:
        assert _allowed(ex), ex.decision
        gate = asyncio.run(self.approval.gate(ex))
        if gate is not None:
            assert isinstance(gate, dict)  # 2026-07-28: answered at once
            return Answer(gate)
        answer = asyncio.run(self.upstream.run(ex, None))
        return self.approval.after(ex, answer)


def _stage(authz: Authorizer, upstream: RecordingUpstream) -> Stage:
    return Stage(authz, upstream)


def _run(stage: Stage, ex: Exchange) -> Answer:
    return stage.run(ex)


def _result(answer: Answer) -> JSON:
    return answer.first.get("result") or {"error": answer.first.get("error")}


def test_the_approved_call_runs_once_and_continues_only_with_its_own_state(
    authz: Authorizer,
) -> None:
    """The upstream asks for more input after the approval (its own MRTR round). Before, any
    repetition of the approved call within the timeout went upstream unasked."""
    upstream = RecordingUpstream(
        {"resultType": "input_required", "inputRequests": {}, "requestState": "up-1"},
        {"content": [{"type": "text", "text": "sent"}], "isError": False},
    )
    stage = _stage(authz, upstream)
    _call(authz, "workspace__list_projects", {})
    asked = _result(_run(stage, _call(authz, "workspace__send_report", REPORT)))
    assert asked["resultType"] == "input_required" and APPROVAL_KEY in asked["inputRequests"]
    assert upstream.sent == []

    retry = _call(
        authz,
        "workspace__send_report",
        REPORT,
        requestState=asked["requestState"],
        inputResponses=YES,
    )
    more = _result(_run(stage, retry))
    assert len(upstream.sent) == 1
    assert "requestState" not in upstream.sent[0]["params"]  # ours is not the upstream's
    assert more["resultType"] == "input_required"
    wrapped = more["requestState"]
    assert wrapped.startswith(PREFIX) and wrapped != "up-1"

    # The attack that used to work: the same call again, no state → asked again, not run.
    again = _result(_run(stage, _call(authz, "workspace__send_report", REPORT)))
    assert APPROVAL_KEY in again["inputRequests"] and len(upstream.sent) == 1
    # The upstream's own state alone is not ours: it does not continue an approval.
    bare = _call(authz, "workspace__send_report", REPORT, requestState="up-1")
    assert APPROVAL_KEY in _result(_run(stage, bare))["inputRequests"]
    assert len(upstream.sent) == 1

    go_on = _call(authz, "workspace__send_report", REPORT, requestState=wrapped)
    done = _result(_run(stage, go_on))
    assert done["content"][0]["text"] == "sent"
    assert upstream.sent[1]["params"]["requestState"] == "up-1"  # restored for the upstream
    assert go_on.decision is not None
    assert go_on.decision.obligations["approval"]["continued"] is True

    replay = _call(authz, "workspace__send_report", REPORT, requestState=wrapped)
    refused = _run(stage, replay)
    assert "already used" in refused.first["error"]["message"]
    assert isinstance(replay.denial, PolicyError) and len(upstream.sent) == 2


# -- 2. what the approver sees is what runs --------------------------------------------------


def test_the_prompt_shows_the_recipient_behind_a_long_body(authz: Authorizer) -> None:
    """Before: sorted JSON cut at 800 characters, so a long `body` hid the `to`."""
    upstream = RecordingUpstream()
    stage = _stage(authz, upstream)
    _call(authz, "workspace__list_projects", {})
    body = "A" * 5_000 + "THE END"
    ex = _call(authz, "workspace__send_report", {"body": body, "to": "eve@evil.example"})
    asked = _result(_run(stage, ex))
    text = asked["inputRequests"][APPROVAL_KEY]["params"]["message"]
    lines = text.splitlines()
    args = [line.strip() for line in lines if line.startswith("  ")]
    assert args[0] == '[SENSITIVE] to = "eve@evil.example"'  # first, marked
    assert args[1].startswith('body = "AAAA') and "characters not shown" in args[1]
    assert args[1].endswith('THE END"')  # the end is shown, the middle is cut
    assert "send_report on server workspace (called as workspace__send_report)" in text
    assert "acme-admin of tenant acme, acting for user alice" in text
    assert len(text) < 1_500

    assert ex.decision is not None
    shown = ex.decision.obligations["approval"]["shown"]
    assert shown["digest"] == hashlib.sha256(text.encode()).hexdigest()
    assert shown["values"][0] == {"path": "to", "sensitive": True, "chars": 16, "shortened": False}
    assert shown["values"][1]["shortened"] is True and shown["values"][1]["chars"] == 5_007
    assert "text" not in shown  # argument values stay out of the trail unless configured


def test_a_client_confirmation_is_recorded_as_such(authz: Authorizer) -> None:
    upstream = RecordingUpstream()
    stage = _stage(authz, upstream)
    _call(authz, "workspace__list_projects", {})
    asked = _result(_run(stage, _call(authz, "workspace__send_report", REPORT)))
    retry = _call(
        authz,
        "workspace__send_report",
        REPORT,
        requestState=asked["requestState"],
        inputResponses=YES,
    )
    _run(stage, retry)
    assert retry.decision is not None
    approval = retry.decision.obligations["approval"]
    assert approval["granted"] is True and approval["kind"] == CLIENT_CONFIRMED
    assert "not verified as a person" in approval["by"] and "acme-admin" in approval["by"]
    assert upstream.sent[0]["params"]["arguments"] == REPORT
    assert "inputResponses" not in upstream.sent[0]["params"]


ASKER = Asker("acme-admin", "acme", None)


def test_every_value_is_shown_nested_ones_too() -> None:
    arguments = {"message": {"cc": ["a@x", "b@x"], "to": "c@x"}, "n": 3, "flag": None}
    shown = prompt(ASKER, "mail", "send", "send", arguments, ["to"])
    assert isinstance(shown, Prompt)
    paths = [v["path"] for v in shown.values]
    assert paths == ["message.to", "message.cc[0]", "message.cc[1]", "n", "flag"]
    assert '[SENSITIVE] message.to = "c@x"' in shown.text


def test_hidden_characters_are_escaped() -> None:
    """A right-to-left override would show `eve@moc.live` reversed; a line break would fake
    another argument line."""
    arguments = {"to": "eve@\u202elive.com", "body": 'hi\n  [SENSITIVE] to = "boss"'}
    shown = prompt(ASKER, "mail", "send", "send", arguments, ["to"])
    assert isinstance(shown, Prompt)
    assert "\u202e" not in shown.text and "\\u202e" in shown.text
    lines = shown.text.splitlines()
    assert sum(1 for line in lines if line.startswith("  [SENSITIVE]")) == 1
    assert sum(1 for line in lines if line.startswith("  ")) == 2  # no line was faked


def test_a_call_too_large_to_show_is_not_put_to_a_person() -> None:
    arguments = {"items": list(range(MAX_VALUES + 1))}
    refused = prompt(ASKER, "s", "t", "t", arguments, [])
    assert isinstance(refused, str) and "cannot be approved" in refused
    assert isinstance(prompt(ASKER, "s", "t", "t", {"items": list(range(MAX_VALUES))}, []), Prompt)


def test_sensitive_annotation_is_validated() -> None:
    assert _check_annotations("p", {"sensitive": "to, cc, message.to, items[0]"}) == []
    assert "@sensitive" in _check_annotations("p", {"sensitive": "to; DROP"})[0]


def test_session_ids_never_look_like_options() -> None:
    """`bastion sessions kill ID` took an id starting with `-` for an option (1 in 64)."""
    store = SessionStore(10, 60.0)
    assert not any(store.new_id().startswith("-") for _ in range(3_000))


def test_a_sensitive_value_is_never_cut() -> None:
    """Padding a recipient list put `mallory@evil.example` into the cut middle."""
    padded = ", ".join(["a@example.org"] * 60 + ["mallory@evil.example"] + ["b@example.org"] * 60)
    refused = prompt(ASKER, "mail", "send", "send", {"to": padded, "body": "x"}, ["to"])
    assert isinstance(refused, str) and "marked sensitive" in refused
    short = ", ".join(["a@example.org"] * 5 + ["mallory@evil.example"])
    shown = prompt(ASKER, "mail", "send", "send", {"to": short}, ["to"])
    assert isinstance(shown, Prompt) and "mallory@evil.example" in shown.text


def test_look_alikes_in_sensitive_values_and_names_are_escaped() -> None:
    """`ceo@acmе.com` with a Cyrillic `е` reads as `ceo@acme.com`; a Hangul filler or a
    Braille blank reads as nothing; a Cyrillic `о` makes `tо` look like `to`."""
    arguments = {"to": "ceo@acm\u0435.com", "note": "hi\u3164\u2800there", "t\u043e": "x"}
    shown = prompt(ASKER, "mail", "send", "send", arguments, ["to"])
    assert isinstance(shown, Prompt)
    assert '[SENSITIVE] to = "ceo@acm\\u0435.com"' in shown.text
    assert "\\u3164" in shown.text and "\\u2800" in shown.text
    assert '["t\\u043e"] = "x"' in shown.text
