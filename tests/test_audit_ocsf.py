"""The OCSF mapping's edge cases: alerts, authentication failures, addresses, reads."""

from __future__ import annotations

import pytest
from tests.test_audit_record import sample

from bastion.audit.chain import Chain
from bastion.audit.ocsf import event
from bastion.audit.record import AuditRecord
from bastion.audit.sinks import level as sink_level


@pytest.mark.parametrize(
    ("client", "endpoint"),
    [
        ("10.0.0.7:443", {"ip": "10.0.0.7", "port": 443}),
        ("[2001:db8::1]:8080", {"ip": "2001:db8::1", "port": 8080}),
        ("2001:db8::1", {"ip": "2001:db8::1"}),
        ("10.0.0.7", {"ip": "10.0.0.7"}),
        (None, {}),
    ],
)
def test_client_addresses(client: str | None, endpoint: dict[str, object]) -> None:
    assert event(sample(client=client))["src_endpoint"] == endpoint


@pytest.mark.parametrize(
    ("method", "activity"),
    [("tools/list", 2), ("resources/read", 2), ("prompts/get", 2), ("tools/call", 99)],
)
def test_reads_are_read_activities(method: str, activity: int) -> None:
    out = event(sample(method=method))
    assert out["activity_id"] == activity and out["type_uid"] == 600300 + activity


def test_alert_severity_comes_from_its_detail() -> None:
    alert = AuditRecord(time=1.0, request_id="a", phase="alert", detail={"severity_id": 5})
    out = event(alert)
    assert (out["severity_id"], out["severity"]) == (5, "Critical")
    assert out["status_id"] == 0 and out["unmapped"]["detail"] == {"severity_id": 5}
    assert event(AuditRecord(time=1.0, request_id="a", phase="alert"))["severity_id"] == 4


def test_authentication_failure() -> None:
    out = event(
        AuditRecord(
            time=2.5, request_id="r", phase="authn", decision="deny", reason="expired",
            client="127.0.0.1:1", route="/mcp",
        )
    )  # fmt: skip
    assert out["time"] == 2500 and out["status"] == "Failure" and out["message"] == "expired"
    assert out["actor"]["user"] == {"uid": "unknown", "type_id": 99, "type": "Agent"}
    assert out["api"]["operation"] == "authn"
    assert out["http_request"] == {"url": {"path": "/mcp"}}


def test_chain_fields_and_metadata() -> None:
    record = sample(trace_id="abc")
    (entry,) = Chain("w1").extend([record.to_json()])
    out = event(record, entry)
    assert out["metadata"]["uid"] == "w1:1" and out["metadata"]["correlation_uid"] == "abc"
    assert out["unmapped"]["chain"] == {
        "writer": "w1", "seq": 1, "prev_hash": entry.prev_hash, "hash": entry.hash,
    }  # fmt: skip


@pytest.mark.parametrize(
    "outcome, status, severity, level",
    [
        ("ok", 1, 1, "info"),
        ("upstream_error", 2, 2, "error"),
        ("error", 2, 2, "error"),
        ("unknown", 0, 2, "error"),
        ("denied", 2, 3, "deny"),
    ],
)
def test_outcomes_map_to_status_severity_and_level(
    outcome: str, status: int, severity: int, level: str
) -> None:
    """An answer the gateway failed to give, or one a crash took, is never reported as a
    success to a SIEM."""
    record = sample(phase="outcome", outcome=outcome)
    out = event(record)
    assert (out["status_id"], out["severity_id"]) == (status, severity)
    assert sink_level(record) == level
