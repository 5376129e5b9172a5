"""A person approves: `approval: human` holds the call until someone with an approver role
decides, on a channel the agent does not control.

In process (the real `Pipeline` over the recording parts of test_pipeline):
- a held call goes nowhere until approved; progress while it waits; the approved call runs;
- a denial gives the client the reason; nobody deciding expires it; a client that goes away
  abandons it; each ending is in the trail;
- one approval releases one call, bound to exactly the arguments shown;
- the requesting agent, an agent's credential, a person without an approver role: refused;
- a full store refuses new holds with 503 `server.busy`.

Through the real gateway (quickstart, OAuth, the demo workspace, the Python SDK):
- the SDK's call waits while the test approves through the admin API, then completes (both
  eras); a denial reaches it with the reason; a 2026 client closing its stream abandons it;
- signed links: a GET (a chat client's prefetch) decides nothing; a forged signature, a
  replayed link, the agent's own token, a viewer's link are refused; the CLI decides too;
- the audit trail names the person, the channel and what was shown.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import httpx
import httpx2
import pytest
import yaml
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from tests.conftest import (
    EXAMPLES,
    GatewayProcess,
    free_port,
    modern_body,
    modern_headers,
    start_gateway,
    until,
    until_async,
    wait_lists_complete,
)
from tests.test_pipeline import CLIENT_TOKEN, Key, Log, RecordingAudit, RecordingUpstreams
from tests.test_policy_gateway import quickstart

from bastion import config
from bastion.errors import ApprovalClosed, ApprovalRefused, Overloaded, PolicyLoadError
from bastion.pipeline import approval as stage
from bastion.pipeline.chain import Pipeline
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.policy.approval import ApprovalLinks, Person
from bastion.policy.engine import obligations_of
from bastion.policy.source import SourceText, compile_grants, load_policies
from bastion.state.approvals import MemoryPendingApprovals
from bastion.types import JSON, META_VERSION, MODERN_VERSION, UPSTREAM_STATUS, Era
from bastion.upstream.base import Answer

STEP = 20.0
REPORT = {"to": "boss@example.org", "body": "weekly"}
ALICE = Person("alice", ("approver",), "console")


# -- in process ------------------------------------------------------------------------------


def _settings(tmp: Path, timeout: float = 30.0) -> config.Settings:
    """The quickstart's policy (send_report: `approval: human`), `auth: none` as acme-admin."""
    shutil.copytree(EXAMPLES / "policies", tmp / "policies", dirs_exist_ok=True)
    data = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    data["auth"] = {"mode": "none", "tenant": "acme", "agent": "acme-admin"}
    data["state_dir"] = str(tmp / "state")
    data["upstreams"]["workspace"].pop("launch")
    data["policy"]["approval_timeout_seconds"] = timeout
    return config.parse(yaml.safe_dump(data), base=tmp)


class Held:
    """The pipeline with `approval: human` on send_report, over recording parts."""

    def __init__(self, tmp: Path, timeout: float = 30.0) -> None:
        self.log = Log()
        settings = _settings(tmp, timeout)
        self.audit = RecordingAudit(self.log)
        self.pipeline = Pipeline(
            settings,
            RecordingUpstreams(settings, self.log),
            keys=Key(),  # type: ignore[arg-type]
            audit=self.audit,  # type: ignore[arg-type]
        )
        self.approvals = self.pipeline.approval.approvals
        self.route = Route("default", "/mcp", ("workspace", "echo"), multiplex=True)

    async def start(self) -> None:
        await self.pipeline.start()
        await self.call("workspace__list_projects", {})  # the history the report needs
        self.log.clear()

    def exchange(self, tool: str, arguments: JSON, token: Any = None) -> Exchange:
        meta: JSON = {META_VERSION: MODERN_VERSION}
        if token is not None:
            meta["progressToken"] = token
        params = {"name": tool, "arguments": arguments, "_meta": meta}
        message = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}
        exchange = Exchange(message, Era.MODERN, MODERN_VERSION, "default", "127.0.0.1:4000")
        exchange.headers = {"authorization": CLIENT_TOKEN, "mcp-protocol-version": MODERN_VERSION}
        exchange.url = "http://127.0.0.1:8080/mcp"
        return exchange

    async def call(self, tool: str, arguments: JSON, token: Any = None) -> Answer:
        answer = await self.pipeline.handle(self.exchange(tool, arguments, token), self.route)
        assert answer is not None
        return answer

    async def hold(self, arguments: JSON = REPORT, token: Any = None) -> tuple[Exchange, Answer]:
        exchange = self.exchange("workspace__send_report", arguments, token)
        answer = await self.pipeline.handle(exchange, self.route)
        assert answer is not None and answer.rest is not None, answer
        return exchange, answer

    async def pending(self, count: int = 1) -> list[Any]:
        async def found() -> list[Any]:
            items = await self.approvals.list()
            return items if len(items) >= count else []

        items: list[Any] = await until_async(found, "a pending approval")
        return items

    def sent(self) -> list[Any]:
        return [e for e in self.log if e[0] == "upstream"]

    def records(self, method: str) -> list[Any]:
        return [r for r in self.audit.records if r.method == method]


async def _rest(answer: Answer) -> list[JSON]:
    assert answer.rest is not None
    return [message async for message in answer.rest]


@pytest.fixture
def built(tmp_path: Path) -> Held:
    return Held(tmp_path)  # outside the event loop: the recording parts list with asyncio.run


@pytest.fixture
def brief(tmp_path: Path) -> Held:
    return Held(tmp_path, timeout=0.2)


@pytest.fixture
async def held(built: Held) -> Held:
    await built.start()
    return built


async def test_a_held_call_goes_nowhere_until_a_person_approves(
    held: Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stage, "PROGRESS_EVERY", 0.05)
    _, answer = await held.hold(token="tok-1")
    assert answer.first["method"] == "notifications/progress"
    assert answer.first["params"]["progressToken"] == "tok-1"
    assert answer.rest is not None
    progress = await anext(answer.rest)  # still pending: progress, and nothing sent upstream
    assert progress["method"] == "notifications/progress" and progress["params"]["progress"] == 1
    assert held.sent() == []
    [item] = await held.pending()
    text = item.shown["text"]
    assert text.index("[SENSITIVE] to = ") < text.index("body = ")  # sensitive first
    assert '"boss@example.org"' in text and "agent acme-admin of tenant acme" in text
    assert "workspace__list_projects" in item.history["tools"]  # what the agent did before
    await held.approvals.decide(item.id, "approve", ALICE, "fine")
    rest = await _rest(answer)
    assert rest[-1]["result"]["content"][0]["text"] == "done"
    assert [e[1:3] for e in held.sent()] == [("tools/call", "send_report")]


async def test_a_denial_reaches_the_client_with_its_reason(held: Held) -> None:
    _, answer = await held.hold()
    assert answer.first["method"] == "notifications/message"  # no progress token: one note
    [item] = await held.pending()
    await held.approvals.decide(item.id, "deny", ALICE, "not this week")
    [refusal] = await _rest(answer)
    assert "denied by alice: not this week" in refusal["error"]["message"]
    assert held.sent() == []
    [record] = held.records("approvals/denied")
    assert record.detail["by"] == "alice" and record.detail["channel"] == "console"


async def test_nobody_deciding_expires_the_call(brief: Held) -> None:
    held = brief
    await held.start()
    _, answer = await held.hold()
    [refusal] = await _rest(answer)
    assert "no person decided within 0.2 s" in refusal["error"]["message"]
    assert "expired" in refusal["error"]["message"]
    assert held.sent() == []
    [record] = held.records("approvals/expired")
    assert record.decision == "deny"
    with pytest.raises(ApprovalClosed, match="already expired"):
        await held.approvals.decide(record.detail["approval"], "approve", ALICE)


async def test_a_client_that_goes_away_abandons_the_item(held: Held) -> None:
    _, answer = await held.hold()
    assert answer.rest is not None
    rest = answer.rest
    waiting = asyncio.ensure_future(anext(rest))
    [item] = await held.pending()
    await until_async(lambda: rest.ag_await is not None, "the wait to start")  # type: ignore[attr-defined]
    waiting.cancel()  # the transport cancels the pump when the client closes its stream
    with pytest.raises(asyncio.CancelledError):
        await waiting
    found = await held.approvals.get(item.id)
    assert found.status == "abandoned"
    [record] = held.records("approvals/abandoned")
    assert record.detail["approval"] == item.id
    with pytest.raises(ApprovalClosed):
        await held.approvals.decide(item.id, "approve", ALICE)
    assert held.sent() == []


async def test_one_approval_releases_one_call(held: Held) -> None:
    _, first = await held.hold()
    _, second = await held.hold()  # the same call again: a second item, decided on its own
    one, two = await held.pending(2)
    await held.approvals.decide(one.id, "approve", ALICE)
    assert (await _rest(first))[-1]["result"]["content"][0]["text"] == "done"
    assert (await held.approvals.get(two.id)).status == "pending"
    with pytest.raises(ApprovalClosed, match="already approved"):  # no second use
        await held.approvals.decide(one.id, "approve", ALICE)
    assert len(held.sent()) == 1
    await held.approvals.decide(two.id, "deny", ALICE)
    assert "error" in (await _rest(second))[-1]


async def test_the_release_is_bound_to_exactly_the_arguments_shown(held: Held) -> None:
    exchange, answer = await held.hold()
    [item] = await held.pending()
    # The arguments change after they were shown (whatever the way): the approval of what
    # was shown does not release what would now run.
    params = {**exchange.params, "arguments": {**REPORT, "to": "evil@example.org"}}
    exchange.message = {**exchange.message, "params": params}
    await held.approvals.decide(item.id, "approve", ALICE)
    [refusal] = await _rest(answer)
    assert "the call is not the one approved" in refusal["error"]["message"]
    assert held.sent() == []


@pytest.mark.parametrize(
    ("person", "why"),
    [
        (Person("acme-admin", ("approver",), "console"), "cannot decide on its own call"),
        (Person("x", ("approver",), "console", subject="acme-admin"), "on its own call"),
        (Person("alice", ("approver",), "console", agent="acme-admin"), "agent's access token"),
        (Person("vic", ("viewer",), "console"), "holds none of the approver roles"),
    ],
)
async def test_who_may_not_decide_is_refused(held: Held, person: Person, why: str) -> None:
    _, answer = await held.hold()
    [item] = await held.pending()
    with pytest.raises(ApprovalRefused, match=why):
        await held.approvals.decide(item.id, "approve", person)
    assert (await held.approvals.get(item.id)).status == "pending"
    await held.approvals.decide(item.id, "deny", ALICE)
    await _rest(answer)
    assert held.sent() == []


async def test_a_full_store_refuses_new_holds_with_503(held: Held) -> None:
    held.approvals.store = MemoryPendingApprovals(max_items=1)
    _, answer = await held.hold()
    busy = await held.pipeline.handle(
        held.exchange("workspace__send_report", {**REPORT, "body": "2"}), held.route
    )
    assert busy is not None and busy.rest is None
    assert busy.first["error"]["data"]["code"] == Overloaded.code
    assert busy.first[UPSTREAM_STATUS] == 503  # the HTTP status the transport sends
    [item] = await held.pending()  # the live one is kept, never forgotten
    await held.approvals.decide(item.id, "deny", ALICE)
    await _rest(answer)


def test_cedar_approval_human_with_approvers_and_timeout() -> None:
    text = (
        '@id("p1")\n@approval("human")\n@approvers("finance, ops")\n@approval_timeout("30")\n'
        "permit (principal, action, resource);"
    )
    docs = load_policies([SourceText("p.cedar", text)])
    assert obligations_of(docs)["approval"] == {
        "required": True,
        "policy": "p1",
        "mode": "human",
        "approvers": ["finance", "ops"],
        "timeout": 30.0,
    }
    # A typo must not quietly become the client's confirmation.
    with pytest.raises(PolicyLoadError, match='@approval: expected "human" or "client"'):
        load_policies([SourceText("p.cedar", text.replace('"human"', '"humna"'))])
    # The older spelling is the client's confirmation.
    older = load_policies([SourceText("p.cedar", text.replace('"human"', '"required"'))])
    assert obligations_of(older)["approval"]["mode"] == "client"


def test_grants_compile_to_the_same_annotations() -> None:
    grant = config.Grant(
        id="g",
        tenant="acme",
        server="workspace",
        tools=("send_report",),
        approval="human",
        approvers=("finance",),
        approval_timeout_seconds=45,
    )
    source = compile_grants((grant,)).text
    assert '@approval("human")' in source and '@approvers("finance")' in source
    assert '@approval_timeout("45.0")' in source
    older = grant.model_copy(update={"approval": True})
    assert '@approval("client")' in compile_grants((older,)).text


# -- through the real gateway ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("human")
    port = free_port()
    data = yaml.safe_load(quickstart(tmp, port))
    for grant in data["policy"]["grants"]:
        if grant["id"] == "acme-admin-report":
            grant["approval"] = "human"  # as the quickstart ships it
    data["policy"]["approval_timeout_seconds"] = 60
    gateway = start_gateway(tmp, yaml.safe_dump(data), port)
    try:
        headers = {"Authorization": f"Bearer {gateway.token('acme-admin')}"}
        wait_lists_complete(gateway, ("/mcp",), headers)
    except BaseException:
        gateway.stop()
        raise
    yield gateway
    gateway.stop()


def _admin(gw: GatewayProcess) -> dict[str, str]:
    token = (gw.config_path.parent / "state" / "admin-token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def _pending(gw: GatewayProcess, body: str) -> dict[str, Any]:
    """The pending approval of the report whose body is `body` (unique per test)."""

    def find() -> dict[str, Any] | None:
        answer = httpx.get(gw.url("/admin/approvals"), headers=_admin(gw), timeout=STEP)
        assert answer.status_code == 200, answer.text
        for item in answer.json()["approvals"]:
            if json.dumps(body) in item["shown"]["text"]:
                return dict(item)
        return None

    found: dict[str, Any] = until(find, f"a pending approval of {body!r}", 30)
    return found


async def _pending_async(gw: GatewayProcess, body: str) -> dict[str, Any]:
    return await asyncio.to_thread(_pending, gw, body)


def _decide(gw: GatewayProcess, approval_id: str, decision: str, **body: str) -> httpx.Response:
    url = gw.url(f"/admin/approvals/{approval_id}/{decision}")
    return httpx.post(url, headers=_admin(gw), json=body, timeout=STEP)


@asynccontextmanager
async def connect(gw: GatewayProcess, mode: str) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {gw.token('acme-admin')}"}
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(90), headers=headers) as http:
        transport = streamable_http_client(gw.url("/mcp"), http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=90) as client:
            yield client


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_the_sdk_call_waits_for_the_person_and_completes(
    gw: GatewayProcess, mode: str
) -> None:
    report = {"to": "boss@example.org", "body": f"approved ({mode})"}
    with anyio.fail_after(90):
        async with connect(gw, mode) as client:
            await client.call_tool("workspace__list_projects", {})
            call = asyncio.ensure_future(client.call_tool("workspace__send_report", report))
            item = await _pending_async(gw, report["body"])
            assert not call.done()  # held while the person reads
            assert item["requester"]["agent"] == "acme-admin"
            assert item["shown"]["text"].index("[SENSITIVE] to") < item["shown"]["text"].index(
                "body ="
            )
            decided = await asyncio.to_thread(_decide, gw, item["id"], "approve", reason="ok")
            assert decided.status_code == 200, decided.text
            result = await call
    assert not result.is_error
    assert result.structured_content is not None and result.structured_content["queued"] is True


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_denial_reaches_the_sdk_client_with_the_reason(
    gw: GatewayProcess, mode: str
) -> None:
    report = {"to": "boss@example.org", "body": f"denied ({mode})"}
    with anyio.fail_after(90):
        async with connect(gw, mode) as client:
            await client.call_tool("workspace__list_projects", {})
            call = asyncio.ensure_future(client.call_tool("workspace__send_report", report))
            item = await _pending_async(gw, report["body"])
            await asyncio.to_thread(_decide, gw, item["id"], "deny", reason="wrong recipient")
            with pytest.raises(MCPError) as raised:
                await call
    assert "denied by admin: wrong recipient" in str(raised.value)


def _history(gw: GatewayProcess, bearer: str) -> None:
    headers = {**modern_headers("tools/call", "workspace__list_projects")}
    headers["Authorization"] = f"Bearer {bearer}"
    body = modern_body("tools/call", {"name": "workspace__list_projects", "arguments": {}})
    assert httpx.post(gw.url("/mcp"), headers=headers, json=body, timeout=STEP).status_code == 200


def _open_held(gw: GatewayProcess, bearer: str, body: str) -> tuple[httpx.Client, Any]:
    """A raw 2026-07-28 call of send_report whose SSE stream stays open; read one event."""
    headers = {**modern_headers("tools/call", "workspace__send_report")}
    headers["Authorization"] = f"Bearer {bearer}"
    call = modern_body(
        "tools/call", {"name": "workspace__send_report", "arguments": {**REPORT, "body": body}}
    )
    http = httpx.Client(timeout=STEP)
    stream = http.stream("POST", gw.url("/mcp"), headers=headers, json=call)
    response = stream.__enter__()
    assert response.headers["content-type"].startswith("text/event-stream")
    return http, (stream, response)


def test_a_2026_client_closing_its_stream_abandons_the_item(gw: GatewayProcess) -> None:
    bearer = gw.token("acme-admin")
    _history(gw, bearer)
    http, (stream, response) = _open_held(gw, bearer, "abandoned")
    lines = response.iter_lines()  # held: dropped, it closes the stream before the item shows
    first = next(line for line in lines if line.startswith("data:"))
    assert "waiting for a person's approval" in first
    item = _pending(gw, "abandoned")
    stream.__exit__(None, None, None)
    http.close()

    def status() -> str | None:
        url = gw.url(f"/admin/approvals/{item['id']}")
        found = httpx.get(url, headers=_admin(gw), timeout=STEP).json()["approval"]["status"]
        return str(found) if found != "pending" else None

    assert until(status, "the item to end") == "abandoned"


def _link(gw: GatewayProcess, approval_id: str, person: str, roles: str) -> dict[str, str]:
    url = gw.url(f"/admin/approvals/{approval_id}/links")
    answer = httpx.post(url, headers=_admin(gw), json={"for": person, "roles": roles}, timeout=9)
    assert answer.status_code == 200, answer.text
    links: dict[str, str] = answer.json()["links"]
    return links


def test_signed_links_decide_only_when_posted_by_the_person(gw: GatewayProcess) -> None:
    bearer = gw.token("acme-admin")
    _history(gw, bearer)
    http, (stream, response) = _open_held(gw, bearer, "by link")
    try:
        item = _pending(gw, "by link")
        approve = _link(gw, item["id"], "alice", "approver")["approve"]
        # A chat client prefetching the link: a confirmation page, nothing decided.
        page = httpx.get(approve, timeout=STEP)
        assert page.status_code == 200 and "Approve this call, alice?" in page.text
        assert "boss@example.org" in page.text and page.headers["cache-control"] == "no-store"
        assert _pending(gw, "by link")["status"] == "pending"
        # A forged signature: refused.
        forged = approve[:-6] + ("000000" if not approve.endswith("000000") else "111111")
        assert httpx.post(forged, timeout=STEP).status_code == 403
        # The agent's own token with a valid link: refused (agents never approve).
        agent = httpx.post(approve, headers={"Authorization": f"Bearer {bearer}"}, timeout=STEP)
        assert agent.status_code == 403 and "access token" in agent.text
        # The agent's token at the admin API: not the admin's.
        url = gw.url(f"/admin/approvals/{item['id']}/approve")
        assert httpx.post(url, headers={"Authorization": f"Bearer {bearer}"}).status_code == 401
        # A viewer's link: signed, but the role cannot approve.
        viewer = _link(gw, item["id"], "vic", "viewer")["approve"]
        refused = httpx.post(viewer, timeout=STEP)
        assert refused.status_code == 403 and "approver roles" in refused.text
        assert _pending(gw, "by link")["status"] == "pending"
        # Alice's POST decides; the held call completes.
        done = httpx.post(approve, data={"reason": "checked"}, timeout=STEP)
        assert done.status_code == 200 and "approved" in done.text
        events = [line for line in response.iter_lines() if line.startswith("data:")]
        assert json.loads(events[-1][5:])["result"]["structuredContent"]["queued"] is True
        # The same link again: replayed, refused.
        replay = httpx.post(approve, timeout=STEP)
        assert replay.status_code == 409 and "already approved" in replay.text
    finally:
        stream.__exit__(None, None, None)
        http.close()


def test_the_cli_lists_shows_and_decides(gw: GatewayProcess) -> None:
    bearer = gw.token("acme-admin")
    _history(gw, bearer)
    http, (stream, response) = _open_held(gw, bearer, "by cli")
    try:
        item = _pending(gw, "by cli")
        listed = gw.cli("approvals", "list")
        assert listed.returncode == 0, listed.stderr
        assert item["id"] in listed.stdout and "workspace__send_report" in listed.stdout
        shown = gw.cli("approvals", "show", item["id"])
        assert shown.returncode == 0 and "[SENSITIVE] to" in shown.stdout
        denied = gw.cli("approvals", "deny", item["id"], "--reason", "not now")
        assert denied.returncode == 0, denied.stderr
        assert f"{item['id']}: denied" in denied.stdout
        events = [line for line in response.iter_lines() if line.startswith("data:")]
        assert "denied by admin: not now" in json.loads(events[-1][5:])["error"]["message"]
        again = gw.cli("approvals", "approve", item["id"])
        assert again.returncode == 1 and "already denied" in again.stderr
    finally:
        stream.__exit__(None, None, None)
        http.close()


def test_the_trail_names_the_person_the_channel_and_what_was_shown(gw: GatewayProcess) -> None:
    run = gw.cli("audit", "export")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line)["record"] for line in run.stdout.splitlines() if line.strip()]
    decided = [r for r in records if r.get("method") == "approvals/approved"]
    by_link = [r for r in decided if r["detail"].get("channel") == "link"]
    assert by_link and by_link[0]["detail"]["by"] == "alice"
    assert by_link[0]["detail"]["roles"] == ["approver"]
    assert len(by_link[0]["detail"]["shown_digest"]) == 64
    assert by_link[0]["agent"] == "acme-admin"
    released = [
        r["obligations"]["approval"]
        for r in records
        if r.get("phase") == "outcome"
        and (r.get("obligations") or {}).get("approval", {}).get("kind") == "person-approved"
    ]
    assert {(a["by"], a["channel"]) for a in released} >= {
        ("alice", "link"),
        ("admin", "admin-api"),
    }
    assert all(a["shown"]["digest"] and a["granted"] is True for a in released)
    assert any(r.get("method") == "approvals/abandoned" for r in records)
    assert any(
        r.get("method") == "approvals/denied" and r["detail"]["channel"] == "cli" for r in records
    )


def test_a_link_is_bound_to_its_person_roles_item_and_time() -> None:
    links = ApprovalLinks(b"k" * 32, lifetime=60)
    path = links.sign("item1", "approve", ALICE, now=1000.0)
    query = dict(parse_qsl(urlsplit(path).query))
    assert links.verify("item1", "approve", query, now=1059.0) == Person(
        "alice", ("approver",), "link"
    )
    assert "expired" in str(links.verify("item1", "approve", query, now=1061.0))
    for changed in ({"roles": "admin"}, {"by": "mallory"}, {"exp": "99999"}):
        assert "signature" in str(links.verify("item1", "approve", {**query, **changed}, 1001))
    assert "signature" in str(links.verify("item2", "approve", query, now=1001.0))
    assert "signature" in str(links.verify("item1", "deny", query, now=1001.0))
    other = ApprovalLinks(b"x" * 32, lifetime=60)  # another gateway's key
    assert "signature" in str(other.verify("item1", "approve", query, now=1001.0))
