"""A legacy session's GET: its standalone stream, or any of its streams resumed from
`Last-Event-ID`, in one process or from the shared state.

```
serve_stream ─┬─► one process   the stream kept here: its events after the client's last,
              │                 then live ones (`write_stream`)
              └─► shared state  what any replica stored of the stream, then live ones, read
                                from the store or followed here (`write_shared`)
```

Both answer a `Last-Event-ID` naming no stream of the session with the same 400, and a second
GET of the standalone stream while one is open with 409. The front has found the session (and
checked that it is the caller's) before any of this runs.
"""

from __future__ import annotations

from collections.abc import Callable

from bastion import sse
from bastion.asgi import Receive, Send
from bastion.errors import InvalidRequest, SessionNotFound, shown
from bastion.pipeline.buffer import GONE
from bastion.pipeline.session import ClientSession
from bastion.transport.delivery import (
    SSE_HEADERS,
    send_plain,
    session_headers,
    write_shared,
    write_stream,
)

__all__ = [
    "GET_OPEN",
    "serve_stream",
]

GET_OPEN = b'{"error":"this session already has an open GET stream"}'
# Digits of an event's number past which it cannot be one (a 64-bit counter has 19); `int`
# refuses more than 4300 (a 500, not a 400), and a number past every event waits for ever.
_MAX_SEQ_DIGITS = 18


async def serve_stream(
    receive: Receive,
    send: Send,
    session: ClientSession,
    last: str | None,
    listen: Callable[[], None],
    keepalive: float,
) -> None:
    """Answer a GET of `session`: the stream `last` (a `Last-Event-ID`) names from the event
    after it, else the standalone stream; `listen` starts relaying the upstreams' own streams
    into the standalone one. Raises InvalidRequest for a `last` naming no stream of the
    session."""
    if session.shared is not None:
        await _serve_shared(receive, send, session, last, listen, keepalive)
        return
    stream, after = session.streams["0"], 0
    if last is not None:
        stream_id, _, seq = last.rpartition("-")
        found = session.streams.get(stream_id)
        if found is None or not _decimal(seq) or len(seq) > _MAX_SEQ_DIGITS:
            raise InvalidRequest(f"Last-Event-ID {shown(last)} names no stream of this session")
        stream, after = found, int(seq)
        if after > stream.last:  # no event it will send comes after it: a wait for ever
            raise InvalidRequest(f"Last-Event-ID {shown(last)} names an event never sent")
    elif stream.attached:
        await send_plain(send, 409, GET_OPEN)
        return
    stream.attached = True
    if stream.id == "0":
        listen()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": SSE_HEADERS + session_headers(session),
        }
    )
    await send(
        {
            "type": "http.response.body",
            "body": sse.encode_priming(stream.event_id(after)),
            "more_body": True,
        }
    )
    await write_stream(send, stream, after, receive, keepalive)


async def _serve_shared(
    receive: Receive,
    send: Send,
    session: ClientSession,
    last: str | None,
    listen: Callable[[], None],
    keepalive: float,
) -> None:
    """A GET of a session every replica may serve: what any replica stored of the named
    stream (the standalone one without Last-Event-ID) is replayed, then live events."""
    assert session.shared is not None  # noqa: S101 - only for shared sessions
    stream_id, after = "0", 0
    if last is not None:
        stream_id, _, seq = last.rpartition("-")
        if not _decimal(stream_id) or not _decimal(seq) or len(seq) > _MAX_SEQ_DIGITS:
            raise InvalidRequest(f"Last-Event-ID {shown(last)} names no stream of this session")
        after = int(seq)
    # Read before answering: with the shared state out of reach the GET is refused (503).
    replay = await session.shared.replay(stream_id, after)
    if replay is None and stream_id == "0":
        raise SessionNotFound(GONE)  # ended on another replica since it was found
    if replay is None:  # as one process answers a stream it does not hold
        raise InvalidRequest(f"Last-Event-ID {shown(last)} names no stream of this session")
    if not replay[0] and await _past_newest(session, stream_id, after):
        raise InvalidRequest(f"Last-Event-ID {shown(last)} names an event never sent")
    local = session.streams.get(stream_id)
    if stream_id == "0" and local is not None:
        if last is None and local.attached:
            await send_plain(send, 409, GET_OPEN)
            return
        local.attached = True
        listen()  # this replica feeds the stream now, whichever started it
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": SSE_HEADERS + session_headers(session),
        }
    )
    priming = sse.encode_priming(f"{stream_id}-{after}")
    await send({"type": "http.response.body", "body": priming, "more_body": True})
    await write_shared(send, session.shared, stream_id, replay, after, local, receive, keepalive)


async def _past_newest(session: ClientSession, stream_id: str, after: int) -> bool:
    """Whether event `after` is past every event any replica stored of the stream (only
    asked when none came after it): no event it will send comes after it either."""
    assert session.shared is not None  # noqa: S101 - only for shared sessions
    if after == 0:
        return False
    name = f"seq:{stream_id}"
    found = await session.shared.records.fields(session.shared.session_hash, [name])
    newest = found.get(name, b"0")
    return not newest.isdigit() or after > int(newest)


def _decimal(text: str) -> bool:
    """Whether a part of Last-Event-ID is a plain number: ASCII digits only (`isdigit` alone
    admits the Latin-1 superscripts '²³¹', which `int` refuses: a 500, not a 400)."""
    return text.isascii() and text.isdigit()
