"""Legacy-era client sessions: ownership, upstream channels, streams kept for resumption.

A session belongs to the principal that opened it; anyone else presenting its id is told it does
not exist, exactly as for an unknown id. Sessions are never authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson

from bastion.errors import SessionNotFound
from bastion.types import JSON, Principal
from bastion.upstream.base import Channel

log = logging.getLogger("bastion.session")

_MAX_PENDING_SERVER_REQUESTS = 1024


class Stream:
    """An SSE stream's events, kept so a client can resume with Last-Event-ID."""

    def __init__(self, stream_id: str, keep: int) -> None:
        self.id = stream_id
        self._events: deque[tuple[int, bytes]] = deque(maxlen=max(keep, 1))
        self._seq = 0
        self.closed = False
        self._changed = asyncio.Event()
        self.attached = False

    def append(self, data: bytes) -> None:
        """Add an event."""
        self._seq += 1
        self._events.append((self._seq, data))
        self._changed.set()

    def close(self) -> None:
        """No more events will come."""
        self.closed = True
        self._changed.set()

    def wake(self) -> None:
        """Wake a writer waiting on this stream (its client went away)."""
        self._changed.set()

    def event_id(self, seq: int) -> str:
        """The SSE id of event `seq` (unique across the session's streams)."""
        return f"{self.id}-{seq}"

    def since(self, seq: int) -> list[tuple[int, bytes]]:
        """Events after `seq` that are still kept."""
        return [(s, data) for s, data in self._events if s > seq]

    def final(self) -> JSON | None:
        """The last message of a closed stream (an answer's response); None while open."""
        if not self.closed or not self._events:
            return None
        try:
            message = orjson.loads(self._events[-1][1])
        except orjson.JSONDecodeError:
            return None
        return message if isinstance(message, dict) else None

    @property
    def last(self) -> int:
        """The newest event's sequence number."""
        return self._seq

    async def wait(self, seq: int, limit: float) -> None:
        """Return when an event after `seq` exists, the stream closed, or `limit` seconds passed."""
        while self._seq <= seq and not self.closed:
            self._changed.clear()
            try:
                async with asyncio.timeout(limit):
                    await self._changed.wait()
            except TimeoutError:
                return


@dataclass(eq=False)
class ClientSession:
    """One client's legacy-era session with a route."""

    id: str
    principal: Principal
    route: str
    protocol_version: str
    hello: JSON
    keep_events: int
    channels: dict[str, Channel] = field(default_factory=dict)
    streams: dict[str, Stream] = field(default_factory=dict)
    server_requests: dict[str, tuple[str, Any]] = field(default_factory=dict)
    asks: dict[str, asyncio.Future[JSON]] = field(default_factory=dict)  # the gateway's own
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    initialized: bool = False
    listening: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _open_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.streams["0"] = Stream("0", self.keep_events)  # the standalone GET stream

    def new_stream(self) -> Stream:
        """A stream for one POST's SSE answer; the oldest finished ones are forgotten."""
        stream = Stream(str(next(self._counter)), self.keep_events)
        self.streams[stream.id] = stream
        finished = [k for k, s in self.streams.items() if s.closed and k != "0"]
        for key in finished[: max(0, len(self.streams) - 64)]:
            del self.streams[key]
        return stream

    def map_server_request(self, upstream: str, message: JSON) -> JSON:
        """Give a server→client request a gateway id, remembering whose it was."""
        gateway_id = f"bastion-{next(self._counter)}"
        if len(self.server_requests) >= _MAX_PENDING_SERVER_REQUESTS:
            # A client that never answers must not grow the session without bound.
            del self.server_requests[next(iter(self.server_requests))]
        self.server_requests[gateway_id] = (upstream, message["id"])
        out = dict(message)
        out["id"] = gateway_id
        return out

    def ask(self) -> tuple[str, asyncio.Future[JSON]]:
        """An id for a request the gateway itself sends the client, and where its answer
        will arrive."""
        gateway_id = f"bastion-ask-{next(self._counter)}"
        if len(self.asks) >= _MAX_PENDING_SERVER_REQUESTS:
            _, oldest = self.asks.popitem()
            oldest.cancel()
        future: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self.asks[gateway_id] = future
        return gateway_id, future

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a task the session owns; closing the session cancels it."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel the session's tasks and end its upstream sessions."""
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for stream in self.streams.values():
            stream.close()
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                await channel.close()


def session_hash(session_id: str) -> str:
    """How a session is named outside this process (the registry never sees raw ids)."""
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    """In-memory sessions of one process, bounded in number and idle time."""

    def __init__(self, max_sessions: int, idle_seconds: float) -> None:
        self._sessions: dict[str, ClientSession] = {}
        self._max = max_sessions
        self._idle = idle_seconds

    def __len__(self) -> int:
        return len(self._sessions)

    def all(self) -> list[ClientSession]:
        """Every live session."""
        return list(self._sessions.values())

    def new_id(self) -> str:
        """A fresh session id: 256 random bits, URL-safe, visible ASCII only."""
        return secrets.token_urlsafe(32)

    async def add(self, session: ClientSession) -> None:
        """Keep a session, evicting idle ones first when full."""
        if len(self._sessions) >= self._max:
            await self.expire()
        if len(self._sessions) >= self._max:
            oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
            await self.remove(oldest.id)
        self._sessions[session.id] = session

    def get(self, session_id: str, principal: Principal, route: str) -> ClientSession:
        """The caller's session; someone else's or an unknown id are both 'not found'."""
        session = self._sessions.get(session_id)
        if (
            session is None
            or session.route != route
            or session.principal.binding_key() != principal.binding_key()
        ):
            if session is not None:
                log.warning("session %s… presented by another principal or route", session_id[:6])
            raise SessionNotFound("session not found; send initialize to start a new session")
        session.last_seen = time.monotonic()
        return session

    def owner(self, session_id: str) -> Principal | None:
        """Who opened the session (for the audit trail only: never an answer to a client)."""
        session = self._sessions.get(session_id)
        return session.principal if session is not None else None

    async def remove(self, session_id: str) -> bool:
        """End a session; False when there was none."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        await session.close()
        return True

    async def expire(self) -> int:
        """End sessions idle for longer than the limit; return how many."""
        cutoff = time.monotonic() - self._idle
        stale = [sid for sid, s in self._sessions.items() if s.last_seen < cutoff]
        for sid in stale:
            await self.remove(sid)
        return len(stale)

    async def close(self) -> None:
        """End every session."""
        for sid in list(self._sessions):
            await self.remove(sid)
