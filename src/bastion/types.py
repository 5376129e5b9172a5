"""Small value types shared by every stage; imports nothing of Bastion's."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "JSON",
    "LEGACY_VERSIONS",
    "META_CAPABILITIES",
    "META_CLIENT_INFO",
    "META_SERVER_INFO",
    "META_SUBSCRIPTION",
    "META_VERSION",
    "MODERN_VERSION",
    "PROBE_META",
    "SUPPORTED_VERSIONS",
    "UPSTREAM_STATUS",
    "Decision",
    "Era",
    "Principal",
    "Target",
]

JSON = dict[str, Any]

MODERN_VERSION = "2026-07-28"
LEGACY_VERSIONS = ("2025-11-25", "2025-06-18")
SUPPORTED_VERSIONS = (MODERN_VERSION, *LEGACY_VERSIONS)

META_VERSION = "io.modelcontextprotocol/protocolVersion"
META_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
META_CLIENT_INFO = "io.modelcontextprotocol/clientInfo"
META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
META_SUBSCRIPTION = "io.modelcontextprotocol/subscriptionId"

# Set on an upstream's JSON-RPC error that came with an HTTP error status, so the front can
# answer a 2026-07-28 client with the same status; removed before anything is sent.
UPSTREAM_STATUS = "__bastion_http_status__"


class Era(enum.Enum):
    """Which shape of the protocol a request speaks."""

    LEGACY = "legacy"  # initialize handshake, Mcp-Session-Id (2025-06-18, 2025-11-25)
    MODERN = "modern"  # stateless, per-request _meta (2026-07-28)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: built once per request by the authn stage."""

    tenant: str
    agent: str
    user: str | None = None
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    delegation: tuple[str, ...] = ()
    token_id: str | None = None
    expires_at: float | None = None
    key_binding: str | None = None
    environment: str | None = None

    def binding_key(self) -> tuple[str, str, str | None, str | None]:
        """What a session is bound to: same key, same owner."""
        return (self.tenant, self.agent, self.user, self.key_binding)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes after routing: an upstream and the name it knows."""

    upstream: str
    name: str | None = None


@dataclass(slots=True)
class Decision:
    """What the authz stage decided, with its reasons."""

    allowed: bool
    reasons: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()
    obligations: dict[str, Any] = field(default_factory=dict)


# The per-request envelope Bastion sends when it asks an upstream something on its own behalf.
PROBE_META: JSON = {
    META_VERSION: MODERN_VERSION,
    META_CAPABILITIES: {},
    META_CLIENT_INFO: {"name": "bastion", "version": "0.1.0"},
}
