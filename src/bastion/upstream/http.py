"""Streamable HTTP upstreams in both protocol eras: `LegacyHttpChannel` (a 2025-era session)
and `ModernHttpChannel` (stateless 2026-07-28 requests), over one `HttpClient` (client.py) per
upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson

from bastion.errors import UpstreamError
from bastion.methods import INITIALIZE, INITIALIZED, SUBSCRIPTIONS_LISTEN
from bastion.sse import Decoder
from bastion.types import JSON, LEGACY_VERSIONS, META_VERSION, MODERN_VERSION, Era
from bastion.upstream.base import Answer, IdMap, header_value, mcp_name, refusal
from bastion.upstream.client import MAX_EVENT_BYTES, HttpClient

# The client and its limit are named here too: the pool and the channels' users import them
# from the module of HTTP upstreams.
__all__ = ["MAX_EVENT_BYTES", "Claim", "HttpClient", "LegacyHttpChannel", "ModernHttpChannel"]

log = logging.getLogger("bastion.upstream")

_MAX_RESUMES = 20

# With shared state: record an upstream session this channel just opened, in place of the one
# it used before (None at its first open), unless another replica recorded another first.
# Returns None when this one is recorded, else the one recorded (as `attachment()` gives it)
# and where its GET stream got to, for this channel to use instead.
Claim = Callable[[str | None, JSON], Awaitable[tuple[JSON, str | None] | None]]


class LegacyHttpChannel:
    """A 2025-era session with one HTTP upstream, opened lazily and reopened if it expires."""

    era = Era.LEGACY

    def __init__(self, client: HttpClient, hello: JSON) -> None:
        self._client = client
        self._hello = hello  # initialize params: protocolVersion, capabilities, clientInfo
        self._ids = IdMap()
        self._session_id: str | None = None
        self._version = str(hello.get("protocolVersion", LEGACY_VERSIONS[0]))
        self._lock = asyncio.Lock()
        self.initialized: JSON | None = None
        self.inflight: dict[Any, Any] = {}
        # The upstream's id of the last event its GET stream sent: a listen after a break (on
        # this replica or another) resumes from there, missing nothing the upstream kept.
        self.listened: str | None = None
        # Set by the client session with shared state: every replica uses one upstream session.
        self.claim: Claim | None = None

    @classmethod
    def attached(cls, client: HttpClient, hello: JSON, attachment: JSON) -> LegacyHttpChannel:
        """A channel joined to an upstream session another replica opened (`attachment`, as
        `attachment()` gave it): no new handshake; reopened, as any, if the upstream forgot
        the session."""
        channel = cls(client, hello)
        channel._use(attachment)
        # Request ids another replica used in this upstream session must not come back: an
        # upstream may still be answering one of them.
        channel._ids = _shared_ids()
        return channel

    def _use(self, attachment: JSON) -> None:
        """Use the upstream session `attachment` names (as `attachment()` gives it)."""
        session_id = attachment.get("session")
        result = attachment.get("initialized")
        self._session_id = session_id if isinstance(session_id, str) else None
        self._version = str(attachment.get("version") or self._version)
        self.initialized = result if isinstance(result, dict) else None

    async def adopt(self, attachment: JSON, listened: str | None, instead_of: str | None) -> None:
        """Use the upstream session another replica recorded (`attachment`) from now on, its
        GET stream resumed from `listened`, unless this channel no longer uses the session
        `instead_of` (it reopened meanwhile, and recorded or adopted what to use then)."""
        async with self._lock:
            if self._session_id != instead_of:
                return
            self._use(attachment)
            self.listened = listened
            self._ids = _shared_ids()

    def attachment(self) -> JSON | None:
        """What another replica needs to join this upstream session (None before it opened):
        its id, negotiated version and InitializeResult."""
        if self.initialized is None:
            return None
        return {
            "session": self._session_id,
            "version": self._version,
            "initialized": self.initialized,
        }

    def _headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        return _session_headers(self._version, self._session_id, extra)

    async def open(self, headers: Mapping[str, str]) -> JSON:
        """Run the initialize handshake if it has not run; return the InitializeResult."""
        if self.initialized is None:
            async with self._lock:
                if self.initialized is None:
                    await self._initialize(headers)
        assert self.initialized is not None  # noqa: S101 - set by _initialize or it raised
        return self.initialized

    async def _initialize(self, headers: Mapping[str, str]) -> None:
        """Open an upstream session (again, when the upstream forgot the one in use); with
        shared state, the one every replica uses (`claim`)."""
        # The session being replaced stays named after a failed reopen: the next attempt
        # replaces the same one in the shared record.
        replaced = self._session_id
        try:
            opened = await self._handshake(headers)
            if self.claim is not None:
                opened = await self._settle(replaced, opened, headers)
            else:
                self.listened = None  # a new upstream session: its stream starts afresh
        except BaseException:
            self.initialized = None  # a failed (re)open: the next request opens afresh
            raise
        self._use(opened)

    async def _handshake(self, headers: Mapping[str, str]) -> JSON:
        """initialize, then notifications/initialized: the new upstream session, as
        `attachment()` names one."""
        message, upstream_id = self._ids.outgoing(
            {"jsonrpc": "2.0", "id": 0, "method": INITIALIZE, "params": self._hello}
        )
        response = await self._client.post(orjson.dumps(message), headers)
        session_id = response.headers.get("mcp-session-id")
        answer = await self._client.answer(response, upstream_id, 0)
        reply = answer.first
        while "method" in reply and answer.rest is not None:
            reply = await anext(answer.rest)
        await answer.close()
        result = reply.get("result")
        if not isinstance(result, dict):
            raise UpstreamError(
                f"upstream {self._client.name!r} refused initialize: {refusal(reply)}"
            )
        version = str(result.get("protocolVersion", self._version))
        note = {"jsonrpc": "2.0", "method": INITIALIZED}
        ack = await self._client.post(
            orjson.dumps(note), _session_headers(version, session_id, headers)
        )
        async with ack:
            await ack.read()
        return {"session": session_id, "version": version, "initialized": result}

    async def _settle(self, replaced: str | None, opened: JSON, headers: Mapping[str, str]) -> JSON:
        """With shared state: the upstream session to use, `opened` when it is recorded for
        every replica; else the one another replica recorded first, and `opened` is ended (no
        request went into it), so one client session never splits over two upstream ones."""
        assert self.claim is not None  # noqa: S101 - only with shared state
        try:
            won = await self.claim(replaced, opened)
        except Exception:
            await self._end(opened, headers)  # unrecorded: no replica would ever use it
            raise
        if won is None:
            self.listened = None  # a new upstream session: its stream starts afresh
            return opened
        recorded, listened = won
        log.info("upstream %r: another replica's session recorded first; used", self._client.name)
        await self._end(opened, headers)
        self.listened = listened
        self._ids = _shared_ids()
        return recorded

    async def call(self, message: JSON, headers: Mapping[str, str]) -> Answer:
        """Send a request in the session; reopen once if the upstream forgot the session."""
        await self.open(headers)
        original = message["id"]
        for attempt in (1, 2):
            outgoing, upstream_id = self._ids.outgoing(message)
            self.inflight[original] = upstream_id
            sent_in = self._session_id
            try:
                response = await self._client.post(orjson.dumps(outgoing), self._headers(headers))
            except BaseException:
                self.inflight.pop(original, None)
                raise
            if response.status == 404 and sent_in is not None and attempt == 1:
                response.release()
                await self._reopen(sent_in, headers)
                continue
            return await self._client.answer(
                response,
                upstream_id,
                original,
                resume=lambda decoder: self._resume(decoder, headers),
                done=lambda: self.inflight.pop(original, None),
            )
        raise UpstreamError(f"upstream {self._client.name!r} keeps forgetting the session")

    async def _reopen(self, forgotten: str, headers: Mapping[str, str]) -> None:
        """The upstream forgot session `forgotten`: open another, unless a concurrent request
        (or, with shared state, another replica's record) already replaced it."""
        async with self._lock:
            if self._session_id == forgotten or self.initialized is None:
                log.info("upstream %r forgot session; reopening", self._client.name)
                await self._initialize(headers)

    async def _resume(self, decoder: Decoder, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        """Reconnect to a stream the upstream closed early, from its last event id, as often
        as it keeps closing (bounded), waiting the `retry` it asked for (at most 5 s)."""
        for _ in range(_MAX_RESUMES):
            last = decoder.last_id
            if last is None:
                return
            await asyncio.sleep(min((decoder.retry or 0) / 1000, 5.0))
            all_headers = {
                "Accept": "text/event-stream",
                "Last-Event-ID": last,
                **self._headers(headers),
            }
            response = await self._client.send("GET", all_headers)
            async with response:
                if response.status != 200:
                    raise UpstreamError(
                        f"upstream {self._client.name!r} refused to resume its stream "
                        f"(HTTP {response.status})"
                    )
                before = decoder.last_id
                async for message in self._client.read_events(response, decoder):
                    yield message
                if decoder.last_id == before:
                    return

    async def send(self, message: JSON, headers: Mapping[str, str]) -> None:
        """POST a notification or a response into the session (expects 202)."""
        await self.open(headers)
        response = await self._client.post(orjson.dumps(message), self._headers(headers))
        async with response:
            await self._client.read_body(response)
            if response.status >= 400:
                raise UpstreamError(
                    f"upstream {self._client.name!r} refused a message with HTTP {response.status}"
                )

    async def listen(self, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        """Open the session's GET stream (from `listened`, when set); nothing when the
        upstream offers none (405)."""
        await self.open(headers)
        all_headers = {"Accept": "text/event-stream", **self._headers(headers)}
        if self.listened is not None:
            all_headers["Last-Event-ID"] = self.listened
        response = await self._client.send("GET", all_headers, long_lived=True)
        async with response:
            if response.status != 200:
                return
            decoder = Decoder()
            async for message in self._client.read_events(response, decoder):
                self.listened = decoder.last_id or self.listened
                yield message

    async def close(self, headers: Mapping[str, str] | None = None) -> None:
        """DELETE the upstream session (best effort: the upstream may already be gone), with
        the credential in `headers`: an upstream that checks every request refuses it without."""
        if self._session_id is None:
            return
        opened = {"session": self._session_id, "version": self._version}
        self._session_id = None
        await self._end(opened, headers or {})

    async def _end(self, opened: JSON, headers: Mapping[str, str]) -> None:
        """DELETE the upstream session `opened` names, best effort and bounded in time."""
        session_id = opened.get("session")
        if not isinstance(session_id, str):
            return
        all_headers = _session_headers(str(opened.get("version")), session_id, headers)
        with contextlib.suppress(UpstreamError, TimeoutError):
            async with asyncio.timeout(2):
                response = await self._client.send("DELETE", all_headers)
                async with response:
                    await response.read()


def _session_headers(
    version: str, session_id: str | None, extra: Mapping[str, str]
) -> dict[str, str]:
    """The headers of a request in an upstream session."""
    headers = {"MCP-Protocol-Version": version, **extra}
    if session_id is not None:
        headers["Mcp-Session-Id"] = session_id
    return headers


def _shared_ids() -> IdMap:
    """Request ids for an upstream session other replicas use too: started at random, far
    from theirs (an upstream may still be answering one of their requests)."""
    return IdMap(secrets.randbelow(1 << 40) + (1 << 20))


class ModernHttpChannel:
    """The stateless 2026-07-28 path to an HTTP upstream: every request stands alone."""

    era = Era.MODERN

    def __init__(self, client: HttpClient) -> None:
        self._client = client
        self._ids = IdMap()
        self.inflight: dict[Any, Any] = {}

    async def open(self, headers: Mapping[str, str]) -> JSON | None:
        """No handshake in the stateless era."""
        return None

    async def call(self, message: JSON, headers: Mapping[str, str]) -> Answer:
        """POST the request with its mirrored headers and relay the answer."""
        outgoing, upstream_id = self._ids.outgoing(message)
        meta = (message.get("params") or {}).get("_meta") or {}
        all_headers = {
            "MCP-Protocol-Version": str(meta.get(META_VERSION, MODERN_VERSION)),
            "Mcp-Method": str(message["method"]),
            **headers,
        }
        name = mcp_name(message)
        if name is not None:
            all_headers["Mcp-Name"] = header_value(name)
        # A subscriptions/listen stream is quiet for long stretches by design.
        long_lived = message["method"] == SUBSCRIPTIONS_LISTEN
        return await self._client.exchange(
            outgoing, all_headers, upstream_id, message["id"], long_lived
        )

    async def send(self, message: JSON, headers: Mapping[str, str]) -> None:
        """The modern era defines no client notifications over HTTP; nothing to deliver."""

    async def listen(self, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        """Modern upstreams push only on subscriptions/listen, which is a request."""
        return
        yield  # pragma: no cover - makes this an async generator

    async def close(self, headers: Mapping[str, str] | None = None) -> None:
        """Nothing is held per conversation."""
