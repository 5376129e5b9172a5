"""Obligations of an allowing decision: an approval, and redaction of results.

`@approval`: before the call goes upstream, the client is asked to confirm it with an MCP
elicitation — in a legacy session as an `elicitation/create` request on the call's own
stream; in 2026-07-28 as an `input_required` result whose retry carries the answer and a
signed `requestState` (see `bastion.policy.approval`), which the decision stage verified and
used up before this stage runs. A client that cannot elicit is refused.

The answer comes from the client, and the client is often the agent itself: it is recorded as
*client-confirmed*, never as a person's approval. The prompt shows the tool, the server and
every argument value (long ones shortened in the middle, never dropped), those the policy
marks `@sensitive` first; the audit record carries how each value was shown and a digest of
the text (the text itself when `audit.record_arguments` is on).

`@redact("$.result…")`: the matching parts of the response are replaced before the client sees
them. (Argument redaction happens in the authz stage, before the decision is recorded.)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from bastion.config import Settings
from bastion.errors import PolicyError
from bastion.pipeline.dispatch import Dispatcher
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.policy.approval import (
    ApprovalState,
    ApprovalStates,
    Asker,
    Prompt,
    call_digest,
    prompt,
)
from bastion.policy.source import parse_redaction
from bastion.rpc import error, result
from bastion.types import JSON, META_CAPABILITIES, Era
from bastion.upstream.base import Answer

log = logging.getLogger("bastion.policy")

APPROVAL_KEY = "bastion.approval"
REDACTED = "[redacted by policy]"
CLIENT_CONFIRMED = "client-confirmed"
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


class Obligations:
    """Carries out approval and result redaction around the dispatcher."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher, states: ApprovalStates) -> None:
        self.dispatcher = dispatcher
        self.timeout = settings.policy.approval_timeout_seconds
        self.record_text = settings.audit.record_arguments
        self.states = states

    async def run(self, exchange: Exchange, route: Route) -> Answer:
        """Run the exchange under its decision's obligations."""
        assert exchange.decision is not None  # noqa: S101 - only decided exchanges run
        obligations = exchange.decision.obligations
        paths = [steps for root, steps in _redactions(obligations) if root == "result"]
        approval = obligations.get("approval")
        if approval is not None and exchange.method == "tools/call":
            if exchange.era is Era.LEGACY:
                return await self._ask_in_session(exchange, route, approval, paths)
            return await self._ask_by_retry(exchange, route, approval, paths)
        return _redacted(await self.dispatcher.run(exchange, route), exchange, paths)

    def _prompt(self, exchange: Exchange, approval: dict[str, Any]) -> Prompt | str:
        """The prompt for this call; what was shown goes into the approval's record."""
        principal = exchange.principal
        target = exchange.target
        assert principal is not None and target is not None  # noqa: S101 - decided calls
        asker = Asker(principal.agent, principal.tenant, principal.user)
        name = str(exchange.params.get("name"))
        shown = prompt(
            asker,
            target.upstream,
            str(target.name),
            name,
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

    # -- legacy: elicitation/create on the call's stream ------------------------------------

    async def _ask_in_session(
        self, exchange: Exchange, route: Route, approval: dict[str, Any], paths: list[Any]
    ) -> Answer:
        session = exchange.session
        assert session is not None  # noqa: S101 - legacy exchanges have sessions
        if "elicitation" not in (session.hello.get("capabilities") or {}):
            return self._refuse(
                exchange, approval, "this client cannot answer elicitation requests"
            )
        shown = self._prompt(exchange, approval)
        if isinstance(shown, str):
            return self._refuse(exchange, approval, shown)
        gateway_id, answer = session.ask()
        params: JSON = {"message": shown.text, "requestedSchema": _SCHEMA}
        if session.protocol_version >= "2025-11-25":
            params["mode"] = "form"
        ask = {"jsonrpc": "2.0", "id": gateway_id, "method": "elicitation/create", "params": params}
        approval["asked_at"] = time.time()

        async def rest() -> AsyncGenerator[JSON, None]:
            try:
                async with asyncio.timeout(self.timeout):
                    reply = await answer
            except TimeoutError:
                session.asks.pop(gateway_id, None)
                yield self._refuse(exchange, approval, "nobody answered in time").first
                return
            found = reply.get("result")
            body: JSON = found if isinstance(found, dict) else {}
            granted, why = _judge(body)
            if not granted:
                yield self._refuse(exchange, approval, why).first
                return
            self._grant(exchange, approval, body)
            inner = _redacted(await self.dispatcher.run(exchange, route), exchange, paths)
            yield inner.first
            if inner.rest is not None:
                async for message in inner.rest:
                    yield message

        return Answer(ask, rest())

    # -- 2026-07-28: input_required, then the retry ------------------------------------------

    async def _ask_by_retry(
        self, exchange: Exchange, route: Route, approval: dict[str, Any], paths: list[Any]
    ) -> Answer:
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
            return await self._forward(exchange, route, paths)
        if isinstance(state, ApprovalState):
            responses = params.get("inputResponses") or {}
            body = responses.get(APPROVAL_KEY) if isinstance(responses, dict) else None
            granted, why = _judge(body if isinstance(body, dict) else {})
            if not granted:
                return self._refuse(exchange, approval, why)
            self._grant(exchange, approval, body if isinstance(body, dict) else {})
            exchange.message = {**exchange.message, "params": _without_ours(params)}
            return await self._forward(exchange, route, paths)
        meta = params.get("_meta") or {}
        if "elicitation" not in (meta.get(META_CAPABILITIES) or {}):
            return self._refuse(
                exchange, approval, "this client cannot answer elicitation requests"
            )
        shown = self._prompt(exchange, approval)
        if isinstance(shown, str):
            return self._refuse(exchange, approval, shown)
        approval["asked_at"] = time.time()
        approval["granted"] = None
        body = {
            "resultType": "input_required",
            "inputRequests": {
                APPROVAL_KEY: {
                    "method": "elicitation/create",
                    "params": {"mode": "form", "message": shown.text, "requestedSchema": _SCHEMA},
                }
            },
            "requestState": self.states.issue(self._call(exchange), time.time()),
        }
        return Answer(result(exchange.id, body))

    async def _forward(self, exchange: Exchange, route: Route, paths: list[Any]) -> Answer:
        """Send the approved call; if the upstream itself answers `input_required`, its
        requestState is wrapped in one of ours, so only that call's retry continues it."""
        call = self._call(exchange)

        def wrap(body: JSON) -> JSON:
            if body.get("resultType") != "input_required":
                return body
            inner = body.get("requestState")
            state = self.states.issue(
                call, time.time(), "continue", inner if isinstance(inner, str) else None
            )
            return {**body, "requestState": state}

        answer = _redacted(await self.dispatcher.run(exchange, route), exchange, paths)
        return _map_result(answer, exchange, wrap)

    @staticmethod
    def _call(exchange: Exchange) -> str:
        principal = exchange.principal
        owner = principal.binding_key() if principal is not None else ()
        return call_digest(owner, exchange.method, exchange.params)

    # -- outcomes ----------------------------------------------------------------------------

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

    def _refuse(self, exchange: Exchange, approval: dict[str, Any], why: str) -> Answer:
        approval.update(granted=False, answered_at=time.time(), refusal=why)
        denial = PolicyError(
            f"approval required by policy {approval.get('policy')} was not given: {why}",
            data={"policies": [approval.get("policy")], "reason": why},
        )
        exchange.denial = denial
        return Answer(error(exchange.id, denial))


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


def _redactions(obligations: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    out: list[tuple[str, tuple[Any, ...]]] = []
    for text in obligations.get("redact", ()):
        out.extend(parse_redaction(text))
    return out


def redact(value: Any, steps: tuple[Any, ...]) -> Any:
    """`value` with what `steps` reach replaced by a marker (a copy; `value` is unchanged)."""
    if not steps:
        return REDACTED
    step, rest = steps[0], steps[1:]
    if step is None and isinstance(value, list):
        return [redact(item, rest) for item in value]
    if step is None and isinstance(value, dict):
        return {k: redact(v, rest) for k, v in value.items()}
    if isinstance(step, int) and isinstance(value, list) and -len(value) <= step < len(value):
        copy = list(value)
        copy[step] = redact(value[step], rest)
        return copy
    if isinstance(step, str) and isinstance(value, dict) and step in value:
        return {**value, step: redact(value[step], rest)}
    return value


def _redacted(answer: Answer, exchange: Exchange, paths: list[tuple[Any, ...]]) -> Answer:
    if not paths:
        return answer

    def fix(body: JSON) -> JSON:
        for steps in paths:
            body = redact(body, steps)
        return body

    return _map_result(answer, exchange, fix)


def _map_result(answer: Answer, exchange: Exchange, fix: Callable[[JSON], JSON]) -> Answer:
    """The answer with `fix` applied to the result of the exchange's own response (whether
    it comes alone or at the end of a stream)."""

    def one(message: JSON) -> JSON:
        body = message.get("result")
        if message.get("id") == exchange.id and isinstance(body, dict):
            return {**message, "result": fix(body)}
        return message

    if answer.rest is None:
        return Answer(one(answer.first))
    rest = answer.rest

    async def fixed() -> AsyncGenerator[JSON, None]:
        try:
            async for message in rest:
                yield one(message)
        finally:
            await rest.aclose()

    return Answer(one(answer.first), fixed())
