"""What the audit sinks send, as bytes: JSON lines, syslog messages, webhook bodies, OTLP logs.

Pure encoders; the I/O (files, sockets, HTTPS) is in `bastion.control.audit.forward`. Each entry is
rendered once per sink in the sink's `format`: `json` is the line `bastion audit export`
writes (the record as hashed, with its place in the chain, so a copy can be checked against
the trail), `ocsf` an OCSF API Activity event. Sinks that list the `checkpoint` phase also
get the anchor's lines (anchor.py: signed checkpoints and heartbeats) as they are, whatever
their format: syslog MSGID `checkpoint` or `heartbeat`, OTLP event `bastion.audit.checkpoint`.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from bastion.audit.chain import Entry
from bastion.audit.export import jsonl_line, ocsf_line
from bastion.audit.record import AuditRecord

Format = Literal["json", "ocsf"]

# RFC 5424 severities (0 emergency … 7 debug) and OpenTelemetry severity numbers (1–24).
_SYSLOG_SEVERITY = {"alert": 1, "deny": 4, "error": 3, "info": 6}
_OTEL_SEVERITY = {"alert": (17, "ERROR"), "deny": (13, "WARN"), "error": (17, "ERROR")}
_OTEL_INFO = (9, "INFO")
UDP_MAX = 65_000  # bytes of one syslog datagram, at most


def render(entry: Entry, fmt: Format) -> bytes:
    """One entry as one line of JSON (no newline) in the sink's format."""
    return ocsf_line(entry) if fmt == "ocsf" else jsonl_line(entry)


def level(record: AuditRecord) -> str:
    """How loud a record is: alert, error (a failed or unknown outcome), deny, or info."""
    if record.phase == "alert":
        return "alert"
    if record.decision == "deny" or record.outcome in ("denied", "blocked"):
        return "deny"
    if record.outcome in ("upstream_error", "error", "unknown"):
        return "error"
    return "info"


def syslog_message(
    line: bytes,
    record: AuditRecord,
    facility: int,
    hostname: str | None = None,
    app: str = "bastion",
) -> bytes:
    """An RFC 5424 message carrying `line`: `<PRI>1 TIMESTAMP HOST APP PROCID MSGID - MSG`.

    MSGID is the record's phase; the structured-data part is empty (the record is the MSG).
    """
    severity = _SYSLOG_SEVERITY[level(record)]
    return _syslog(line, record.time, record.phase, facility * 8 + severity, hostname, app)


def anchor_kind(line: bytes) -> tuple[str, float, dict[str, Any]]:
    """(kind, time, the entry) of an anchor line: kind `checkpoint` or `heartbeat`."""
    entry: dict[str, Any] = orjson.loads(line)
    return str(entry["kind"]), float(entry["time"]), entry


def syslog_anchor(line: bytes, facility: int, hostname: str | None = None) -> bytes:
    """An RFC 5424 message (severity info) carrying an anchor line; MSGID is its kind."""
    kind, when, _ = anchor_kind(line)
    return _syslog(line, when, kind, facility * 8 + _SYSLOG_SEVERITY["info"], hostname, "bastion")


def _syslog(
    line: bytes, when: float, msgid: str, priority: int, hostname: str | None, app: str
) -> bytes:
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds")
    host = _token(hostname or socket.gethostname())
    head = f"<{priority}>1 {stamp.replace('+00:00', 'Z')} {host} {_token(app)} - {msgid} - "
    return head.encode("ascii") + line


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 framing for syslog over TCP: the length, a space, the message."""
    return str(len(message)).encode("ascii") + b" " + message


def webhook_body(lines: Sequence[bytes]) -> bytes:
    """A JSON array of the rendered entries."""
    return b"[" + b",".join(lines) + b"]"


def webhook_signature(secret: str, timestamp: int, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256 over `<timestamp>.<body>` (the receiver recomputes it and
    refuses stale timestamps, so a captured delivery cannot be replayed later)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def otlp_logs(items: Sequence[tuple[bytes, AuditRecord]], service: str = "bastion") -> bytes:
    """An OTLP `ExportLogsServiceRequest` (protobuf): one log record per entry, its body the
    rendered line, its attributes the record's who/what/decision."""
    logs = []
    for line, record in items:
        number, text = _OTEL_SEVERITY.get(level(record), _OTEL_INFO)
        nanos = int(record.time * 1_000_000_000)
        attributes = {
            "event.name": f"bastion.audit.{record.phase}",
            "bastion.request_id": record.request_id,
            "bastion.tenant": record.tenant,
            "bastion.agent": record.agent,
            "bastion.user": record.user,
            "bastion.tool": record.tool,
            "bastion.decision": record.decision,
            "bastion.outcome": record.outcome,
            "bastion.alert.rule": record.detail.get("rule") if record.phase == "alert" else None,
        }
        log = LogRecord(
            time_unix_nano=nanos,
            observed_time_unix_nano=time.time_ns(),
            severity_number=number,  # type: ignore[arg-type]
            severity_text=text,
            body=AnyValue(string_value=line.decode()),
            attributes=[_attribute(k, v) for k, v in attributes.items() if v is not None],
        )
        if record.trace_id is not None and len(record.trace_id) == 32:
            try:
                log.trace_id = bytes.fromhex(record.trace_id)
            except ValueError:
                pass
        logs.append(log)
    return _export(logs, service)


def otlp_anchor(lines: Sequence[bytes], service: str = "bastion") -> bytes:
    """An OTLP `ExportLogsServiceRequest`: one log record per anchor line, its body the line."""
    logs = []
    for line in lines:
        kind, when, entry = anchor_kind(line)
        attributes = {
            "event.name": f"bastion.audit.{kind}",
            "bastion.writer": entry["writer"],
            "bastion.seq": entry["seq"],
        }
        logs.append(
            LogRecord(
                time_unix_nano=int(when * 1_000_000_000),
                observed_time_unix_nano=time.time_ns(),
                severity_number=_OTEL_INFO[0],  # type: ignore[arg-type]
                severity_text=_OTEL_INFO[1],
                body=AnyValue(string_value=line.decode()),
                attributes=[_attribute(k, v) for k, v in attributes.items()],
            )
        )
    return _export(logs, service)


def _export(logs: list[LogRecord], service: str) -> bytes:
    request = ExportLogsServiceRequest(
        resource_logs=[
            ResourceLogs(
                resource=Resource(attributes=[_attribute("service.name", service)]),
                scope_logs=[
                    ScopeLogs(scope=InstrumentationScope(name="bastion.audit"), log_records=logs)
                ],
            )
        ]
    )
    return bytes(request.SerializeToString())


def _attribute(key: str, value: Any) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _token(value: str) -> str:
    """A syslog header field: printable ASCII without spaces, at most 48 characters."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:48]
    return cleaned or "-"
