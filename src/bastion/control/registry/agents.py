"""Agents: the non-human identities that may call Bastion, and their validation.

The registry (store.py) stores them; everything here is pure.
"""

from __future__ import annotations

import builtins
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from bastion.config import ENVIRONMENTS, RESERVED_TENANT
from bastion.errors import RegistryInvalid, TokenError, shown
from bastion.identity import keys

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
TENANT_PATTERN = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3
PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
_SPIFFE_ID = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_MAX_KEYS = 16
# Revocations outlive their token by this much, so a token accepted with clock leeway still
# finds its revocation; older rows are pruned.
REVOCATION_KEEP_S = 3600.0


class AgentStatus(enum.StrEnum):
    """Lifecycle of an agent: only `active` agents may call; `offboarded` is final."""

    ACTIVE = "active"
    SUSPENDED = "suspended"
    OFFBOARDED = "offboarded"


@dataclass(frozen=True)
class Agent:
    """A registered non-human identity: who owns it, what it may reach, how it proves itself."""

    id: str
    display_name: str
    owner: str
    tenant: str
    purpose: str
    environment: str
    jwks: dict[str, Any]
    spiffe_id: str | None
    audiences: tuple[str, ...]
    scopes: tuple[str, ...]
    require_dpop: bool
    expires_at: float | None
    status: AgentStatus
    created_at: float
    last_used_at: float | None = None
    status_reason: str | None = None

    def usable(self, now: float) -> tuple[bool, str]:
        """Whether the agent may call at `now`; else a reason: suspended, offboarded, expired."""
        if self.status is not AgentStatus.ACTIVE:
            return False, str(self.status)
        if self.expires_at is not None and now >= self.expires_at:
            return False, "expired"
        return True, "ok"

    def to_dict(self) -> dict[str, Any]:
        """The agent as a JSON object (`bastion agents show --json`, the admin API)."""
        data = asdict(self)
        data["status"] = str(self.status)
        data["audiences"] = list(self.audiences)
        data["scopes"] = list(self.scopes)
        return data


@dataclass(frozen=True)
class RegistrySnapshot:
    """Everything the gateway's view holds, read in one transaction, with its version."""

    version: int
    agents: Mapping[str, Agent]
    revoked_jtis: frozenset[str]
    killed_sessions: frozenset[str]


class Registry(Protocol):
    """The registry port; `SqliteRegistry` is the embedded implementation."""

    def add(self, agent: Agent) -> Agent: ...
    def get(self, agent_id: str) -> Agent: ...
    def list(
        self, tenant: str | None = None, status: AgentStatus | None = None
    ) -> builtins.list[Agent]: ...
    def set_status(self, agent_id: str, status: AgentStatus, reason: str | None) -> Agent: ...
    def rotate_key(self, agent_id: str, jwks: dict[str, Any]) -> Agent: ...
    def touch(self, agent_id: str, when: float) -> None: ...
    def flush_touches(self, *, wait: bool = False) -> int: ...
    def revoke_token(self, jti: str, expires_at: float, reason: str) -> None: ...
    def is_token_revoked(self, jti: str) -> bool: ...
    def kill_session(self, session_id_hash: str) -> None: ...
    def killed_sessions(self) -> set[str]: ...
    def version(self) -> int: ...
    def snapshot(self) -> RegistrySnapshot: ...


# --- validation -------------------------------------------------------------------------------


def validate_agent(agent: Agent) -> None:
    """Raise `RegistryInvalid` naming the first field of `agent` that is not acceptable."""
    if not isinstance(agent.id, str) or not ID_PATTERN.fullmatch(agent.id):
        raise RegistryInvalid(f"id: expected {ID_PATTERN.pattern}, found {shown(agent.id)}")
    if not isinstance(agent.tenant, str) or not TENANT_PATTERN.fullmatch(agent.tenant):
        raise RegistryInvalid(
            f"tenant: expected {TENANT_PATTERN.pattern}, found {shown(agent.tenant)}"
        )
    if agent.tenant == RESERVED_TENANT:
        raise RegistryInvalid(f"tenant: {RESERVED_TENANT!r} is reserved for the gateway itself")
    check_text("display_name", agent.display_name, 200)
    check_text("owner", agent.owner, 200)
    check_text("purpose", agent.purpose, 2000)
    if agent.environment not in ENVIRONMENTS:
        raise RegistryInvalid(
            f"environment: expected one of {', '.join(ENVIRONMENTS)}, "
            f"found {shown(agent.environment)}"
        )
    if agent.spiffe_id is not None:
        validate_spiffe_id(agent.spiffe_id)
    validate_jwks(agent.jwks, allow_empty=agent.spiffe_id is not None)
    _tokens("audiences", agent.audiences, PRINTABLE_ASCII, "printable ASCII without spaces")
    _tokens("scopes", agent.scopes, _SCOPE_TOKEN, "RFC 6749 scope tokens")
    if not isinstance(agent.require_dpop, bool):
        raise RegistryInvalid(f"require_dpop: expected a bool, found {shown(agent.require_dpop)}")
    check_time("created_at", agent.created_at)
    if agent.expires_at is not None:
        check_time("expires_at", agent.expires_at)
    if agent.last_used_at is not None:
        check_time("last_used_at", agent.last_used_at)
    if not isinstance(agent.status, AgentStatus):
        raise RegistryInvalid(f"status: expected an AgentStatus, found {shown(agent.status)}")
    if agent.status is not AgentStatus.ACTIVE or agent.status_reason is not None:
        check_text("status_reason", agent.status_reason, 500)


def validate_spiffe_id(value: object) -> None:
    """Raise `RegistryInvalid` unless `value` is a SPIFFE ID of a workload (with a path)."""
    if (
        not isinstance(value, str)
        or len(value) > 2048
        or not _SPIFFE_ID.fullmatch(value)
        or any(seg in (".", "..") for seg in value.split("/")[3:])
    ):
        raise RegistryInvalid(
            f"spiffe_id: expected spiffe://<trust-domain>/<path>, found {shown(value)}"
        )


def validate_jwks(jwks: object, *, allow_empty: bool) -> None:
    """Raise `RegistryInvalid` unless `jwks` is a JWKS of usable public signing keys."""
    if not isinstance(jwks, dict) or (jwks and not isinstance(jwks.get("keys"), builtins.list)):
        raise RegistryInvalid('jwks: expected a JWK Set, an object {"keys": [...]}')
    entries: builtins.list[Any] = jwks.get("keys", [])
    if not entries and not allow_empty:
        raise RegistryInvalid("jwks: expected at least one public key (or a spiffe_id)")
    if len(entries) > _MAX_KEYS:
        raise RegistryInvalid(f"jwks: expected at most {_MAX_KEYS} keys, found {len(entries)}")
    kids: set[str] = set()
    for index, key in enumerate(entries):
        where = f"jwks.keys[{index}]"
        if not isinstance(key, dict):
            raise RegistryInvalid(f"{where}: expected a JWK object, found {type(key).__name__}")
        kid = key.get("kid")
        if not isinstance(kid, str) or not PRINTABLE_ASCII.fullmatch(kid):
            raise RegistryInvalid(f"{where}.kid: expected a non-empty string, found {shown(kid)}")
        if kid in kids:
            raise RegistryInvalid(f"{where}.kid: {shown(kid)} appears twice")
        kids.add(kid)
        _public_key(where, key)


def _public_key(where: str, key: dict[str, Any]) -> None:
    # The same loader and checks as the verifier's KeySet, so that no registered key is one
    # the gateway would silently skip.
    try:
        public = keys.public_key_from_jwk(key)
    except TokenError as exc:
        raise RegistryInvalid(f"{where}: {exc.message}") from exc
    if key.get("use", "sig") != "sig":
        raise RegistryInvalid(f"{where}.use: expected 'sig', found {shown(key.get('use'))}")
    ops = key.get("key_ops")
    if ops is not None and (not isinstance(ops, builtins.list) or "verify" not in ops):
        raise RegistryInvalid(f"{where}.key_ops: expected a list with 'verify', found {shown(ops)}")
    alg = key.get("alg")
    if alg is not None and (not isinstance(alg, str) or not keys.fits(alg, public)):
        raise RegistryInvalid(f"{where}.alg: {alg!r} does not fit a {key.get('kty')} key")


def check_text(field: str, value: object, limit: int) -> None:
    """A printable string of at most `limit` characters, or RegistryInvalid naming `field`."""
    if not isinstance(value, str) or not value.strip():
        raise RegistryInvalid(f"{field}: expected non-empty text, found {shown(value)}")
    if len(value) > limit:
        raise RegistryInvalid(f"{field}: expected at most {limit} characters, found {len(value)}")
    if _CONTROL_CHARS.search(value):
        raise RegistryInvalid(f"{field}: control characters are not allowed")


def _tokens(field: str, values: object, pattern: re.Pattern[str], expected: str) -> None:
    if not isinstance(values, tuple):
        raise RegistryInvalid(f"{field}: expected a tuple of strings, found {shown(values)}")
    for value in values:
        if not isinstance(value, str) or len(value) > 2048 or not pattern.fullmatch(value):
            raise RegistryInvalid(f"{field}: expected {expected}, found {shown(value)}")
    if len(set(values)) != len(values):
        raise RegistryInvalid(f"{field}: duplicate entries in {shown(str(list(values)))}")


def check_time(field: str, value: object) -> None:
    """A finite epoch time, or RegistryInvalid naming `field`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RegistryInvalid(f"{field}: expected epoch seconds, found {shown(value)}")
    if value < 0:
        raise RegistryInvalid(f"{field}: expected epoch seconds ≥ 0, found {shown(value)}")


# --- SQLite -----------------------------------------------------------------------------------
