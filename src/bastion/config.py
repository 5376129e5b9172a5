"""Configuration: one YAML file parsed once into frozen, typed settings.

Every problem is reported with its key path and line (`upstreams.workspace.url (line 12): …`),
all of them at once, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bastion.errors import ConfigError

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
    "RateSpike",
    "Restart",
    "Rule",
    "Security",
    "SeedAgent",
    "Settings",
    "Sink",
    "SpiffeDomain",
    "StdioUpstream",
    "Telemetry",
    "Traces",
    "TrustedIssuer",
    "Upstream",
    "VirtualServer",
    "audit_path_problems",
    "environment_problems",
    "load",
    "parse",
]

# Upstream names become tool-name prefixes (`workspace__search_tasks`): no underscores in them,
# so the first "__" in an exposed name always ends the prefix.
NAME_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"
TOOL_SEPARATOR = "__"
# The tenant the gateway itself acts in when it lists upstreams for policy; no agent, seed or
# `auth: none` caller may be in it, so nothing of a real tenant's is ever shared with it.
RESERVED_TENANT = "bastion"
# A secret is named, never written in the file: env:NAME, file:PATH or vault:PATH#KEY.
SECRET_REFERENCE = r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+|vault:[^#]+#.+)$"  # noqa: S105
# Where a gateway, an upstream, a virtual server or an agent belongs. An agent reaches only
# upstreams of its own environment (a built-in forbid); a `prod` gateway refuses `demo` parts.
Environment = Literal["dev", "staging", "prod", "demo"]
ENVIRONMENTS: tuple[str, ...] = ("dev", "staging", "prod", "demo")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Listen(_Frozen):
    """Where the gateway listens."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


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


RATE_PATTERN = r"^[1-9][0-9]*/(second|minute|hour|day)$"


class ArgumentRule(_Frozen):
    """A constraint on one tool argument in a grant (exactly one of the operators)."""

    equals: str | int | bool | None = None
    like: str | None = None  # Cedar glob: * matches any run of characters
    one_of: tuple[str, ...] | None = None
    max: int | None = None  # integers only

    @model_validator(mode="after")
    def _one(self) -> ArgumentRule:
        given = [k for k in ("equals", "like", "one_of", "max") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of equals, like, one_of, max")
        return self


class Grant(_Frozen):
    """A simple permission compiled to a Cedar permit: who (tenant, agents or roles), which
    server, which tools/prompts/resources, with which constraints and obligations."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    tenant: str  # a tenant name, or "*" for every tenant (flagged by `bastion policy lint`)
    agents: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    server: str  # an upstream name, or "*"
    tools: tuple[str, ...] | Literal["*"] = ()
    prompts: tuple[str, ...] | Literal["*"] = ()
    resources: tuple[str, ...] | Literal["*"] = ()  # URI globs
    read_only: bool = False  # only tools a trusted server marks read-only
    arguments: dict[str, ArgumentRule] = Field(default_factory=dict)
    # human: a person with an `approvers` role decides (console, CLI, admin API, link);
    # client (or true, the older spelling): the client is asked through elicitation.
    approval: bool | Literal["human", "client"] = False
    approvers: tuple[str, ...] = ()  # roles that may approve; none: policy.approvers
    approval_timeout_seconds: float | None = Field(None, gt=0)  # none: the policy's
    # Arguments the approver is shown first, marked: recipients, egress targets, amounts.
    sensitive: tuple[str, ...] = ()
    rate: str | None = Field(None, pattern=RATE_PATTERN)
    reason: str | None = None

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if value != "*" and not re.match(NAME_PATTERN, value):
            raise ValueError(f"expected a tenant name or '*', found {value!r}")
        return value

    @model_validator(mode="after")
    def _shape(self) -> Grant:
        if not (self.tools or self.prompts or self.resources):
            raise ValueError("a grant names at least one of tools, prompts, resources")
        if self.arguments and (self.tools == "*" or not self.tools):
            raise ValueError("argument rules need an explicit list of tools")
        return self


class CrossEnvironment(_Frozen):
    """An exception to environment separation: agents of `from_` may reach upstreams of `to`.

    It is written into the built-in `environment-separation` forbid (`unless { … }`), so
    `bastion policy explain` shows it with the rule it relaxes."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    from_: Environment = Field(alias="from")  # the agents' environment
    to: Environment  # the upstreams' environment
    tenant: str  # a tenant name, or "*" for every tenant
    agents: tuple[str, ...] = ()  # none: every agent of the tenant in `from`
    servers: tuple[str, ...] = ()  # none: every upstream in `to`
    reason: str = Field(min_length=1)  # why; shown in the policy text

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if value != "*" and not re.match(NAME_PATTERN, value):
            raise ValueError(f"expected a tenant name or '*', found {value!r}")
        return value

    @model_validator(mode="after")
    def _crosses(self) -> CrossEnvironment:
        if self.from_ == self.to:
            raise ValueError(f"from and to are both {self.to!r}: nothing to allow")
        return self


class PolicySettings(_Frozen):
    """Authorization: Cedar policy files and YAML grants, evaluated on every request."""

    files: tuple[str, ...] = ()  # .cedar files, relative to the config file
    grants: tuple[Grant, ...] = ()
    # The old name of the top-level `environment` (the gateway's), still read.
    environment: str | None = None
    cross_environment: tuple[CrossEnvironment, ...] = ()
    reload_seconds: float = Field(1.0, gt=0)  # how often the files are checked for changes
    approval_timeout_seconds: float = Field(120.0, gt=0)
    approvers: tuple[str, ...] = ("approver",)  # who may approve held calls by default
    catalog_timeout_seconds: float = Field(10.0, gt=0)  # listing upstream tools at start

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: str | None) -> str | None:
        if value is not None and value not in ENVIRONMENTS:
            raise ValueError(
                f"expected one of {', '.join(ENVIRONMENTS)}, found {value[:40]!r} "
                "(the gateway's environment; write it as the top-level `environment:`)"
            )
        return value


def _loopback(host: str | None) -> bool:
    if host in ("localhost", None):
        return host is not None
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Sink(_Frozen):
    """An export of the audit trail: each committed record (or those of `phases`) is sent in
    order, at least once, behind the hot path, resuming where it stopped after a restart.

    - `jsonl`: lines appended to `path`;
    - `syslog`: RFC 5424 messages to `address` (`host:port`) over UDP or TCP (RFC 6587 octet
      counting);
    - `webhook`: a JSON array of records POSTed to an HTTPS `url` (plain http only on loopback),
      retried with backoff, optionally signed (HMAC-SHA256 with `secret`);
    - `otel_logs`: OTLP/HTTP (protobuf) log records POSTed to `url` (a collector's /v1/logs).
    """

    name: str = Field(pattern=NAME_PATTERN)
    type: Literal["jsonl", "syslog", "webhook", "otel_logs"]
    format: Literal["json", "ocsf"] = "json"
    # empty: every record phase; "checkpoint" (named, never implied) adds the signed checkpoints
    # and heartbeats that audit.anchor receives, as JSON lines of their own
    phases: tuple[Literal["decision", "outcome", "authn", "alert", "checkpoint"], ...] = ()
    path: str | None = None
    address: str | None = None
    transport: Literal["udp", "tcp"] = "udp"
    facility: int = Field(13, ge=0, le=23)  # 13: log audit (RFC 5424)
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)  # header -> secret reference
    secret: str | None = None  # webhook signing key, a secret reference
    ca_file: str | None = None  # trust this CA for the url (besides the system's)
    batch_max: int = Field(100, ge=1, le=10_000)
    timeout_seconds: float = Field(10.0, gt=0)
    retry_max_seconds: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _shape(self) -> Sink:
        needs = {"jsonl": "path", "syslog": "address", "webhook": "url", "otel_logs": "url"}
        if getattr(self, needs[self.type]) is None:
            raise ValueError(f"sink type {self.type} needs `{needs[self.type]}`")
        for key, value in [
            *(("headers." + k, v) for k, v in self.headers.items()),
            ("secret", self.secret),
        ]:
            if value is not None and not re.match(SECRET_REFERENCE, value):
                raise ValueError(
                    f"{key} must be a secret reference (env:NAME, file:PATH or vault:PATH#KEY); "
                    "literal secrets are refused"
                )
        if self.url is not None:
            match = re.match(r"^(https?)://(\[[^\]]+\]|[^/:]+)(:\d+)?(/.*)?$", self.url)
            if match is None:
                raise ValueError(f"url must be an http(s) URL, found {self.url!r}")
            if match.group(1) == "http" and not _loopback(match.group(2)):
                raise ValueError("url must use https (plain http is allowed on loopback only)")
        if self.address is not None and not re.match(r"^(\[[^\]]+\]|[^:]+):\d+$", self.address):
            raise ValueError(f"address must be host:port, found {self.address!r}")
        return self


class Rule(_Frozen):
    """One anomaly detector: whether it runs and whether its alert suspends the agent."""

    enabled: bool = True
    suspend: bool = False


class RateSpike(Rule):
    """An agent's calls in one minute far above its own moving average."""

    factor: float = Field(5.0, gt=1)  # times the agent's average calls per minute
    min_calls: int = Field(60, ge=1)  # never alert below this many calls in the minute
    warmup_minutes: int = Field(10, ge=1)  # minutes of history before the baseline counts


class DenialBurst(Rule):
    """Many denials of one agent in a short window."""

    count: int = Field(10, ge=1)
    window_seconds: float = Field(60.0, gt=0)


class CrossTenant(Rule):
    """A request naming another tenant's data, or presenting another tenant's session."""

    suspend: bool = True
    count: int = Field(3, ge=1)  # attempts within the window that suspend the agent
    window_seconds: float = Field(600.0, gt=0)


class Habit(Rule):
    """A first that matters only once the agent has a history (`min_calls`)."""

    min_calls: int = Field(50, ge=0)


class Alerts(_Frozen):
    """Streaming anomaly detectors over the audit records; alerts are written to the trail,
    counted in /metrics and sent to the sinks that take `alert` records."""

    enabled: bool = True
    # One alert per rule, agent and subject; the repeats in between are counted into the next.
    cooldown_seconds: float = Field(600.0, ge=0)
    baseline_days: float = Field(14.0, ge=0)  # history replayed at start to rebuild baselines
    rate_spike: RateSpike = RateSpike()
    denial_burst: DenialBurst = DenialBurst()
    cross_tenant: CrossTenant = CrossTenant()
    # A new agent's first servers and tools are its habits being learned, not an anomaly.
    first_use: Habit = Habit(min_calls=20)
    unusual_hours: Habit = Habit(min_calls=200)
    # A host (not host:port) the agent never called from; behind a trusted proxy, the host the
    # proxy forwarded (`security.trusted_proxies`).
    new_client: Habit = Habit(min_calls=20)


class AuditSigner(_Frozen):
    """Who signs the audit checkpoints and anchor entries, instead of the key in the state
    directory: an Ed25519 PEM key `file` outside it (created 0600 when missing; refused when
    other users may read it), or a Vault/OpenBao transit key (`vault_transit`: an ed25519 key
    `key` under the `mount`, at VAULT_ADDR with VAULT_TOKEN, VAULT_CACERT, VAULT_NAMESPACE)."""

    type: Literal["file", "vault_transit"]
    path: str | None = None
    key: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    mount: str = Field("transit", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")

    @model_validator(mode="after")
    def _shape(self) -> AuditSigner:
        if self.type == "file" and self.path is None:
            raise ValueError("signer type file needs `path`")
        if self.type == "vault_transit" and self.key is None:
            raise ValueError("signer type vault_transit needs `key` (the transit key's name)")
        return self


class AuditAnchor(_Frozen):
    """An append-only JSON-lines file outside the state directory that receives every signed
    checkpoint, and a signed heartbeat naming this writer's head every `heartbeat_seconds`."""

    path: str
    heartbeat_seconds: float = Field(60.0, gt=0)


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


def _audit_paths(settings: Settings, base: Path) -> dict[str, Any]:
    """The audit signer key file and anchor, resolved against the config file's folder."""
    update: dict[str, Any] = {}
    signer, anchor = settings.audit.signer, settings.audit.anchor
    if signer is not None and signer.path is not None:
        update["signer"] = signer.model_copy(update={"path": str((base / signer.path).resolve())})
    if anchor is not None:
        update["anchor"] = anchor.model_copy(update={"path": str((base / anchor.path).resolve())})
    return update


class AuditSettings(_Frozen):
    """The audit trail: where it is kept and what a call waits for."""

    enabled: bool = True
    # strict: a call goes upstream only once its decision record is as safe as `survives`
    # says; relaxed: records are written behind the calls.
    durability: Literal["strict", "relaxed"] = "strict"
    # What a record the writer took survives. process: a crash or kill -9 of the gateway (a
    # write-ahead in the OS page cache, no fsync per call); power: also an OS crash or power
    # loss (an fsync per group commit). README: Durability.
    survives: Literal["process", "power"] = "process"
    # Before `survives`: FULL is survives power, NORMAL survives process (kept for old files).
    synchronous: Literal["FULL", "NORMAL"] | None = None
    max_bytes: int | None = Field(None, ge=65536)  # the store refuses to grow past this
    checkpoint_every: int = Field(1000, ge=1)
    checkpoint_seconds: float = Field(5.0, gt=0)
    record_arguments: bool = False  # keep the arguments themselves, not only their digest
    sinks: tuple[Sink, ...] = ()
    alerts: Alerts = Alerts()
    # sqlite: one file in <state_dir>/audit/ (one machine); postgres: one database that every
    # replica appends to. `dsn` (postgres only) is a secret reference, env:NAME or file:PATH,
    # or a DSN without a password (libpq then finds it in PGPASSWORD, ~/.pgpass or uses
    # certificates); a DSN with a password written into the config is refused.
    store: Literal["sqlite", "postgres"] = "sqlite"
    dsn: str | None = None
    # None: checkpoints are signed with <state_dir>/audit/checkpoint-key.pem, beside the data.
    signer: AuditSigner | None = None
    anchor: AuditAnchor | None = None

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value is None or re.match(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$", value):
            return value
        if value.startswith("vault:"):
            raise ValueError("expected env:NAME or file:PATH; vault: is not read here")
        if re.search(r"(?i)\bpassword\s*=", value) or re.match(
            r"(?i)^postgres(ql)?://[^/?#@]*:[^/?#@]*@", value
        ):
            raise ValueError(
                "a DSN with a password must come from a secret reference (env:NAME or "
                "file:PATH); literal secrets are refused"
            )
        if not re.match(r"(?i)^postgres(ql)?://", value) and "=" not in value:
            raise ValueError("expected env:NAME, file:PATH or a postgresql:// DSN")
        return value

    @model_validator(mode="before")
    @classmethod
    def _synchronous(cls, data: Any) -> Any:
        """Read the older `synchronous` as the `survives` it meant; refuse a contradiction."""
        if not isinstance(data, dict) or data.get("synchronous") not in ("FULL", "NORMAL"):
            return data
        meant = "power" if data["synchronous"] == "FULL" else "process"
        if data.get("survives", meant) != meant:
            raise ValueError(
                f"synchronous {data['synchronous']} means survives {meant}, but survives is "
                f"{data['survives']!r}; keep only survives"
            )
        return {**data, "survives": meant}

    @model_validator(mode="after")
    def _store_needs(self) -> AuditSettings:
        if self.store == "postgres" and self.dsn is None:
            raise ValueError("store postgres needs audit.dsn")
        if self.store == "postgres" and self.max_bytes is not None:
            raise ValueError("audit.max_bytes applies to store sqlite only")
        return self


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
        return f"http://{host}:{self.listen.port}"

    def is_loopback(self) -> bool:
        """Whether the gateway binds only to a loopback address."""
        host = self.listen.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def load(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a config file; raise ConfigError naming every problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from exc
    return parse(text, source=str(file), base=file.parent)


def parse(text: str, *, source: str = "<config>", base: Path | None = None) -> Settings:
    """Validate YAML text into Settings; relative paths resolve against `base`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError([f"{source}{where}: not valid YAML: {exc}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source} (line 1): expected a mapping at the top level"])
    lines = _key_lines(node)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(error, lines) for error in exc.errors()]) from exc
    settings = _resolve_paths(settings, base) if base is not None else settings
    problems = {**audit_path_problems(settings), **environment_problems(settings)}
    if problems:
        raise ConfigError(
            [
                f"{key} (line {_nearest_line(lines, key)}): {problem}"
                for key, problem in problems.items()
            ]
        )
    return settings


def _nearest_line(lines: dict[tuple[str, ...], int], key: str) -> int:
    """The line of a key path, else of its nearest written parent (a defaulted key)."""
    parts = tuple(key.split("."))
    for cut in range(len(parts), 0, -1):
        if parts[:cut] in lines:
            return lines[parts[:cut]]
    return 1


def _describe(error: Any, lines: dict[tuple[str, ...], int]) -> str:
    # Discriminated unions put the tag ("http", "stdio") into loc; the user never wrote it.
    loc = tuple(str(part) for part in error["loc"] if part not in ("http", "stdio"))
    path = ".".join(loc) or "(top level)"
    line = None
    for cut in range(len(loc), -1, -1):
        line = lines.get(loc[:cut])
        if line is not None:
            break
    where = f" (line {line})" if line is not None else ""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{path}{where}: {message}"


def _key_lines(node: yaml.Node | None) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}

    def walk(current: yaml.Node, path: tuple[str, ...]) -> None:
        lines.setdefault(path, current.start_mark.line + 1)
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(current, yaml.SequenceNode):
            for index, value in enumerate(current.value):
                walk(value, (*path, str(index)))

    if node is not None:
        walk(node, ())
    return lines


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    upstreams: dict[str, HttpUpstream | StdioUpstream] = {}
    for name, upstream in settings.upstreams.items():
        if upstream.cwd is not None:
            upstream = upstream.model_copy(update={"cwd": str((base / upstream.cwd).resolve())})
        upstreams[name] = upstream
    spiffe = tuple(
        domain.model_copy(update={"bundle": str((base / domain.bundle).resolve())})
        for domain in settings.auth.spiffe
    )
    auth = settings.auth.model_copy(update={"spiffe": spiffe})
    state_dir = str((base / settings.state_dir).resolve())
    files = tuple(str((base / f).resolve()) for f in settings.policy.files)
    policy = settings.policy.model_copy(update={"files": files})
    sinks = tuple(
        sink.model_copy(
            update={
                key: str((base / value).resolve())
                for key in ("path", "ca_file")
                if (value := getattr(sink, key)) is not None
            }
        )
        for sink in settings.audit.sinks
    )
    audit = settings.audit.model_copy(update={"sinks": sinks, **_audit_paths(settings, base)})
    return settings.model_copy(
        update={
            "upstreams": upstreams,
            "auth": auth,
            "state_dir": state_dir,
            "policy": policy,
            "audit": audit,
        }
    )
