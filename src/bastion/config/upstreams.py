"""The MCP servers behind the gateway (`upstreams:`), what is inspected in their answers, and the
virtual servers that combine them.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from bastion.config.auth import Credential
from bastion.config.base import Environment, _Frozen

__all__ = [
    "Containment",
    "HttpUpstream",
    "Inspect",
    "InspectionSettings",
    "Quarantine",
    "Restart",
    "StdioUpstream",
    "Upstream",
    "VirtualServer",
]


class Restart(_Frozen):
    """Backoff for restarting a stdio upstream that exited."""

    initial_seconds: float = Field(0.2, gt=0)
    max_seconds: float = Field(30.0, gt=0)


Containment = Literal["block", "redact", "flag", "off"]


class Quarantine(_Frozen):
    """When an upstream whose answers leaked across a tenant line is taken out of service for
    every tenant, until an operator releases it (None: never, only alerted)."""

    after: int | None = Field(None, ge=1)  # contained leaks before the quarantine


class Inspect(_Frozen):
    """What the inspection stage does with what this upstream sends back.

    `block` withholds the answer (the client gets an `inspection.*` error), `redact` replaces
    what was found by a marker, `flag` delivers it and records and alerts, `off` skips the rule.
    """

    tenants: Containment = "block"  # objects of another tenant (`tenant_arguments` patterns)
    quarantine: Quarantine = Quarantine()
    secrets: Containment = "redact"  # keys, tokens, private keys, passwords in URLs
    personal_data: Containment = "off"
    personal_kinds: tuple[Literal["email", "card", "phone", "iban"], ...] = (
        "email",
        "card",
        "phone",
        "iban",
    )
    injection: Literal["block", "flag", "off"] = "flag"  # instructions aimed at the model
    pins: Literal["enforce", "off"] = "enforce"  # a changed definition waits for an operator
    poisoning: Literal["withhold", "flag", "off"] = "flag"  # instructions in descriptions
    shadowing: Literal["withhold", "flag", "off"] = "withhold"  # names like another's tools
    # Labels a session collects whenever this upstream answers it (e.g. `untrusted` for a
    # server that fetches web pages); policy reads them in `context.history.labels`.
    labels: tuple[str, ...] = ()


class InspectionSettings(_Frozen):
    """The inspection stage as a whole (per-upstream rules are under `upstreams.*.inspect`)."""

    enabled: bool = True
    # Tenants whose objects the tenant guard recognises besides those of registered agents
    # and grants (customers of an upstream that have no agent at this gateway).
    tenants: tuple[str, ...] = ()


class HttpUpstream(_Frozen):
    """An MCP server reached over Streamable HTTP."""

    transport: Literal["http"]
    url: str
    timeout_seconds: float = Field(30.0, gt=0)
    connect_timeout_seconds: float = Field(5.0, gt=0)
    max_connections: int = Field(64, ge=1)
    protocol: Literal["auto", "legacy", "modern"] = "auto"
    launch: tuple[str, ...] = ()
    cwd: str | None = None
    expose: bool = True
    environment: Environment | None = None  # None: the gateway's own `environment`
    # Policy inputs: whether the tool annotations this server declares are believed, which
    # arguments name a tenant's object (`{tenant}` in a glob, e.g. "{tenant}-p*"), and
    # labels per tool that a session's history collects (e.g. `send_report: [egress]`).
    trusted: bool = False
    tenant_arguments: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    inspect: Inspect = Inspect()
    credentials: Credential = Credential()

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError(f"expected an http:// or https:// URL, found {value!r}")
        return value


class StdioUpstream(_Frozen):
    """An MCP server run as a subprocess speaking JSON-RPC over stdin/stdout."""

    transport: Literal["stdio"]
    command: tuple[str, ...] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    env_passthrough: tuple[str, ...] = ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")
    cwd: str | None = None
    timeout_seconds: float = Field(30.0, gt=0)
    protocol: Literal["auto", "legacy", "modern"] = "auto"
    restart: Restart = Restart()
    expose: bool = True
    environment: Environment | None = None  # None: the gateway's own `environment`
    # Policy inputs: whether the tool annotations this server declares are believed, which
    # arguments name a tenant's object (`{tenant}` in a glob, e.g. "{tenant}-p*"), and
    # labels per tool that a session's history collects (e.g. `send_report: [egress]`).
    trusted: bool = False
    tenant_arguments: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    inspect: Inspect = Inspect()
    credentials: Credential = Credential(mode="none")


Upstream = Annotated[HttpUpstream | StdioUpstream, Field(discriminator="transport")]


class VirtualServer(_Frozen):
    """A route that combines several upstreams under one MCP endpoint."""

    path: str = Field(pattern=r"^/[A-Za-z0-9/_.-]*$")
    upstreams: tuple[str, ...] = Field(min_length=1)
    instructions: str | None = None
    environment: Environment | None = None  # None: its upstreams' (which must agree)
