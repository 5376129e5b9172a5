"""One legacy client session as a replica holds it: its owner, upstream channels, streams
kept for resumption, the server requests it relays, and the tasks it owns.

`SessionStore` (session.py) keeps these; with shared state, a replica that did not open a
session rebuilds one from its record, joined to the same upstream sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from bastion.errors import SessionNotFound
from bastion.pipeline.buffer import GONE, SharedEvents, Stream
from bastion.types import JSON, Principal
from bastion.upstream.base import Channel
from bastion.upstream.http import LegacyHttpChannel

__all__ = [
    "ClientSession",
    "CloseCredentials",
]

log = logging.getLogger("bastion.session")

_MAX_PENDING_SERVER_REQUESTS = 1024
_CLOSE_SECONDS = 5.0  # to end one upstream session: its credential, then its DELETE

# The credential headers that end a principal's session with an upstream.
CloseCredentials = Callable[[Principal, str], Awaitable[Mapping[str, str]]]


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
    shared: SharedEvents | None = None  # its events stored for every replica
    refreshed: float = field(default_factory=time.monotonic)  # its shared expiry restarted
    recorded: dict[str, JSON] = field(default_factory=dict)  # upstream sessions as stored
    unsaved: dict[str, tuple[str, Any]] = field(default_factory=dict)  # server requests
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _open_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.streams["0"] = Stream("0", self.keep_events, self.shared)  # the GET stream

    def share(self, shared: SharedEvents, counter_start: int = 1) -> None:
        """Store the session's events for every replica from now on; `counter_start` keeps
        this replica's ids for server requests apart from another replica's."""
        self.shared = shared
        for stream in self.streams.values():
            stream.shared = shared
        self._counter = itertools.count(counter_start)

    def new_stream(self) -> Stream:
        """A stream for one POST's SSE answer (kept in this process only)."""
        return self._keep(Stream(str(next(self._counter)), self.keep_events))

    async def open_stream(self) -> Stream:
        """A stream for one POST's SSE answer; with shared events, numbered by the store so
        ids never collide whichever replica opens it. Raises SessionNotFound when the
        session was ended elsewhere, StateUnavailable when the store is out of reach."""
        if self.shared is None:
            return self.new_stream()
        number = await self.shared.records.next_stream(self.shared.session_hash)
        if number <= 0:
            raise SessionNotFound(GONE)
        return self._keep(Stream(str(number), self.keep_events, self.shared))

    def _keep(self, stream: Stream) -> Stream:
        """Keep a new stream; the oldest finished ones are forgotten."""
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
        if self.shared is not None:  # saved before the client can see it (`save_requests`)
            self.unsaved[gateway_id] = (upstream, message["id"])
        out = dict(message)
        out["id"] = gateway_id
        return out

    async def save_requests(self) -> None:
        """With shared events: store the server requests mapped since last saved, so the
        replica the client's answer lands on finds whose they are. Called before the event
        carrying them is stored (and so before any client is sent it)."""
        if self.shared is None or not self.unsaved:
            return
        fields = {f"request:{gid}": orjson.dumps(mapped) for gid, mapped in self.unsaved.items()}
        self.unsaved.clear()
        await self.shared.records.put(self.shared.session_hash, fields)

    async def save_listened(self, upstream: str) -> None:
        """With shared events: store where the upstream's GET stream got to, so a replica
        that takes the session over resumes it from there (called once the event it sent
        is stored: a replica dying between the two repeats that event, never loses one)."""
        channel = self.channels.get(upstream)
        if self.shared is None or not isinstance(channel, LegacyHttpChannel):
            return
        if channel.listened is not None:
            fields = {f"listen:{upstream}": channel.listened.encode()}
            await self.shared.records.put(self.shared.session_hash, fields)

    async def take_request(self, gateway_id: str) -> tuple[str, Any] | None:
        """Whose server request `gateway_id` was, once: mapped here, or (with shared events)
        by whichever replica relayed it."""
        mapped = self.server_requests.pop(gateway_id, None)
        if self.shared is None:
            return mapped
        self.unsaved.pop(gateway_id, None)
        stored = await self.shared.records.take(self.shared.session_hash, f"request:{gateway_id}")
        if mapped is None and stored is not None:
            upstream, upstream_id = orjson.loads(stored)
            mapped = (str(upstream), upstream_id)
        return mapped

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

    def busy(self) -> bool:
        """Whether a client is reading one of the session's streams or an answer is still
        arriving: such a session is in use, however long ago its last request came."""
        return any(s.attached or (s.id != "0" and not s.closed) for s in self.streams.values())

    def attachments(self) -> dict[str, JSON]:
        """The upstream sessions another replica can join, by upstream (those opened)."""
        found: dict[str, JSON] = {}
        for name, channel in self.channels.items():
            if isinstance(channel, LegacyHttpChannel):
                attachment = channel.attachment()
                if attachment is not None:
                    found[name] = attachment
        return found

    async def detach(self) -> None:
        """Let go of the session here only: its tasks and streams stop, its upstream sessions
        stay open (another replica serves it, or ended them)."""
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for stream in self.streams.values():
            stream.close()

    async def close(self, credentials: CloseCredentials | None = None) -> None:
        """Cancel the session's tasks and end its upstream sessions, each with the credential
        `credentials` gives for its upstream (an upstream that checks every request would
        refuse the DELETE without one, and keep the session)."""
        await self.detach()
        channels = list(self.channels.items())
        await asyncio.gather(*(self._end(name, ch, credentials) for name, ch in channels))

    async def _end(
        self, upstream: str, channel: Channel, credentials: CloseCredentials | None
    ) -> None:
        """End one upstream session, best effort and bounded in time."""
        try:
            async with asyncio.timeout(_CLOSE_SECONDS):
                headers = await credentials(self.principal, upstream) if credentials else {}
                await channel.close(headers)
        except Exception as exc:  # the upstream may be gone; ending the client's session goes on
            log.info("upstream %r: ending its session failed: %r", upstream, exc)
