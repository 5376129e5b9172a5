"""Audit records as OCSF 1.3 events of class API Activity (6003), for SIEMs that speak OCSF.

One record becomes one event. The mapping:

| OCSF attribute                      | from the record                                          |
|-------------------------------------|----------------------------------------------------------|
| class_uid 6003, category_uid 6      | constant: API Activity, Application Activity             |
| activity_id / activity_name         | method: `*/list`, `*/read`, `*/get`, `completion/*` →    |
|                                     | 2 Read; others (`tools/call`, …) → 99 Other + method     |
| type_uid                            | class_uid × 100 + activity_id                            |
| time                                | time, in milliseconds                                    |
| duration                            | latency_ms (rounded)                                     |
| severity_id / severity              | 1 Informational; 2 Low for failed or unknown outcomes; 3 |
|                                     | Medium for denials and blocks; alerts: severity_id or 4  |
| status_id / status / status_detail  | 1 Success (outcome ok, or decision allow), 2 Failure     |
|                                     | (deny, denied, blocked, upstream_error, error), 0 Unknown |
|                                     | (outcome unknown: lost to a crash); the reason           |
| disposition_id / disposition        | 1 Allowed / 2 Blocked from decision (security control)   |
| message                             | reason, else "<method> <tool>"                           |
| actor.user                          | uid = user (type User), else the agent (type Other,      |
|                                     | "Agent"); org.uid = tenant                               |
| actor.app_name                      | agent                                                    |
| actor.session.uid                   | session (already a digest)                               |
| actor.authorizations                | [{decision, policy.name}] from decision and policies     |
| actor.invoked_by                    | the delegation chain, joined by " > "                    |
| api.operation                       | method                                                   |
| api.service.name                    | server (the upstream's name)                             |
| api.request.uid                     | request_id                                               |
| api.response.code / error           | outcome                                                  |
| cloud.provider                      | "Bastion" (required by the class; MCP has no cloud)      |
| src_endpoint.ip / port              | client ("ip" or "ip:port")                               |
| dst_endpoint.svc_name               | upstream (URL or command)                                |
| http_request.url.path               | route; http_request.length = request_bytes               |
| resources                           | [{type "tool", name tool_exposed, uid tool_original}]    |
| metadata                            | version "1.3.0", product Bastion, uid "<writer>:<seq>",  |
|                                     | correlation_uid trace_id, log_name "audit"               |
| unmapped                            | everything else: phase, delegation, args, args_digest,   |
|                                     | obligations, credential_id, response_bytes,              |
|                                     | result_digest, detail, and the chain fields              |
"""

from __future__ import annotations

from typing import Any

from bastion.audit.chain import Entry
from bastion.audit.record import AuditRecord

OCSF_VERSION = "1.3.0"
API_ACTIVITY = 6003
APPLICATION_ACTIVITY = 6
_READ, _OTHER = 2, 99
_SEVERITY = {1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical", 6: "Fatal"}
_FAILURES = frozenset({"upstream_error", "error", "blocked", "denied"})


def event(
    record: AuditRecord, entry: Entry | None = None, version: str = "0.1.0"
) -> dict[str, Any]:
    """The OCSF API Activity event for `record`; `entry` adds its place in the chain."""
    activity_id = _activity(record.method)
    severity_id = _severity(record)
    status_id = _status(record)
    out: dict[str, Any] = {
        "class_uid": API_ACTIVITY,
        "class_name": "API Activity",
        "category_uid": APPLICATION_ACTIVITY,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "activity_name": "Read" if activity_id == _READ else (record.method or "Other"),
        "type_uid": API_ACTIVITY * 100 + activity_id,
        "time": int(record.time * 1000),
        "severity_id": severity_id,
        "severity": _SEVERITY.get(severity_id, "Unknown"),
        "status_id": status_id,
        "status": {1: "Success", 2: "Failure"}.get(status_id, "Unknown"),
        "actor": _actor(record),
        "api": _api(record),
        "cloud": {"provider": "Bastion"},
        "src_endpoint": _endpoint(record.client),
        "metadata": _metadata(record, entry, version),
        "unmapped": _unmapped(record, entry),
    }
    if record.reason:
        out["status_detail"] = record.reason
    message = record.reason or " ".join(part for part in (record.method, record.tool) if part)
    if message:
        out["message"] = message
    if record.decision is not None:
        out["disposition_id"] = 1 if record.decision == "allow" else 2
        out["disposition"] = "Allowed" if record.decision == "allow" else "Blocked"
    if record.latency_ms is not None:
        out["duration"] = round(record.latency_ms)
    if record.upstream:
        out["dst_endpoint"] = {"svc_name": record.upstream}
    if record.route or record.request_bytes is not None:
        out["http_request"] = _http(record)
    if record.tool:
        resource = {"type": "tool", "name": record.tool}
        if record.tool_original:
            resource["uid"] = record.tool_original
        out["resources"] = [resource]
    return out


def _activity(method: str | None) -> int:
    if method is None:
        return _OTHER
    if method.endswith(("/list", "/read", "/get")) or method.startswith("completion/"):
        return _READ
    return _OTHER


def _severity(record: AuditRecord) -> int:
    if record.phase == "alert":
        given = record.detail.get("severity_id")
        return given if isinstance(given, int) and given in _SEVERITY else 4
    if record.decision == "deny" or record.outcome in ("blocked", "denied"):
        return 3
    if record.outcome in ("upstream_error", "error", "unknown"):
        return 2
    return 1


def _status(record: AuditRecord) -> int:
    if record.outcome == "ok":
        return 1
    if record.outcome in _FAILURES or record.decision == "deny":
        return 2
    if record.outcome == "unknown":  # a crash took the answer: nobody knows
        return 0
    if record.decision == "allow":
        return 1
    return 0


def _actor(record: AuditRecord) -> dict[str, Any]:
    user: dict[str, Any]
    if record.user is not None:
        user = {"uid": record.user, "type_id": 1, "type": "User"}
    else:
        user = {"uid": record.agent or "unknown", "type_id": 99, "type": "Agent"}
    if record.tenant is not None:
        user["org"] = {"uid": record.tenant}
    actor: dict[str, Any] = {"user": user}
    if record.agent is not None:
        actor["app_name"] = record.agent
    if record.session is not None:
        actor["session"] = {"uid": record.session}
    if record.delegation:
        actor["invoked_by"] = " > ".join(record.delegation)
    if record.decision is not None:
        policies = record.policies or (None,)
        actor["authorizations"] = [
            {"decision": record.decision, **({"policy": {"name": name}} if name else {})}
            for name in policies
        ]
    return actor


def _api(record: AuditRecord) -> dict[str, Any]:
    api: dict[str, Any] = {
        "operation": record.method or record.phase,
        "request": {"uid": record.request_id},
    }
    if record.server is not None:
        api["service"] = {"name": record.server}
    if record.outcome is not None:
        response: dict[str, Any] = {"code": 0 if record.outcome == "ok" else 1}
        if record.outcome != "ok":
            response["error"] = record.outcome
            if record.reason:
                response["error_message"] = record.reason
        api["response"] = response
    return api


def _endpoint(client: str | None) -> dict[str, Any]:
    if not client:
        return {}
    host, sep, port = client.rpartition(":")
    if sep and port.isdigit() and (host.count(":") == 0 or host.startswith("[")):
        return {"ip": host.strip("[]"), "port": int(port)}
    return {"ip": client.strip("[]")}


def _http(record: AuditRecord) -> dict[str, Any]:
    http: dict[str, Any] = {}
    if record.route:
        http["url"] = {"path": record.route}
    if record.request_bytes is not None:
        http["length"] = record.request_bytes
    return http


def _metadata(record: AuditRecord, entry: Entry | None, version: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": {"name": "Bastion", "vendor_name": "Bastion", "version": version},
        "log_name": "audit",
    }
    if entry is not None:
        metadata["uid"] = f"{entry.writer_id}:{entry.seq}"
    if record.trace_id is not None:
        metadata["correlation_uid"] = record.trace_id
    return metadata


_UNMAPPED = (
    "phase",
    "delegation",
    "args",
    "args_digest",
    "obligations",
    "credential_id",
    "response_bytes",
    "result_digest",
    "detail",
)


def _unmapped(record: AuditRecord, entry: Entry | None) -> dict[str, Any]:
    data = record.to_dict()
    unmapped = {name: data[name] for name in _UNMAPPED if name in data}
    if entry is not None:
        unmapped["chain"] = {
            "writer": entry.writer_id,
            "seq": entry.seq,
            "prev_hash": entry.prev_hash,
            "hash": entry.hash,
        }
    return unmapped
