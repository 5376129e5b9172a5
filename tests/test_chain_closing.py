"""A streamed upstream answer nobody will read any more is let go at once, not left to the
garbage collector with its connection held.

Driven in process on the real `Pipeline` (over the recording upstreams of test_pipeline): the
upstream's answer is a stream whose generator notes when it is closed, as the SSE reader's
closes its response. Two ways the client's request ends before the stream does:
`Pipeline._upstream` fails after the upstream answered (the session cannot be synced), and a
call held for a person's approval is abandoned while its upstream answer streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

import pytest
from tests.test_pipeline import InProcess

from bastion.errors import StateUnavailable
from bastion.pipeline.client_session import ClientSession
from bastion.pipeline.consent import Ask
from bastion.pipeline.exchange import Exchange
from bastion.types import JSON, MODERN_VERSION, Era, Target
from bastion.upstream.base import Answer

CALL_ID = 7
NOTE = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "asked"}}


class UpstreamStream:
    """One streamed upstream answer: two progress notifications, then the response."""

    def __init__(self) -> None:
        self.released = False

    def _progress(self, step: int) -> JSON:
        params = {"progressToken": "t", "progress": step}
        return {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}

    async def _messages(self) -> AsyncGenerator[JSON, None]:
        try:
            yield self._progress(1)
            yield self._progress(2)
            yield {"jsonrpc": "2.0", "id": CALL_ID, "result": {"content": []}}
        finally:
            self.released = True  # where the SSE reader closes its response

    async def answer(self, *_: Any) -> Answer:
        """The answer as a channel gives it (`answer_from`): the first message read, the
        stream open for the rest."""
        messages = self._messages()
        return Answer(await anext(messages), messages)


def _call(path: InProcess) -> Exchange:
    """An allowed 2026-07-28 tools/call, routed to the workspace upstream."""
    message = {"jsonrpc": "2.0", "id": CALL_ID, "method": "tools/call"}
    message["params"] = {"name": "workspace__send_report", "arguments": {"to": "boss"}}
    exchange = Exchange(message, Era.MODERN, MODERN_VERSION, "default", "127.0.0.1:4000")
    exchange.target = Target("workspace", "send_report")
    return exchange


@pytest.fixture
def path(tmp_path: Path) -> InProcess:
    return InProcess(tmp_path)


def test_a_streamed_answer_is_closed_when_its_session_cannot_be_synced(
    path: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = path.pipeline
    stream = UpstreamStream()
    exchange = _call(path)
    exchange.session = cast("ClientSession", object())  # only handed to the failing sync

    async def unavailable(session: ClientSession) -> None:
        raise StateUnavailable("the shared state store did not answer")

    # Below the dispatcher: its guard wraps the stream in a generator not yet started when
    # the sync fails, and closing that one alone runs none of it (Answer.inner closes it).
    monkeypatch.setattr(pipeline.dispatcher.caller, "call", stream.answer)
    monkeypatch.setattr(pipeline.sessions, "sync", unavailable)

    async def scenario() -> bool:
        async with asyncio.timeout(10):
            with pytest.raises(StateUnavailable):
                await pipeline._upstream(exchange, path.route)
        # Seen before the loop ends: asyncio.run's shutdown closes every generator left open.
        return stream.released

    assert asyncio.run(scenario())


@pytest.mark.parametrize("read", [2, 3], ids=["gone-after-the-first", "gone-mid-stream"])
def test_a_held_calls_upstream_stream_is_closed_when_the_client_goes(
    path: InProcess, monkeypatch: pytest.MonkeyPatch, read: int
) -> None:
    """Gone right after the upstream's first message, no wrapper of its stream has started:
    closing the outermost alone would leave the stream open."""
    pipeline = path.pipeline
    stream = UpstreamStream()
    exchange = _call(path)

    async def approved(exchange: Exchange, ask: Ask) -> AsyncGenerator[JSON, None]:
        yield NOTE  # the person approved meanwhile: ask.refusal stays None

    monkeypatch.setattr(pipeline.approval, "waiting", approved)
    # Below the dispatcher, so its guard, approval's `after` and inspection all wrap the stream.
    monkeypatch.setattr(pipeline.dispatcher.caller, "call", stream.answer)

    async def scenario() -> tuple[list[JSON], bool]:
        async with asyncio.timeout(10):
            messages = pipeline._after_asking(exchange, path.route, Ask(NOTE))
            seen = [await anext(messages) for _ in range(read)]  # the client reads, then goes
            await messages.aclose()
        # Seen before the loop ends: asyncio.run's shutdown closes every generator left open.
        return seen, stream.released

    seen, released = asyncio.run(scenario())
    expected = ["notifications/message", "notifications/progress", "notifications/progress"]
    assert [m.get("method") for m in seen] == expected[:read]
    assert released
