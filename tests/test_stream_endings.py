"""How a streamed answer ends when it does not end with its response: an upstream SSE answer
the gateway resumed releases the resumed response the moment the answer is closed (and `done`
is called once); a 2026-07-28 client closing its stream before the response is recorded as
cut off, not `ok`, and lets the upstream call go at once, not after the keepalive interval.

`HttpClient.answer` and `deliver` are driven in process with fake responses and sends whose
timing the test chooses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import orjson

from bastion.asgi import Message
from bastion.config import HttpUpstream
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.trail import outcome_of
from bastion.sse import Decoder
from bastion.transport.delivery import Ended, deliver
from bastion.types import JSON, MODERN_VERSION, Era
from bastion.upstream.base import Answer
from bastion.upstream.client import HttpClient
from bastion.wire import Response


class FakeResponse:
    """An SSE response whose body is the given chunks; remembers whether it was released."""

    def __init__(self, *chunks: bytes) -> None:
        self.status = 200
        self.headers = {"content-type": "text/event-stream"}
        self._chunks = chunks
        self.released = 0

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    def release(self) -> None:
        self.released += 1

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def event(message: JSON, id_: str) -> bytes:
    return b"id: " + id_.encode() + b"\ndata: " + orjson.dumps(message) + b"\n\n"


def client() -> HttpClient:
    return HttpClient("up", HttpUpstream(transport="http", url="http://127.0.0.1:9/mcp"))


async def test_a_resumed_stream_is_released_when_the_answer_is_closed() -> None:
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"n": 1}}
    reply = {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}
    first = FakeResponse(event(progress, "1"))  # closed early: SSE polling
    resumed = FakeResponse(event(reply, "2"), b": the upstream keeps the stream open\n\n")
    dones: list[int] = []

    async def resume(decoder: Decoder) -> AsyncIterator[JSON]:
        async with resumed:  # as HttpChannel._resume holds its GET response
            async for message in client().read_events(cast(Response, resumed), decoder):
                yield message

    answer = await client().answer(
        cast(Response, first), 7, "orig", resume, lambda: dones.append(1)
    )
    assert answer.first == progress
    assert answer.rest is not None
    got: list[Any] = [message async for message in _until_response(answer.rest)]
    assert got[-1]["id"] == "orig"
    await answer.rest.aclose()
    assert first.released == 1
    assert resumed.released == 1  # not left to the garbage collector
    assert dones == [1]


async def _until_response(rest: AsyncIterator[JSON]) -> AsyncIterator[JSON]:
    async for message in rest:
        yield message
        if "method" not in message:
            return


# -- a streamed 2026-07-28 answer the client closes before its response ---------------------


async def test_a_stream_the_client_closes_before_the_response_is_not_recorded_as_ok() -> None:
    """2026-07-28: closing the stream cancels the request. The outcome must not say "ok"
    with a progress notification standing in for the response the call never got."""
    message = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "slow"}}
    exchange = Exchange(message, Era.MODERN, MODERN_VERSION, "/servers/x/mcp", "127.0.0.1")
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"n": 1}}
    never = asyncio.Event()
    closed: list[bool] = []

    async def rest() -> AsyncGenerator[JSON, None]:
        try:
            yield {**progress, "params": {"n": 2}}
            await never.wait()  # the upstream's response has not come
            yield {"jsonrpc": "2.0", "id": 3, "result": {"content": []}}
        finally:
            closed.append(True)

    sent: list[Message] = []
    second_event = asyncio.Event()

    async def send(event: Message) -> None:
        sent.append(event)
        if b"notifications/progress" in event.get("body", b"") and b'"n":2' in event["body"]:
            second_event.set()

    async def receive() -> Message:
        await second_event.wait()  # the client reads both notifications, then goes
        return {"type": "http.disconnect"}

    ended = Ended()
    async with asyncio.timeout(5):
        await deliver(send, receive, exchange, Answer(progress, rest()), ended, 0.2)
    assert closed == [True]  # the upstream answer was let go
    assert ended.reply is None or "method" not in ended.reply, ended.reply
    assert outcome_of(False, ended.reply, ended.failure) != "ok"


async def test_closing_a_stream_lets_the_upstream_call_go_at_once() -> None:
    """2026-07-28: the client closing the stream cancels the request then, not once the
    keepalive interval (30 s here) has passed twice with the upstream call still running."""
    message = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "slow"}}
    exchange = Exchange(message, Era.MODERN, MODERN_VERSION, "/servers/x/mcp", "127.0.0.1")
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"n": 1}}
    never, started = asyncio.Event(), asyncio.Event()
    closed: list[bool] = []

    async def rest() -> AsyncGenerator[JSON, None]:
        try:
            started.set()
            await never.wait()  # the upstream's response has not come
            yield {"jsonrpc": "2.0", "id": 4, "result": {"content": []}}
        finally:
            closed.append(True)

    async def send(event: Message) -> None:
        pass

    async def receive() -> Message:
        await started.wait()  # the call is under way upstream; the client goes
        return {"type": "http.disconnect"}

    ended = Ended()
    async with asyncio.timeout(2):
        await deliver(send, receive, exchange, Answer(progress, rest()), ended, 30.0)
    assert closed == [True]
    assert ended.failure is not None
