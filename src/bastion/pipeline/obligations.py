"""Obligations of an allowing decision: a human's approval, and redaction of results.

`@approval`: before the call goes upstream, the client is asked to let a human approve it with
an MCP elicitation — in a legacy session as an `elicitation/create` request on the call's own
stream; in 2026-07-28 as an `input_required` result whose retry carries the answer and an
integrity-protected `requestState` bound to the principal, the call and a short expiry, usable
once. A client that cannot elicit is refused. Whether it was approved, when, and by whom is
written into the decision's obligations, which the audit outcome record carries.

`@redact("$.result…")`: the matching parts of the response are replaced before the client sees
them. (Argument redaction happens in the authz stage, before the decision is recorded.)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any

from bastion.audit import digest
from bastion.config import Settings
from bastion.errors import Overloaded, PolicyError
from bastion.pipeline.dispatch import Dispatcher
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.policy.source import parse_redaction
from bastion.rpc import error, result
from bastion.state.memory import ReplayCache, TtlCache
from bastion.types import JSON, META_CAPABILITIES, Era
from bastion.upstream.base import Answer

log = logging.getLogger("bastion.policy")

APPROVAL_KEY = "bastion.approval"
STATE_PREFIX = "bastion1."
REDACTED = "[redacted by policy]"
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

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.timeout = settings.policy.approval_timeout_seconds
        self._key = secrets.token_bytes(32)  # per process: a restart voids pending approvals
        self._used = ReplayCache()
        self._granted: TtlCache[bool] = TtlCache()  # approved calls in an upstream's own MRTR

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
        gateway_id, answer = session.ask()
        params: JSON = {"message": _prompt(exchange), "requestedSchema": _SCHEMA}
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
        meta = params.get("_meta") or {}
        state = params.get("requestState")
        call = self._call_digest(exchange)
        if isinstance(state, str) and state.startswith(STATE_PREFIX):
            problem = self._check_state(state, exchange, call)
            if problem is not None:
                return self._refuse(exchange, approval, problem)
            responses = params.get("inputResponses") or {}
            body = responses.get(APPROVAL_KEY) if isinstance(responses, dict) else None
            granted, why = _judge(body if isinstance(body, dict) else {})
            if not granted:
                return self._refuse(exchange, approval, why)
            self._grant(exchange, approval, body if isinstance(body, dict) else {})
            exchange.message = {**exchange.message, "params": _without_ours(params)}
            return await self._forward(exchange, route, call, paths)
        if self._granted.get(call, time.time()):
            # The upstream asked for more input after the approval; its retry continues it.
            approval["granted"] = True
            approval["continued"] = True
            return await self._forward(exchange, route, call, paths)
        if "elicitation" not in (meta.get(META_CAPABILITIES) or {}):
            return self._refuse(
                exchange, approval, "this client cannot answer elicitation requests"
            )
        approval["asked_at"] = time.time()
        approval["granted"] = None
        body = {
            "resultType": "input_required",
            "inputRequests": {
                APPROVAL_KEY: {
                    "method": "elicitation/create",
                    "params": {
                        "mode": "form",
                        "message": _prompt(exchange),
                        "requestedSchema": _SCHEMA,
                    },
                }
            },
            "requestState": self._state(exchange, call),
        }
        return Answer(result(exchange.id, body))

    async def _forward(
        self, exchange: Exchange, route: Route, call: str, paths: list[Any]
    ) -> Answer:
        answer = _redacted(await self.dispatcher.run(exchange, route), exchange, paths)
        final = answer.first if answer.rest is None else None
        body = final.get("result") if final is not None else None
        if isinstance(body, dict) and body.get("resultType") == "input_required":
            self._granted.put(call, True, time.time() + self.timeout)
        return answer

    def _call_digest(self, exchange: Exchange) -> str:
        params = {
            k: v
            for k, v in exchange.params.items()
            if k not in ("_meta", "requestState", "inputResponses")
        }
        principal = exchange.principal
        owner = principal.binding_key() if principal is not None else ()
        return digest({"who": list(owner), "method": exchange.method, "params": params})

    def _state(self, exchange: Exchange, call: str) -> str:
        payload = {"c": call, "e": int(time.time() + self.timeout), "n": secrets.token_urlsafe(12)}
        raw = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        mac = hmac.new(self._key, raw.encode(), hashlib.sha256).hexdigest()
        return f"{STATE_PREFIX}{raw}.{mac}"

    def _check_state(self, state: str, exchange: Exchange, call: str) -> str | None:
        """Why a requestState is refused, or None: integrity, expiry, same principal and call,
        first use."""
        raw, _, mac = state[len(STATE_PREFIX) :].rpartition(".")
        expected = hmac.new(self._key, raw.encode(), hashlib.sha256).hexdigest()
        if not raw or not hmac.compare_digest(mac, expected):
            return "the approval state was altered or comes from another gateway process"
        try:
            payload = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        except ValueError:
            return "the approval state cannot be read"
        if payload.get("c") != call:
            return "the approval was given for another call or another principal"
        if time.time() > payload.get("e", 0):
            return "the approval expired; call again to be asked anew"
        try:
            if not self._used.first_use(str(payload.get("n")), float(payload.get("e", 0))):
                return "the approval was already used"
        except Overloaded:  # refused, and recorded as such, rather than forgetting a live one
            return "the gateway holds too many pending approvals; call again shortly"
        return None

    # -- outcomes ----------------------------------------------------------------------------

    def _grant(self, exchange: Exchange, approval: dict[str, Any], body: JSON) -> None:
        principal = exchange.principal
        approval.update(
            granted=True,
            answered_at=time.time(),
            by=(principal.user if principal and principal.user else "the user of the client")
            + (f" via agent {principal.agent}" if principal else ""),
            answer=body.get("content"),
        )
        log.info("approval granted for %s by %s", exchange.params.get("name"), approval["by"])

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


def _prompt(exchange: Exchange) -> str:
    name = exchange.params.get("name")
    arguments = exchange.params.get("arguments") or {}
    shown = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    if len(shown) > 800:
        shown = shown[:800] + "…"
    principal = exchange.principal
    who = f"agent {principal.agent} of tenant {principal.tenant}" if principal else "an agent"
    return f"Bastion: {who} wants to call {name} with {shown}. Approve this call?"


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

    def fix(message: JSON) -> JSON:
        if message.get("id") == exchange.id and isinstance(message.get("result"), dict):
            body = message["result"]
            for steps in paths:
                body = redact(body, steps)
            return {**message, "result": body}
        return message

    if answer.rest is None:
        return Answer(fix(answer.first))
    rest = answer.rest

    async def fixed() -> AsyncGenerator[JSON, None]:
        try:
            async for message in rest:
                yield fix(message)
        finally:
            await rest.aclose()

    return Answer(fix(answer.first), fixed())
