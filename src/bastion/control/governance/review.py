"""Access review rules: what in the registry, the policy and the upstreams deserves a decision.

Pure: every rule is a function `(facts, settings, now) -> findings`, listed in `RULES`; the
facts are gathered elsewhere (reviews.py reads the registry, the config and the trail). A
finding's id is `<rule>:<kind>/<name>`, stable from one run to the next, so that a reviewer's
decision names it. Thresholds are "more than N days": an agent idle for exactly
`unused_days` is not yet a finding.

| rule | subject | trips when | suggested action |
|---|---|---|---|
| unused_agent | agent | active, not used (or never, since created) for > unused_days | suspend |
| unexercised_grant | grant | permits tools none of its agents called in the period | narrow |
| no_owner | agent | its owner is a placeholder ("-", "none", "unknown", …) | suspend |
| owner_gone | agent | `governance.owners` is set and does not list its owner | suspend |
| no_expiry | agent | active and never expires | suspend |
| expiry_too_far | agent | expires more than max_expiry_days from now | suspend |
| old_key | agent | a key aged over max_key_age_days (`iat`, else rotated, else created) | suspend |
| wildcard_grant | grant | server, tools, prompts or resources is "*" | narrow |
| tenantless_grant | grant | tenant is "*" (every tenant) | narrow |
| long_lived_secret | upstream | credentials mode `secret` (not minted or exchanged) | reconfigure |
| stale_suspension | agent | suspended for > suspended_days | offboard |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from bastion.config import Governance, Grant, Settings
from bastion.control.registry.agents import Agent, AgentStatus

__all__ = [
    "DAY",
    "AgentReach",
    "RULES",
    "Action",
    "Facts",
    "Finding",
    "GrantUse",
    "Rule",
    "find",
    "grant_uses",
    "key_issued_at",
]

DAY = 86400.0
Action = Literal["suspend", "offboard", "narrow", "reconfigure"]
# Owners that name nobody: an agent with one of these has no one answerable for it.
_NOBODY = frozenset({"", "-", "?", "none", "nobody", "unknown", "n/a", "na", "tbd", "todo"})


@dataclass(frozen=True)
class GrantUse:
    """A grant with the tools it permits and those its agents called in the period.

    `known` is False when the grant's tools could not be listed (a wildcard, and no policy
    catalog to expand it): then only "never called at all" can be told.
    """

    grant: Grant
    permitted: frozenset[tuple[str, str]]  # (upstream, tool)
    called: frozenset[tuple[str, str]]
    calls: int
    known: bool = True


@dataclass(frozen=True)
class Facts:
    """What the rules judge: agents (with their key and status times), grants, upstreams."""

    agents: tuple[Agent, ...] = ()
    keys_rotated_at: Mapping[str, float | None] = field(default_factory=dict)
    status_changed_at: Mapping[str, float | None] = field(default_factory=dict)
    grants: tuple[GrantUse, ...] = ()
    credentials: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # upstream →
    since: float = 0.0  # the start of the usage period (trail records from then on)


@dataclass(frozen=True)
class Finding:
    """One thing a reviewer decides on: which rule, about what, why, and what to do."""

    id: str
    rule: str
    kind: Literal["agent", "grant", "upstream"]
    subject: str
    message: str
    action: Action
    evidence: dict[str, Any] = field(default_factory=dict)
    tenant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON for the CLI, the admin API and the report."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """The inverse of `to_dict` (a review's stored findings)."""
        return cls(**data)


Rule = Callable[[Facts, Governance, float], Iterator[Finding]]


def _finding(rule: str, agent: Agent, message: str, action: Action, **evidence: Any) -> Finding:
    return Finding(
        f"{rule}:agent/{agent.id}", rule, "agent", agent.id, message, action, evidence,
        agent.tenant,
    )  # fmt: skip


def _days(seconds: float) -> float:
    return round(seconds / DAY, 1)


def _live(facts: Facts) -> Iterator[Agent]:
    """Agents still to be reviewed: every one but the offboarded (final, kept for audit)."""
    return (a for a in facts.agents if a.status is not AgentStatus.OFFBOARDED)


def _active(facts: Facts) -> Iterator[Agent]:
    return (a for a in facts.agents if a.status is AgentStatus.ACTIVE)


# --- agents -----------------------------------------------------------------------------------


def unused_agent(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Active agents not used for more than `unused_days` (never used: since created)."""
    for agent in _active(facts):
        since = agent.last_used_at if agent.last_used_at is not None else agent.created_at
        idle = now - since
        if idle > settings.unused_days * DAY:
            used = "never used" if agent.last_used_at is None else "not used"
            yield _finding(
                "unused_agent", agent, f"{used} for {_days(idle)} days", "suspend",
                last_used_at=agent.last_used_at, created_at=agent.created_at,
                idle_days=_days(idle), limit_days=settings.unused_days,
            )  # fmt: skip


def no_owner(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Agents whose owner names nobody."""
    for agent in _live(facts):
        if agent.owner.strip().casefold() in _NOBODY:
            yield _finding(
                "no_owner", agent, f"owner {agent.owner!r} names nobody", "suspend",
                owner=agent.owner,
            )  # fmt: skip


def owner_gone(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Agents whose owner is not among `governance.owners` (off while that list is empty)."""
    current = {owner.strip().casefold() for owner in settings.owners}
    if not current:
        return
    for agent in _live(facts):
        owner = agent.owner.strip().casefold()
        if owner not in current and owner not in _NOBODY:
            yield _finding(
                "owner_gone", agent, f"owner {agent.owner!r} is not in governance.owners",
                "suspend", owner=agent.owner,
            )  # fmt: skip


def no_expiry(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Active agents that never expire."""
    for agent in _active(facts):
        if agent.expires_at is None:
            yield _finding(
                "no_expiry", agent, "never expires", "suspend",
                limit_days=settings.max_expiry_days,
            )  # fmt: skip


def expiry_too_far(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Active agents expiring further away than `max_expiry_days`."""
    for agent in _active(facts):
        if agent.expires_at is not None and agent.expires_at - now > settings.max_expiry_days * DAY:
            left = agent.expires_at - now
            yield _finding(
                "expiry_too_far", agent, f"expires in {_days(left)} days", "suspend",
                expires_at=agent.expires_at, days_left=_days(left),
                limit_days=settings.max_expiry_days,
            )  # fmt: skip


def key_issued_at(agent: Agent, rotated_at: float | None) -> dict[str, float]:
    """Each key's kid -> when it was made: its JWK `iat` when it carries one, else the last
    rotation of the agent's keys, else the agent's registration."""
    base = rotated_at if rotated_at is not None else agent.created_at
    times: dict[str, float] = {}
    for key in agent.jwks.get("keys", []):
        iat = key.get("iat")
        valid = isinstance(iat, int | float) and not isinstance(iat, bool) and math.isfinite(iat)
        times[str(key.get("kid"))] = float(iat) if valid else base
    return times


def old_key(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Live agents holding a key older than `max_key_age_days`."""
    for agent in _live(facts):
        times = key_issued_at(agent, facts.keys_rotated_at.get(agent.id))
        limit = settings.max_key_age_days * DAY
        old = {kid: _days(now - at) for kid, at in times.items() if now - at > limit}
        if old:
            oldest = max(old.values())
            yield _finding(
                "old_key", agent, f"a key is {oldest} days old; rotate it", "suspend",
                key_age_days=old, limit_days=settings.max_key_age_days,
            )  # fmt: skip


def stale_suspension(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Agents suspended for more than `suspended_days`: resume them or end them."""
    for agent in facts.agents:
        if agent.status is not AgentStatus.SUSPENDED:
            continue
        changed = facts.status_changed_at.get(agent.id)
        since = changed if changed is not None else agent.created_at
        if now - since > settings.suspended_days * DAY:
            yield _finding(
                "stale_suspension", agent, f"suspended for {_days(now - since)} days",
                "offboard", suspended_since=since, reason=agent.status_reason,
                limit_days=settings.suspended_days,
            )  # fmt: skip


# --- grants and upstreams ---------------------------------------------------------------------


def _grant_finding(rule: str, grant: Grant, message: str, **evidence: Any) -> Finding:
    tenant = None if grant.tenant == "*" else grant.tenant
    return Finding(
        f"{rule}:grant/{grant.id}", rule, "grant", grant.id, message, "narrow", evidence, tenant
    )


def unexercised_grant(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Grants permitting tools that none of their agents called since `facts.since`."""
    for use in facts.grants:
        if use.known:
            unused = sorted(f"{up}/{tool}" for up, tool in use.permitted - use.called)
            if unused:
                yield _grant_finding(
                    "unexercised_grant", use.grant,
                    f"{len(unused)} of {len(use.permitted)} permitted tools never called",
                    unused_tools=unused, called_tools=sorted(f"{u}/{t}" for u, t in use.called),
                    since=facts.since,
                )  # fmt: skip
        elif use.calls == 0:
            yield _grant_finding(
                "unexercised_grant", use.grant, "no tool call under this grant", calls=0,
                since=facts.since,
            )  # fmt: skip


def wildcard_grant(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Grants with "*" for a server, tools, prompts or resources."""
    for use in facts.grants:
        grant = use.grant
        fields = [
            name for name in ("server", "tools", "prompts", "resources")
            if getattr(grant, name) == "*" or "*" in (getattr(grant, name) or ())
        ]  # fmt: skip
        if fields:
            yield _grant_finding(
                "wildcard_grant", grant, f"wildcard {', '.join(fields)}", wildcards=fields
            )


def tenantless_grant(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Grants for every tenant (`tenant: "*"`)."""
    for use in facts.grants:
        if use.grant.tenant == "*":
            yield _grant_finding("tenantless_grant", use.grant, "applies to every tenant")


def long_lived_secret(facts: Facts, settings: Governance, now: float) -> Iterator[Finding]:
    """Upstreams fed a stored secret instead of a minted or exchanged credential."""
    for name, credential in sorted(facts.credentials.items()):
        if credential.get("mode") == "secret":
            yield Finding(
                f"long_lived_secret:upstream/{name}", "long_lived_secret", "upstream", name,
                "fed a long-lived secret; use credentials mode mint or token_exchange",
                "reconfigure",
                {"mode": "secret", "secret": credential.get("secret"),
                 "header": credential.get("header")},
            )  # fmt: skip


RULES: tuple[Rule, ...] = (
    unused_agent,
    unexercised_grant,
    no_owner,
    owner_gone,
    no_expiry,
    expiry_too_far,
    old_key,
    wildcard_grant,
    tenantless_grant,
    long_lived_secret,
    stale_suspension,
)


def find(facts: Facts, settings: Governance, now: float) -> list[Finding]:
    """Every rule's findings, by id."""
    return sorted((f for rule in RULES for f in rule(facts, settings, now)), key=lambda f: f.id)


# --- facts from the policy and usage -----------------------------------------------------------


def grant_uses(
    settings: Settings, reach: Iterable[AgentReach], reach_known: bool
) -> tuple[GrantUse, ...]:
    """Each tool grant with what it permits and what its agents called.

    With `reach_known` (the policy engine listed each agent's tools), a grant permits what
    the engine says it does (`grant:<id>` among a tool's permits); otherwise its own tool
    list, and nothing known for a wildcard. An agent counts as covered by the tenant and the
    `agents` list; roles are not in the registry, so a grant by role counts every agent of
    its tenant (fewer findings, never a false one about calls).
    """
    agents = list(reach)
    uses: list[GrantUse] = []
    for grant in settings.policy.grants:
        if not grant.tools:
            continue
        covered = [a for a in agents if _covers(grant, a)]
        called = {
            (up, tool) for a in covered for up, tool, count in a.used
            if count > 0 and grant.server in ("*", up)
        }  # fmt: skip
        calls = sum(c for a in covered for up, _, c in a.used if grant.server in ("*", up))
        if reach_known:
            policy = f"grant:{grant.id}"
            permitted = {(up, t) for a in covered for up, t, ids in a.reach if policy in ids}
        elif grant.server != "*" and grant.tools != "*":
            permitted = {(grant.server, tool) for tool in grant.tools}
        else:
            uses.append(GrantUse(grant, frozenset(), frozenset(called), calls, known=False))
            continue
        uses.append(GrantUse(grant, frozenset(permitted), frozenset(called & permitted), calls))
    return tuple(uses)


@dataclass(frozen=True)
class AgentReach:
    """One agent's side of `grant_uses`: what it may call and what it called."""

    id: str
    tenant: str
    reach: tuple[tuple[str, str, tuple[str, ...]], ...] = ()  # (upstream, tool, permits)
    used: tuple[tuple[str, str, int], ...] = ()  # (upstream, tool, allowed calls)


def _covers(grant: Grant, agent: AgentReach) -> bool:
    return grant.tenant in ("*", agent.tenant) and (not grant.agents or agent.id in grant.agents)
