"""With shared state: one client session uses the same upstream sessions on every replica.

```
record   the upstream sessions opened at the client's initialize: a plain write (no other
         replica knows the session before the client does)
claim    an upstream session a replica opened later (first open, or reopen after the upstream
         forgot one), by compare-and-set on the record's up:<upstream>: set only while that is
         absent or still names the upstream session replaced; a replica that loses uses the one
         recorded and ends its own before any request went into it
join     before a replica opens an upstream session, the one another replica recorded
follow   while a replica serves the session's GET stream: what another replica opened or
         reopened since, so what that upstream sends reaches the client's stream here
```

So two replicas opening, or reopening, the same upstream at the same moment never split one
client session over two upstream sessions (each with its own state and server stream).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import orjson

from bastion.errors import SessionNotFound
from bastion.pipeline.buffer import GONE
from bastion.pipeline.client_session import ClientSession, upstream_session
from bastion.state.sessions import SessionRecords
from bastion.types import JSON
from bastion.upstream.base import Channel
from bastion.upstream.http import LegacyHttpChannel

__all__ = ["Attach", "SharedUpstreams"]

log = logging.getLogger("bastion.session")

# Joins one upstream of a session another replica opened: (upstream, hello, tenant, the
# upstream session as recorded, or None when it had not opened) → the channel.
Attach = Callable[[str, JSON, str, JSON | None], Awaitable[Channel]]


class SharedUpstreams:
    """Which upstream session each replica uses for a client session: the recorded one."""

    def __init__(self, records: SessionRecords, attach: Attach | None) -> None:
        self.records = records
        self._attach = attach

    @property
    def joins(self) -> bool:
        """Whether this replica can join upstream sessions another opened (it can unless
        built without a way to: then it opens its own)."""
        return self._attach is not None

    def bind(self, session: ClientSession) -> None:
        """From now on, `session` joins what other replicas record before it opens anything,
        and records what it opens by compare-and-set (its channels held now and later)."""
        session.join = lambda upstream: self.join(session, upstream)
        session.record = lambda upstream, replaced, opened: self.claim(
            session, upstream, replaced, opened
        )
        session.follow = lambda upstreams: self.follow(session, upstreams)
        for upstream, channel in list(session.channels.items()):
            session.hold(upstream, channel)

    async def record(self, session: ClientSession) -> None:
        """Record the upstream sessions opened at the client's initialize."""
        fields = {f"up:{name}": orjson.dumps(a) for name, a in session.attachments().items()}
        if fields:
            await self.records.put(_digest(session), fields)

    async def claim(
        self, session: ClientSession, upstream: str, replaced: str | None, opened: JSON
    ) -> tuple[JSON, str | None] | None:
        """Record the upstream session `opened` (replacing the one with id `replaced`); None
        when it is recorded, else the one another replica recorded first and where its stream
        got to. Raises SessionNotFound when the session was ended elsewhere."""
        found = await self.records.claim(_digest(session), upstream, orjson.dumps(opened), replaced)
        if not found.exists:
            raise SessionNotFound(GONE)
        if found.first is None:
            return None
        log.info(
            "session %s…: upstream %r opened on another replica first", session.id[:6], upstream
        )
        listened = found.listened.decode() if found.listened is not None else None
        return orjson.loads(found.first), listened

    async def join(self, session: ClientSession, upstream: str) -> Channel | None:
        """The upstream session another replica recorded for `session` since this replica
        read its record, joined; None when none is recorded (this replica opens one)."""
        if self._attach is None:
            return None
        names = (f"up:{upstream}", f"listen:{upstream}")
        found = await self.records.fields(_digest(session), names)
        recorded = found.get(names[0])
        if recorded is None:
            return None
        log.info(
            "session %s…: joined upstream %r opened on another replica", session.id[:6], upstream
        )
        return await self.joined(session, upstream, recorded, found.get(names[1]))

    async def joined(
        self, session: ClientSession, upstream: str, recorded: bytes, listened: bytes | None
    ) -> Channel:
        """A channel joined to the upstream session `recorded` (resuming its GET stream
        from `listened`, the last event any replica relayed)."""
        assert self._attach is not None  # noqa: S101 - only with shared state
        attachment = orjson.loads(recorded)
        channel = await self._attach(upstream, session.hello, session.principal.tenant, attachment)
        if isinstance(channel, LegacyHttpChannel) and listened is not None:
            channel.listened = listened.decode()
        return channel

    async def follow(self, session: ClientSession, upstreams: Sequence[str]) -> None:
        """Join the upstream sessions recorded for `upstreams` that this replica does not use:
        one it holds no open channel to, or one another replica reopened (one read)."""
        if self._attach is None:
            return
        names = [f"{kind}:{u}" for u in upstreams for kind in ("up", "listen")]
        found = await self.records.fields(_digest(session), names)
        for upstream in upstreams:
            recorded = found.get(f"up:{upstream}")
            if recorded is not None:
                await self._follow(session, upstream, recorded, found.get(f"listen:{upstream}"))

    async def _follow(
        self, session: ClientSession, upstream: str, recorded: bytes, listened: bytes | None
    ) -> None:
        """Use the recorded upstream session `recorded` with `upstream` here, unless this
        replica uses it already."""
        held = session.channels.get(upstream)
        if held is not None and not isinstance(held, LegacyHttpChannel):
            return  # no upstream session of its own to share (stdio, stateless)
        now = held.attachment() if held is not None else None
        if now is None:  # none held, or not opened: joined as a call would join it
            await session.channel(
                upstream, lambda: self.joined(session, upstream, recorded, listened)
            )
            return
        attachment = orjson.loads(recorded)
        used = now.get("session")
        if held is not None and used != attachment.get("session"):
            log.info("session %s…: upstream %r reopened elsewhere", session.id[:6], upstream)
            position = listened.decode() if listened is not None else None
            await held.adopt(attachment, position, instead_of=used)

    async def ending(
        self, session: ClientSession, recorded: dict[str, bytes]
    ) -> list[tuple[str, Channel]]:
        """The upstream sessions `session`'s record named as it was ended (`recorded`) that
        this replica does not use, joined so that closing them with the session ends them:
        other replicas opened them, and only let go of the session."""
        if self._attach is None:
            return []
        used = {upstream_session(channel) for channel in session.channels.values()}
        extra = []
        for key, value in recorded.items():
            upstream = key.removeprefix("up:")
            held = session.channels.get(upstream)
            if upstream == key or (held is not None and not isinstance(held, LegacyHttpChannel)):
                continue  # not an upstream session, or an upstream without one (stdio)
            try:
                if orjson.loads(value).get("session") not in used:
                    extra.append((upstream, await self.joined(session, upstream, value, None)))
            except Exception as exc:  # best effort, as ending any upstream session is
                log.info("upstream %r: its session not ended: %r", upstream, exc)
        return extra


def _digest(session: ClientSession) -> str:
    """The name of the session's record (kept with its shared events)."""
    assert session.shared is not None  # noqa: S101 - only sessions with shared state
    return session.shared.session_hash
