"""Bastion's errors: one tree, each node knowing its wire form.

```
class                            code                    HTTP  JSON-RPC
BastionError                     bastion                 500   -32603  (the root)
├── ProtocolError                protocol.invalid        400   -32600
│   ├── ParseError               protocol.parse          400   -32700
│   ├── InvalidRequest           protocol.invalid        400   -32600
│   ├── MethodNotFound           protocol.method         200   -32601  (404 in the 2026 era)
│   ├── InvalidParams            protocol.params         200   -32602
│   │   └── InvalidEnvelope      protocol.meta           400   -32602  (2026 `_meta` envelope)
│   ├── HeaderMismatch           protocol.header         400   -32020
│   ├── UnsupportedVersion       protocol.version        400   -32022
│   ├── BodyTooLarge             protocol.size           413   -32600
│   ├── NotAcceptable            protocol.accept         406   -32600
│   ├── UnsupportedMediaType     protocol.media          415   -32600
│   ├── SessionRequired          protocol.session        400   -32600
│   ├── SessionNotFound          protocol.session        404   -32600
│   └── OriginRejected           protocol.origin         403   -32600
├── AuthError                    auth.failed             401   -32600
│   ├── TokenError               auth.invalid_token      401   -32600  (.reason: which check)
│   ├── InsufficientScope        auth.insufficient_scope 403   -32600
│   └── OAuthError               auth.oauth              400   -32600  (RFC 6749 error body)
├── PolicyError                  policy.denied           200   -32600
│   └── ArgumentMismatch         policy.arguments        200   -32600  (also a ValueError)
├── UpstreamError                upstream.error          200   -32603
│   ├── UpstreamTimeout          upstream.timeout        200   -32603
│   ├── UpstreamUnavailable      upstream.unavailable    200   -32603
│   ├── WireError                upstream.wire           200   -32603  (a peer broke HTTP)
│   └── Quarantined              upstream.quarantined    200   -32603  (until released)
├── InspectionError              inspection.blocked      200   -32603  (an answer withheld)
│   ├── ForeignTenant            inspection.foreign_tenant 200 -32603  (another tenant's)
│   ├── SecretFound              inspection.secret       200   -32603  (.kinds)
│   ├── InjectionFound           inspection.injection    200   -32603  (.kinds)
│   ├── ToolChanged              inspection.tool_changed 200   -32603  (pending approval)
│   └── DefinitionWithheld       inspection.withheld     200   -32603  (poisoned or shadowing)
├── SessionQuotaExceeded         session.quota           429   -32600  (.quota: which one)
├── Overloaded                   server.busy             503   -32603
├── IssuerUnavailable            auth.issuer_unavailable 503   -32603  (keys out of reach)
├── AuditUnavailable             audit.unavailable       503   -32603
├── StateUnavailable             state.unavailable       503   -32603  (Redis out of reach)
├── FilterInvalid                audit.filter            400   -32603  (.parameter)
├── SinkError                    audit.sink              500   -32603  (retried, never sent)
├── RegistryError                registry.error          500   -32603
│   ├── RegistryConflict         registry.conflict       409   -32603
│   ├── RegistryNotFound         registry.not_found      404   -32603
│   ├── RegistryInvalid          registry.invalid        400   -32603
│   └── RegistryUnavailable      registry.unavailable    503   -32603
├── BadRequest                   admin.bad_request       400   -32603  (.parameter)
├── NotAvailable                 admin.not_available     404   -32603
├── ApprovalRefused              approval.refused        403   -32603  (may not decide)
│   └── ApprovalClosed           approval.closed         409   -32603  (decided or ended)
├── InputError                   cli.input               500   -32603  (the CLI's options)
└── ConfigError                  config.invalid          500   -32603  (never on the wire)
    └── PolicyLoadError          policy.invalid          500   -32603  (.problems, as config)
```

JSON-RPC errors about one request travel with HTTP 200 in the legacy era, so that clients show
the message; transport-level problems use the HTTP status. The audit, registry, admin and CLI
errors answer operators (the admin API sends `{"error": code, "message": ...}` with the HTTP
status); config and policy-load errors stop a start or a reload and are never sent at all.
Messages say what was expected and what was found, and never contain a token or a secret; what
the client sent appears through `shown()`, so no more than a short prefix of it comes back.

Outside the tree on purpose: `bastion.transport.front._MethodNotAllowed` and `._Refused`,
control flow private to the front that never leaves it. `tests/test_exported_members.py` holds
this drawing to the classes defined below (names, parents, codes, statuses), and finds any error
class defined elsewhere in the package that is not underscore-named.
"""

from __future__ import annotations

import reprlib
from typing import Any, ClassVar

__all__ = [
    "SHOWN_LIMIT",
    "ArgumentMismatch",
    "ApprovalClosed",
    "ApprovalRefused",
    "AuditUnavailable",
    "StateUnavailable",
    "AuthError",
    "BadRequest",
    "BastionError",
    "BodyTooLarge",
    "ConfigError",
    "DefinitionWithheld",
    "FilterInvalid",
    "ForeignTenant",
    "HeaderMismatch",
    "InjectionFound",
    "InputError",
    "InspectionError",
    "IssuerUnavailable",
    "InsufficientScope",
    "InvalidEnvelope",
    "InvalidParams",
    "InvalidRequest",
    "MethodNotFound",
    "NotAcceptable",
    "NotAvailable",
    "OAuthError",
    "OriginRejected",
    "Overloaded",
    "ParseError",
    "PolicyError",
    "PolicyLoadError",
    "ProtocolError",
    "Quarantined",
    "RegistryConflict",
    "RegistryError",
    "RegistryInvalid",
    "RegistryNotFound",
    "RegistryUnavailable",
    "SecretFound",
    "SessionNotFound",
    "SessionQuotaExceeded",
    "SessionRequired",
    "SinkError",
    "TokenError",
    "ToolChanged",
    "UnsupportedMediaType",
    "UnsupportedVersion",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "WireError",
    "shown",
]

SHOWN_LIMIT = 64  # characters of a client-supplied value an error message may repeat
# Containers are rendered through reprlib, which stops after a few items and levels: the cost
# stays small however large the value is.
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict = 2, 6, 6, 4
_BRIEF.maxstring = _BRIEF.maxother = 40


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """A client-supplied value as an error message may quote it: its ASCII repr, cut to `limit`
    characters with the full length noted, so a 100 kB name never comes back whole (and the
    message stays fit for a header such as WWW-Authenticate)."""
    if isinstance(value, str):
        text = ascii(value[: limit + 1])  # never the repr of the whole: it may be megabytes
        if len(value) <= limit and len(text) <= limit + 2:
            return text
        return f"{text[:limit]}...{text[0]} ({len(value)} characters)"
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} digits)"
    if isinstance(value, list | tuple | dict):
        text = _BRIEF.repr(value).encode("ascii", "backslashreplace").decode()
        return text if len(text) <= limit else f"{text[:limit]}... (a {type(value).__name__})"
    return f"a {type(value).__name__}"


class BastionError(Exception):
    """Base of every error Bastion raises on purpose."""

    code: ClassVar[str] = "bastion"
    http_status: ClassVar[int] = 500
    rpc_code: ClassVar[int] = -32603

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def rpc_error(self) -> dict[str, Any]:
        """The JSON-RPC `error` member for this error."""
        data: dict[str, Any] = {"code": self.code}
        if self.data:
            data.update(self.data)
        return {"code": self.rpc_code, "message": self.message, "data": data}


class ProtocolError(BastionError):
    """The request does not follow JSON-RPC 2.0, MCP or the Streamable HTTP transport."""

    code = "protocol.invalid"
    http_status = 400
    rpc_code = -32600


class ParseError(ProtocolError):
    """The body is not valid JSON (or repeats a key in an object)."""

    code = "protocol.parse"
    rpc_code = -32700


class InvalidRequest(ProtocolError):
    """The body is JSON but not a valid JSON-RPC 2.0 message."""


class MethodNotFound(ProtocolError):
    """The method is not one this route serves."""

    code = "protocol.method"
    http_status = 200
    rpc_code = -32601


class InvalidParams(ProtocolError):
    """The method's params are missing or of the wrong shape."""

    code = "protocol.params"
    http_status = 200
    rpc_code = -32602


class InvalidEnvelope(InvalidParams):
    """A 2026-07-28 request lacks the per-request `_meta` envelope fields."""

    code = "protocol.meta"
    http_status = 400


class HeaderMismatch(ProtocolError):
    """An Mcp-* header is missing, malformed or disagrees with the body (2026-07-28)."""

    code = "protocol.header"
    rpc_code = -32020


class UnsupportedVersion(ProtocolError):
    """The requested protocol version is not one Bastion speaks."""

    code = "protocol.version"
    rpc_code = -32022


class BodyTooLarge(ProtocolError):
    """The request body is larger than `limits.max_body_bytes`."""

    code = "protocol.size"
    http_status = 413


class NotAcceptable(ProtocolError):
    """The Accept header does not list the media types the transport requires."""

    code = "protocol.accept"
    http_status = 406


class UnsupportedMediaType(ProtocolError):
    """The Content-Type of a POST is not application/json."""

    code = "protocol.media"
    http_status = 415


class SessionRequired(ProtocolError):
    """A legacy-era request other than initialize came without Mcp-Session-Id."""

    code = "protocol.session"


class SessionNotFound(ProtocolError):
    """The Mcp-Session-Id is unknown, ended, or belongs to someone else."""

    code = "protocol.session"
    http_status = 404


class OriginRejected(ProtocolError):
    """The Origin or Host header is not allowed (DNS rebinding protection)."""

    code = "protocol.origin"
    http_status = 403


class AuthError(BastionError):
    """The caller could not be authenticated."""

    code = "auth.failed"
    http_status = 401
    rpc_code = -32600


class TokenError(AuthError):
    """A token, assertion or DPoP proof was refused; `reason` says why, machine-readably.

    Reasons: malformed, too_large, alg_not_allowed, unknown_kid, bad_signature, wrong_issuer,
    wrong_audience, expired, not_yet_valid, issued_in_future, wrong_typ, missing_claim,
    replayed, revoked, suspended, wrong_key, htm, htu, ath, nonce, iat.
    """

    code = "auth.invalid_token"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, data={"reason": reason})
        self.reason = reason


class InsufficientScope(AuthError):
    """The token is valid but lacks a scope this request needs (403, step-up)."""

    code = "auth.insufficient_scope"
    http_status = 403


class OAuthError(AuthError):
    """An RFC 6749 error response of the embedded token endpoint: `error` is the RFC's code,
    `status` the HTTP status it is sent with (400, or 401 for a client that failed to
    authenticate, 503 when a replay cache is full)."""

    code = "auth.oauth"
    http_status = 400

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.status = status

    def body(self) -> dict[str, str]:
        """The JSON error body."""
        return {"error": self.error, "error_description": self.message}


class PolicyError(BastionError):
    """Policy denied the request."""

    code = "policy.denied"
    http_status = 200  # a refusal of one call, not of the transport
    rpc_code = -32600


class ArgumentMismatch(PolicyError, ValueError):
    """Tool arguments that do not fit the tool's declared input schema; the authz stage turns
    it into a denial naming the argument. Still a ValueError, as converters raised before."""

    code = "policy.arguments"


class UpstreamError(BastionError):
    """An upstream MCP server failed, answered garbage or could not be reached."""

    code = "upstream.error"
    http_status = 200
    rpc_code = -32603


class UpstreamTimeout(UpstreamError):
    """An upstream did not answer within its configured timeout."""

    code = "upstream.timeout"


class UpstreamUnavailable(UpstreamError):
    """An upstream is down, refused the connection or its process exited."""

    code = "upstream.unavailable"


class WireError(UpstreamError):
    """A peer of the HTTP client in `wire.py` (an upstream, Vault, a webhook, an issuer) broke
    HTTP: an unparsable response or a connection lost mid-answer. Callers name the peer when
    they translate it (`UpstreamUnavailable`, `ConfigError`, `SinkError`)."""

    code = "upstream.wire"


class Quarantined(UpstreamError):
    """An upstream taken out of service for every tenant (after answers that leaked across a
    tenant line) until an operator releases it."""

    code = "upstream.quarantined"


class InspectionError(BastionError):
    """The inspection stage withheld what an upstream sent back: the client gets this error
    instead of the data. `data` names the rule and what it found, never the data itself."""

    code = "inspection.blocked"
    http_status = 200  # the refusal of one answer, not of the transport
    rpc_code = -32603


class ForeignTenant(InspectionError):
    """An answer carried objects of a tenant other than the caller's."""

    code = "inspection.foreign_tenant"


class SecretFound(InspectionError):
    """An answer or an upstream's error carried a secret (a key, a token, a password)."""

    code = "inspection.secret"


class InjectionFound(InspectionError):
    """An answer carried instructions aimed at the model, and the upstream blocks them."""

    code = "inspection.injection"


class ToolChanged(InspectionError):
    """A tool, prompt or template whose definition changed since it was pinned: withheld
    until an operator approves the new version."""

    code = "inspection.tool_changed"


class DefinitionWithheld(InspectionError):
    """A tool, prompt or template withheld at listing: its description carries instructions
    to the model, or its name shadows another upstream's."""

    code = "inspection.withheld"


class SessionQuotaExceeded(BastionError):
    """An initialize would pass a session quota: `quota` says which (`agent`, `tenant`, or
    `gateway` for `limits.max_sessions`) and `limit` its value. One principal's sessions never
    make room for another's, so the asker is refused instead (429, retry later)."""

    code = "session.quota"
    http_status = 429
    rpc_code = -32600

    def __init__(self, quota: str, limit: int, message: str) -> None:
        super().__init__(message, data={"reason": f"{quota}_quota", "quota": quota, "limit": limit})
        self.quota = quota
        self.limit = limit


class Overloaded(BastionError):
    """A bounded resource is full; refusing is safer than forgetting (503, retry later)."""

    code = "server.busy"
    http_status = 503
    rpc_code = -32603


class IssuerUnavailable(BastionError):
    """A trusted issuer's keys could not be fetched (or not for too long): its tokens cannot
    be checked now. The gateway's trouble, not the token's (503, retry later)."""

    code = "auth.issuer_unavailable"
    http_status = 503
    rpc_code = -32603


class AuditUnavailable(BastionError):
    """The audit store failed, is full or lags too far behind; the call is not audited.

    Raised by a strict `append` whose record did not commit, and by a relaxed one that waited
    too long for room in the queue. The gateway answers 503 and does not forward the call.
    """

    code = "audit.unavailable"
    http_status = 503
    rpc_code = -32603


class StateUnavailable(BastionError):
    """The shared state store (Redis) cannot be reached or answered too late: a replay, a
    rate or a session cannot be checked, so the request is refused (fail closed, 503)."""

    code = "state.unavailable"
    http_status = 503
    rpc_code = -32603


class FilterInvalid(BastionError):
    """An audit filter value cannot be used; `parameter` names the option or query parameter."""

    code = "audit.filter"
    http_status = 400

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


class SinkError(BastionError):
    """A delivery of committed audit records to a sink failed; the forwarder retries it."""

    code = "audit.sink"


class RegistryError(BastionError):
    """A registry operation failed; subclasses say whether it conflicts, is missing or invalid."""

    code = "registry.error"


class RegistryConflict(RegistryError):
    """The change conflicts with the stored state (duplicate id, offboarded agent)."""

    code = "registry.conflict"
    http_status = 409


class RegistryNotFound(RegistryError):
    """No agent has this id."""

    code = "registry.not_found"
    http_status = 404


class RegistryInvalid(RegistryError):
    """A field has a value the registry refuses; the message names the field."""

    code = "registry.invalid"
    http_status = 400


class RegistryUnavailable(RegistryError):
    """The registry file cannot be opened, read or written."""

    code = "registry.unavailable"
    http_status = 503


class BadRequest(BastionError):
    """An admin API query parameter or body field cannot be used; `parameter` names it."""

    code = "admin.bad_request"
    http_status = 400

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


class NotAvailable(BastionError):
    """The gateway runs without what an admin endpoint serves (no registry, no audit trail)."""

    code = "admin.not_available"
    http_status = 404


class ApprovalRefused(BastionError):
    """Someone may not decide on a held call: not a person (an agent's token), the
    requesting agent itself, or without an approver role; or the link is not valid."""

    code = "approval.refused"
    http_status = 403


class ApprovalClosed(ApprovalRefused):
    """The held call is no longer pending: already decided, expired or abandoned."""

    code = "approval.closed"
    http_status = 409


class InputError(BastionError):
    """A file or option given to the CLI cannot be used."""

    code = "cli.input"


class ConfigError(BastionError):
    """The configuration is invalid; carries every problem found, each with path and line."""

    code = "config.invalid"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class PolicyLoadError(ConfigError):
    """A policy file or grant cannot be read, parsed or validated; names every problem.

    Part of the configuration: it stops a start, and a reload keeps the policy that runs."""

    code = "policy.invalid"
