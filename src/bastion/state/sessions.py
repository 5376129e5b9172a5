"""Legacy client sessions as every replica sees them: their records and SSE event buffers.

```
SessionRecords (port)          what a replica needs to serve a session it did not open
└── RedisSessionRecords        one hash per session, one capped list per SSE stream
      session:<hash>                 record, initialized, up:<upstream> (the upstream session
                                     every replica uses, set by compare-and-set) and
                                     listen:<upstream>, streams, seq:<stream>,
                                     closed:<stream>, request:<id> and pending:* (the server
                                     requests awaiting the client's answer, oldest dropped
                                     past a cap)  (expires after the idle limit)
      session:<hash>:events:<id>     "<seq> <event>" entries, the newest `keep` of them
      sessions:<quota>               digests scored by expiry: a quota counted over the fleet
```

The in-memory behaviour (one process) needs no records at all: the session store keeps its
sessions itself and passes no `SessionRecords`. Keys are named by the session's digest
(`session_hash`), never by its id, which is a bearer of the session. Every write is guarded by
the session still existing, so nothing resurrects a session another replica ended. Every
failure of Redis becomes `StateUnavailable` (503): a session is never served from a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import orjson

from bastion.types import JSON, Principal

if TYPE_CHECKING:  # the redis client is imported only when a gateway shares its state
    from bastion.state.redis import RedisState

__all__ = [
    "KEPT_STREAMS",
    "Claimed",
    "RedisSessionRecords",
    "SessionRecords",
    "record_owner",
    "session_record",
]

# A new session, within every quota counted over the fleet: each quota is a sorted set of
# session digests scored by when they expire (the server's clock), so expired sessions stop
# counting without anyone removing them. Returns {0, 0}, or {which quota refused, held}.
_CREATE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ms)
  local held = redis.call('ZCARD', KEYS[i])
  if held >= tonumber(ARGV[i + 2]) then return {i - 1, held} end
end
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], ms + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[i], ttl)
end
redis.call('HSET', KEYS[1], 'record', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return {0, 0}
"""
# Restart a session's expiry, in its quotas too; 0 when it is gone.
_REFRESH = """
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 0 then return 0 end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', ms + tonumber(ARGV[1]), ARGV[2])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return 1
"""
# Only while the session exists: a write never brings back one that was ended elsewhere.
_PUT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
# Map server requests awaiting the client's answer (ARGV: cap, then gateway id, mapping
# pairs), only while the session exists. Each is numbered in arrival order (`pending:<n>`
# names it) and `pending:held` counts those not yet answered; past the cap the oldest are
# dropped, as one process drops them, so a hostile upstream cannot grow the hash without end.
_ADD_REQUESTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cap = tonumber(ARGV[1])
local first = tonumber(redis.call('HGET', KEYS[1], 'pending:first') or '1')
local upto = tonumber(redis.call('HGET', KEYS[1], 'pending:next') or '1')
local held = tonumber(redis.call('HGET', KEYS[1], 'pending:held') or '0')
for i = 2, #ARGV, 2 do
  local field = 'request:' .. ARGV[i]
  local again = redis.call('HGET', KEYS[1], field)
  if again then
    redis.call('HDEL', KEYS[1], 'pending:' .. (string.match(again, '^(%d+) ') or ''))
  else
    held = held + 1
  end
  redis.call('HSET', KEYS[1], field, upto .. ' ' .. ARGV[i + 1], 'pending:' .. upto, ARGV[i])
  upto = upto + 1
end
while held > cap and first < upto do
  local gid = redis.call('HGET', KEYS[1], 'pending:' .. first)
  if gid then
    redis.call('HDEL', KEYS[1], 'pending:' .. first)
    local found = redis.call('HGET', KEYS[1], 'request:' .. gid)
    if found and string.match(found, '^(%d+) ') == tostring(first) then
      redis.call('HDEL', KEYS[1], 'request:' .. gid)
      held = held - 1
    end
  end
  first = first + 1
end
redis.call('HSET', KEYS[1], 'pending:first', first, 'pending:next', upto, 'pending:held', held)
return 1
"""
# Record the upstream session a replica just opened (ARGV: upstream, its attachment, and the
# upstream session it replaces, '' at a first open) unless the record already names another:
# only while that field is absent or still names the replaced one. A new upstream session's
# stream has no position yet. Returns {0} when the session is gone, {1} when recorded, else
# {2, what is recorded, where its stream got to}: the replica uses that one instead.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local field = 'up:' .. ARGV[1]
local current = redis.call('HGET', KEYS[1], field)
if current then
  local ok, found = pcall(cjson.decode, current)
  local held = ok and type(found) == 'table' and found['session'] or nil
  if ARGV[3] == '' or held ~= ARGV[3] then
    return {2, current, redis.call('HGET', KEYS[1], 'listen:' .. ARGV[1]) or ''}
  end
end
redis.call('HSET', KEYS[1], field, ARGV[2])
redis.call('HDEL', KEYS[1], 'listen:' .. ARGV[1])
return {1}
"""
# Take the mapping of one server request (the client answered it): once, whichever replica.
_TAKE_REQUEST = """
local found = redis.call('HGET', KEYS[1], 'request:' .. ARGV[1])
if not found then return false end
local number = string.match(found, '^(%d+) ')
redis.call('HDEL', KEYS[1], 'request:' .. ARGV[1])
if not number then return found end
redis.call('HDEL', KEYS[1], 'pending:' .. number)
redis.call('HINCRBY', KEYS[1], 'pending:held', -1)
return string.sub(found, #number + 2)
"""
# The next stream id of a session (ids never collide across replicas); 0 when it is gone.
# The stream opened ARGV[1] streams before it is forgotten if it finished (its fields and
# events, named by the prefix ARGV[2]); one finishing later is forgotten as it ends
# (_END_STREAM), so the record holds the counters of a bounded number of streams.
_NEXT_STREAM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'streams', 1)
local old = n - tonumber(ARGV[1])
if old > 0 and redis.call('HEXISTS', KEYS[1], 'closed:' .. old) == 1 then
  redis.call('HDEL', KEYS[1], 'seq:' .. old, 'closed:' .. old)
  redis.call('DEL', ARGV[2] .. old)
end
return n
"""
# Mark a stream (ARGV[1]) closed, or forget it (KEYS[2]: its events) when ARGV[2] newer
# streams opened since it did; only while the session exists.
_END_STREAM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local number = tonumber(ARGV[1])
local newest = tonumber(redis.call('HGET', KEYS[1], 'streams') or '0')
if ARGV[1] ~= '0' and number and number <= newest - tonumber(ARGV[2]) then
  redis.call('HDEL', KEYS[1], 'seq:' .. ARGV[1], 'closed:' .. ARGV[1])
  redis.call('DEL', KEYS[2])
else
  redis.call('HSET', KEYS[1], 'closed:' .. ARGV[1], '1')
end
return 1
"""
# Store one event, numbered by the session's counter for its stream; 0 when it is gone.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seq = redis.call('HINCRBY', KEYS[1], 'seq:' .. ARGV[1], 1)
redis.call('RPUSH', KEYS[2], seq .. ' ' .. ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return seq
"""

# A stream's events after ARGV[2] (only those: a reader polling an idle stream must not pull
# the whole buffer each time; the kept entries are consecutive numbers ending at the stream's
# counter). Returns {exists, closed, kept, entries}.
_SINCE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, 0, {}} end
local last = tonumber(redis.call('HGET', KEYS[1], 'seq:' .. ARGV[1]) or '0')
local closed = redis.call('HEXISTS', KEYS[1], 'closed:' .. ARGV[1])
local kept = redis.call('LLEN', KEYS[2])
local wanted = math.min(last - tonumber(ARGV[2]), kept)
local entries = {}
if wanted > 0 then entries = redis.call('LRANGE', KEYS[2], -wanted, -1) end
return {1, closed, kept, entries}
"""


# Finished streams of a session kept for resumption past the newest, as one process keeps
# them (client_session.py): a stream is forgotten once this many newer ones opened.
KEPT_STREAMS = 64

# A quota counted over the fleet: (what it counts, e.g. "tenant:acme", its limit).
Quota = tuple[str, int]


class Claimed(NamedTuple):
    """What recording an upstream session found (`SessionRecords.claim`)."""

    exists: bool  # the client session still exists (else nothing was recorded)
    first: bytes | None  # the upstream session another replica recorded first; None: this one
    listened: bytes | None  # where the GET stream of `first` got to, when any replica said


class SessionRecords(Protocol):
    """Where sessions are recorded for every replica (the port; Redis implements it)."""

    async def create(
        self, session_hash: str, record: bytes, quotas: Sequence[Quota]
    ) -> tuple[int, int]:
        """Record a new session within every quota: (0, 0), or (which quota refused it,
        counting from 1, and how many sessions it holds)."""
        ...

    async def load(self, session_hash: str) -> dict[str, bytes] | None:
        """A session's fields, or None when there is no such session (any more)."""
        ...

    async def fields(self, session_hash: str, names: Sequence[str]) -> dict[str, bytes]:
        """Some fields of a session: those of `names` it has (none when it is gone)."""
        ...

    async def alive(self, session_hash: str, refresh: bool, quotas: Sequence[Quota] = ()) -> bool:
        """Whether the session still exists; `refresh` restarts its idle expiry (in the
        quotas it counts in too)."""
        ...

    async def put(self, session_hash: str, fields: dict[str, bytes]) -> bool:
        """Set fields of an existing session; False when it is gone."""
        ...

    async def claim(
        self, session_hash: str, upstream: str, attachment: bytes, replaced: str | None
    ) -> Claimed:
        """Record `attachment` as the upstream session every replica uses with `upstream`,
        unless the record names one other than `replaced` (the upstream session id this
        replica used before; None at a first open): then that one is returned instead."""
        ...

    async def add_requests(self, session_hash: str, mapped: dict[str, bytes], cap: int) -> bool:
        """Keep server requests awaiting the client's answer (gateway id → mapping); past
        `cap` unanswered, the oldest are dropped. False when the session is gone."""
        ...

    async def take_request(self, session_hash: str, gateway_id: str) -> bytes | None:
        """The mapping of a server request, removed as it is read (None when there is none:
        never mapped, answered already, or dropped past the cap)."""
        ...

    async def delete(
        self, session_hash: str, quotas: Sequence[Quota] = ()
    ) -> dict[str, bytes] | None:
        """End a session for every replica (no longer counted in `quotas`): the fields it had
        as it was ended (its upstream sessions, to end), None when there was none."""
        ...

    async def next_stream(self, session_hash: str) -> int:
        """A new stream id for the session (unique across replicas); 0 when it is gone."""
        ...

    async def append(self, session_hash: str, stream: str, data: bytes, keep: int) -> int:
        """Store an event of a stream; its sequence number (0 when the session is gone)."""
        ...

    async def end_stream(self, session_hash: str, stream: str) -> None:
        """Mark a stream closed: no event will follow."""
        ...

    async def since(
        self, session_hash: str, stream: str, seq: int
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """A stream's kept events after `seq`, and whether it is closed."""
        ...

    async def replay(
        self, session_hash: str, stream: str, seq: int
    ) -> tuple[list[tuple[int, bytes]], bool] | None:
        """As `since`, but None when the session has no such stream (never had it, forgot
        it, or is gone itself): what a client resuming a stream is told is an error."""
        ...


class RedisSessionRecords:
    """Session records and event buffers in Redis, expiring after `idle_seconds` unused."""

    def __init__(self, state: RedisState, idle_seconds: float) -> None:
        self._state = state
        self._ttl_ms = max(int(idle_seconds * 1000), 1)
        self._create = state.script(_CREATE)
        self._refresh = state.script(_REFRESH)
        self._put = state.script(_PUT)
        self._next = state.script(_NEXT_STREAM)
        self._end_stream = state.script(_END_STREAM)
        self._append = state.script(_APPEND)
        self._since = state.script(_SINCE)
        self._add_requests = state.script(_ADD_REQUESTS)
        self._take_request = state.script(_TAKE_REQUEST)
        self._claim = state.script(_CLAIM)

    def _key(self, session_hash: str) -> str:
        return self._state.key("session", session_hash)

    def _events(self, session_hash: str, stream: str) -> str:
        return self._state.key("session", session_hash, "events", stream)

    def _quota(self, quota: Quota) -> str:
        return self._state.key("sessions", quota[0])

    async def create(
        self, session_hash: str, record: bytes, quotas: Sequence[Quota]
    ) -> tuple[int, int]:
        """Record a new session, expiring after the idle limit, unless one of `quotas` is
        full over the fleet (checked and counted atomically)."""
        keys = [self._key(session_hash), *(self._quota(q) for q in quotas)]
        args = [record, self._ttl_ms, session_hash, *(limit for _, limit in quotas)]
        refused, held = await self._state.run(
            "record a session", self._create(keys=keys, args=args)
        )
        return int(refused), int(held)

    async def load(self, session_hash: str) -> dict[str, bytes] | None:
        """A session's fields, or None when there is none."""
        fields: dict[Any, Any] = await self._state.run(
            "read a session", self._state.client.hgetall(self._key(session_hash))
        )
        if not fields or b"record" not in fields:
            return None
        return {k.decode(): v for k, v in fields.items()}

    async def fields(self, session_hash: str, names: Sequence[str]) -> dict[str, bytes]:
        """Those of `names` the session has (one round trip)."""
        found: list[Any] = await self._state.run(
            "read a session", self._state.client.hmget(self._key(session_hash), list(names))
        )
        return {name: bytes(v) for name, v in zip(names, found, strict=True) if v is not None}

    async def alive(self, session_hash: str, refresh: bool, quotas: Sequence[Quota] = ()) -> bool:
        """Whether the session exists (one round trip); `refresh` restarts its expiry."""
        key = self._key(session_hash)
        if refresh:
            keys = [key, *(self._quota(q) for q in quotas)]
            found = self._refresh(keys=keys, args=[self._ttl_ms, session_hash])
            return bool(await self._state.run("refresh a session", found))
        return bool(await self._state.run("check a session", self._state.client.exists(key)))

    async def put(self, session_hash: str, fields: dict[str, bytes]) -> bool:
        """Set fields of the session unless it is gone."""
        args: list[bytes | str] = []
        for name, value in fields.items():
            args += [name, value]
        done = await self._state.run(
            "update a session", self._put(keys=[self._key(session_hash)], args=args)
        )
        return bool(done)

    async def claim(
        self, session_hash: str, upstream: str, attachment: bytes, replaced: str | None
    ) -> Claimed:
        """Record an upstream session by compare-and-set (one script)."""
        args = [upstream, attachment, replaced or ""]
        found = await self._state.run(
            "record an upstream session", self._claim(keys=[self._key(session_hash)], args=args)
        )
        if int(found[0]) != 2:
            return Claimed(exists=int(found[0]) == 1, first=None, listened=None)
        return Claimed(exists=True, first=bytes(found[1]), listened=bytes(found[2]) or None)

    async def add_requests(self, session_hash: str, mapped: dict[str, bytes], cap: int) -> bool:
        """Keep server requests (one script: added, and the oldest dropped past `cap`)."""
        args: list[bytes | str | int] = [max(cap, 1)]
        for gateway_id, mapping in mapped.items():
            args += [gateway_id, mapping]
        done = await self._state.run(
            "map a server request", self._add_requests(keys=[self._key(session_hash)], args=args)
        )
        return bool(done)

    async def take_request(self, session_hash: str, gateway_id: str) -> bytes | None:
        """A server request's mapping, removed as it is read: one reader gets it."""
        found = await self._state.run(
            "read a server request",
            self._take_request(keys=[self._key(session_hash)], args=[gateway_id]),
        )
        return bytes(found) if found is not None else None

    async def delete(
        self, session_hash: str, quotas: Sequence[Quota] = ()
    ) -> dict[str, bytes] | None:
        """End the session everywhere (its standalone stream's events with it; other streams'
        events expire on their own and cannot be read without the session). Its fields are
        read in the same transaction: an upstream session recorded up to the end is named."""
        key = self._key(session_hash)
        pipe = self._state.client.pipeline(transaction=True)
        pipe.hgetall(key)
        pipe.delete(key, self._events(session_hash, "0"))
        for quota in quotas:
            pipe.zrem(self._quota(quota), session_hash)
        removed = await self._state.run("end a session", pipe.execute())
        if not removed[1]:
            return None
        return {bytes(k).decode(): bytes(v) for k, v in removed[0].items()}

    async def next_stream(self, session_hash: str) -> int:
        """A new stream id, from the session's counter (the finished stream KEPT_STREAMS
        before it is forgotten)."""
        args = [KEPT_STREAMS, self._events(session_hash, "")]
        found = await self._state.run(
            "open a stream", self._next(keys=[self._key(session_hash)], args=args)
        )
        return int(found)

    async def append(self, session_hash: str, stream: str, data: bytes, keep: int) -> int:
        """Store one event (the newest `keep` of the stream are kept)."""
        keys = [self._key(session_hash), self._events(session_hash, stream)]
        seq = await self._state.run(
            "store a stream event",
            self._append(keys=keys, args=[stream, data, max(keep, 1), self._ttl_ms]),
        )
        return int(seq)

    async def end_stream(self, session_hash: str, stream: str) -> None:
        """Mark the stream closed (forgotten, when KEPT_STREAMS newer ones opened since)."""
        keys = [self._key(session_hash), self._events(session_hash, stream)]
        await self._state.run(
            "end a stream", self._end_stream(keys=keys, args=[stream, KEPT_STREAMS])
        )

    async def since(
        self, session_hash: str, stream: str, seq: int
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """The stream's kept events after `seq` (oldest first) and whether it closed; a
        session that is gone, or a stream it never had, reads as closed without events (a
        reader following the stream stops)."""
        found = await self.replay(session_hash, stream, seq)
        return found if found is not None else ([], True)

    async def replay(
        self, session_hash: str, stream: str, seq: int
    ) -> tuple[list[tuple[int, bytes]], bool] | None:
        """As `since`; None when the session is gone or has no such stream (the standalone
        stream "0" always exists; a POST's stream stores its first event as it opens, so one
        without kept events was never opened, or its events expired)."""
        keys = [self._key(session_hash), self._events(session_hash, stream)]
        found = self._since(keys=keys, args=[stream, str(seq)])
        exists, closed, kept, entries = await self._state.run("read a stream", found)
        if not exists or (stream != "0" and not kept):
            return None
        events: list[tuple[int, bytes]] = []
        for entry in entries:
            number, _, data = bytes(entry).partition(b" ")
            if number.isdigit() and int(number) > seq:
                events.append((int(number), data))
        return events, bool(closed)


def session_record(principal: Principal, route: str, version: str, hello: JSON) -> bytes:
    """What another replica needs to serve a session: its owner (every field of the
    principal that opened it), route, negotiated version and the client's hello."""
    owner = {
        "tenant": principal.tenant,
        "agent": principal.agent,
        "user": principal.user,
        "scopes": sorted(principal.scopes),
        "roles": sorted(principal.roles),
        "delegation": list(principal.delegation),
        "token_id": principal.token_id,
        "expires_at": principal.expires_at,
        "key_binding": principal.key_binding,
        "environment": principal.environment,
    }
    return orjson.dumps({"principal": owner, "route": route, "version": version, "hello": hello})


def record_owner(raw: bytes) -> tuple[Principal, JSON]:
    """The owner a session record names, and the record."""
    record = orjson.loads(raw)
    p = record["principal"]
    owner = Principal(
        tenant=p["tenant"],
        agent=p["agent"],
        user=p.get("user"),
        scopes=frozenset(p.get("scopes") or ()),
        roles=frozenset(p.get("roles") or ()),
        delegation=tuple(p.get("delegation") or ()),
        token_id=p.get("token_id"),
        expires_at=p.get("expires_at"),
        key_binding=p.get("key_binding"),
        environment=p.get("environment"),
    )
    return owner, record
