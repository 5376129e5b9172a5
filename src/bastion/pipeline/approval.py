"""The approval stage: an `@approval` call waits for a confirmation before it goes upstream.

`approval: human` (`@approval("human")`): a person decides. The call is held as a
`PendingApproval` (see `approvals.py` for who may decide, and how) and its HTTP request stays
open, in both eras, as an SSE stream: a progress notification every few seconds when the
client gave a `progressToken` (else one log message saying what it waits for, then SSE
keepalive comments), then the call's own answer once a person approved — or the refusal
naming who denied it and why, or that nobody decided in time. A client that goes away ends
the item as `abandoned`. One approval releases this one call, whose digest it holds. Held
rather than `input_required` in the 2026 era: the SDKs retry a state-only `input_required`
about ten times within a few seconds and then give up, far sooner than a person decides.

`approval: client` (`@approval("client")`, and `true`/`required`, the older spellings):
the client is asked with an MCP elicitation — in a legacy session as an `elicitation/create`
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
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from bastion import methods
from bastion.audit import AuditWriter
from bastion.config import Settings
from bastion.errors import Overloaded, PolicyError, StateUnavailable
from bastion.pipeline.approvals import Approvals
from bastion.pipeline.authz import History, history_key
from bastion.pipeline.exchange import Exchange
from bastion.policy.approval import (
    ApprovalState,
    ApprovalStates,
    Asker,
    Prompt,
    call_digest,
    prompt,
)
from bastion.rpc import error, result
from bastion.state.approvals import (
    MemoryPendingApprovals,
    PendingApproval,
    PendingApprovals,
    Requester,
)
from bastion.types import JSON, META_CAPABILITIES, UPSTREAM_STATUS, Era
from bastion.upstream.base import Answer

__all__ = ["APPROVAL_KEY", "CLIENT_CONFIRMED", "PERSON_APPROVED", "Approval", "Ask"]

log = logging.getLogger("bastion.policy")

APPROVAL_KEY = "bastion.approval"
CLIENT_CONFIRMED = "client-confirmed"
PERSON_APPROVED = "person-approved"
PROGRESS_EVERY = 5.0  # seconds between progress notifications of a held call
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


class Approval:
    """Asks for, checks and records the confirmation an `@approval` call needs."""

    def __init__(
        self,
        settings: Settings,
        states: ApprovalStates,
        audit: AuditWriter | None = None,
        history: History | None = None,
        store: PendingApprovals | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout = settings.policy.approval_timeout_seconds
        self.approvers = settings.policy.approvers
        self.record_text = settings.audit.record_arguments
        self.states = states
        self.history = history
        self._clock = clock
        self.approvals = Approvals(settings, store or MemoryPendingApprovals(), audit, clock)

    async def gate(self, exchange: Exchange) -> JSON | Ask | None:
        """None when the call may go upstream now; a message to answer with instead (the
        question, or a refusal); or a wait: a legacy session's question, a held call."""
        approval = _approval(exchange)
        if approval is None:
            return None
        if approval.get("mode") == "human":
            return await self._hold(exchange, approval)
        if exchange.era is Era.LEGACY:
            return self._ask_in_session(exchange, approval)
        return self._by_retry(exchange, approval)

    async def waiting(self, exchange: Exchange, ask: Ask) -> AsyncGenerator[JSON, None]:
        """Wait out `ask`, yielding progress notifications meanwhile; once it ends,
        `ask.refusal` is None when the call may go upstream, else the refusal to send."""
        if ask.held is None:
            ask.refusal = await self.wait(exchange, ask)
            return
        async for note in self._wait_for_person(exchange, ask):
            yield note

    async def wait(self, exchange: Exchange, ask: Ask) -> JSON | None:
        """Wait for a legacy client's answer: None when it approved, else the refusal."""
        approval = _approval(exchange)
        session = exchange.session
        assert approval is not None and session is not None  # noqa: S101 - gate asked
        assert ask.answer is not None  # noqa: S101 - an elicitation has its answer
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
            self._continue(exchange, approval, state)
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

    # -- a person decides: the call is held -------------------------------------------------

    async def _hold(self, exchange: Exchange, approval: dict[str, Any]) -> JSON | Ask | None:
        """Hold the call for a person's decision (`PendingApproval`), or refuse it."""
        state = exchange.approval_state
        if isinstance(state, ApprovalState) and state.kind == "continue":
            self._continue(exchange, approval, state)  # approved; the upstream asked for more
            return None
        if isinstance(state, str):
            return self._refuse(exchange, approval, state)
        shown = self._prompt(exchange, approval)
        if isinstance(shown, str):
            return self._refuse(exchange, approval, shown)
        item = self._pending(exchange, approval, shown)
        try:
            await self.approvals.store.add(item)
        except (Overloaded, StateUnavailable) as exc:  # full, or the shared store is down
            approval.update(granted=False, answered_at=self._clock(), refusal=exc.message)
            exchange.denial = exc
            busy = error(exchange.id, exc)
            if exchange.era is Era.MODERN:
                busy[UPSTREAM_STATUS] = exc.http_status
            return busy
        approval.update(
            granted=None,
            kind="human",
            approval_id=item.id,
            approvers=list(item.approvers),
            asked_at=item.created_at,
            expires_at=item.expires_at,
        )
        log.info("call of %s held for approval %s", item.called_as, item.id)
        token = _progress_token(exchange)
        text = f"waiting for a person's approval {item.id} of {item.called_as}"
        first = _progress(token, 0, text) if token is not None else _note(text)
        return Ask(first, held=item)

    def _pending(
        self, exchange: Exchange, approval: dict[str, Any], shown: Prompt
    ) -> PendingApproval:
        principal = exchange.principal
        target = exchange.target
        assert principal is not None and target is not None  # noqa: S101 - decided calls
        now = self._clock()
        tools: list[str] = []
        labels: list[str] = []
        if self.history is not None:
            tools, labels = self.history.get(history_key(exchange, principal))
        return PendingApproval(
            id=uuid.uuid4().hex,
            call=_digest(exchange),
            policy=str(approval.get("policy")),
            server=target.upstream,
            tool=str(target.name),
            called_as=str(exchange.params.get("name")),
            requester=Requester(
                principal.agent, principal.tenant, principal.user, principal.token_id
            ),
            shown={"text": shown.text, "values": list(shown.values), **approval["shown"]},
            approvers=tuple(approval.get("approvers") or self.approvers),
            created_at=now,
            expires_at=now + float(approval.get("timeout") or self.timeout),
            history={"tools": tools, "labels": labels},
        )

    async def _wait_for_person(self, exchange: Exchange, ask: Ask) -> AsyncGenerator[JSON, None]:
        """Progress while the item is pending; it ends decided, expired or abandoned."""
        item = ask.held
        assert item is not None  # noqa: S101 - only held calls come here
        token = _progress_token(exchange)
        ended = False
        try:
            rounds = 0
            while item.status == "pending":
                left = item.expires_at - self._clock()
                if left <= 0:
                    why = f"no person decided within {item.expires_at - item.created_at:g} s"
                    item = await self.approvals.end(item, "expired", why)
                    break
                try:
                    waited = await self.approvals.store.wait(item.id, min(PROGRESS_EVERY, left))
                except StateUnavailable as exc:
                    # The decision cannot be learnt: refused (fail closed), and the item is
                    # left to expire in the store, which cannot be written either.
                    ended = True
                    ask.refusal = self._refuse(exchange, _approval_of(exchange), exc.message)
                    return
                item = waited or item
                if item.status == "pending" and token is not None:
                    rounds += 1
                    text = f"waiting for a person's approval {item.id}; {left:.0f} s left"
                    yield _progress(token, rounds, text)
            ended = True
        finally:
            if not ended:  # closed or cancelled while pending: the client went away
                why = "the client went away before a person decided"
                item = await self.approvals.end(item, "abandoned", why)
                self._conclude(exchange, item)
        ask.refusal = self._conclude(exchange, item)

    def _conclude(self, exchange: Exchange, item: PendingApproval) -> JSON | None:
        """None when a person approved exactly this call; else the refusal, recorded."""
        approval = _approval(exchange)
        assert approval is not None  # noqa: S101 - held calls have one
        decided = item.decision
        by = decided.by if decided is not None else None
        if decided is not None:
            approval.update(status=item.status, channel=decided.channel, by=by)
            approval.update(roles=list(decided.roles), decided_at=decided.at)
        reason = decided.reason if decided is not None else None
        if item.status == "approved":
            if item.call != _digest(exchange):  # the release is bound to what was shown
                return self._refuse(exchange, approval, "the call is not the one approved")
            approval.update(granted=True, kind=PERSON_APPROVED, answered_at=self._clock())
            approval["reason"] = reason
            log.info("approval %s: %s released by %s", item.id, item.called_as, by)
            return None
        if item.status == "denied":
            why = f"denied by {by}" + (f": {reason}" if reason else "")
        else:
            why = reason or item.status
        if item.status == "expired":
            why += "; the approval expired, call again to be asked anew"
        return self._refuse(exchange, approval, why)

    def _continue(self, exchange: Exchange, approval: dict[str, Any], state: ApprovalState) -> None:
        """A 2026-07-28 retry continuing an approved call whose upstream asked for input."""
        approval.update(granted=True, continued=True)
        approval["kind"] = PERSON_APPROVED if approval.get("mode") == "human" else CLIENT_CONFIRMED
        restored = {k: v for k, v in exchange.params.items() if k != "requestState"}
        if state.upstream_state is not None:
            restored["requestState"] = state.upstream_state
        exchange.message = {**exchange.message, "params": restored}

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


def _approval_of(exchange: Exchange) -> dict[str, Any]:
    """The approval obligation of a held call (it has one)."""
    approval = _approval(exchange)
    assert approval is not None  # noqa: S101 - held calls have one
    return approval


def _approval(exchange: Exchange) -> dict[str, Any] | None:
    """The approval obligation of an allowed tool call, if it has one."""
    decision = exchange.decision
    if decision is None or exchange.method != methods.TOOLS_CALL:
        return None
    found = decision.obligations.get("approval")
    return found if isinstance(found, dict) else None


def _digest(exchange: Exchange) -> str:
    """What a person's approval releases: principal, route, upstream, tool and arguments."""
    principal = exchange.principal
    target = exchange.target
    assert principal is not None and target is not None  # noqa: S101 - decided calls
    place = (exchange.route, target.upstream, str(target.name))
    return call_digest(principal.binding_key(), exchange.method, exchange.params, place)


def _progress_token(exchange: Exchange) -> str | int | None:
    meta = exchange.params.get("_meta")
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return token if isinstance(token, str | int) and not isinstance(token, bool) else None


def _progress(token: str | int, progress: int, text: str) -> JSON:
    params = {"progressToken": token, "progress": progress, "message": text}
    return {"jsonrpc": "2.0", "method": methods.PROGRESS, "params": params}


def _note(text: str) -> JSON:
    """One log message: the client gave no progress token to report progress against."""
    params = {"level": "info", "logger": "bastion.approval", "data": text}
    return {"jsonrpc": "2.0", "method": methods.MESSAGE, "params": params}


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
