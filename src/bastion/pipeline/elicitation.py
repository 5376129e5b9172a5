"""`approval: client`: the client is asked to confirm a call with an MCP elicitation.

In a legacy session the question is an `elicitation/create` request on the call's own stream
(`ask_in_session`, then `wait_for_answer`); in 2026-07-28 it is an `input_required` result
whose retry carries the answer and a signed `requestState` (`ask_by_retry`), which the decision
stage verified and used up before this stage runs. A client that cannot elicit is refused.

The answer comes from the client, and the client is often the agent itself: it is recorded as
*client-confirmed*, never as a person's approval (see approval.py for the stage as a whole).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bastion import methods
from bastion.pipeline.consent import (
    APPROVAL_KEY,
    CLIENT_CONFIRMED,
    Ask,
    bound_call,
    carry_on,
    obligation,
    refuse,
    show,
)
from bastion.pipeline.exchange import Exchange
from bastion.policy.approval import ApprovalState, ApprovalStates
from bastion.rpc import result
from bastion.types import JSON, META_CAPABILITIES

__all__ = ["ask_by_retry", "ask_in_session", "wait_for_answer"]

log = logging.getLogger("bastion.policy")

_CANNOT_ELICIT = "this client cannot answer elicitation requests"
_SCHEMA = {
    "type": "object",
    "properties": {
        "approve": {
            "type": "boolean",
            "title": "Approve this call",
            "description": "Allow the agent to make this call once",
        }
    },
    "required": ["approve"],
}


# -- legacy: elicitation/create on the call's stream -------------------------------------------


def ask_in_session(exchange: Exchange, approval: dict[str, Any], record_text: bool) -> JSON | Ask:
    """The elicitation request to send on a legacy call's stream, or the refusal."""
    session = exchange.session
    assert session is not None  # noqa: S101 - legacy exchanges have sessions
    if "elicitation" not in (session.hello.get("capabilities") or {}):
        return refuse(exchange, approval, _CANNOT_ELICIT)
    shown = show(exchange, approval, record_text)
    if isinstance(shown, str):
        return refuse(exchange, approval, shown)
    gateway_id, answer = session.ask()
    params: JSON = {"message": shown.text, "requestedSchema": _SCHEMA}
    if session.protocol_version >= "2025-11-25":
        params["mode"] = "form"
    approval["asked_at"] = time.time()
    message = {
        "jsonrpc": "2.0",
        "id": gateway_id,
        "method": methods.ELICITATION_CREATE,
        "params": params,
    }
    return Ask(message, gateway_id, answer)


async def wait_for_answer(exchange: Exchange, ask: Ask, within: float) -> JSON | None:
    """Wait up to `within` seconds for a legacy client's answer: None when it approved, else
    the refusal."""
    approval = obligation(exchange)
    session = exchange.session
    assert approval is not None and session is not None  # noqa: S101 - gate asked
    assert ask.answer is not None  # noqa: S101 - an elicitation has its answer
    try:
        async with asyncio.timeout(within):
            reply = await ask.answer
    except TimeoutError:
        session.asks.pop(ask.gateway_id, None)
        return refuse(exchange, approval, "nobody answered in time")
    found = reply.get("result")
    body: JSON = found if isinstance(found, dict) else {}
    granted, why = _judge(body)
    if not granted:
        return refuse(exchange, approval, why)
    _grant(exchange, approval, body)
    return None


# -- 2026-07-28: input_required, then the retry ------------------------------------------------


def ask_by_retry(
    exchange: Exchange, approval: dict[str, Any], states: ApprovalStates, record_text: bool
) -> JSON | None:
    """None when this retry carries the approval (or continues an approved call); else the
    `input_required` question, or the refusal."""
    params = exchange.params
    state = exchange.approval_state  # verified and used up by the decision stage
    if isinstance(state, str):
        return refuse(exchange, approval, state)
    if isinstance(state, ApprovalState) and state.kind == "continue":
        # The upstream asked for more input after the approval; this retry continues it.
        carry_on(exchange, approval, state)
        return None
    if isinstance(state, ApprovalState):
        responses = params.get("inputResponses") or {}
        body = responses.get(APPROVAL_KEY) if isinstance(responses, dict) else None
        granted, why = _judge(body if isinstance(body, dict) else {})
        if not granted:
            return refuse(exchange, approval, why)
        _grant(exchange, approval, body if isinstance(body, dict) else {})
        exchange.message = {**exchange.message, "params": _without_ours(params)}
        return None
    meta = params.get("_meta") or {}
    if "elicitation" not in (meta.get(META_CAPABILITIES) or {}):
        return refuse(exchange, approval, _CANNOT_ELICIT)
    shown = show(exchange, approval, record_text)
    if isinstance(shown, str):
        return refuse(exchange, approval, shown)
    approval["asked_at"] = time.time()
    approval["granted"] = None
    question = {
        "resultType": "input_required",
        "inputRequests": {
            APPROVAL_KEY: {
                "method": methods.ELICITATION_CREATE,
                "params": {"mode": "form", "message": shown.text, "requestedSchema": _SCHEMA},
            }
        },
        "requestState": states.issue(bound_call(exchange), time.time()),
    }
    return result(exchange.id, question)


# -- the answer ----------------------------------------------------------------------------------


def _grant(exchange: Exchange, approval: dict[str, Any], body: JSON) -> None:
    principal = exchange.principal
    who = (
        f"the client of agent {principal.agent}"
        + (f" acting for user {principal.user}" if principal.user else "")
        if principal is not None
        else "the client"
    )
    approval.update(
        granted=True,
        kind=CLIENT_CONFIRMED,
        channel="elicitation",
        answered_at=time.time(),
        by=f"{who} (an MCP elicitation answer: not verified as a person)",
        answer=body.get("content"),
    )
    log.info("approval client-confirmed for %s by %s", exchange.params.get("name"), who)


def _judge(body: JSON) -> tuple[bool, str]:
    action = body.get("action")
    found = body.get("content")
    content: JSON = found if isinstance(found, dict) else {}
    if action == "accept" and content.get("approve") is True:
        return True, "approved"
    if action == "accept":
        return False, "the user did not approve"
    if action in ("decline", "cancel"):
        return False, f"the user chose {action}"
    return False, "the answer to the approval request was not understood"


def _without_ours(params: JSON) -> JSON:
    out = {k: v for k, v in params.items() if k != "requestState"}
    responses = params.get("inputResponses")
    if isinstance(responses, dict):
        rest = {k: v for k, v in responses.items() if k != APPROVAL_KEY}
        if rest:
            out["inputResponses"] = rest
        else:
            out.pop("inputResponses", None)
    return out
