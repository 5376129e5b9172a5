"""The request path without sockets: exchanges through the real `Pipeline`, in process, over a
recording upstream and a recording audit port, asserting the exact sequence of effects.

Each effect is one line of a log shared by the audit port and the upstream channel:
`("record", phase, decision, outcome)` when a record is appended, `("upstream", method, name,
credential)` when a message reaches the upstream. The security properties of the path are then
sequences: nothing reaches the upstream before its decision is recorded, a denied call never
reaches it, the upstream sees a minted credential and never the client's token, a refused
approval sends nothing, an approval state that only looks like one relaxes nothing.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
import yaml
from tests.conftest import EXAMPLES, demo_listings

from bastion import config
from bastion.audit.record import AuditRecord
from bastion.identity.keys import SigningKey, generate
from bastion.pipeline.approval import APPROVAL_KEY
from bastion.pipeline.chain import Pipeline
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.types import JSON, META_CAPABILITIES, META_VERSION, MODERN_VERSION, Era
from bastion.upstream.base import Answer
from bastion.upstream.pool import Upstreams

Effect = tuple[Any, ...]
CLIENT_TOKEN = "Bearer the-clients-own-token"


class Log(list[Effect]):
    """Every effect, in order."""


class RecordingAudit:
    """The audit port: keeps the records and logs each append."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.records: list[AuditRecord] = []
        self.healthy = True
        self.problem = ""

    async def append(self, record: AuditRecord, durable: bool) -> None:
        self.records.append(record)
        self.log.append(("record", record.phase, record.decision, record.outcome))


class RecordingChannel:
    """A 2026-07-28 upstream: answers lists from the demo's real tool list, calls with a
    fixed result, and logs every message with the credential it carried."""

    era = Era.MODERN

    def __init__(self, log: Log, listing: JSON) -> None:
        self.log = log
        self.listing = listing
        self.inflight: dict[Any, Any] = {}
        self.headers: list[Mapping[str, str]] = []

    async def open(self, headers: Mapping[str, str]) -> JSON | None:
        return None

    async def call(self, message: JSON, headers: Mapping[str, str]) -> Answer:
        method = message.get("method")
        params = message.get("params") or {}
        self.headers.append(headers)
        self.log.append(("upstream", method, params.get("name"), _credential(headers)))
        body: JSON
        if method == "tools/list":
            body = {"tools": self.listing["tools"]}
        elif method == "prompts/list":
            body = {"prompts": self.listing["prompts"]}
        else:
            body = {"content": [{"type": "text", "text": "done"}], "isError": False}
        return Answer({"jsonrpc": "2.0", "id": message.get("id"), "result": body})

    async def send(self, message: JSON, headers: Mapping[str, str]) -> None:
        self.log.append(("upstream-send", message.get("method"), None, None))

    async def listen(self, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        if False:  # pragma: no cover - nothing unsolicited
            yield {}

    async def close(self, headers: Mapping[str, str] | None = None) -> None:
        return None


class RecordingUpstreams(Upstreams):
    """The pool, with one recording channel per upstream instead of real connections."""

    def __init__(self, settings: config.Settings, log: Log) -> None:
        super().__init__(settings)
        listings = demo_listings()
        listings["echo"]["tools"].append(REGIONAL)
        self.channels = {name: RecordingChannel(log, listings[name]) for name in listings}

    async def stateless_channel(self, name: str, tenant: str) -> Any:
        return self.channels[name]

    async def session_channel(self, name: str, hello: JSON, tenant: str) -> Any:
        return self.channels[name]


# A tool whose `region` argument clients mirror into the Mcp-Param-Region header (SEP-2243).
REGIONAL = {
    "name": "regional",
    "inputSchema": {
        "type": "object",
        "properties": {"region": {"type": "string", "x-mcp-header": "Region"}},
        "required": ["region"],
    },
}


class Key:
    """The gateway's current signing key (what `mint` signs upstream credentials with)."""

    def __init__(self) -> None:
        self.key: SigningKey = generate("ES256")

    def current(self) -> SigningKey:
        return self.key

    def refresh(self) -> None:
        return None


def _credential(headers: Mapping[str, str]) -> str | None:
    """What the upstream was given: a minted JWT, the tenant header (`auth: none`), or the
    client's own token (never)."""
    value = headers.get("Authorization")
    if value is None:
        tenant = headers.get("X-Bastion-Tenant")
        return f"tenant header {tenant}" if tenant else None
    if value == CLIENT_TOKEN:
        return "the client's token"
    claims = pyjwt.decode(value.removeprefix("Bearer "), options={"verify_signature": False})
    return f"minted for {claims.get('tenant')}/{claims.get('agent') or claims.get('sub')}"


def _settings(tmp: Path) -> config.Settings:
    """The quickstart's policy with `auth: none` as acme-admin (no token service needed)."""
    shutil.copytree(EXAMPLES / "policies", tmp / "policies", dirs_exist_ok=True)
    data = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    data["auth"] = {"mode": "none", "tenant": "acme", "agent": "acme-admin"}
    data["state_dir"] = str(tmp / "state")
    data["upstreams"]["workspace"].pop("launch")
    for grant in data["policy"]["grants"]:  # the client's flow; a person's: test_human_approval
        if grant["id"] == "acme-admin-report":
            grant["approval"] = "client"
    return config.parse(yaml.safe_dump(data), base=tmp)


class InProcess:
    """A pipeline over recording parts, and how to send it one message."""

    def __init__(self, tmp: Path) -> None:
        self.log = Log()
        settings = _settings(tmp)
        self.audit = RecordingAudit(self.log)
        self.upstreams = RecordingUpstreams(settings, self.log)
        self.key = Key()
        self.pipeline = Pipeline(
            settings,
            self.upstreams,
            keys=self.key,  # type: ignore[arg-type]
            audit=self.audit,  # type: ignore[arg-type]
        )
        asyncio.run(self.pipeline.start())
        self.log.clear()  # the catalog listing at start is the gateway's own
        self.route = Route("default", "/mcp", ("workspace", "echo"), multiplex=True)

    def send(
        self, method: str, params: JSON, *, finish: bool = True, **headers: str
    ) -> tuple[Exchange, JSON]:
        meta = {META_VERSION: MODERN_VERSION, META_CAPABILITIES: {"elicitation": {"form": {}}}}
        message = {"jsonrpc": "2.0", "id": 7, "method": method, "params": {**params, "_meta": meta}}
        exchange = Exchange(message, Era.MODERN, MODERN_VERSION, "default", "127.0.0.1:4000")
        exchange.headers = {
            "authorization": CLIENT_TOKEN,
            "mcp-protocol-version": MODERN_VERSION,
            **headers,
        }
        exchange.url = "http://127.0.0.1:8080/mcp"
        exchange.mirrored = {  # as the transport decodes them: white space trimmed
            k.removeprefix("mcp-param-"): v.strip()
            for k, v in headers.items()
            if k.startswith("mcp-param-")
        }
        # What the transport once forwarded as it came: the client's own mirrored headers.
        exchange.forward_headers = {k: v for k, v in headers.items() if k.startswith("mcp-param")}

        async def run() -> JSON:
            answer = await self.pipeline.handle(exchange, self.route)
            assert answer is not None and answer.rest is None
            if finish:
                await self.pipeline.finish(exchange, self.route, answer.first)
            return answer.first

        return exchange, asyncio.run(run())


@pytest.fixture
def path(tmp_path: Path) -> InProcess:
    return InProcess(tmp_path)


def call(path: InProcess, tool: str, **arguments: Any) -> tuple[Exchange, JSON]:
    return path.send("tools/call", {"name": tool, "arguments": arguments})


def test_an_allowed_call_is_decided_recorded_sent_with_the_gateways_credential_then_closed(
    path: InProcess,
) -> None:
    _, reply = call(path, "workspace__search_tasks", query="launch")
    assert reply["result"]["content"][0]["text"] == "done"
    assert path.log == [
        ("record", "decision", "allow", None),
        ("upstream", "tools/call", "search_tasks", "tenant header acme"),
        ("record", "outcome", "allow", "ok"),
    ]
    # The upstream never sees the client's own token, whatever the client sends.
    sent = path.upstreams.channels["workspace"].headers[-1]
    assert CLIENT_TOKEN not in sent.values()


def test_a_denied_call_is_recorded_and_never_reaches_the_upstream(path: InProcess) -> None:
    exchange, reply = call(path, "workspace__get_task", task_id="globex-t1")
    assert "another tenant" in reply["error"]["message"]
    # The decision, then the detector's alert on it: no outcome is due for a denial.
    assert path.log == [("record", "decision", "deny", None), ("record", "alert", None, None)]
    assert exchange.recorded is False


def test_nothing_goes_upstream_when_the_decision_cannot_be_recorded(path: InProcess) -> None:
    path.audit.healthy = False
    exchange, reply = call(path, "workspace__search_tasks", query="x")
    assert reply["error"]["data"]["code"] == "audit.unavailable"
    assert exchange.http_status == 503
    assert [e for e in path.log if e[0] == "upstream"] == []


def test_an_approval_is_asked_before_anything_is_sent(path: InProcess) -> None:
    call(path, "workspace__list_projects")
    path.log.clear()
    _, reply = call(path, "workspace__send_report", to="boss@example.org", body="hi")
    assert reply["result"]["resultType"] == "input_required"
    assert APPROVAL_KEY in reply["result"]["inputRequests"]
    assert path.log == [("record", "decision", "allow", None), ("record", "outcome", "allow", "ok")]


def test_a_forged_approval_state_is_refused_and_sends_nothing(path: InProcess) -> None:
    call(path, "workspace__list_projects")
    path.log.clear()
    forged = {"requestState": "bastion1.e30.00", "inputResponses": {}}
    exchange, reply = path.send(
        "tools/call",
        {"name": "workspace__send_report", "arguments": {"to": "a@b.c", "body": "x"}, **forged},
    )
    assert "altered" in reply["error"]["message"]
    assert [e for e in path.log if e[0] == "upstream"] == []
    assert path.log[-1] == ("record", "outcome", "deny", "denied")


def test_a_list_is_recorded_and_each_upstream_asked_with_the_gateways_credential(
    path: InProcess,
) -> None:
    _, reply = path.send("tools/list", {})
    names = {tool["name"] for tool in reply["result"]["tools"]}
    assert "workspace__send_report" in names and "workspace__search_tasks" in names
    assert path.log[0] == ("record", "decision", "allow", None)
    assert path.log[-1] == ("record", "outcome", "allow", "ok")
    upstream = [e for e in path.log if e[0] == "upstream"]
    assert {e[1] for e in upstream} == {"tools/list"}
    assert all(e[3] == "tenant header acme" for e in upstream)


def test_mirrored_headers_must_agree_with_the_body(path: InProcess) -> None:
    """A body naming one region (what policy and the approver see) and a header naming
    another (what a load balancer in front may act on) is refused before anything is sent;
    so is a body value whose header is missing."""
    params = {"name": "echo__regional", "arguments": {"region": "eu"}}
    for headers in ({"mcp-param-region": "globex-p2"}, {}):
        path.log.clear()
        exchange, reply = path.send("tools/call", params, **headers)
        assert reply["error"]["code"] == -32020 and exchange.http_status == 400
        assert path.log == [("record", "decision", "deny", None)]


def test_mirrored_headers_are_rebuilt_from_the_decided_arguments(path: InProcess) -> None:
    """The upstream gets the copies the gateway makes from the arguments it decided on,
    not the client's (which earlier were forwarded as they came)."""
    params = {"name": "echo__regional", "arguments": {"region": "eu"}}
    _, reply = path.send("tools/call", params, **{"mcp-param-region": " eu "})
    assert "result" in reply, reply
    sent = path.upstreams.channels["echo"].headers[-1]
    assert sent.get("Mcp-Param-Region") == "eu"
    assert " eu " not in sent.values()
