"""The audit stage's records of one call: what the decision and the outcome record say, and
what building them costs (the arguments are serialized and hashed once per call)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bastion.audit import digest
from bastion.audit.keys import DB_FILE, audit_dir
from bastion.audit.store import SqliteAuditStore
from bastion.audit.trail import open_writer
from bastion.audit.writer import AuditWriter
from bastion.config import parse
from bastion.pipeline import trail as trail_module
from bastion.pipeline.consent import APPROVAL_KEY
from bastion.pipeline.elicitation import _without_ours
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.pipeline.trail import Trail
from bastion.types import MODERN_VERSION, Decision, Era, Principal, Target

ARGUMENTS = {"text": "a quarterly plan " * 64}
ROUTE = Route("echo", "/servers/echo/mcp", ("echo",), False)


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[AuditWriter]:
    opened = open_writer(tmp_path, survives="process")
    await opened.start()
    yield opened
    await opened.stop()


def _trail(tmp_path: Path, writer: AuditWriter) -> Trail:
    settings = parse(
        f"state_dir: {tmp_path}\nauth: {{mode: none, tenant: acme}}\n"
        "upstreams:\n  echo: {transport: http, url: 'http://127.0.0.1:9/mcp'}\n"
    )
    return Trail(settings, writer)


def _exchange() -> Exchange:
    message = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": ARGUMENTS},
    }
    exchange = Exchange(message, Era.MODERN, MODERN_VERSION, ROUTE.path, "127.0.0.1")
    exchange.principal = Principal(tenant="acme", agent="bot")
    exchange.target = Target("echo", "echo")
    exchange.decision = Decision(True, ("grant echo",), ("echo",))
    return exchange


async def _records(
    tmp_path: Path, writer: AuditWriter, request_id: str
) -> dict[str, dict[str, Any]]:
    await writer.stop()  # everything appended is committed
    with SqliteAuditStore(audit_dir(tmp_path) / DB_FILE) as store:
        found = [orjson.loads(entry.record) for entry in store.read()]
    return {r["phase"]: r for r in found if r["request_id"] == request_id}


async def test_the_arguments_are_hashed_once_and_both_records_name_them(
    tmp_path: Path, writer: AuditWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Any] = []

    def counting(value: Any) -> str:
        hashed.append(value)
        return digest(value)

    monkeypatch.setattr(trail_module, "digest", counting)
    trail, exchange = _trail(tmp_path, writer), _exchange()
    answer = {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "ok"}]}}
    await trail.decision(exchange, ROUTE)
    await trail.outcome(exchange, ROUTE, answer)
    assert [v for v in hashed if v == ARGUMENTS] == [ARGUMENTS]  # once, not once per record
    records = await _records(tmp_path, writer, exchange.request_id)
    assert records["decision"]["args_digest"] == digest(ARGUMENTS)
    assert records["outcome"]["args_digest"] == digest(ARGUMENTS)
    assert records["outcome"]["result_digest"] == digest(answer["result"])
    assert records["outcome"]["outcome"] == "ok"
    assert records["outcome"]["response_bytes"] == len(orjson.dumps(answer))


async def test_an_outcome_the_gateway_could_not_deliver_says_why(
    tmp_path: Path, writer: AuditWriter
) -> None:
    trail, exchange = _trail(tmp_path, writer), _exchange()
    exchange.credential_id = "jti-1"
    await trail.decision(exchange, ROUTE)
    await trail.outcome(exchange, ROUTE, None, failure="client.gone")
    records = await _records(tmp_path, writer, exchange.request_id)
    outcome = records["outcome"]
    assert outcome["outcome"] == "error"
    assert outcome["detail"]["failure"] == "client.gone"
    assert outcome["credential_id"] == "jti-1"
    assert "failure" not in records["decision"].get("detail", {})
    assert "credential_id" not in records["decision"]


async def test_a_tool_call_without_arguments_rewritten_by_its_approval_has_a_true_digest(
    tmp_path: Path, writer: AuditWriter
) -> None:
    # A tools/call with no `arguments`: the trail takes the params as its arguments, and a
    # 2026-07-28 approval retry's params lose the gateway's approval answer and requestState
    # after the decision record (as `elicitation.ask_by_retry` does on a grant).
    settings = parse(
        f"state_dir: {tmp_path}\nauth: {{mode: none, tenant: acme}}\n"
        "audit: {record_arguments: true}\n"
        "upstreams:\n  echo: {transport: http, url: 'http://127.0.0.1:9/mcp'}\n"
    )
    trail, exchange = Trail(settings, writer), _exchange()
    retry = {
        "name": "echo",
        "inputResponses": {APPROVAL_KEY: {"action": "accept"}},
        "requestState": "sealed-by-the-gateway",
    }
    exchange.message = {**exchange.message, "params": retry}
    await trail.decision(exchange, ROUTE)
    exchange.message = {**exchange.message, "params": _without_ours(exchange.params)}
    answer = {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}
    await trail.outcome(exchange, ROUTE, answer)
    records = await _records(tmp_path, writer, exchange.request_id)
    assert records["decision"]["args_digest"] == digest(retry)
    outcome = records["outcome"]
    assert outcome["args"] == {"name": "echo"}
    assert outcome["args_digest"] == digest(outcome["args"])  # the digest of what it records
