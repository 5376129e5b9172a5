"""Delivering an answer to the client: one message as a JSON body, more as an SSE stream.

```
deliver ─┬─► one message      JSON body (in 2026-07-28 with the upstream's HTTP status)
         ├─► more, stateless  SSE from a stream pumped while the client reads; closing it
         │                    cancels the request
         └─► more, session    SSE from a stream the session owns (the answer survives a
                              dropped connection; resumable with Last-Event-ID)
write_stream                  a kept stream's events, live, keepalives, until it closes or
                              the client goes (also the legacy GET stream)
```

`Watched` and `Ended` let the front tell the pipeline how the delivery of a recorded call
ended, whatever happened on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import orjson

from bastion import rpc, sse
from bastion.asgi import Message, Receive, Send
from bastion.errors import BastionError, MethodNotFound, UpstreamError
from bastion.methods import SUBSCRIPTIONS_LISTEN
from bastion.pipeline.buffer import SharedEvents, Stream
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.session import ClientSession
from bastion.types import JSON, UPSTREAM_STATUS, Era
from bastion.upstream.base import Answer

__all__ = [
    "JSON_HEADERS",
    "SSE_HEADERS",
    "Ended",
    "Watched",
    "deliver",
    "deliver_failure",
    "encode",
    "pump",
    "send_error",
    "send_json",
    "send_plain",
    "session_headers",
    "write_shared",
    "write_stream",
]

log = logging.getLogger("bastion.transport")

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]
# How often a stream another replica feeds is read again from the shared state.
_POLL_SECONDS = 0.25
_ANSWER_FAILED = "the gateway failed while answering; its log has the details"
_RELAY_FAILED = "the gateway failed while relaying this answer; its log has the details"
_CUT_OFF = "the stream ended before the response: the client closed it or the call was cut off"


@dataclass(slots=True)
class Ended:
    """How a recorded call ended: the response sent (or meant to be), and why the gateway
    could not answer as it meant to."""

    reply: JSON | None = None
    failure: str | None = None


class Watched:
    """A send that remembers whether the response started and whether its body ended."""

    __slots__ = ("_send", "ended", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.ended = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif not message.get("more_body", False):
            self.ended = True
        await self._send(message)


async def deliver(
    send: Send,
    receive: Receive,
    exchange: Exchange,
    answer: Answer,
    ended: Ended,
    keepalive: float,
) -> None:
    """One message answers with a JSON body; more (notifications first) with an SSE stream.
    `ended.reply` is the response message, or None when the stream ended before it (the
    client went away while a legacy session's answer goes on)."""
    session = exchange.session
    extra = session_headers(session) if session is not None else []
    first = answer.first
    if answer.rest is None:
        status = _status(first.pop(UPSTREAM_STATUS, 200))
        error = first.get("error")
        if isinstance(error, dict) and error.get("code") == MethodNotFound.rpc_code:
            status = 404
        ended.reply = first
        await send_json(send, status if exchange.era is Era.MODERN else 200, encode(first), extra)
        return
    if session is None:
        # 2026-07-28: no resumption; the client closing the stream cancels the request.
        stream = Stream("", keep=4096)
        stream.append(encode(first))
        pumping = asyncio.create_task(pump(answer.rest, stream, exchange.id))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await write_stream(send, stream, 0, receive, keepalive, ids=False)
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumping
            with contextlib.suppress(Exception):  # a pump cancelled before it ran closed nothing
                await answer.close()
        _end(ended, stream, exchange.method != SUBSCRIPTIONS_LISTEN)
        return
    # Legacy: the session owns the pump, so the answer survives a dropped connection and
    # the client can resume it with Last-Event-ID (on any replica, with shared state: each
    # event is stored there before the client is sent it).
    try:
        stream = await session.open_stream()
        await session.save_requests()
        await stream.put(encode(first))
    except BaseException:
        await answer.close()
        raise
    session.spawn(pump(answer.rest, stream, exchange.id, session))
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + extra})
    if session.protocol_version >= "2025-11-25":
        priming = sse.encode_priming(stream.event_id(0))
        await send({"type": "http.response.body", "body": priming, "more_body": True})
    await write_stream(send, stream, 0, receive, keepalive)
    _end(ended, stream, stream.closed)


def _end(ended: Ended, stream: Stream, answer_due: bool) -> None:
    """How a streamed answer ended: its response (never a notification or request standing
    in for it), else, when one was due, why there is none (the call was cut off)."""
    final = stream.final()
    ended.reply = final if final is not None and "method" not in final else None
    if ended.reply is None and answer_due:
        ended.failure = _CUT_OFF


async def deliver_failure(
    exc: Exception,
    send: Watched,
    exchange: Exchange,
    extra: list[tuple[bytes, bytes]],
    ended: Ended,
) -> None:
    """A call that broke instead of answering: answered with a JSON-RPC error while the
    response has not started (the connection then serves its next request), else its
    body is ended. Either way the outcome record says what happened."""
    if isinstance(exc, BastionError):
        error, status = exc, exc.http_status
    else:
        log.exception("answering request %s failed", exchange.request_id)
        # A JSON-RPC error about one call travels with HTTP 200, as upstream errors do.
        error, status = BastionError(_ANSWER_FAILED), 200
    ended.failure = error.message
    if send.started:
        if not send.ended:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    ended.reply = rpc.error(exchange.id, error)
    await send_json(send, status, rpc.dumps(ended.reply), extra)


async def write_stream(
    send: Send,
    stream: Stream,
    after: int,
    receive: Receive,
    keepalive: float,
    *,
    ids: bool = True,
) -> None:
    """Write a kept stream's events after `after`, live, until it closes or the client goes;
    a comment every `keepalive` seconds of silence."""
    seq = after
    gone = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(receive, gone, stream))
    try:
        while not gone.is_set():
            for number, data in stream.since(seq):
                event_id = stream.event_id(number) if ids else None
                await send(
                    {
                        "type": "http.response.body",
                        "body": sse.encode(data, event_id),
                        "more_body": True,
                    }
                )
                seq = number
            if stream.closed and seq >= stream.last:
                break
            if gone.is_set():  # went while events were written: no wake-up comes after
                break
            before = stream.last
            await stream.wait(seq, keepalive)
            if stream.last == before and not stream.closed and not gone.is_set():
                await send({"type": "http.response.body", "body": sse.KEEPALIVE, "more_body": True})
    except OSError:
        pass
    finally:
        stream.attached = False
        watcher.cancel()
    with contextlib.suppress(OSError):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def pump(
    replies: AsyncGenerator[JSON, None],
    stream: Stream,
    id_: Any,
    session: ClientSession | None = None,
) -> None:
    """Move an upstream answer into a kept stream, whether or not a client is reading; a
    failure on the way ends the stream with an error response rather than none. A server
    request on the way is saved for every replica before the client can see it."""
    try:
        async for message in replies:
            message.pop(UPSTREAM_STATUS, None)
            if session is not None:
                await session.save_requests()
            await stream.put(encode(message))
    except BastionError as exc:
        await _last_word(stream, rpc.dumps(rpc.error(id_, exc)))
    except Exception:
        log.exception("relaying a streamed answer failed")
        await _last_word(stream, rpc.dumps(rpc.error(id_, BastionError(_RELAY_FAILED))))
    finally:
        await replies.aclose()
        await stream.end()


async def _last_word(stream: Stream, data: bytes) -> None:
    """The error response ending a broken stream: stored for every replica when it can be,
    else at least sent by this one (the shared state may be what broke)."""
    try:
        await stream.put(data)
    except BastionError:
        stream.append(data)


async def write_shared(
    send: Send,
    shared: SharedEvents,
    stream_id: str,
    replay: tuple[list[tuple[int, bytes]], bool],
    after: int,
    local: Stream | None,
    receive: Receive,
    keepalive: float,
) -> None:
    """Resume a session's stream from the shared state: `replay` (the events after `after`
    that any replica stored, and whether the stream closed, as `shared.since` read them),
    then live ones until it closes or the client goes. A POST's stream this replica pumps is
    followed here; the standalone stream (any replica listening upstream may feed it) and a
    stream another replica pumps are read from the store, at once when this replica added
    to it, else every `_POLL_SECONDS`."""
    events, closed = replay
    after = await _send_events(send, stream_id, events, after)
    if local is not None and stream_id != "0":
        await write_stream(send, local, after, receive, keepalive)
        return
    woken = local if local is not None else Stream("", 1)
    gone = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(receive, gone, woken))
    loop = asyncio.get_running_loop()
    spoke, mark = loop.time(), woken.last
    try:
        while not closed and not gone.is_set() and not woken.closed:
            await woken.wait(mark, _POLL_SECONDS)
            mark = woken.last  # what the read below covers of this replica's own events
            events, closed = await shared.since(stream_id, after)
            if events:
                after = await _send_events(send, stream_id, events, after)
                spoke = loop.time()
            elif loop.time() - spoke >= keepalive and not gone.is_set():
                await send({"type": "http.response.body", "body": sse.KEEPALIVE, "more_body": True})
                spoke = loop.time()
    except (OSError, BastionError):
        pass  # the client went, or the shared state did: the client resumes later
    finally:
        woken.attached = False
        watcher.cancel()
    with contextlib.suppress(OSError):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_events(
    send: Send, stream_id: str, events: list[tuple[int, bytes]], after: int
) -> int:
    """Send stored events of a stream; the number of the last one sent (else `after`)."""
    for number, data in events:
        body = sse.encode(data, f"{stream_id}-{number}")
        await send({"type": "http.response.body", "body": body, "more_body": True})
        after = number
    return after


def encode(message: JSON) -> bytes:
    """A message from upstream as the client gets it; one that cannot be encoded again (JSON
    nested deeper than the encoder goes) is the upstream's failure, not the gateway's."""
    try:
        return rpc.dumps(message)
    except TypeError:
        raise UpstreamError(
            "the upstream's answer cannot be relayed: it is JSON nested too deeply to encode"
        ) from None


def session_headers(session: ClientSession) -> list[tuple[bytes, bytes]]:
    """The Mcp-Session-Id response header."""
    return [(b"mcp-session-id", session.id.encode())]


async def send_json(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    """A whole JSON response: status, headers (with its length and `extra`), body."""
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_plain(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A whole response of the gateway's own (JSON when there is a body)."""
    headers = (JSON_HEADERS if body else []) + (extra or [])
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    exc: BastionError,
    id_: Any,
    *,
    status: int | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A JSON-RPC error response (with the error's HTTP status unless `status`)."""
    body = orjson.dumps(rpc.error(id_, exc))
    await send_json(send, status or exc.http_status, body, extra or [])


def _status(value: Any) -> int:
    """The HTTP status an upstream's error came with, when it is one a response may carry."""
    return value if isinstance(value, int) and 200 <= value <= 599 else 200


async def _watch_disconnect(receive: Receive, gone: asyncio.Event, stream: Stream) -> None:
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            gone.set()
            stream.wake()
            return
