"""The upstream stage: one request of an exchange sent to one upstream, and its answer.

It picks the channel (the legacy session's own, else the pooled stateless one), shapes the
request for the upstream's era, asks the credentials stage what the upstream gets, sends, and
carries the answer back into the client's era, streamed answers included. What credential an
upstream gets is not decided here: a `CredentialFor` callable is handed in.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from bastion.errors import UpstreamError
from bastion.observe.tracing import UpstreamCall, stage
from bastion.pipeline.exchange import Exchange
from bastion.rpc import error
from bastion.types import (
    JSON,
    META_CAPABILITIES,
    META_CLIENT_INFO,
    META_VERSION,
    MODERN_VERSION,
    Era,
)
from bastion.upstream.base import Answer, Channel, answer_from
from bastion.upstream.pool import Upstreams

# The credentials stage as this stage sees it: (exchange, upstream, message) → the headers the
# upstream gets, and the id of the credential minted for them (None when none was).
CredentialFor = Callable[[Exchange, str, JSON], Awaitable[tuple[dict[str, str], str | None]]]


class Caller:
    """Sends an exchange's requests to upstreams."""

    def __init__(self, upstreams: Upstreams, credential_for: CredentialFor) -> None:
        self.upstreams = upstreams
        self._credential_for = credential_for

    async def channel(self, exchange: Exchange, upstream: str) -> Channel:
        """The channel this exchange uses to reach an upstream."""
        session = exchange.session
        if session is not None:
            hello, tenant = session.hello, session.principal.tenant
            return await session.channel(
                upstream, lambda: self.upstreams.session_channel(upstream, hello, tenant)
            )
        assert exchange.principal is not None  # noqa: S101 - authn ran
        return await self.upstreams.stateless_channel(upstream, exchange.principal.tenant)

    async def open(self, exchange: Exchange, upstream: str) -> JSON | None:
        """Open a legacy session's channel to an upstream: the upstream's initialize result,
        or None when the channel has no handshake of its own."""
        channel = await self.channel(exchange, upstream)
        headers, exchange.credential_id = await self._credential_for(
            exchange, upstream, exchange.message
        )
        return await channel.open(headers)

    async def call(self, exchange: Exchange, upstream: str, message: JSON) -> Answer:
        """Send one request to one upstream, in the request's trace; map server requests into
        the session."""
        channel = await self.channel(exchange, upstream)
        shaped = _shape(exchange, channel, message)
        # Timed, not spanned: an SDK span costs ~25 µs, and the CLIENT span follows at once.
        with stage(exchange.trace, "credentials", span=False):
            headers, exchange.credential_id = await self._credential_for(
                exchange, upstream, message
            )
        if exchange.forward_headers:
            headers = {**headers, **exchange.forward_headers}
        call = exchange.trace.call(upstream, shaped) if exchange.trace is not None else None
        if call is not None:
            headers = {**headers, **call.headers}
            shaped = call.message
        try:
            answer = await channel.call(shaped, headers)
        except BaseException as exc:
            if call is not None:
                call.finish(exc=exc)
            raise
        if answer.rest is None:
            if call is not None:
                call.finish(answer.first)
            if "result" in answer.first and channel.era is not exchange.era:
                answer.first = _translate_result(answer.first, exchange.era, upstream)
            return answer
        adapted = _adapt(exchange, channel, upstream, answer, call)
        return await answer_from(adapted, upstream)

    async def call_once(self, exchange: Exchange, upstream: str, message: JSON) -> JSON:
        """Send a request and return only its response."""
        answer = await self.call(exchange, upstream, message)
        reply = answer.first
        try:
            while "method" in reply and answer.rest is not None:
                reply = await anext(answer.rest)
        except StopAsyncIteration:
            raise UpstreamError(f"upstream {upstream!r} gave no response") from None
        finally:
            await answer.close()
        return reply


def _shape(exchange: Exchange, channel: Channel, message: JSON) -> JSON:
    """Carry a legacy session's request to a modern upstream: add the per-request _meta."""
    if channel.era is Era.MODERN and exchange.era is Era.LEGACY and exchange.session:
        params = dict(message.get("params") or {})
        meta = dict(params.get("_meta") or {})
        meta.setdefault(META_VERSION, MODERN_VERSION)
        meta.setdefault(META_CAPABILITIES, exchange.session.hello.get("capabilities", {}))
        meta.setdefault(META_CLIENT_INFO, exchange.session.hello.get("clientInfo", {}))
        params["_meta"] = meta
        return {**message, "params": params}
    return message


async def _adapt(
    exchange: Exchange,
    channel: Channel,
    upstream: str,
    answer: Answer,
    call: UpstreamCall | None,
) -> AsyncGenerator[JSON, None]:
    """A streamed answer as the client must see it: server requests under gateway ids,
    results in the client's era. The call ends with the stream."""
    assert answer.rest is not None  # noqa: S101 - only streamed answers come here
    last = answer.first
    try:
        yield _adapt_one(exchange, channel, upstream, answer.first)
        async for last in answer.rest:
            yield _adapt_one(exchange, channel, upstream, last)
    except Exception as exc:
        if call is not None:
            call.finish(exc=exc)
        raise
    finally:
        if call is not None:
            call.finish(last)  # nothing when it already finished
        await answer.close()


def _adapt_one(exchange: Exchange, channel: Channel, upstream: str, reply: JSON) -> JSON:
    if "method" in reply and "id" in reply:
        if exchange.session is None:
            # A 2026-07-28 upstream asks through input_required results, never so.
            exc = UpstreamError(f"upstream {upstream!r} sent a request to a stateless call")
            return error(exchange.id, exc)
        return exchange.session.map_server_request(upstream, reply)
    if "result" in reply and channel.era is not exchange.era:
        return _translate_result(reply, exchange.era, upstream)
    return reply


def _translate_result(reply: JSON, era: Era, upstream: str) -> JSON:
    """Carry a result across eras: stamp resultType for modern clients; refuse to hand a
    legacy session a multi-round-trip request it has no way to answer."""
    body = reply["result"]
    if not isinstance(body, dict):
        return reply
    if era is Era.MODERN:
        return {**reply, "result": {**body, "resultType": body.get("resultType", "complete")}}
    if body.get("resultType") == "input_required":
        exc = UpstreamError(
            f"upstream {upstream!r} asks for client input (2026-07-28 input_required), "
            "which a 2025-era session cannot answer; connect with protocol 2026-07-28"
        )
        return error(reply.get("id"), exc)
    return reply


def json_object(value: Any) -> JSON:
    """A copy of `value` when it is a JSON object, else an empty one (what an upstream put
    in a member is not trusted to have the shape MCP gives it)."""
    return dict(value) if isinstance(value, dict) else {}
