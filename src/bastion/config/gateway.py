"""The gateway's own bounds: where it listens, what a request may cost, which peers it trusts."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator, model_validator

from bastion.config.base import _Frozen

__all__ = [
    "Limits",
    "Listen",
    "Security",
    "Tls",
]


class Tls(_Frozen):
    """TLS on the listener: a PEM certificate chain and its unencrypted PEM key, each a file
    (relative to the config file), watched and reloaded when either changes."""

    cert: str = Field(min_length=1)
    key: str = Field(min_length=1)
    reload_seconds: float = Field(5.0, gt=0, le=3600)


class Listen(_Frozen):
    """Where the gateway listens, whether over TLS, and how long a shutdown may drain."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tls: Tls | None = None
    # SIGTERM: answers in progress get this long to finish before their connections are cut.
    drain_seconds: float = Field(20.0, ge=0, le=3600)


class Limits(_Frozen):
    """Bounds on what one request may cost."""

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Legacy-era sessions: in all, per agent (all its users) and per tenant. At a bound, only
    # the asker's own sessions idle for `session_reclaim_seconds` make room; never another's.
    max_sessions: int = Field(10_000, ge=1)
    max_sessions_per_agent: int = Field(100, ge=1)
    max_sessions_per_tenant: int = Field(1000, ge=1)
    session_reclaim_seconds: float = Field(60.0, gt=0)
    session_idle_seconds: float = Field(3600.0, gt=0)
    sse_replay_events: int = Field(256, ge=0)
    sse_keepalive_seconds: float = Field(15.0, gt=0)
    header_timeout_seconds: float = Field(30.0, gt=0)  # a request must arrive whole by then
    idle_connection_seconds: float = Field(75.0, gt=0)  # keep-alive between requests

    @model_validator(mode="after")
    def _nested(self) -> Limits:
        # An agent's quota above its tenant's, or a tenant's above the gateway's, would let
        # one agent or one tenant hold every session there is.
        if self.max_sessions_per_agent > self.max_sessions_per_tenant:
            raise ValueError(
                f"max_sessions_per_agent ({self.max_sessions_per_agent}) exceeds "
                f"max_sessions_per_tenant ({self.max_sessions_per_tenant}); expected at most it"
            )
        if self.max_sessions_per_tenant > self.max_sessions:
            raise ValueError(
                f"max_sessions_per_tenant ({self.max_sessions_per_tenant}) exceeds "
                f"max_sessions ({self.max_sessions}): one tenant could hold every session; "
                "expected at most it"
            )
        return self


class Security(_Frozen):
    """DNS-rebinding protection (which Origin and Host values are accepted), and which peers
    are proxies whose forwarded header names the client (audit records, alerts)."""

    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()  # addresses or CIDR ranges, e.g. 10.0.0.0/8
    forwarded_header: str = Field("x-forwarded-for", pattern=r"^[A-Za-z0-9-]+$")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"expected an IP address or CIDR range, found {entry[:64]!r}"
                ) from None
        return value

    @field_validator("forwarded_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()  # header names arrive lower-cased
