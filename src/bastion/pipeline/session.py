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
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from bastion.config import Limits
from bastion.errors import SessionNotFound, SessionQuotaExceeded
from bastion.types import JSON, Principal
from bastion.upstream.base import Channel

log = logging.getLogger("bastion.session")

_MAX_PENDING_SERVER_REQUESTS = 1024
_CLOSE_SECONDS = 5.0  # to end one upstream session: its credential, then its DELETE

# The credential headers that end a principal's session with an upstream.
CloseCredentials = Callable[[Principal, str], Awaitable[Mapping[str, str]]]


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

    def busy(self) -> bool:
        """Whether a client is reading one of the session's streams or an answer is still
        arriving: such a session is in use, however long ago its last request came."""
        return any(s.attached or (s.id != "0" and not s.closed) for s in self.streams.values())

    async def close(self, credentials: CloseCredentials | None = None) -> None:
        """Cancel the session's tasks and end its upstream sessions, each with the credential
        `credentials` gives for its upstream (an upstream that checks every request would
        refuse the DELETE without one, and keep the session)."""
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for stream in self.streams.values():
            stream.close()
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


def session_hash(session_id: str) -> str:
    """How a session is named outside this process (the registry never sees raw ids)."""
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    """In-memory sessions of one process, bounded in idle time and in number: in all
    (`limits.max_sessions`), per agent and per tenant.

    One principal never pushes out another: at a bound, only the asker's own sessions that
    have been idle for `limits.session_reclaim_seconds` (and have no stream open) are ended to
    make room; otherwise the new session is refused with `SessionQuotaExceeded`.
    """

    def __init__(self, limits: Limits, credentials: CloseCredentials | None = None) -> None:
        self._sessions: dict[str, ClientSession] = {}
        self._limits = limits
        self._credentials = credentials
        self._per_agent: Counter[tuple[str, str]] = Counter()
        self._per_tenant: Counter[str] = Counter()
        # Each principal's sessions (by binding key), where room for its next one comes from.
        self._owned: dict[tuple[str, str, str | None, str | None], dict[str, ClientSession]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def all(self) -> list[ClientSession]:
        """Every live session."""
        return list(self._sessions.values())

    def new_id(self) -> str:
        """A fresh session id: 256 random bits, URL-safe, visible ASCII only, never starting
        with `-` (a command line would take it for an option: `bastion sessions kill ID`)."""
        while True:
            found = secrets.token_urlsafe(32)
            if not found.startswith("-"):
                return found

    async def open(self, session: ClientSession) -> SessionQuotaExceeded | None:
        """Keep a new session if its principal's quotas allow, ending the principal's own idle
        sessions to make room; else keep nothing and return the quota that refuses it.

        The check and the insertion happen with no await between them, so concurrent opens
        cannot together pass a quota.
        """
        now = time.monotonic()
        ended = self._take_idle(now) if len(self._sessions) >= self._limits.max_sessions else []
        refusal = self._make_room(session.principal, now, ended)
        if refusal is None:
            self._put(session)
        for old in ended:
            await old.close(self._credentials)
        return refusal

    async def add(self, session: ClientSession) -> None:
        """Keep a new session (as `open`); raises SessionQuotaExceeded over a quota."""
        refusal = await self.open(session)
        if refusal is not None:
            raise refusal

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
        """End a session and its upstream sessions; False when there was none."""
        session = self._take(session_id)
        if session is None:
            return False
        await session.close(self._credentials)
        return True

    async def discard(self, session: ClientSession) -> None:
        """End a session whether or not it was kept (an initialize that failed half-way)."""
        self._take(session.id)
        await session.close(self._credentials)

    async def expire(self) -> int:
        """End sessions idle for longer than the limit; return how many."""
        stale = self._take_idle(time.monotonic())
        for session in stale:
            await session.close(self._credentials)
        return len(stale)

    async def close(self) -> None:
        """End every session."""
        for sid in list(self._sessions):
            await self.remove(sid)

    # -- quotas -----------------------------------------------------------------------------

    def _make_room(
        self, principal: Principal, now: float, ended: list[ClientSession]
    ) -> SessionQuotaExceeded | None:
        """Take the principal's own reclaimable sessions out until it is within every quota
        (adding them to `ended`); the quota still passed when none is left to take."""
        while (refusal := self._over(principal)) is not None:
            victim = self._reclaimable(principal, now)
            if victim is None:
                log.info("session refused: %s", refusal.message)
                return refusal
            log.info(
                "ending an idle session of agent %r (tenant %r) to make room for its new one",
                principal.agent,
                principal.tenant,
            )
            self._take(victim.id)
            ended.append(victim)
        return None

    def _over(self, principal: Principal) -> SessionQuotaExceeded | None:
        """The first quota one more session of `principal` would pass, or None."""
        limits = self._limits
        agent, tenant = principal.agent, principal.tenant
        held = self._per_agent[(tenant, agent)]
        if held >= limits.max_sessions_per_agent:
            return SessionQuotaExceeded(
                "agent",
                limits.max_sessions_per_agent,
                f"session quota reached: agent {agent!r} of tenant {tenant!r} has {held} open "
                f"sessions, the most limits.max_sessions_per_agent allows; end one (HTTP "
                f"DELETE) or retry once one has been idle for "
                f"{limits.session_reclaim_seconds:g} s",
            )
        held = self._per_tenant[tenant]
        if held >= limits.max_sessions_per_tenant:
            return SessionQuotaExceeded(
                "tenant",
                limits.max_sessions_per_tenant,
                f"session quota reached: tenant {tenant!r} has {held} open sessions, the most "
                "limits.max_sessions_per_tenant allows; end one (HTTP DELETE) and retry",
            )
        if len(self._sessions) >= limits.max_sessions:
            return SessionQuotaExceeded(
                "gateway",
                limits.max_sessions,
                f"session limit reached: the gateway holds {len(self._sessions)} sessions, "
                "the most limits.max_sessions allows, and none of yours is idle enough to "
                "end for a new one; retry later",
            )
        return None

    def _reclaimable(self, principal: Principal, now: float) -> ClientSession | None:
        """The principal's own least recently used session that may be ended for its next
        one: idle for `session_reclaim_seconds` and with no stream open."""
        cutoff = now - self._limits.session_reclaim_seconds
        owned = self._owned.get(principal.binding_key(), {})
        idle = [s for s in owned.values() if s.last_seen <= cutoff and not s.busy()]
        return min(idle, key=lambda s: s.last_seen, default=None)

    def _take_idle(self, now: float) -> list[ClientSession]:
        """Take out every session idle for longer than `session_idle_seconds`."""
        cutoff = now - self._limits.session_idle_seconds
        stale = [sid for sid, s in self._sessions.items() if s.last_seen < cutoff]
        return [s for sid in stale if (s := self._take(sid)) is not None]

    def _put(self, session: ClientSession) -> None:
        principal = session.principal
        self._sessions[session.id] = session
        self._per_agent[(principal.tenant, principal.agent)] += 1
        self._per_tenant[principal.tenant] += 1
        self._owned.setdefault(principal.binding_key(), {})[session.id] = session

    def _take(self, session_id: str) -> ClientSession | None:
        """Take a session out of the store (and its counts); ending it is the caller's."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        principal = session.principal
        _decrement(self._per_agent, (principal.tenant, principal.agent))
        _decrement(self._per_tenant, principal.tenant)
        key = principal.binding_key()
        owned = self._owned.get(key)
        if owned is not None:
            owned.pop(session_id, None)
            if not owned:
                del self._owned[key]
        return session


def _decrement(counter: Counter[Any], key: Any) -> None:
    """Count one less, forgetting keys at zero (the counters stay as small as the store)."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
