"""The audit record: what Bastion writes down about one request, in one canonical JSON form.

A record is a frozen value built by the gateway at the end of a stage (`phase`): the policy
decision, the outcome of the upstream call, an authentication failure, or an alert from a
detector. `to_json()` is canonical (keys sorted, no whitespace, fields that are None or empty
left out, the schema version under "v"), so the bytes hashed into the chain are a function of
the record alone. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import orjson

SCHEMA_VERSION = 1

Phase = Literal["decision", "outcome", "authn", "alert"]
Verdict = Literal["allow", "deny"]
# How an allowed call ended: answered (`ok`), with an upstream failure, with another JSON-RPC
# error (`error`), blocked or denied on the way back; `unknown` when the gateway stopped before
# it recorded the end (written at the next start, see `bastion.audit.recover`).
Outcome = Literal["ok", "upstream_error", "error", "blocked", "denied", "unknown"]

PHASES: frozenset[str] = frozenset(get_args(Phase))
VERDICTS: frozenset[str] = frozenset(get_args(Verdict))
OUTCOMES: frozenset[str] = frozenset(get_args(Outcome))

_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
# Kept even when empty: `args={}` (called without arguments) differs from `args=None` (not kept).
_KEEP_EMPTY = frozenset({"args"})


def digest(value: Any) -> str:
    """SHA-256 (hex) of `value`'s canonical JSON: sorted keys, no whitespace, UTF-8.

    Used for `args_digest`, `result_digest` and `session` (the digest of the session id, so the
    trail can link a session's calls without holding a replayable id).
    """
    return hashlib.sha256(orjson.dumps(value, option=_JSON_OPTIONS)).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited event; every field but `time`, `request_id` and `phase` is optional.

    `server` is the upstream's configured name, `upstream` where the call went (URL or stdio
    command); `tool_exposed` is the name the client used, `tool_original` the upstream's own.
    `args` is the redacted argument object when the gateway keeps arguments, else None;
    `args_digest` is `digest()` of the arguments as received, before redaction.
    """

    time: float
    request_id: str
    phase: Phase
    trace_id: str | None = None
    tenant: str | None = None
    user: str | None = None
    agent: str | None = None
    delegation: tuple[str, ...] = ()
    session: str | None = None
    client: str | None = None
    route: str | None = None
    method: str | None = None
    server: str | None = None
    tool_original: str | None = None
    tool_exposed: str | None = None
    args_digest: str | None = None
    args: dict[str, Any] | None = None
    decision: Verdict | None = None
    policies: tuple[str, ...] = ()
    reason: str | None = None
    obligations: dict[str, Any] = field(default_factory=dict)
    upstream: str | None = None
    credential_id: str | None = None
    outcome: Outcome | None = None
    latency_ms: float | None = None
    request_bytes: int | None = None
    response_bytes: int | None = None
    result_digest: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def tool(self) -> str | None:
        """The tool name to index and search by: the exposed one, else the original."""
        return self.tool_exposed if self.tool_exposed is not None else self.tool_original

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `to_json()` writes: None and empty collections left out."""
        out: dict[str, Any] = {"v": SCHEMA_VERSION}
        for name in _FIELD_NAMES:
            value = getattr(self, name)
            if value is None or (not value and name not in _KEEP_EMPTY and _is_empty(value)):
                continue
            out[name] = value
        return out

    def to_json(self) -> bytes:
        """Canonical JSON bytes: sorted keys, no whitespace, None and empty collections left out.

        Raises TypeError when `args`, `obligations` or `detail` hold a value JSON cannot carry.
        """
        try:
            return orjson.dumps(self.to_dict(), option=_JSON_OPTIONS)
        except orjson.JSONEncodeError as exc:
            raise TypeError(f"audit record {self.request_id!r} is not JSON: {exc}") from exc

    @classmethod
    def from_json(cls, data: bytes | str) -> AuditRecord:
        """Parse what `to_json()` wrote; raise ValueError on anything else."""
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(
                f"expected an audit record as JSON, found invalid JSON: {exc}"
            ) from exc
        if not isinstance(raw, dict):
            raise ValueError("expected an audit record as a JSON object, found another value")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AuditRecord:
        """Build a record from its JSON object; raise ValueError naming the first bad field."""
        data = dict(raw)
        version = data.pop("v", None)
        if version != SCHEMA_VERSION:
            raise ValueError(f"expected audit schema version {SCHEMA_VERSION}, found {version!r}")
        unknown = sorted(set(data) - set(_FIELD_NAMES))
        if unknown:
            raise ValueError(f"expected audit record fields only, found {', '.join(unknown)}")
        for name in ("time", "request_id", "phase"):
            if name not in data:
                raise ValueError(f"expected audit record field {name!r}, found none")
        for name, check in _CHECKS.items():
            if name in data and not check(data[name]):
                raise ValueError(f"audit record field {name!r} has an unexpected value")
        for name in ("delegation", "policies"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


def _is_empty(value: Any) -> bool:
    return isinstance(value, (tuple, list, dict))


def _str(value: Any) -> bool:
    return isinstance(value, str)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _object(value: Any) -> bool:
    return isinstance(value, dict)


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(AuditRecord))
_CHECKS: dict[str, Any] = {
    **{f.name: _str for f in fields(AuditRecord) if f.type == "str | None"},
    "request_id": _str,
    "time": _number,
    "phase": lambda value: value in PHASES,
    "decision": lambda value: value in VERDICTS,
    "outcome": lambda value: value in OUTCOMES,
    "latency_ms": _number,
    "request_bytes": _int,
    "response_bytes": _int,
    "delegation": _strings,
    "policies": _strings,
    "args": _object,
    "obligations": _object,
    "detail": _object,
}
