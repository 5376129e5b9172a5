"""SSE event buffers of legacy sessions, kept so a client can resume with Last-Event-ID.

One process keeps a stream's newest events in memory. With shared state, every event is also
stored for every replica (`SharedEvents`) *before* any client is sent it, numbered by the
session's counter in the store, so a client resuming on another replica is replayed exactly
what it missed, and numbers never collide whichever replica produced them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

import orjson

from bastion.errors import SessionNotFound
from bastion.state.sessions import SessionRecords
from bastion.types import JSON

__all__ = [
    "GONE",
    "SharedEvents",
    "Stream",
]

GONE = "session not found; send initialize to start a new session"


@dataclass(frozen=True, slots=True)
class SharedEvents:
    """Where a session's stream events are stored for every replica."""

    records: SessionRecords
    session_hash: str
    keep: int

    async def since(self, stream: str, seq: int) -> tuple[list[tuple[int, bytes]], bool]:
        """A stream's stored events after `seq`, and whether it closed."""
        return await self.records.since(self.session_hash, stream, seq)

    async def replay(self, stream: str, seq: int) -> tuple[list[tuple[int, bytes]], bool] | None:
        """As `since`, for a client resuming the stream: None when the session has no such
        stream (or is gone)."""
        return await self.records.replay(self.session_hash, stream, seq)


class Stream:
    """An SSE stream's events, kept so a client can resume with Last-Event-ID."""

    def __init__(self, stream_id: str, keep: int, shared: SharedEvents | None = None) -> None:
        self.id = stream_id
        self._events: deque[tuple[int, bytes]] = deque(maxlen=max(keep, 1))
        self._seq = 0
        self.closed = False
        self._changed = asyncio.Event()
        self.attached = False
        self.shared = shared
        self._order = asyncio.Lock()  # numbered in the store and kept here in the same order

    def append(self, data: bytes) -> None:
        """Add an event here only (a stream no other replica can resume)."""
        self._push(self._seq + 1, data)

    async def put(self, data: bytes) -> None:
        """Add an event: with shared events, stored for every replica first (raises
        StateUnavailable when it cannot be, SessionNotFound when the session ended)."""
        if self.shared is None:
            self.append(data)
            return
        async with self._order:
            shared = self.shared
            seq = await shared.records.append(shared.session_hash, self.id, data, shared.keep)
            if seq <= 0:
                raise SessionNotFound(GONE)
            self._push(seq, data)

    def _push(self, seq: int, data: bytes) -> None:
        self._seq = seq
        self._events.append((seq, data))
        self._changed.set()

    def close(self) -> None:
        """No more events will come."""
        self.closed = True
        self._changed.set()

    async def end(self) -> None:
        """No more events will come; other replicas are told so too (best effort: a closed
        mark that cannot be stored leaves a resuming client waiting for the session's end)."""
        self.close()
        if self.shared is not None:
            try:
                await self.shared.records.end_stream(self.shared.session_hash, self.id)
            except Exception:  # noqa: BLE001, S110 - the stream is over here either way
                pass

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
        """Return when an event after `seq` exists, the stream closed, it was woken (its
        client went away), or `limit` seconds passed."""
        if self._seq > seq or self.closed:
            return
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self._changed.wait()
