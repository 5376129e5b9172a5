"""Who may call (`auth:`), and what an upstream receives instead of the caller's token."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bastion.config.base import (
    NAME_PATTERN,
    RESERVED_TENANT,
    SECRET_REFERENCE,
    Environment,
    _Frozen,
)

__all__ = [
    "Auth",
    "Credential",
    "Dpop",
    "SeedAgent",
    "SpiffeDomain",
    "TrustedIssuer",
]


class TrustedIssuer(_Frozen):
    """An external OAuth/OIDC issuer whose tokens Bastion accepts, found by discovery."""

    issuer: str
    jwks_uri: str | None = None  # skips discovery when set
    audience: str | None = None  # required `aud` of its tokens; default: this gateway's routes
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    scope_claim: str = "scope"
    # Accept its tokens directly on MCP routes; they must then name the agent in this claim.
    agent_claim: str | None = None

    @field_validator("issuer")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError(f"expected an http(s) issuer URL, found {value!r}")
        return value


class SpiffeDomain(_Frozen):
    """A SPIFFE trust domain whose JWT-SVIDs are accepted as agent assertions."""

    domain: str = Field(pattern=r"^[a-z0-9.-]+$")
    bundle: str  # path to the domain's JWKS bundle, relative to the config file


class Dpop(_Frozen):
    """DPoP (RFC 9449) at the resource server and the token endpoint."""

    nonce: bool = False  # demand server-issued nonces (DPoP-Nonce / use_dpop_nonce)
    max_age_seconds: float = Field(60.0, gt=0, le=600)


def _not_reserved(value: str) -> str:
    if value == RESERVED_TENANT:
        raise ValueError(f"tenant {RESERVED_TENANT!r} is reserved for the gateway itself")
    return value


class SeedAgent(_Frozen):
    """An agent registered at start when absent (the quickstart's demo agents)."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    tenant: str = Field(pattern=NAME_PATTERN)
    owner: str
    purpose: str
    environment: Environment = "dev"
    scopes: tuple[str, ...] = ()
    require_dpop: bool = False
    roles: tuple[str, ...] = ()

    _tenant = field_validator("tenant")(_not_reserved)


class Auth(_Frozen):
    """Who may call: an OAuth 2.1 resource server with an embedded authorization server.

    `mode: none` (no identity; every caller is `agent` of `tenant`) exists for local
    development and is refused off loopback.
    """

    mode: Literal["oauth", "none"] = "oauth"
    public_url: str | None = None  # how clients reach this gateway; default from `listen`
    token_lifetime_seconds: int = Field(300, ge=30, le=3600)
    assertion_max_lifetime_seconds: int = Field(300, ge=10, le=3600)
    signing_alg: Literal["ES256", "EdDSA", "RS256"] = "ES256"
    leeway_seconds: float = Field(30.0, ge=0, le=300)
    scopes: tuple[str, ...] = ("mcp:tools", "mcp:resources", "mcp:prompts")
    trusted_issuers: tuple[TrustedIssuer, ...] = ()
    spiffe: tuple[SpiffeDomain, ...] = ()
    dpop: Dpop = Dpop()
    agents: tuple[SeedAgent, ...] = ()
    tenant: str = Field("default", pattern=NAME_PATTERN)  # mode none only
    agent: str = "anonymous"  # mode none only

    _tenant = field_validator("tenant")(_not_reserved)


class Credential(_Frozen):
    """What an upstream receives instead of the client's token.

    - `mint`: a JWT signed by Bastion for this call's principal, audience and tool (≤ 60 s);
    - `token_exchange`: RFC 8693 at an external authorization server;
    - `secret`: a header from a secret reference (`env:NAME`, `file:PATH`, `vault:PATH#KEY`);
    - `none`: nothing.
    """

    mode: Literal["mint", "token_exchange", "secret", "none"] = "mint"
    audience: str | None = None  # default: the upstream's URL (mint, token_exchange)
    lifetime_seconds: int = Field(60, ge=5, le=60)
    header: str = Field("Authorization", pattern=r"^[A-Za-z0-9-]+$")
    scheme: str = "Bearer"  # prefix of the header value; "" for the bare secret
    secret: str | None = None
    token_endpoint: str | None = None
    client_id: str | None = None
    client_secret: str | None = None  # a secret reference, like `secret`

    @model_validator(mode="after")
    def _references(self) -> Credential:
        for key in ("secret", "client_secret"):
            value = getattr(self, key)
            if value is not None and not re.match(SECRET_REFERENCE, value):
                raise ValueError(
                    f"{key} must be a secret reference (env:NAME, file:PATH or vault:PATH#KEY); "
                    "literal secrets are refused"
                )
        if self.mode == "secret" and self.secret is None:
            raise ValueError("mode secret needs `secret`")
        if self.mode == "token_exchange" and (
            self.token_endpoint is None or self.client_id is None
        ):
            raise ValueError("mode token_exchange needs `token_endpoint` and `client_id`")
        return self
