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
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from bastion.errors import BastionError, SessionNotFound
from bastion.pipeline.buffer import GONE, SharedEvents, Stream
from bastion.types import JSON, Principal
from bastion.upstream.base import Channel
from bastion.upstream.http import LegacyHttpChannel

__all__ = [
    "MAX_PENDING_SERVER_REQUESTS",
    "ClientSession",
    "FOLLOW_SECONDS",
    "CloseCredentials",
    "Follow",
    "Join",
    "Listener",
    "Record",
    "upstream_session",
]

log = logging.getLogger("bastion.session")

# Server requests (and the gateway's own) awaiting the client's answer, per session: past
# this, the oldest is dropped (its answer then finds nothing pending), in this process and in
# the shared state alike, so an upstream that asks endlessly grows neither.
MAX_PENDING_SERVER_REQUESTS = 1024
_CLOSE_SECONDS = 5.0  # to end one upstream session: its credential, then its DELETE
# With shared state, how often a replica serving the session's GET stream looks for upstream
# sessions other replicas opened or reopened (one read of the record), to relay their streams.
FOLLOW_SECONDS = 1.0

# The credential headers that end a principal's session with an upstream.
CloseCredentials = Callable[[Principal, str], Awaitable[Mapping[str, str]]]
# With shared state: the upstream session another replica recorded for this client session,
# joined (None when none is recorded).
Join = Callable[[str], Awaitable[Channel | None]]
# With shared state: record an upstream session a channel opened, by compare-and-set
# (upstream, the upstream session id it replaces, the new one as `attachment()` gives it) →
# None when recorded, else the one another replica recorded first and where its stream got to.
Record = Callable[[str, str | None, JSON], Awaitable[tuple[JSON, str | None] | None]]
# With shared state: join the upstream sessions recorded for these upstreams that this replica
# does not use yet (another replica opened or reopened them).
Follow = Callable[[Sequence[str]], Awaitable[None]]
# Relays an upstream's own stream (legacy GET) into the session's standalone stream.
Listener = Callable[[str], Coroutine[Any, Any, None]]


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
    unsaved: dict[str, tuple[str, Any]] = field(default_factory=dict)  # server requests
    # With shared state, once its initialize has run (`SharedUpstreams.bind`).
    join: Join | None = None
    record: Record | None = None
    follow: Follow | None = None
    listener: Listener | None = None  # once a client opened its GET stream
    # Upstream → the upstream session whose stream is relayed, and the task relaying it.
    heard: dict[str, tuple[str | None, asyncio.Task[None]]] = field(default_factory=dict)
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

    async def channel(self, upstream: str, create: Callable[[], Awaitable[Channel]]) -> Channel:
        """The session's channel to an upstream: the one held here; else (with shared state)
        one joined to the upstream session another replica recorded; else a new one from
        `create`. A channel held here that has not opened its upstream session yet is
        replaced by a joined one too: whichever replica opens an upstream session first,
        every replica uses that one, never a second of its own."""
        channel = self.channels.get(upstream)
        if channel is not None and self._settled(channel):
            return channel
        async with self._open_lock:
            channel = self.channels.get(upstream)
            if channel is None or not self._settled(channel):
                joined = await self.join(upstream) if self.join is not None else None
                if joined is not None:
                    channel = joined
                elif channel is None:
                    channel = await create()
                self.hold(upstream, channel)
            return channel

    def hold(self, upstream: str, channel: Channel) -> None:
        """Use `channel` to reach `upstream`; with shared state, an upstream session it opens
        is recorded for every replica, or replaced by the one another replica recorded."""
        self.channels[upstream] = channel
        record = self.record
        if record is not None and isinstance(channel, LegacyHttpChannel):
            channel.claim = lambda replaced, opened: record(upstream, replaced, opened)

    def _settled(self, channel: Channel) -> bool:
        """Whether a channel held here is the one to use: always in one process; with
        shared state, once it has opened its upstream session (or has none to share)."""
        return self.join is None or _opened(channel)

    def hear(self) -> None:
        """Once a client opened the GET stream: relay the own stream of every upstream whose
        session is open and not relayed yet: one opened or joined since, too, and one whose
        upstream session changed (reopened, or another replica's adopted), whose old relay
        stops."""
        if self.listener is None:
            return
        for upstream, channel in list(self.channels.items()):
            if not _opened(channel):
                continue
            relayed = upstream_session(channel)
            held = self.heard.get(upstream)
            if held is not None and held[0] == relayed:
                continue
            if held is not None:
                held[1].cancel()
            self.heard[upstream] = (relayed, self.spawn(self.listener(upstream)))

    def watch(self, upstreams: Sequence[str]) -> None:
        """With shared state, while the session's GET stream is served here: join, now and
        then, what other replicas opened or reopened with `upstreams`, and relay it."""
        if self.follow is not None:
            self.spawn(self._follow(self.follow, upstreams))

    async def _follow(self, follow: Follow, upstreams: Sequence[str]) -> None:
        while True:
            await asyncio.sleep(FOLLOW_SECONDS)  # a polling period: another replica's record
            if not self.streams["0"].attached:
                continue  # no client reads the stream here now: no read of the record either
            try:
                await follow(upstreams)
            except BastionError as exc:  # the shared state out of reach: tried again later
                log.info(
                    "session %s…: other replicas' upstream sessions not followed: %s",
                    self.id[:6],
                    exc.message,
                )
            except Exception:  # a record that cannot be read must not end the following
                log.exception("session %s…: other replicas' upstream sessions", self.id[:6])
            self.hear()

    def map_server_request(self, upstream: str, message: JSON) -> JSON:
        """Give a server→client request a gateway id, remembering whose it was."""
        gateway_id = f"bastion-{next(self._counter)}"
        if len(self.server_requests) >= MAX_PENDING_SERVER_REQUESTS:
            # A client that never answers must not grow the session without bound.
            oldest = next(iter(self.server_requests))
            del self.server_requests[oldest]
            self.unsaved.pop(oldest, None)
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
        mapped = {gid: orjson.dumps(m) for gid, m in self.unsaved.items()}
        self.unsaved.clear()
        shared = self.shared
        await shared.records.add_requests(shared.session_hash, mapped, MAX_PENDING_SERVER_REQUESTS)

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
        stored = await self.shared.records.take_request(self.shared.session_hash, gateway_id)
        if mapped is None and stored is not None:
            upstream, upstream_id = orjson.loads(stored)
            mapped = (str(upstream), upstream_id)
        return mapped

    def ask(self) -> tuple[str, asyncio.Future[JSON]]:
        """An id for a request the gateway itself sends the client, and where its answer
        will arrive."""
        gateway_id = f"bastion-ask-{next(self._counter)}"
        if len(self.asks) >= MAX_PENDING_SERVER_REQUESTS:
            # The oldest goes (`popitem` alone would take the newest: insertion order).
            self.asks.pop(next(iter(self.asks))).cancel()
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

    async def close(
        self,
        credentials: CloseCredentials | None = None,
        also: Sequence[tuple[str, Channel]] = (),
    ) -> None:
        """Cancel the session's tasks and end its upstream sessions (and those `also` names:
        joined only to be ended), each with the credential `credentials` gives for its
        upstream (an upstream that checks every request would refuse the DELETE without one,
        and keep the session)."""
        await self.detach()
        channels = [*self.channels.items(), *also]
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


def upstream_session(channel: Channel) -> str | None:
    """The upstream session a channel uses (None for one without sessions of its own)."""
    attachment = channel.attachment() if isinstance(channel, LegacyHttpChannel) else None
    found = attachment.get("session") if attachment is not None else None
    return found if isinstance(found, str) else None


def _opened(channel: Channel) -> bool:
    """Whether a channel's upstream session is open (one without a handshake always is)."""
    return not isinstance(channel, LegacyHttpChannel) or channel.initialized is not None
