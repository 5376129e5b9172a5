"""Bastion's errors: one small tree, each node knowing its wire form.

```
BastionError                     code               HTTP  JSON-RPC
├── ProtocolError                protocol.*         400   -32600
│   ├── ParseError               protocol.parse     400   -32700
│   ├── InvalidRequest           protocol.invalid   400   -32600
│   ├── MethodNotFound           protocol.method    200   -32601  (404 in the 2026 era)
│   ├── InvalidParams            protocol.params    200   -32602
│   │   └── InvalidEnvelope      protocol.meta      400   -32602  (2026 `_meta` envelope)
│   ├── HeaderMismatch           protocol.header    400   -32020
│   ├── UnsupportedVersion       protocol.version   400   -32022
│   ├── BodyTooLarge             protocol.size      413   -32600
│   ├── NotAcceptable            protocol.accept    406   -32600
│   ├── UnsupportedMediaType     protocol.media     415   -32600
│   ├── SessionRequired          protocol.session   400   -32600
│   ├── SessionNotFound          protocol.session   404   -32600
│   └── OriginRejected           protocol.origin    403   -32600
├── AuthError                    auth.*             401   -32600
│   ├── TokenError               auth.invalid_token 401   -32600  (.reason says which check)
│   └── InsufficientScope        auth.insufficient_scope 403
├── PolicyError                  policy.*           200   -32600
├── UpstreamError                upstream.*         200   -32603
│   ├── UpstreamTimeout          upstream.timeout
│   └── UpstreamUnavailable      upstream.unavailable
├── SessionQuotaExceeded         session.quota      429   -32600  (.quota: agent, tenant, gateway)
├── Overloaded                   server.busy        503   -32603
└── ConfigError                  config.*           (never on the wire)
```

JSON-RPC errors about one request travel with HTTP 200 in the legacy era, so that clients show
the message; transport-level problems use the HTTP status. Messages say what was expected and
what was found, and never contain a token or a secret; what the client sent appears through
`shown()`, so no more than a short prefix of it comes back.
"""

from __future__ import annotations

import reprlib
from typing import Any, ClassVar

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


class PolicyError(BastionError):
    """Policy denied the request."""

    code = "policy.denied"
    http_status = 200  # a refusal of one call, not of the transport
    rpc_code = -32600


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


class ConfigError(BastionError):
    """The configuration is invalid; carries every problem found, each with path and line."""

    code = "config.invalid"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
