"""The whole configuration (`Settings`), its cross-section checks, and the problems found once
paths are resolved: environments and audit paths.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from bastion.config.audit import AuditSettings
from bastion.config.auth import Auth
from bastion.config.base import ENVIRONMENTS, NAME_PATTERN, Environment, _Frozen
from bastion.config.gateway import Limits, Listen, Security
from bastion.config.operators import AdminSettings, ConsoleSettings, Governance, Telemetry
from bastion.config.policy import PolicySettings
from bastion.config.shared import RegistrySettings, SharedState
from bastion.config.upstreams import InspectionSettings, Upstream, VirtualServer

__all__ = [
    "Settings",
    "audit_path_problems",
    "environment_problems",
]


class Settings(_Frozen):
    """The whole configuration, validated."""

    listen: Listen = Listen()
    state_dir: str = ".state"  # keys and the registry; relative to the config file
    auth: Auth = Auth()
    audit: AuditSettings = AuditSettings()
    admin: AdminSettings = AdminSettings()
    console: ConsoleSettings = ConsoleSettings()
    policy: PolicySettings = PolicySettings()
    limits: Limits = Limits()
    security: Security = Security()
    telemetry: Telemetry = Telemetry()
    inspection: InspectionSettings = InspectionSettings()
    governance: Governance = Governance()
    state: SharedState = SharedState()  # memory (one process) or redis (replicas)
    registry: RegistrySettings = RegistrySettings()  # sqlite (state_dir) or postgres
    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    virtual_servers: dict[str, VirtualServer] = Field(default_factory=dict)
    # The gateway's own environment: its upstreams' unless they say otherwise, and what
    # `context.request.environment` carries. `prod` refuses demo parts and `auth: none`.
    environment: Environment = "dev"

    @model_validator(mode="before")
    @classmethod
    def _old_environment(cls, data: Any) -> Any:
        """Read `policy.environment`, the old name of `environment`, when that is not given
        (a disagreement between the two is reported by `environment_problems`)."""
        policy = data.get("policy") if isinstance(data, dict) else None
        old = policy.get("environment") if isinstance(policy, dict) else None
        if old in ENVIRONMENTS and "environment" not in data:
            return {**data, "environment": old}
        return data

    def environment_of(self, upstream: str) -> str:
        """An upstream's environment: its own, else the gateway's."""
        found = self.upstreams.get(upstream)
        return (found.environment if found is not None else None) or self.environment

    @model_validator(mode="after")
    def _references(self) -> Settings:
        problems = []
        for name in self.upstreams:
            if not re.match(NAME_PATTERN, name):
                problems.append(f"upstream name {name!r} must match {NAME_PATTERN}")
        paths: dict[str, str] = {}
        for vname, server in self.virtual_servers.items():
            for ref in server.upstreams:
                if ref not in self.upstreams:
                    problems.append(f"virtual server {vname!r} names unknown upstream {ref!r}")
            if server.path.startswith(("/servers/", "/admin/", "/console/")) or server.path in (
                "/healthz",
                "/readyz",
                "/admin",
                "/console",
            ):
                problems.append(f"virtual server {vname!r} path {server.path!r} is reserved")
            if server.path in paths:
                problems.append(
                    f"virtual servers {paths[server.path]!r} and {vname!r} share a path"
                )
            paths[server.path] = vname
        for grant in self.policy.grants:
            if grant.server != "*" and grant.server not in self.upstreams:
                problems.append(f"grant {grant.id!r} names unknown upstream {grant.server!r}")
        ids = [g.id for g in self.policy.grants]
        if len(set(ids)) != len(ids):
            problems.append("grant ids must be unique")
        if self.auth.mode == "none":
            problems += [
                f"upstream {name!r}: credentials mode token_exchange needs auth mode oauth "
                "(under auth: none there is no principal to exchange for)"
                for name, upstream in self.upstreams.items()
                if upstream.credentials.mode == "token_exchange"
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def base_url(self) -> str:
        """The gateway's public base URL (no trailing slash)."""
        if self.auth.public_url:
            return self.auth.public_url.rstrip("/")
        host = self.listen.host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.listen.tls is not None else "http"
        return f"{scheme}://{host}:{self.listen.port}"

    def is_loopback(self) -> bool:
        """Whether the gateway binds only to a loopback address."""
        host = self.listen.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def audit_path_problems(settings: Settings) -> dict[str, str]:
    """Key path -> problem, for an audit signer key file or anchor inside the state directory,
    which protects nothing: whoever can rewrite the store there can reach them too."""
    state = Path(settings.state_dir).resolve()
    signer, anchor = settings.audit.signer, settings.audit.anchor
    named = {
        "audit.signer.path": signer.path if signer is not None else None,
        "audit.anchor.path": anchor.path if anchor is not None else None,
    }
    return {
        key: f"{value} lies inside state_dir {state}; keep it outside, where whoever can "
        "write the audit store cannot reach it"
        for key, value in named.items()
        if value is not None and Path(value).resolve().is_relative_to(state)
    }


def environment_problems(settings: Settings) -> dict[str, str]:
    """Key path -> problem, for environments: a virtual server whose upstreams are not all of
    its environment, an exception naming what it cannot apply to, and in a `prod` gateway
    every demo part and `auth: none` (see docs/decisions/0004-environments.md)."""
    problems: dict[str, str] = {}
    old = settings.policy.environment
    if old is not None and old != settings.environment:
        problems["policy.environment"] = (
            f"{old!r} disagrees with the top-level environment {settings.environment!r}; "
            "keep only the top-level `environment:`"
        )
    for name, server in settings.virtual_servers.items():
        problems.update(_virtual_server_problems(settings, name, server))
    for n, exception in enumerate(settings.policy.cross_environment):
        for upstream in exception.servers:
            if upstream not in settings.upstreams:
                found = "is not an upstream"
            elif settings.environment_of(upstream) != exception.to:
                found = f"is in {settings.environment_of(upstream)!r}"
            else:
                continue
            problems[f"policy.cross_environment.{n}.servers"] = (
                f"{upstream!r} {found}, not in {exception.to!r} (the exception's `to`)"
            )
    if settings.environment == "prod":
        problems.update(_prod_problems(settings))
    return problems


def _virtual_server_problems(
    settings: Settings, name: str, server: VirtualServer
) -> dict[str, str]:
    found = {u: settings.environment_of(u) for u in server.upstreams if u in settings.upstreams}
    wanted = server.environment
    if wanted is not None:
        others = [f"{u!r} ({env})" for u, env in found.items() if env != wanted]
        if others:
            return {
                f"virtual_servers.{name}.environment": f"{wanted!r}, but its upstreams "
                f"{', '.join(others)} are not; a virtual server serves one environment"
            }
    elif len(set(found.values())) > 1:
        listed = ", ".join(f"{u!r} ({env})" for u, env in found.items())
        return {
            f"virtual_servers.{name}.upstreams": f"upstreams of different environments: "
            f"{listed}; a virtual server serves one environment"
        }
    return {}


def _prod_problems(settings: Settings) -> dict[str, str]:
    """What a `prod` gateway refuses: anything labelled demo, and callers without identity."""
    problems: dict[str, str] = {}
    if settings.auth.mode == "none":
        problems["auth.mode"] = (
            "a prod gateway refuses auth: none (every caller would be one anonymous agent)"
        )
    demo = "a prod gateway refuses demo {what}; remove it or run it on a demo gateway"
    for name, upstream in settings.upstreams.items():
        if upstream.environment == "demo":
            problems[f"upstreams.{name}.environment"] = demo.format(what="upstreams")
    for name, server in settings.virtual_servers.items():
        if server.environment == "demo":
            problems[f"virtual_servers.{name}.environment"] = demo.format(what="virtual servers")
    for n, agent in enumerate(settings.auth.agents):
        if agent.environment == "demo":
            problems[f"auth.agents.{n}.environment"] = demo.format(what=f"agents ({agent.id!r})")
    for n, exception in enumerate(settings.policy.cross_environment):
        if exception.from_ == "demo":
            problems[f"policy.cross_environment.{n}.from"] = demo.format(
                what="agents, even by exception"
            )
    return problems
