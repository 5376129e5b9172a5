"""Offboarding an owner: every agent a departing person answers for is suspended, or handed
to someone else, in one act that the audit trail records.

`offboard_owner` changes the registry (blocking I/O, one transaction per agent, so a run cut
short is finished by running it again: agents already suspended or reassigned are left as
they are). A suspended agent's tokens are refused at once; a running gateway sees the change
through its registry watcher and ends the agent's sessions and drops its cached upstream
credentials (`Pipeline.reconcile`). A reassigned agent keeps working under its new owner.
`records` turns the result into audit records, one per agent changed, written by the admin
API's writer or, for the CLI, by a writer of its own (`write_records`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bastion.audit.record import AuditRecord
from bastion.audit.trail import open_trail_writer
from bastion.config import Settings
from bastion.control.registry.agents import Agent, AgentStatus, check_text
from bastion.control.registry.store import SqlRegistry
from bastion.errors import RegistryInvalid, RegistryNotFound, shown

__all__ = [
    "Offboarding",
    "offboard_owner",
    "records",
    "write_records",
]

Action = Literal["suspend", "reassign"]


@dataclass(frozen=True)
class Offboarding:
    """What offboarding `owner` did: the agents changed, and those left as they were."""

    owner: str
    action: Action
    new_owner: str | None
    reason: str
    changed: tuple[Agent, ...]
    unchanged: tuple[Agent, ...]  # already suspended (suspend) or offboarded

    def to_dict(self) -> dict[str, Any]:
        """As JSON (`bastion owners offboard --json`, the admin API)."""
        return {
            "owner": self.owner,
            "action": self.action,
            "new_owner": self.new_owner,
            "reason": self.reason,
            "changed": [agent.to_dict() for agent in self.changed],
            "unchanged": [
                {"id": agent.id, "status": str(agent.status)} for agent in self.unchanged
            ],
        }


def offboard_owner(
    registry: SqlRegistry,
    owner: str,
    *,
    new_owner: str | None = None,
    reason: str | None = None,
) -> Offboarding:
    """Suspend every agent of `owner` (or, with `new_owner`, reassign each to them).

    RegistryNotFound when no agent was ever owned by `owner`; RegistryInvalid for a blank or
    equal new owner. Offboarded agents are never changed (final); with suspend, agents
    already suspended are left as they are.
    """
    check_text("owner", owner, 200)
    if new_owner is not None:
        check_text("new_owner", new_owner, 200)
        if new_owner == owner:
            raise RegistryInvalid(f"new_owner: {shown(new_owner)} is the owner being offboarded")
    why = reason if reason and reason.strip() else f"owner {owner} offboarded"
    check_text("reason", why, 500)
    owned = [agent for agent in registry.list() if agent.owner == owner]
    if not owned:
        raise RegistryNotFound(f"no agent is owned by {shown(owner)}")
    changed: list[Agent] = []
    unchanged: list[Agent] = []
    for agent in owned:
        if agent.status is AgentStatus.OFFBOARDED or (
            new_owner is None and agent.status is AgentStatus.SUSPENDED
        ):
            unchanged.append(agent)
        elif new_owner is None:
            changed.append(registry.set_status(agent.id, AgentStatus.SUSPENDED, why))
        else:
            changed.append(registry.set_owner(agent.id, new_owner))
    action: Action = "suspend" if new_owner is None else "reassign"
    return Offboarding(owner, action, new_owner, why, tuple(changed), tuple(unchanged))


def records(
    done: Offboarding, actor: str, client: str | None = None, now: float | None = None
) -> list[AuditRecord]:
    """One audit record per agent changed. The agent is named in `detail`, not `agent`: the
    act is the operator's, and detectors must not count it as a call of the agent's."""
    when = time.time() if now is None else now
    batch = uuid.uuid4().hex  # links the records of one offboarding
    return [
        AuditRecord(
            time=when,
            request_id=uuid.uuid4().hex,
            phase="decision",
            tenant=agent.tenant,
            client=client,
            route="/admin" if actor == "admin" else "cli",
            method=f"admin/owners/offboard/{done.action}",
            decision="allow",
            reason=done.reason,
            detail={
                "actor": actor,
                "offboarding": batch,
                "owner": done.owner,
                "new_owner": done.new_owner,
                "target_agent": agent.id,
                "status": str(agent.status),
            },
        )
        for agent in done.changed
    ]


async def write_records(settings: Settings, batch: Sequence[AuditRecord]) -> None:
    """Append `batch` to the configured trail with a writer of this process's own (the CLI:
    it claims a free writer id beside running gateways), committed before this returns."""
    if not batch:
        return
    writer = open_trail_writer(settings)
    await writer.start()
    try:
        for record in batch:
            await writer.append(record, True)
    finally:
        await writer.stop()
