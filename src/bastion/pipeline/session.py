"""Legacy-era client sessions: ownership, quotas, idle expiry, and (with shared state) the
record every replica serves a session from.

A session belongs to the principal that opened it; anyone else presenting its id is told it does
not exist, exactly as for an unknown id. Sessions are never authentication. One session as a
replica holds it is a `ClientSession` (client_session.py); with shared state, every replica
uses the same upstream sessions for it (sharing.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import Counter
from typing import Any

from bastion.config import Limits
from bastion.errors import BastionError, SessionNotFound, SessionQuotaExceeded
from bastion.pipeline.buffer import GONE, SharedEvents, Stream
from bastion.pipeline.client_session import ClientSession, CloseCredentials
from bastion.pipeline.quotas import QUOTAS, fleet_quotas, quota_refusal
from bastion.pipeline.sharing import Attach, SharedUpstreams
from bastion.state.sessions import Quota, SessionRecords, record_owner, session_record
from bastion.types import JSON, Principal

__all__ = [
    "Attach",
    "ClientSession",
    "CloseCredentials",
    "SessionStore",
    "Stream",
    "session_hash",
]

log = logging.getLogger("bastion.session")


def session_hash(session_id: str) -> str:
    """How a session is named outside this process (the registry never sees raw ids)."""
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    """Sessions of one process, bounded in idle time and in number: in all
    (`limits.max_sessions`), per agent and per tenant.

    One principal never pushes out another: at a bound, only the asker's own sessions that
    have been idle for `limits.session_reclaim_seconds` (and have no stream open) are ended to
    make room; otherwise the new session is refused with `SessionQuotaExceeded`.

    With `records` (shared state), every session is also recorded for every replica: one this
    process does not hold is re-attached from its record (`find`), one ended anywhere is ended
    everywhere, and its idle expiry is the record's; the quotas count the fleet's sessions
    (only this process's own idle ones are ended to make room).
    """

    def __init__(
        self,
        limits: Limits,
        credentials: CloseCredentials | None = None,
        records: SessionRecords | None = None,
        attach: Attach | None = None,
    ) -> None:
        self._sessions: dict[str, ClientSession] = {}
        self._limits = limits
        self._credentials = credentials
        self.records = records
        # With shared state: the same upstream sessions on every replica (sharing.py).
        self._upstreams = SharedUpstreams(records, attach) if records is not None else None
        self._loading: dict[str, asyncio.Lock] = {}
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
        sessions to make room; else keep nothing and return the quota that refuses it. With
        shared state it is recorded for every replica (StateUnavailable when it cannot be).

        The check and the insertion happen with no await between them, so concurrent opens
        cannot together pass a quota.
        """
        now = time.monotonic()
        ended = self._take_idle(now) if len(self._sessions) >= self._limits.max_sessions else []
        refusal = self._make_room(session.principal, now, ended)
        if refusal is None:
            self._put(session)
        for old in ended:
            await self._end(old)
        if refusal is None and self.records is not None:
            refusal = await self._record(session)
        return refusal

    async def add(self, session: ClientSession) -> None:
        """Keep a new session (as `open`); raises SessionQuotaExceeded over a quota."""
        refusal = await self.open(session)
        if refusal is not None:
            raise refusal

    def get(self, session_id: str, principal: Principal, route: str) -> ClientSession:
        """The caller's session held here; someone else's or an unknown id are both 'not
        found'."""
        session = self._sessions.get(session_id)
        if session is None or not _owns(session.principal, session.route, principal, route):
            if session is not None:
                log.warning("session %s… presented by another principal or route", session_id[:6])
            raise SessionNotFound(GONE)
        session.last_seen = time.monotonic()
        return session

    async def find(self, session_id: str, principal: Principal, route: str) -> ClientSession:
        """The caller's session, held here or (with shared state) re-attached from its record;
        someone else's, an unknown id, or one ended on any replica are all 'not found'. Raises
        StateUnavailable when the shared state cannot say."""
        if self.records is None:
            return self.get(session_id, principal, route)
        if session_id in self._sessions:
            session = self.get(session_id, principal, route)
            await self._confirm(session)
            return session
        lock = self._loading.setdefault(session_id, asyncio.Lock())
        try:
            async with lock:  # concurrent first requests on this replica re-attach once
                if session_id not in self._sessions:
                    await self._reattach(session_id, principal, route)
        finally:
            if not lock.locked():
                self._loading.pop(session_id, None)
        return self.get(session_id, principal, route)

    async def owner(self, session_id: str) -> Principal | None:
        """Who opened the session (for the audit trail only: never an answer to a client)."""
        session = self._sessions.get(session_id)
        if session is not None:
            return session.principal
        if self.records is None:
            return None
        fields = await self.records.load(session_hash(session_id))
        return record_owner(fields["record"])[0] if fields is not None else None

    async def initialized(self, session: ClientSession) -> None:
        """The client said `notifications/initialized`; every replica hears it."""
        session.initialized = True
        if self.records is not None:
            await self.records.put(session_hash(session.id), {"initialized": b"1"})

    async def sync(self, session: ClientSession) -> None:
        """After the session's initialize and each of its calls: relay the stream of an
        upstream session opened (or reopened) since, when the session is listening. With
        shared state, the first sync (the initialize's) records the upstream sessions opened;
        from then on an upstream session this replica opens is recorded as it opens, by
        compare-and-set, and one another replica recorded is joined (sharing.py)."""
        session.hear()
        if self._upstreams is None or session.join is not None:
            return
        # Nothing can be recorded before the client knows the session: a plain write.
        await self._upstreams.record(session)
        self._upstreams.bind(session)

    async def remove(self, session_id: str, strict: bool = True) -> bool:
        """End a session (for every replica) and its upstream sessions; False when there was
        none here. With the shared state out of reach, `strict` raises StateUnavailable and
        ends nothing (a client's DELETE, retried later); else the session is ended here all
        the same (a registry change: every replica refuses the agent or the killed session
        by the registry, and the record expires)."""
        recorded: dict[str, bytes] | None = None
        if self.records is not None:
            held = self._sessions.get(session_id)
            quotas = self._quotas(held.principal) if held is not None else []
            try:
                recorded = await self.records.delete(session_hash(session_id), quotas)
            except BastionError as exc:
                if strict:
                    raise
                log.warning("session record not removed (it expires): %s", exc.message)
        session = self._take(session_id)
        if session is None:
            return False
        await self._close(session, recorded)
        return True

    async def discard(self, session: ClientSession) -> None:
        """End a session whether or not it was kept (an initialize that failed half-way)."""
        self._take(session.id)
        await self._end(session)

    async def expire(self) -> int:
        """End sessions idle here for longer than the limit; return how many. With shared
        state, one another replica kept using is only let go of here."""
        stale = self._take_idle(time.monotonic())
        for session in stale:
            if self.records is not None and await self._alive_elsewhere(session):
                await session.detach()
            else:
                await session.close(self._credentials)
        return len(stale)

    async def close(self) -> None:
        """End every session this process holds; with shared state, only let go of them
        (they live on for the other replicas)."""
        for sid in list(self._sessions):
            session = self._take(sid)
            if session is None:
                continue
            if self.records is not None:
                await session.detach()
            else:
                await session.close(self._credentials)

    # -- shared state -----------------------------------------------------------------------

    async def _record(self, session: ClientSession) -> SessionQuotaExceeded | None:
        """Record a session kept here for every replica, within the quotas counted over the
        fleet; else take it out again and return the quota that refuses it."""
        assert self.records is not None  # noqa: S101 - only with shared state
        digest = session_hash(session.id)
        session.share(SharedEvents(self.records, digest, session.keep_events))
        record = session_record(
            session.principal, session.route, session.protocol_version, session.hello
        )
        try:
            refused, held = await self.records.create(
                digest, record, self._quotas(session.principal)
            )
        except BaseException:
            self._take(session.id)
            raise
        if refused == 0:
            return None
        self._take(session.id)
        quota = QUOTAS[refused - 1]
        refusal = self._refusal(quota, session.principal, held)
        log.info("session refused over the fleet: %s", refusal.message)
        return refusal

    async def _confirm(self, session: ClientSession) -> None:
        """The session held here still exists for the fleet (DELETE, kill or expiry on
        another replica end it here too); its shared expiry is restarted now and then."""
        assert self.records is not None  # noqa: S101 - only with shared state
        now = time.monotonic()
        # The record's expiry is restarted at most this often (a read, not a write, between).
        every = min(self._limits.session_idle_seconds / 4, 30.0)
        refresh = now - session.refreshed >= every
        quotas = self._quotas(session.principal)
        if not await self.records.alive(session_hash(session.id), refresh, quotas):
            log.info("session %s… was ended on another replica", session.id[:6])
            self._take(session.id)
            await session.detach()
            raise SessionNotFound(GONE)
        if refresh:
            session.refreshed = now

    async def _reattach(self, session_id: str, principal: Principal, route: str) -> None:
        """Rebuild a session another replica opened from its record, when it is the caller's
        (binding and route as `get` checks them; else 'not found' and nothing is built)."""
        assert self.records is not None  # noqa: S101 - only with shared state
        digest = session_hash(session_id)
        fields = await self.records.load(digest)
        if fields is None:
            raise SessionNotFound(GONE)
        owner, record = record_owner(fields["record"])
        if not _owns(owner, str(record.get("route")), principal, route):
            log.warning("session %s… presented by another principal or route", session_id[:6])
            raise SessionNotFound(GONE)
        found = record.get("hello")
        hello: JSON = found if isinstance(found, dict) else {}
        session = ClientSession(
            id=session_id,
            principal=owner,
            route=route,
            protocol_version=str(record.get("version")),
            hello=hello,
            keep_events=self._limits.sse_replay_events,
            initialized=fields.get("initialized") == b"1",
        )
        session.share(
            SharedEvents(self.records, digest, session.keep_events),
            counter_start=secrets.randbelow(1 << 40) + (1 << 20),
        )
        assert self._upstreams is not None  # noqa: S101 - only with shared state
        for key, value in fields.items():
            if key.startswith("up:") and self._upstreams.joins:
                name = key[3:]
                listened = fields.get(f"listen:{name}")
                joined = await self._upstreams.joined(session, name, value, listened)
                session.channels[name] = joined
        self._upstreams.bind(session)
        self._put(session)  # admitted by the fleet when it opened: no quota is asked again
        log.info("session %s… re-attached from the shared state", session_id[:6])

    async def _alive_elsewhere(self, session: ClientSession) -> bool:
        """Whether another replica kept the session alive (this one did not use it for the
        whole idle limit, so only another can have); True when the store cannot say, so
        nothing is ended on a guess."""
        assert self.records is not None  # noqa: S101 - only with shared state
        try:
            return await self.records.alive(session_hash(session.id), False)
        except BastionError as exc:
            log.warning("idle session kept upstream: %s", exc.message)
            return True

    async def _end(self, session: ClientSession) -> None:
        """End a session taken out of the store: its record (best effort: it expires anyway)
        and its upstream sessions."""
        recorded: dict[str, bytes] | None = None
        if self.records is not None and session.shared is not None:
            try:
                quotas = self._quotas(session.principal)
                recorded = await self.records.delete(session_hash(session.id), quotas)
            except BastionError as exc:
                log.warning("session record not removed (it expires): %s", exc.message)
        await self._close(session, recorded)

    async def _close(self, session: ClientSession, recorded: dict[str, bytes] | None) -> None:
        """Close a session ended for good: its upstream sessions, with those its record named
        as it was ended (`recorded`: opened on other replicas too)."""
        also = []
        if recorded and self._upstreams is not None:
            also = await self._upstreams.ending(session, recorded)
        await session.close(self._credentials, also)

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
        """The first quota one more session of `principal` would pass here, or None."""
        limits = self._limits
        held = self._per_agent[(principal.tenant, principal.agent)]
        if held >= limits.max_sessions_per_agent:
            return self._refusal("agent", principal, held)
        held = self._per_tenant[principal.tenant]
        if held >= limits.max_sessions_per_tenant:
            return self._refusal("tenant", principal, held)
        if len(self._sessions) >= limits.max_sessions:
            return self._refusal("gateway", principal, len(self._sessions))
        return None

    def _refusal(self, quota: str, principal: Principal, held: int) -> SessionQuotaExceeded:
        return quota_refusal(self._limits, quota, principal, held)

    def _quotas(self, principal: Principal) -> list[Quota]:
        return fleet_quotas(self._limits, principal)

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


def _owns(owner: Principal, owner_route: str, principal: Principal, route: str) -> bool:
    """Whether a session opened by `owner` on `owner_route` is `principal`'s on `route`."""
    return owner_route == route and owner.binding_key() == principal.binding_key()
