"""The inventory: every agent, who answers for it, how it proves itself, what it can reach,
how each upstream it reaches is credentialed, and what it actually used.

`build_inventory` is pure: it takes the settings, the registry's agents, the policy engine,
the usage read from the audit trail and the time, and returns frozen values that the CLI
(`bastion inventory`), the admin API (`GET /admin/inventory`) and access reviews
(review.py) print or judge. What an agent can reach is derived from the policy itself by
Cedar's partial evaluation over the catalog: for each agent and each tool the upstreams
list, the request is evaluated with the call's arguments (`context.input`) and its
circumstances (`context.request`: time, history, named tenants, client address) unknown.
"Allowed" is an allow whatever they are; "conditional" an answer that depends on them, with
the permits and forbids that may decide; a deny whatever they are is not reach.

Secrets are shown by where they live (`env:NAME`, `file:PATH`, `vault:PATH#KEY`), never by
value: nothing here resolves a reference. `read_usage` and `load_engine` are the I/O around
it: the trail, and the catalog the gateway saved in its state directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bastion.audit.record import AuditRecord
from bastion.audit.store import Query
from bastion.audit.trail import open_trail_reader
from bastion.config import Credential, Settings
from bastion.control.registry.agents import Agent
from bastion.errors import AuditUnavailable, InputError
from bastion.methods import TOOLS_CALL
from bastion.policy.build import build_engine
from bastion.policy.catalog import Catalog
from bastion.policy.engine import CedarRequest, PolicyEngine, Who

__all__ = [
    "CATALOG_FILE",
    "AgentEntry",
    "CredentialInfo",
    "Inventory",
    "KeyInfo",
    "ToolReach",
    "ToolUsage",
    "UpstreamInfo",
    "UpstreamReach",
    "Usage",
    "build_inventory",
    "effective_status",
    "load_engine",
    "read_usage",
    "usage_from_records",
]

CATALOG_FILE = "policy-catalog.json"  # saved by the gateway's policy loader at start
# What the inventory cannot know ahead of a call: its arguments and its circumstances.
_UNKNOWN = ("input", "request")
_MAX_USAGE_RECORDS = 1_000_000
Access = Literal["allowed", "conditional"]


@dataclass(frozen=True)
class KeyInfo:
    """One public key an agent signs its assertions with. `age_s` counts from the agent's
    registration: the registry does not record when keys were rotated, so after a rotation
    it is an upper bound."""

    kid: str
    algorithm: str
    age_s: float


@dataclass(frozen=True)
class CredentialInfo:
    """How an upstream is credentialed, and where its secrets live (never their values)."""

    mode: str  # mint | token_exchange | secret | none
    secret_source: str | None = None  # env | file | vault
    secret_ref: str | None = None  # the reference as configured: env:NAME, file:PATH, …
    client_secret_source: str | None = None  # token_exchange's client secret
    client_secret_ref: str | None = None
    audience: str | None = None
    token_endpoint: str | None = None
    client_id: str | None = None
    header: str = "Authorization"

    def summary(self) -> str:
        """One line: `minted JWT`, `exchanged at URL`, `secret from env:NAME`, `none`."""
        if self.mode == "mint":
            return "minted JWT" + (f" (aud {self.audience})" if self.audience else "")
        if self.mode == "token_exchange":
            where = f" (client secret {self.client_secret_ref})" if self.client_secret_ref else ""
            return f"exchanged at {self.token_endpoint} as {self.client_id}{where}"
        if self.mode == "secret":
            return f"secret from {self.secret_ref} in {self.header}"
        return "none"


@dataclass(frozen=True)
class UpstreamInfo:
    """A configured upstream: its environment, transport and credential."""

    name: str
    environment: str
    transport: str
    credential: CredentialInfo
    listed: bool  # whether the catalog holds its tools (else reach to it is unknown)


@dataclass(frozen=True)
class ToolReach:
    """One tool an agent can call: for every call (`allowed`) or for some (`conditional`)."""

    tool: str  # the upstream's own name
    action: str  # <upstream>__<tool>, the Cedar action
    access: Access
    permits: tuple[str, ...]  # policy ids that may permit it
    forbids: tuple[str, ...]  # policy ids that may forbid it (for some arguments, requests)
    approval: bool = False  # a permit asks a person to approve each call


@dataclass(frozen=True)
class UpstreamReach:
    """An upstream an agent can reach: where it is, how it is credentialed, which tools."""

    upstream: str
    environment: str
    credential: CredentialInfo
    tools: tuple[ToolReach, ...]


@dataclass(frozen=True)
class ToolUsage:
    """An agent's calls of one tool in the window: allowed and denied decisions, the last."""

    upstream: str
    tool: str
    allowed: int
    denied: int
    last_at: float


@dataclass(frozen=True)
class Usage:
    """What each agent called, from the audit trail (agent id → its tools, busiest first)."""

    by_agent: Mapping[str, tuple[ToolUsage, ...]] = field(default_factory=dict)
    since: float | None = None
    note: str | None = None  # why there is none (no trail), when that is so

    def of(self, agent_id: str) -> tuple[ToolUsage, ...]:
        """The agent's tool usage; () when it called nothing."""
        return self.by_agent.get(agent_id, ())


@dataclass(frozen=True)
class AgentEntry:
    """One agent as the inventory shows it: owner → agent → credentials → upstreams."""

    id: str
    display_name: str
    owner: str
    tenant: str
    purpose: str
    environment: str
    status: str  # active | suspended | offboarded | expired
    status_reason: str | None
    created_at: float
    last_used_at: float | None
    expires_at: float | None
    keys: tuple[KeyInfo, ...]
    spiffe_id: str | None
    reach: tuple[UpstreamReach, ...]
    used: tuple[ToolUsage, ...]

    @property
    def usable(self) -> bool:
        """Whether the agent may call now."""
        return self.status == "active"


@dataclass(frozen=True)
class Inventory:
    """Every agent and upstream of one deployment, at `generated_at`."""

    generated_at: float
    days: int
    reach_known: bool  # False: no policy catalog, reach not derived
    agents: tuple[AgentEntry, ...]
    upstreams: tuple[UpstreamInfo, ...]
    usage_note: str | None = None

    def agent(self, agent_id: str) -> AgentEntry | None:
        """The entry of one agent, or None."""
        return next((a for a in self.agents if a.id == agent_id), None)

    def by_owner(self) -> dict[str, tuple[AgentEntry, ...]]:
        """Agents grouped by owner, owners sorted."""
        owners: dict[str, list[AgentEntry]] = {}
        for entry in self.agents:
            owners.setdefault(entry.owner, []).append(entry)
        return {owner: tuple(owners[owner]) for owner in sorted(owners)}

    def to_dict(self) -> dict[str, Any]:
        """The inventory as JSON (`bastion inventory --json`, `GET /admin/inventory`)."""
        return asdict(self)


# --- building ---------------------------------------------------------------------------------


def build_inventory(
    settings: Settings,
    agents: Iterable[Agent],
    engine: PolicyEngine | None,
    usage: Usage,
    now: float,
    days: int = 30,
) -> Inventory:
    """The inventory of `agents` under `settings`' upstreams and `engine`'s policy (None:
    reach not derived), with `usage` from the trail; pure."""
    upstreams = tuple(_upstream(settings, name, engine) for name in sorted(settings.upstreams))
    entries = tuple(
        _entry(agent, upstreams, engine, usage, now)
        for agent in sorted(agents, key=lambda a: (a.tenant, a.id))
    )
    return Inventory(now, days, engine is not None, entries, upstreams, usage.note)


def effective_status(agent: Agent, now: float) -> str:
    """The agent's status as it stands at `now`: `expired` for an active agent past expiry."""
    usable, reason = agent.usable(now)
    return "expired" if not usable and reason == "expired" else str(agent.status)


def credential_info(credential: Credential) -> CredentialInfo:
    """How an upstream is credentialed, from its settings; references only."""
    return CredentialInfo(
        mode=credential.mode,
        secret_source=_source(credential.secret),
        secret_ref=credential.secret,
        client_secret_source=_source(credential.client_secret),
        client_secret_ref=credential.client_secret,
        audience=credential.audience,
        token_endpoint=credential.token_endpoint,
        client_id=credential.client_id,
        header=credential.header,
    )


def _source(reference: str | None) -> str | None:
    return None if reference is None else reference.partition(":")[0]


def _upstream(settings: Settings, name: str, engine: PolicyEngine | None) -> UpstreamInfo:
    upstream = settings.upstreams[name]
    listed = engine is not None and name in engine.catalog.listed
    return UpstreamInfo(
        name,
        settings.environment_of(name),
        upstream.transport,
        credential_info(upstream.credentials),
        listed,
    )


def _entry(
    agent: Agent,
    upstreams: tuple[UpstreamInfo, ...],
    engine: PolicyEngine | None,
    usage: Usage,
    now: float,
) -> AgentEntry:
    return AgentEntry(
        id=agent.id,
        display_name=agent.display_name,
        owner=agent.owner,
        tenant=agent.tenant,
        purpose=agent.purpose,
        environment=agent.environment,
        status=effective_status(agent, now),
        status_reason=agent.status_reason,
        created_at=agent.created_at,
        last_used_at=agent.last_used_at,
        expires_at=agent.expires_at,
        keys=_keys(agent, now),
        spiffe_id=agent.spiffe_id,
        reach=() if engine is None else _reach(agent, upstreams, engine),
        used=usage.of(agent.id),
    )


def _keys(agent: Agent, now: float) -> tuple[KeyInfo, ...]:
    age = max(0.0, now - agent.created_at)
    return tuple(
        KeyInfo(str(key.get("kid")), _algorithm(key), age) for key in agent.jwks.get("keys", ())
    )


def _algorithm(key: Mapping[str, Any]) -> str:
    """The key's `alg`, else what its type allows (as the verifier reads it)."""
    if isinstance(key.get("alg"), str):
        return str(key["alg"])
    kty, crv = key.get("kty"), key.get("crv")
    if kty == "EC":
        return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(str(crv), f"EC {crv}")
    if kty == "OKP":
        return "EdDSA"
    if kty == "RSA":
        return "RS256|PS256"
    return str(kty)


def _reach(
    agent: Agent, upstreams: tuple[UpstreamInfo, ...], engine: PolicyEngine
) -> tuple[UpstreamReach, ...]:
    """The upstreams and tools policy lets this agent call, by partial evaluation. The agent
    on its own authority: its scopes, no user (a delegating user's roles may add more)."""
    who = Who(agent.id, agent.tenant, scopes=frozenset(agent.scopes), environment=agent.environment)
    tools_of: dict[str, list[ToolReach]] = {}
    for action in sorted(engine.catalog.tools):
        info = engine.catalog.tools[action]
        found = _tool_reach(engine, who, action, info.name)
        if found is not None:
            tools_of.setdefault(info.upstream, []).append(found)
    return tuple(
        UpstreamReach(up.name, up.environment, up.credential, tuple(tools_of[up.name]))
        for up in upstreams
        if up.name in tools_of
    )


def _tool_reach(engine: PolicyEngine, who: Who, action: str, name: str) -> ToolReach | None:
    context = {"tool": {"__entity": {"type": "Bastion::Tool", "id": action}}}
    verdict = engine.reach(CedarRequest(who, action, ("Tool", action), context), _UNKNOWN)
    if not verdict.allowed and not verdict.undecided:
        return None
    effects = {pid: engine.docs[pid].effect for pid in verdict.policies if pid in engine.docs}
    permits = tuple(pid for pid, effect in effects.items() if effect == "permit")
    if not permits:  # undecided only by forbids: no permit can ever allow it
        return None
    return ToolReach(
        tool=name,
        action=action,
        access="allowed" if verdict.allowed else "conditional",
        permits=permits,
        forbids=tuple(pid for pid, effect in effects.items() if effect == "forbid"),
        approval="approval" in verdict.obligations,
    )


# --- usage from the trail ---------------------------------------------------------------------


def usage_from_records(records: Iterable[AuditRecord], since: float) -> Usage:
    """Each agent's tool calls at or after `since`: the trail's decision records of
    `tools/call`, counted allowed and denied per tool; pure. An operator's act on an agent
    (named in `detail`, not `agent`) is no use of it."""
    counts: dict[tuple[str, str, str], list[float]] = {}
    for record in records:
        if (
            record.phase != "decision"
            or record.method != TOOLS_CALL
            or record.agent is None
            or record.time < since
        ):
            continue
        key = (record.agent, record.server or "", record.tool_original or record.tool or "")
        allowed, denied, last = counts.get(key, [0.0, 0.0, 0.0])
        if record.decision == "allow":
            allowed += 1
        else:
            denied += 1
        counts[key] = [allowed, denied, max(last, record.time)]
    by_agent: dict[str, list[ToolUsage]] = {}
    for (agent, upstream, tool), (allowed, denied, last) in counts.items():
        by_agent.setdefault(agent, []).append(
            ToolUsage(upstream, tool, int(allowed), int(denied), last)
        )
    return Usage(
        {
            agent: tuple(sorted(tools, key=lambda u: (-(u.allowed + u.denied), u.upstream, u.tool)))
            for agent, tools in by_agent.items()
        },
        since,
    )


def read_usage(settings: Settings, since: float) -> Usage:
    """Usage since `since` from the configured trail (blocking I/O); empty with a note when
    there is no trail to read."""
    if not settings.audit.enabled:
        return Usage(since=since, note="the audit trail is off (audit.enabled: false)")
    try:
        store = open_trail_reader(settings)
    except AuditUnavailable as exc:
        return Usage(since=since, note=exc.message)
    try:
        entries = store.query(Query(phase="decision", since=since, limit=_MAX_USAGE_RECORDS))
        records = (AuditRecord.from_json(entry.record) for entry in entries)
        return usage_from_records(records, since)
    finally:
        store.close()


def load_engine(settings: Settings, catalog: Path | None = None) -> PolicyEngine:
    """The policy engine of `settings` over the tool catalog the gateway saved in its state
    directory (or `catalog`, the same JSON); blocking I/O. InputError when there is none,
    PolicyLoadError when the policy does not load."""
    source = catalog or Path(settings.state_dir) / CATALOG_FILE
    try:
        listings = json.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(
            f"no tool catalog at {source} ({exc.strerror}): start the gateway once (it saves "
            "the upstreams' tool lists there) or pass --catalog FILE"
        ) from exc
    except ValueError as exc:
        raise InputError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(listings, dict):
        raise InputError(f"{source}: expected an object of upstream listings")
    built = Catalog.build(settings.upstreams, listings, settings.environment)
    return build_engine(settings.policy, built)
