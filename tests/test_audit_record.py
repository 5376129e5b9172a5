"""The audit record: canonical JSON, round trips, strict parsing, digests."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.audit.record import SCHEMA_VERSION, AuditRecord, digest


def sample(i: int = 0, **changes: Any) -> AuditRecord:
    """A realistic decision record; tests elsewhere build their trails from it."""
    args = {"query": "overdue invoices", "limit": 20, "n": i}
    fields: dict[str, Any] = {
        "time": time.time(),
        "request_id": f"req-{i}",
        "phase": "decision",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "tenant": "acme",
        "user": "alice@example.com",
        "agent": "acme-reader",
        "delegation": ("alice@example.com",),
        "session": digest("session-1"),
        "client": "127.0.0.1:50123",
        "route": "/mcp",
        "method": "tools/call",
        "server": "workspace",
        "tool_original": "search_tasks",
        "tool_exposed": "workspace__search_tasks",
        "args_digest": digest(args),
        "decision": "allow",
        "policies": ("acme-readers",),
        "upstream": "http://127.0.0.1:9000/mcp",
        "credential_id": "jti-123",
        "latency_ms": 1.25,
        "request_bytes": 312,
    }
    fields.update(changes)
    return AuditRecord(**fields)


def test_to_json_is_canonical_and_round_trips() -> None:
    record = sample(obligations={"redact": ["email"]}, detail={"z": 1, "a": 2}, args={})
    data = record.to_json()
    assert data == orjson.dumps(orjson.loads(data), option=orjson.OPT_SORT_KEYS)
    assert b" " not in data.replace(b"overdue invoices", b"")
    parsed = orjson.loads(data)
    assert parsed["v"] == SCHEMA_VERSION
    assert list(parsed) == sorted(parsed)
    assert "reason" not in parsed  # None is left out
    assert parsed["args"] == {}  # an empty argument object is kept: it differs from None
    assert AuditRecord.from_json(data) == record
    assert AuditRecord.from_json(data).to_json() == data


def test_minimal_record_leaves_empty_fields_out() -> None:
    record = AuditRecord(time=1.5, request_id="r", phase="alert")
    assert orjson.loads(record.to_json()) == {
        "v": 1,
        "time": 1.5,
        "request_id": "r",
        "phase": "alert",
    }
    assert AuditRecord.from_json(record.to_json()) == record


def test_unserializable_values_fail_at_to_json() -> None:
    with pytest.raises(TypeError, match="req-0"):
        sample(args={"x": {1, 2}}).to_json()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[1]", "JSON object"),
        (b"{nope", "invalid JSON"),
        (b'{"v":2,"time":1,"request_id":"r","phase":"alert"}', "schema version 1"),
        (b'{"v":1,"time":1,"request_id":"r"}', "'phase'"),
        (b'{"v":1,"time":1,"request_id":"r","phase":"other"}', "'phase'"),
        (b'{"v":1,"time":"1","request_id":"r","phase":"alert"}', "'time'"),
        (b'{"v":1,"time":1,"request_id":"r","phase":"alert","decision":"maybe"}', "'decision'"),
        (b'{"v":1,"time":1,"request_id":"r","phase":"alert","tenant":5}', "'tenant'"),
        (b'{"v":1,"time":1,"request_id":"r","phase":"alert","policies":[1]}', "'policies'"),
        (b'{"v":1,"time":1,"request_id":"r","phase":"alert","extra":1}', "extra"),
        (b'{"v":1,"time":1,"request_id":"r","phase":"alert","request_bytes":true}', "bytes"),
    ],
)
def test_from_json_refuses_what_to_json_never_writes(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AuditRecord.from_json(raw)


def test_digest_is_sha256_of_canonical_json() -> None:
    assert digest({"b": 1, "a": [1, "x"]}) == hashlib.sha256(b'{"a":[1,"x"],"b":1}').hexdigest()
    assert digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})
    assert digest("session-1") != digest("session-2")


def test_tool_prefers_the_exposed_name() -> None:
    assert sample().tool == "workspace__search_tasks"
    assert sample(tool_exposed=None).tool == "search_tasks"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(
    args=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    reason=st.none() | st.text(max_size=40),
    delegation=st.lists(st.text(max_size=10), max_size=3).map(tuple),
)
def test_round_trip_holds_for_any_json_arguments(
    args: dict[str, Any], reason: str | None, delegation: tuple[str, ...]
) -> None:
    record = sample(args=args, reason=reason, delegation=delegation)
    data = record.to_json()
    assert AuditRecord.from_json(data) == record
    assert AuditRecord.from_json(data).to_json() == data
