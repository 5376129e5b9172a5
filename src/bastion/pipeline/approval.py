"""The approval stage: an `@approval` call waits for a confirmation before it goes upstream.

The client is asked with an MCP elicitation — in a legacy session as an `elicitation/create`
request on the call's own stream; in 2026-07-28 as an `input_required` result whose retry
carries the answer and a signed `requestState` (see `bastion.policy.approval`), which the
decision stage verified and used up before this stage runs. A client that cannot elicit is
refused.

The answer comes from the client, and the client is often the agent itself: it is recorded as
*client-confirmed*, never as a person's approval. The prompt shows the tool, the server and
every argument value (long ones shortened in the middle, never dropped), those the policy
marks `@sensitive` first; the audit record carries how each value was shown and a digest of
the text (the text itself when `audit.record_arguments` is on).

The stage runs before the credentials and upstream stages (`gate`, and for a legacy session
`wait`), and once more over the upstream's answer (`after`): an upstream that itself asks for
more input after an approval gets its `requestState` wrapped in one of Bastion's, so only that
call's retry continues it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from bastion import methods
from bastion.config import Settings
from bastion.errors import PolicyError
from bastion.pipeline.exchange import Exchange
from bastion.policy.approval import (
    ApprovalState,
    ApprovalStates,
    Asker,
    Prompt,
    prompt,
)
from bastion.rpc import error, result
from bastion.types import JSON, META_CAPABILITIES, Era
from bastion.upstream.base import Answer

__all__ = ["APPROVAL_KEY", "CLIENT_CONFIRMED", "Approval", "Ask"]

log = logging.getLogger("bastion.policy")

APPROVAL_KEY = "bastion.approval"
CLIENT_CONFIRMED = "client-confirmed"
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


@dataclass(frozen=True, slots=True)
class Ask:
    """A legacy session's question: the request sent on the call's stream, and its answer."""

    message: JSON
    gateway_id: str
    answer: asyncio.Future[JSON]


class Approval:
    """Asks for, checks and records the confirmation an `@approval` call needs."""

    def __init__(self, settings: Settings, states: ApprovalStates) -> None:
        self.timeout = settings.policy.approval_timeout_seconds
        self.record_text = settings.audit.record_arguments
        self.states = states

    def gate(self, exchange: Exchange) -> JSON | Ask | None:
        """None when the call may go upstream now; a message to answer with instead (the
        question, or a refusal); or, in a legacy session, a question to wait on."""
        approval = _approval(exchange)
        if approval is None:
            return None
        if exchange.era is Era.LEGACY:
            return self._ask_in_session(exchange, approval)
        return self._by_retry(exchange, approval)

    async def wait(self, exchange: Exchange, ask: Ask) -> JSON | None:
        """Wait for a legacy client's answer: None when it approved, else the refusal."""
        approval = _approval(exchange)
        session = exchange.session
        assert approval is not None and session is not None  # noqa: S101 - gate asked
        try:
            async with asyncio.timeout(self.timeout):
                reply = await ask.answer
        except TimeoutError:
            session.asks.pop(ask.gateway_id, None)
            return self._refuse(exchange, approval, "nobody answered in time")
        found = reply.get("result")
        body: JSON = found if isinstance(found, dict) else {}
        granted, why = _judge(body)
        if not granted:
            return self._refuse(exchange, approval, why)
        self._grant(exchange, approval, body)
        return None

    def after(self, exchange: Exchange, answer: Answer) -> Answer:
        """An approved 2026-07-28 call whose upstream answers `input_required`: its
        requestState is wrapped in one of ours, so only this call's retry continues it."""
        approval = _approval(exchange)
        if approval is None or exchange.era is not Era.MODERN or not approval.get("granted"):
            return answer
        call = _call(exchange)

        def wrap(body: JSON) -> JSON:
            if body.get("resultType") != "input_required":
                return body
            inner = body.get("requestState")
            state = self.states.issue(
                call, time.time(), "continue", inner if isinstance(inner, str) else None
            )
            return {**body, "requestState": state}

        return answer.map_result(exchange.id, wrap)

    # -- legacy: elicitation/create on the call's stream ------------------------------------

    def _ask_in_session(self, exchange: Exchange, approval: dict[str, Any]) -> JSON | Ask:
        session = exchange.session
        assert session is not None  # noqa: S101 - legacy exchanges have sessions
        if "elicitation" not in (session.hello.get("capabilities") or {}):
            return self._refuse(exchange, approval, _CANNOT_ELICIT)
        shown = self._prompt(exchange, approval)
        if isinstance(shown, str):
            return self._refuse(exchange, approval, shown)
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

    # -- 2026-07-28: input_required, then the retry ------------------------------------------

    def _by_retry(self, exchange: Exchange, approval: dict[str, Any]) -> JSON | None:
        params = exchange.params
        state = exchange.approval_state  # verified and used up by the decision stage
        if isinstance(state, str):
            return self._refuse(exchange, approval, state)
        if isinstance(state, ApprovalState) and state.kind == "continue":
            # The upstream asked for more input after the approval; this retry continues it.
            approval.update(granted=True, continued=True, kind=CLIENT_CONFIRMED)
            restored = {k: v for k, v in params.items() if k != "requestState"}
            if state.upstream_state is not None:
                restored["requestState"] = state.upstream_state
            exchange.message = {**exchange.message, "params": restored}
            return None
        if isinstance(state, ApprovalState):
            responses = params.get("inputResponses") or {}
            body = responses.get(APPROVAL_KEY) if isinstance(responses, dict) else None
            granted, why = _judge(body if isinstance(body, dict) else {})
            if not granted:
                return self._refuse(exchange, approval, why)
            self._grant(exchange, approval, body if isinstance(body, dict) else {})
            exchange.message = {**exchange.message, "params": _without_ours(params)}
            return None
        meta = params.get("_meta") or {}
        if "elicitation" not in (meta.get(META_CAPABILITIES) or {}):
            return self._refuse(exchange, approval, _CANNOT_ELICIT)
        shown = self._prompt(exchange, approval)
        if isinstance(shown, str):
            return self._refuse(exchange, approval, shown)
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
            "requestState": self.states.issue(_call(exchange), time.time()),
        }
        return result(exchange.id, question)

    # -- what is shown, and what is recorded -------------------------------------------------

    def _prompt(self, exchange: Exchange, approval: dict[str, Any]) -> Prompt | str:
        """The prompt for this call; what was shown goes into the approval's record."""
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
                **({"text": shown.text} if self.record_text else {}),
            }
        return shown

    def _grant(self, exchange: Exchange, approval: dict[str, Any], body: JSON) -> None:
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

    def _refuse(self, exchange: Exchange, approval: dict[str, Any], why: str) -> JSON:
        approval.update(granted=False, answered_at=time.time(), refusal=why)
        denial = PolicyError(
            f"approval required by policy {approval.get('policy')} was not given: {why}",
            data={"policies": [approval.get("policy")], "reason": why},
        )
        exchange.denial = denial
        return error(exchange.id, denial)


def _approval(exchange: Exchange) -> dict[str, Any] | None:
    """The approval obligation of an allowed tool call, if it has one."""
    decision = exchange.decision
    if decision is None or exchange.method != methods.TOOLS_CALL:
        return None
    found = decision.obligations.get("approval")
    return found if isinstance(found, dict) else None


def _call(exchange: Exchange) -> str:
    """The digest the decision stage bound this call's approval to (see `authz`)."""
    assert exchange.approval_call is not None  # noqa: S101 - set for every 2026 approval
    return exchange.approval_call


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
