"""The audit trail (`audit:`): its store, durability, signer and anchor, sinks and alert rules."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from bastion.config.base import NAME_PATTERN, SECRET_REFERENCE, _Frozen

__all__ = [
    "Alerts",
    "AuditAnchor",
    "AuditSettings",
    "AuditSigner",
    "CrossTenant",
    "DenialBurst",
    "Habit",
    "RateSpike",
    "Rule",
    "Sink",
]


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
