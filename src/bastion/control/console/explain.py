"""The console's "explain this request": `bastion policy explain` against the policy in force.

The request is decided by a throwaway authorizer holding the running gateway's policy engine,
with its own rate counters and history, so that explaining changes nothing the gateway counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bastion.config import Settings
from bastion.control.cli.policy import _exchange as policy_case  # the CLI's own case builder
from bastion.errors import BadRequest
from bastion.pipeline.authz import Authorizer
from bastion.pipeline.chain import Pipeline
from bastion.state.rates import MemoryRateCounter

__all__ = ["Explained", "explain"]


@dataclass
class Explained:
    """A decision and why: the verdict, reasons, deciding policies (id, origin, text)."""

    agent: str
    tool: str
    allowed: bool
    reasons: list[str]
    policies: list[tuple[str, str, str]] = field(default_factory=list)
    obligations: dict[str, Any] = field(default_factory=dict)


async def explain(settings: Settings, pipeline: Pipeline, fields: dict[str, str]) -> Explained:
    """Decide the request the form describes (agent, tool, JSON arguments, tenant)."""
    engine = pipeline.authz.engine
    if engine is None:
        raise BadRequest("policy", "the policy is not loaded yet")
    agent, tool = fields.get("agent", "").strip(), fields.get("tool", "").strip()
    try:
        arguments = json.loads(fields.get("arguments") or "{}")
    except ValueError:
        raise BadRequest("arguments", "expected a JSON object") from None
    if not isinstance(arguments, dict):
        raise BadRequest("arguments", "expected a JSON object")

    async def no_listing(upstream: str) -> Any:
        raise LookupError("explain never lists upstreams")

    authz = Authorizer(settings, no_listing, MemoryRateCounter())
    authz.loader.engine = engine
    case = {"agent": agent, "tool": tool, "arguments": arguments,
            "tenant": fields.get("tenant", "").strip() or None}  # fmt: skip
    try:
        exchange = policy_case(authz, case)
    except ValueError as exc:
        raise BadRequest("request", str(exc)[:200]) from None
    await authz.authorize(exchange)
    decision = exchange.decision
    if decision is None:  # pragma: no cover - authorize always decides
        raise BadRequest("request", "no decision")
    policies = [
        (pid, engine.docs[pid].origin, engine.docs[pid].text())
        for pid in decision.policies
        if pid in engine.docs
    ]
    return Explained(
        agent, tool, decision.allowed, list(decision.reasons), policies, dict(decision.obligations)
    )
