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
refused. That path lives in `elicitation.py`; what both paths share (the obligation, `Ask`,
the prompt's record, a refusal) in `consent.py`.

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

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from bastion import methods
from bastion.audit import AuditWriter
from bastion.config import Settings
from bastion.errors import Overloaded, StateUnavailable
from bastion.pipeline.approvals import Approvals
from bastion.pipeline.consent import (
    APPROVAL_KEY,
    CLIENT_CONFIRMED,
    PERSON_APPROVED,
    Ask,
    bound_call,
    carry_on,
    obligation,
    refuse,
    show,
)
from bastion.pipeline.elicitation import ask_by_retry, ask_in_session, wait_for_answer
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.history import History, history_key
from bastion.policy.approval import ApprovalState, ApprovalStates, Prompt, call_digest
from bastion.rpc import error
from bastion.state.approvals import (
    MemoryPendingApprovals,
    PendingApproval,
    PendingApprovals,
    Requester,
)
from bastion.types import JSON, UPSTREAM_STATUS, Era
from bastion.upstream.base import Answer

# The obligation's constants and `Ask` are named here too: the chain and the tests import them
# from the stage.
__all__ = ["APPROVAL_KEY", "CLIENT_CONFIRMED", "PERSON_APPROVED", "Approval", "Ask"]

log = logging.getLogger("bastion.policy")

PROGRESS_EVERY = 5.0  # seconds between progress notifications of a held call


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
        approval = obligation(exchange)
        if approval is None:
            return None
        if approval.get("mode") == "human":
            return await self._hold(exchange, approval)
        if exchange.era is Era.LEGACY:
            return ask_in_session(exchange, approval, self.record_text)
        return ask_by_retry(exchange, approval, self.states, self.record_text)

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
        return await wait_for_answer(exchange, ask, self.timeout)

    def after(self, exchange: Exchange, answer: Answer) -> Answer:
        """An approved 2026-07-28 call whose upstream answers `input_required`: its
        requestState is wrapped in one of ours, so only this call's retry continues it."""
        approval = obligation(exchange)
        if approval is None or exchange.era is not Era.MODERN or not approval.get("granted"):
            return answer
        call = bound_call(exchange)

        def wrap(body: JSON) -> JSON:
            if body.get("resultType") != "input_required":
                return body
            inner = body.get("requestState")
            state = self.states.issue(
                call, time.time(), "continue", inner if isinstance(inner, str) else None
            )
            return {**body, "requestState": state}

        return answer.map_result(exchange.id, wrap)

    # -- a person decides: the call is held -------------------------------------------------

    async def _hold(self, exchange: Exchange, approval: dict[str, Any]) -> JSON | Ask | None:
        """Hold the call for a person's decision (`PendingApproval`), or refuse it."""
        state = exchange.approval_state
        if isinstance(state, ApprovalState) and state.kind == "continue":
            carry_on(exchange, approval, state)  # approved; the upstream asked for more
            return None
        if isinstance(state, str):
            return refuse(exchange, approval, state)
        shown = show(exchange, approval, self.record_text)
        if isinstance(shown, str):
            return refuse(exchange, approval, shown)
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
                    ask.refusal = refuse(exchange, _approval_of(exchange), exc.message)
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
        approval = obligation(exchange)
        assert approval is not None  # noqa: S101 - held calls have one
        decided = item.decision
        by = decided.by if decided is not None else None
        if decided is not None:
            approval.update(status=item.status, channel=decided.channel, by=by)
            approval.update(roles=list(decided.roles), decided_at=decided.at)
        reason = decided.reason if decided is not None else None
        if item.status == "approved":
            if item.call != _digest(exchange):  # the release is bound to what was shown
                return refuse(exchange, approval, "the call is not the one approved")
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
        return refuse(exchange, approval, why)


def _approval_of(exchange: Exchange) -> dict[str, Any]:
    """The approval obligation of a held call (it has one)."""
    approval = obligation(exchange)
    assert approval is not None  # noqa: S101 - held calls have one
    return approval


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
