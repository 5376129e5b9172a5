"""Configuration: one YAML file parsed once into frozen, typed settings.

Every problem is reported with its key path and line (`upstreams.workspace.url (line 12): …`),
all of them at once, so an operator fixes a file in one pass.

`base` holds the frozen model and the shared patterns; one module per section of the file:
`gateway` (listen, limits, security), `auth` (callers, upstream credentials), `upstreams`
(servers, inspection, virtual servers), `policy`, `audit`, `operators` (admin API, console,
telemetry, governance); `settings` puts them together and checks across sections; `loader`
reads the YAML, reports problems by line and resolves relative paths.
"""

from bastion.config.audit import (
    Alerts,
    AuditAnchor,
    AuditSettings,
    AuditSigner,
    CrossTenant,
    DenialBurst,
    Habit,
    RateSpike,
    Rule,
    Sink,
)
from bastion.config.auth import Auth, Credential, Dpop, SeedAgent, SpiffeDomain, TrustedIssuer
from bastion.config.base import (
    ENVIRONMENTS,
    NAME_PATTERN,
    RATE_PATTERN,
    RESERVED_TENANT,
    SECRET_REFERENCE,
    TOOL_SEPARATOR,
    Environment,
)
from bastion.config.gateway import Limits, Listen, Security, Tls
from bastion.config.loader import load, parse
from bastion.config.operators import (
    AdminSettings,
    ConsoleSettings,
    Governance,
    Telemetry,
    Traces,
)
from bastion.config.policy import ArgumentRule, CrossEnvironment, Grant, PolicySettings
from bastion.config.settings import Settings, audit_path_problems, environment_problems
from bastion.config.shared import RegistrySettings, SharedState
from bastion.config.upstreams import (
    Containment,
    HttpUpstream,
    Inspect,
    InspectionSettings,
    Quarantine,
    Restart,
    StdioUpstream,
    Upstream,
    VirtualServer,
)

__all__ = [
    "NAME_PATTERN",
    "RATE_PATTERN",
    "RESERVED_TENANT",
    "SECRET_REFERENCE",
    "TOOL_SEPARATOR",
    "Containment",
    "AdminSettings",
    "ConsoleSettings",
    "Alerts",
    "ArgumentRule",
    "AuditAnchor",
    "AuditSettings",
    "AuditSigner",
    "Auth",
    "Credential",
    "CrossTenant",
    "DenialBurst",
    "Dpop",
    "ENVIRONMENTS",
    "CrossEnvironment",
    "Environment",
    "Governance",
    "Grant",
    "Habit",
    "HttpUpstream",
    "Inspect",
    "InspectionSettings",
    "Limits",
    "Listen",
    "PolicySettings",
    "Quarantine",
    "RegistrySettings",
    "RateSpike",
    "Restart",
    "Rule",
    "Security",
    "SeedAgent",
    "Settings",
    "SharedState",
    "Sink",
    "SpiffeDomain",
    "StdioUpstream",
    "Telemetry",
    "Tls",
    "Traces",
    "TrustedIssuer",
    "Upstream",
    "VirtualServer",
    "audit_path_problems",
    "environment_problems",
    "load",
    "parse",
]
