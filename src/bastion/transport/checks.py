"""Transport checks on headers: pure functions from header values to errors.

DNS-rebinding protection (Origin, Host), media types, protocol versions and the 2026-07-28
header/body agreement (Mcp-Method, Mcp-Name), the check that stops a gateway from routing or
deciding on one name while the server executes another.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

from bastion.errors import (
    SHOWN_LIMIT,
    HeaderMismatch,
    InvalidEnvelope,
    NotAcceptable,
    OriginRejected,
    UnsupportedMediaType,
    UnsupportedVersion,
    shown,
)
from bastion.methods import PROMPTS_GET, RESOURCES_READ, TOOLS_CALL
from bastion.types import JSON, META_CAPABILITIES, META_VERSION, SUPPORTED_VERSIONS

_LOOPBACK_HOSTS = frozenset(("127.0.0.1", "localhost", "[::1]", "::1"))
_VISIBLE = re.compile(r"^[\x20-\x7e\t]*$")
_SENTINEL = re.compile(r"^=\?base64\?([A-Za-z0-9+/]*={0,2})\?=$")
_NAMED_METHODS = {TOOLS_CALL: "name", PROMPTS_GET: "name", RESOURCES_READ: "uri"}


class HostPolicy:
    """Which Host and Origin values are acceptable for this listener."""

    def __init__(self, loopback: bool, hosts: tuple[str, ...], origins: tuple[str, ...]) -> None:
        self._loopback = loopback
        self._hosts = frozenset(h.lower() for h in hosts)
        self._origins = frozenset(o.lower().rstrip("/") for o in origins)

    def check(self, host: str | None, origin: str | None) -> None:
        """Raise OriginRejected when the Host or the Origin is not allowed."""
        if self._hosts or self._loopback:
            name = _host_name(host or "")
            allowed = self._hosts or _LOOPBACK_HOSTS
            if (host or "").lower() not in allowed and name not in allowed:
                raise OriginRejected(f"Host {shown(host)} is not allowed on this gateway")
        if origin is None:
            return
        value = origin.lower().rstrip("/")
        if value in self._origins:
            return
        if self._loopback and not self._origins:
            parts = urlsplit(value)
            if parts.scheme in ("http", "https") and _host_name(parts.netloc) in _LOOPBACK_HOSTS:
                return
        raise OriginRejected(f"Origin {shown(origin)} is not allowed on this gateway")


def _host_name(hostport: str) -> str:
    hostport = hostport.lower()
    if hostport.startswith("["):
        return hostport[: hostport.find("]") + 1]
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


def check_post_media(content_type: str | None, accept: str | None) -> None:
    """A POST carries JSON and accepts both JSON and SSE back."""
    if content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, found {shown(content_type or 'none')}"
        )
    kinds = _accepted(accept)
    if not (
        ("application/json" in kinds or "*/*" in kinds)
        and ("text/event-stream" in kinds or "*/*" in kinds)
    ):
        raise NotAcceptable(
            "Accept must list both application/json and text/event-stream, "
            f"found {shown(accept or 'none')}"
        )


def check_get_accept(accept: str | None) -> None:
    """A GET stream is only for clients that accept SSE."""
    kinds = _accepted(accept)
    if "text/event-stream" not in kinds and "*/*" not in kinds:
        raise NotAcceptable(f"Accept must list text/event-stream, found {shown(accept or 'none')}")


def _accepted(accept: str | None) -> set[str]:
    return {part.split(";")[0].strip().lower() for part in (accept or "").split(",")}


def check_version(value: str) -> None:
    """The MCP-Protocol-Version header names a revision Bastion speaks."""
    if value not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            f"protocol version {shown(value)} is not supported",
            data={"supported": list(SUPPORTED_VERSIONS), "requested": value[:SHOWN_LIMIT]},
        )


def decode_header(name: str, value: str) -> str:
    """A header value as the body would hold it: plain, or decoded from the base64 sentinel."""
    if not _VISIBLE.match(value):
        raise HeaderMismatch(
            f"{shown(name)} header contains characters not allowed in a header value"
        )
    value = value.strip(" \t")  # optional whitespace around a field value is not part of it
    match = _SENTINEL.match(value)
    if match is None:
        return value
    try:
        return base64.b64decode(match.group(1), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise HeaderMismatch(f"{shown(name)} header has an invalid base64 value") from exc


def check_modern_headers(message: JSON, version: str, headers: dict[str, str]) -> None:
    """2026-07-28: the envelope is complete and the mirrored headers agree with the body."""
    method = message.get("method")
    params = message.get("params") if isinstance(message.get("params"), dict) else {}
    assert isinstance(params, dict)  # noqa: S101 - narrowed above
    meta = params.get("_meta")
    if not isinstance(meta, dict) or META_VERSION not in meta:
        raise InvalidEnvelope(f"params._meta must carry {META_VERSION!r}")
    if not isinstance(meta.get(META_CAPABILITIES), dict):
        raise InvalidEnvelope(f"params._meta must carry {META_CAPABILITIES!r} as an object")
    if not version:
        raise HeaderMismatch(
            f"MCP-Protocol-Version header is required with params._meta[{META_VERSION!r}]"
        )
    mcp_method = headers.get("mcp-method")
    if mcp_method is None:
        raise HeaderMismatch("Mcp-Method header is required")
    if decode_header("Mcp-Method", mcp_method) != method:
        raise HeaderMismatch(
            f"Mcp-Method header {shown(mcp_method)} does not match body method {shown(method)}"
        )
    if meta[META_VERSION] != version:
        raise HeaderMismatch(
            f"MCP-Protocol-Version header {shown(version)} does not match "
            f"params._meta[{META_VERSION!r}] {shown(meta[META_VERSION])}"
        )
    for name, value in headers.items():
        if name.startswith("mcp-param-"):
            decode_header(name, value)  # invalid characters are refused here
    field = _NAMED_METHODS.get(str(method))
    if field is None:
        return
    mcp_name = headers.get("mcp-name")
    if mcp_name is None:
        raise HeaderMismatch(f"Mcp-Name header is required for {method}")
    decoded = decode_header("Mcp-Name", mcp_name)
    if decoded != params.get(field):
        raise HeaderMismatch(
            f"Mcp-Name header {shown(decoded)} does not match body params.{field} "
            f"{shown(params.get(field))}"
        )
