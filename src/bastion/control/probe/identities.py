"""The principals a probe run acts as.

By default the probe registers its own agents, one per tenant and more when a tenant's cases
would cross the cross-tenant detector's threshold (`audit.alerts.cross_tenant.count`): a probe
agent is never suspended half-way. They carry purpose "bastion probe", expire 15 minutes after
registration, keep their keys in memory only, and are offboarded (final, with the run's id as
the reason) when the run ends. With `--agent` the probe acts as those agents instead, and a case
that would put one over a detector's threshold is skipped rather than get it suspended.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion import config
from bastion.control.probe.types import Case
from bastion.control.registry.agents import Agent, AgentStatus
from bastion.control.registry.locator import open_registry
from bastion.errors import BastionError, InputError, RegistryNotFound
from bastion.identity.keys import SigningKey
from bastion.identity.keys import generate as generate_key

if TYPE_CHECKING:
    from bastion.control.probe.client import Gateway

__all__ = ["LIFETIME_S", "MAX_IDENTITIES", "PURPOSE", "READY_S", "Identity", "Roster"]

PURPOSE = "bastion probe"
LIFETIME_S = 900.0  # a probe agent left behind by a crash expires on its own
READY_S = 10.0  # how long a new agent may take to reach the gateway's registry view
MAX_IDENTITIES = 64


@dataclass
class Identity:
    """One principal the probe acts as."""

    agent: str
    tenant: str
    key: SigningKey
    disposable: bool
    crossings: int = 0
    denials: int = 0
    tokens: dict[str, str] = field(default_factory=dict)


class Roster:
    """The identities of one run, kept within the detectors' suspension budgets; it opens the
    registry of `settings.state_dir` (InputError when there is none)."""

    def __init__(
        self, settings: config.Settings, run_id: str, agents: list[str], skipped: list[str]
    ) -> None:
        self.settings = settings
        self.run_id = run_id
        self.agents = agents  # given with --agent; empty: register probe agents
        self.skipped = skipped  # the run's list of what was left out, appended to
        self.state = Path(settings.state_dir)
        self.identities: list[Identity] = []
        alerts = settings.audit.alerts
        self.cross_budget = _budget(alerts.enabled, alerts.cross_tenant)
        self.deny_budget = _budget(alerts.enabled, alerts.denial_burst)
        try:
            self.registry = open_registry(settings)
        except BastionError as exc:
            raise InputError(f"cannot open the registry of {self.state}: {exc.message}") from exc

    def close(self) -> None:
        """Close the registry."""
        self.registry.close()

    def enlist(self, gateway: Gateway) -> None:
        """The given agents, else one probe agent per tenant; each ready for a token."""
        if self.agents:
            self._given()
        else:
            for tenant in self._tenants():
                self._register(tenant)
        self._ready(gateway, self.identities)

    def identity_for(self, tenant: str) -> Identity:
        """The first identity of `tenant` (the canary's planter)."""
        return next(i for i in self.identities if i.tenant == tenant)

    def _tenants(self) -> list[str]:
        found = {a.tenant for a in self.registry.list(status=AgentStatus.ACTIVE)}
        found |= {g.tenant for g in self.settings.policy.grants if g.tenant != "*"}
        return sorted(found - {config.RESERVED_TENANT})

    def _given(self) -> None:
        for agent_id in self.agents:
            try:
                agent = self.registry.get(agent_id)
                pem = (self.state / "agents" / f"{agent_id}.pem").read_bytes()
            except RegistryNotFound as exc:
                raise InputError(f"no agent {agent_id!r} in the registry") from exc
            except OSError as exc:
                raise InputError(f"no key for agent {agent_id!r}: {exc.strerror}") from exc
            jwk = agent.jwks["keys"][0]
            key = SigningKey.from_pem(pem, str(jwk.get("kid", agent_id)), str(jwk["alg"]))
            self.identities.append(Identity(agent_id, agent.tenant, key, disposable=False))

    def _register(self, tenant: str) -> Identity:
        if len(self.identities) >= MAX_IDENTITIES:
            raise InputError(f"the run would need more than {MAX_IDENTITIES} probe agents")
        key = generate_key("ES256")
        agent_id = f"probe-{self.run_id}-{len(self.identities)}"
        envs = [a.environment for a in self.registry.list(tenant=tenant)]
        now = time.time()
        self.registry.add(
            Agent(
                id=agent_id,
                display_name=f"bastion probe {self.run_id}",
                owner="bastion probe",
                tenant=tenant,
                purpose=PURPOSE,
                environment=max(set(envs), key=envs.count) if envs else "dev",
                jwks={"keys": [key.public_jwk()]},
                spiffe_id=None,
                audiences=(),
                scopes=(),
                require_dpop=False,
                expires_at=now + LIFETIME_S,
                status=AgentStatus.ACTIVE,
                created_at=now,
            )
        )
        who = Identity(agent_id, tenant, key, disposable=True)
        self.identities.append(who)
        return who

    def _ready(self, gateway: Gateway, identities: list[Identity]) -> None:
        """Wait until each identity gets a token: the gateway's registry view has it."""
        deadline = time.monotonic() + READY_S
        for who in identities:
            while True:
                try:
                    gateway.bearer(who)
                    break
                except InputError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def assign(self, gateway: Gateway, cases: list[Case]) -> list[tuple[Case, Identity]]:
        """Each case with the identity that runs it, registering probe agents as the budgets
        require; a case no given agent can take is added to `skipped`."""
        planned: list[tuple[Case, Identity]] = []
        fresh: list[Identity] = []
        for case in cases:
            who = self._fits(case)
            if who is None and not self.agents:
                who = self._register(case.tenant)
                fresh.append(who)
            if who is None:
                self.skipped.append(
                    f"{case.name}: would take the given agents of {case.tenant} over a "
                    "detector's suspension threshold (audit.alerts)"
                )
                continue
            who.crossings += case.crossing
            who.denials += case.denial
            planned.append((case, who))
        self._ready(gateway, fresh)
        return planned

    def _fits(self, case: Case) -> Identity | None:
        for who in self.identities:
            if who.tenant != case.tenant:
                continue
            if who.crossings + case.crossing <= self.cross_budget and (
                who.denials + case.denial <= self.deny_budget
            ):
                return who
        return None

    def retire(self) -> list[Identity]:
        """Offboard the probe's own agents (not given ones); those it registered."""
        mine = [i for i in self.identities if i.disposable]
        for who in mine:
            try:
                self.registry.set_status(
                    who.agent, AgentStatus.OFFBOARDED, f"bastion probe run {self.run_id} ended"
                )
            except BastionError as exc:
                self.skipped.append(f"could not offboard {who.agent}: {exc.message}")
        return mine


def _budget(enabled: bool, rule: Any) -> float:
    """How many attempts one agent may make before a detector would suspend it."""
    if enabled and rule.enabled and rule.suspend:
        return max(0, int(rule.count) - 1)
    return math.inf
