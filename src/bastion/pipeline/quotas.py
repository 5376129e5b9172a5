"""The quotas a principal's legacy sessions are held to, and how a refusal over one reads.

Three bounds, checked in this order: the agent's sessions (`limits.max_sessions_per_agent`),
its tenant's (`max_sessions_per_tenant`) and the gateway's (`max_sessions`). One process
counts its own sessions (`SessionStore`, session.py); with shared state each is also counted
over the fleet, in Redis, under the names `fleet_quotas` gives.
"""

from __future__ import annotations

from bastion.config import Limits
from bastion.errors import SessionQuotaExceeded
from bastion.state.sessions import Quota
from bastion.types import Principal

__all__ = [
    "QUOTAS",
    "fleet_quotas",
    "quota_refusal",
]

QUOTAS = ("agent", "tenant", "gateway")  # in the order they are checked


def fleet_quotas(limits: Limits, principal: Principal) -> list[Quota]:
    """The quotas a session of `principal` counts in over the fleet, in QUOTAS' order."""
    return [
        (f"agent:{principal.tenant}:{principal.agent}", limits.max_sessions_per_agent),
        (f"tenant:{principal.tenant}", limits.max_sessions_per_tenant),
        ("gateway", limits.max_sessions),
    ]


def quota_refusal(
    limits: Limits, quota: str, principal: Principal, held: int
) -> SessionQuotaExceeded:
    """The refusal of a session over `quota` (one of QUOTAS), `held` counted."""
    agent, tenant = principal.agent, principal.tenant
    if quota == "agent":
        return SessionQuotaExceeded(
            "agent",
            limits.max_sessions_per_agent,
            f"session quota reached: agent {agent!r} of tenant {tenant!r} has {held} open "
            f"sessions, the most limits.max_sessions_per_agent allows; end one (HTTP "
            f"DELETE) or retry once one has been idle for "
            f"{limits.session_reclaim_seconds:g} s",
        )
    if quota == "tenant":
        return SessionQuotaExceeded(
            "tenant",
            limits.max_sessions_per_tenant,
            f"session quota reached: tenant {tenant!r} has {held} open sessions, the most "
            "limits.max_sessions_per_tenant allows; end one (HTTP DELETE) and retry",
        )
    return SessionQuotaExceeded(
        "gateway",
        limits.max_sessions,
        f"session limit reached: the gateway holds {held} sessions, "
        "the most limits.max_sessions allows, and none of yours is idle enough to "
        "end for a new one; retry later",
    )
