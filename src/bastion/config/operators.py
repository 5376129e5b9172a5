"""What operators use: the admin API, the console, telemetry export and access reviews."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bastion.config.base import SECRET_REFERENCE, _Frozen

__all__ = [
    "AdminSettings",
    "ConsoleSettings",
    "Governance",
    "Telemetry",
    "Traces",
]


class AdminSettings(_Frozen):
    """The admin API under /admin on the gateway's port, for operators.

    `token` is a secret reference (env:NAME, file:PATH or vault:PATH#KEY); without one, a
    token is generated at first start into `<state_dir>/admin-token` (mode 0600).
    """

    enabled: bool = True
    token: str | None = None

    @field_validator("token")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and not re.match(SECRET_REFERENCE, value):
            raise ValueError(
                "expected a secret reference (env:NAME, file:PATH or vault:PATH#KEY); "
                "a literal token is refused"
            )
        return value


class ConsoleSettings(_Frozen):
    """The operators' console under /console: who may log in, and as what.

    `issuer` is an OIDC provider for the authorization-code flow with PKCE (its `client_id`,
    and `client_secret` as a secret reference for a confidential client); without one, only
    the admin-token login is offered. `roles` maps a console role to the values of the
    issuer's `role_claim` that grant it; a person holding none of them is refused.
    """

    enabled: bool = True
    issuer: str | None = Field(None, pattern=r"^https?://[^/\s]+(/\S*)?$")
    client_id: str | None = None
    client_secret: str | None = None
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    role_claim: str = "roles"
    roles: dict[Literal["viewer", "operator", "approver", "admin"], tuple[str, ...]] = Field(
        default_factory=dict
    )
    session_lifetime_seconds: int = Field(8 * 3600, ge=60, le=7 * 86400)
    max_sessions: int = Field(1000, ge=1, le=100_000)

    @field_validator("client_secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and not re.match(SECRET_REFERENCE, value):
            raise ValueError("expected a secret reference (env:NAME, file:PATH or vault:PATH#KEY)")
        return value

    @model_validator(mode="after")
    def _client(self) -> ConsoleSettings:
        if self.issuer is not None and not self.client_id:
            raise ValueError("console.issuer needs console.client_id")
        return self


class Traces(_Frozen):
    """OpenTelemetry traces exported over OTLP/HTTP; W3C trace context propagates either way."""

    enabled: bool = False
    endpoint: str = Field("http://127.0.0.1:4318/v1/traces", pattern=r"^https?://")
    service_name: str = Field("bastion", min_length=1)
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)  # of traces the gateway starts itself
    # Sent with every export; OTEL_EXPORTER_OTLP_TRACES_HEADERS adds more (keep secrets there).
    headers: dict[str, str] = Field(default_factory=dict)


class Telemetry(_Frozen):
    """What the gateway reports about its own work beyond /metrics."""

    traces: Traces = Traces()


class Governance(_Frozen):
    """Access reviews (`bastion review`): what a finding is, and how often a review is due.

    `owners` is the list of people who may own agents today (the source of truth for "owner
    gone"); empty, that rule is off, since owners are free text in the registry.
    """

    unused_days: int = Field(30, ge=1)  # an active agent not used for this long
    max_expiry_days: int = Field(365, ge=1)  # an expiry further away than this
    max_key_age_days: int = Field(180, ge=1)  # keys not rotated for this long
    suspended_days: int = Field(14, ge=1)  # suspended for this long, neither resumed nor ended
    review_every_days: int = Field(90, ge=1)  # after the last closed review, the next is due
    owners: tuple[str, ...] = ()
