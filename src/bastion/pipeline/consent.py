"""What both kinds of approval share (approval.py for a person, elicitation.py for the client):
the `approval` obligation a call carries, the `Ask` a waiting call is, and what is written on
the obligation — the prompt shown, a refusal, a continued call.

The obligation is the decision's `approval` dict (authz.py put it there); it is the approval's
record: the audit trail carries what these functions write into it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from bastion import methods
from bastion.errors import PolicyError
from bastion.pipeline.exchange import Exchange
from bastion.policy.approval import ApprovalState, Asker, Prompt, prompt
from bastion.rpc import error
from bastion.state.approvals import PendingApproval
from bastion.types import JSON

__all__ = [
    "APPROVAL_KEY",
    "CLIENT_CONFIRMED",
    "PERSON_APPROVED",
    "Ask",
    "bound_call",
    "carry_on",
    "obligation",
    "refuse",
    "show",
]

APPROVAL_KEY = "bastion.approval"
CLIENT_CONFIRMED = "client-confirmed"
PERSON_APPROVED = "person-approved"


@dataclass(slots=True)
class Ask:
    """A call that waits: the first message sent on its stream (a legacy session's
    elicitation request with its `gateway_id` and `answer`; or, for a call held for a person,
    a progress or log notification with the `held` item); `refusal` once the wait ended
    without approval."""

    message: JSON
    gateway_id: str = ""
    answer: asyncio.Future[JSON] | None = None
    held: PendingApproval | None = None
    refusal: JSON | None = None


def obligation(exchange: Exchange) -> dict[str, Any] | None:
    """The approval obligation of an allowed tool call, if it has one."""
    decision = exchange.decision
    if decision is None or exchange.method != methods.TOOLS_CALL:
        return None
    found = decision.obligations.get("approval")
    return found if isinstance(found, dict) else None


def bound_call(exchange: Exchange) -> str:
    """The digest the decision stage bound this call's approval to (see `authz`)."""
    assert exchange.approval_call is not None  # noqa: S101 - set for every 2026 approval
    return exchange.approval_call


def show(exchange: Exchange, approval: dict[str, Any], record_text: bool) -> Prompt | str:
    """The prompt for this call, or why none can be shown; what was shown goes into the
    approval's record (its text only when `record_text`: `audit.record_arguments`)."""
    principal = exchange.principal
    target = exchange.target
    assert principal is not None and target is not None  # noqa: S101 - decided calls
    shown = prompt(
        Asker(principal.agent, principal.tenant, principal.user),
        target.upstream,
        str(target.name),
        str(exchange.params.get("name")),
        exchange.params.get("arguments"),
        approval.get("sensitive") or (),
    )
    if isinstance(shown, Prompt):
        approval["shown"] = {
            "digest": hashlib.sha256(shown.text.encode()).hexdigest(),
            "values": list(shown.values),
            **({"text": shown.text} if record_text else {}),
        }
    return shown


def refuse(exchange: Exchange, approval: dict[str, Any], why: str) -> JSON:
    """Record that the approval was not given, and why; the error to answer the call with."""
    approval.update(granted=False, answered_at=time.time(), refusal=why)
    denial = PolicyError(
        f"approval required by policy {approval.get('policy')} was not given: {why}",
        data={"policies": [approval.get("policy")], "reason": why},
    )
    exchange.denial = denial
    return error(exchange.id, denial)


def carry_on(exchange: Exchange, approval: dict[str, Any], state: ApprovalState) -> None:
    """A 2026-07-28 retry continuing an approved call whose upstream asked for input: the
    upstream's own requestState goes back in place of ours."""
    approval.update(granted=True, continued=True)
    approval["kind"] = PERSON_APPROVED if approval.get("mode") == "human" else CLIENT_CONFIRMED
    restored = {k: v for k, v in exchange.params.items() if k != "requestState"}
    if state.upstream_state is not None:
        restored["requestState"] = state.upstream_state
    exchange.message = {**exchange.message, "params": restored}
