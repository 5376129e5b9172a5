"""Streamable HTTP upstreams over a pooled aiohttp session, in both protocol eras."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from bastion.config import HttpUpstream
from bastion.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from bastion.sse import Decoder
from bastion.types import (
    JSON,
    LEGACY_VERSIONS,
    META_VERSION,
    MODERN_VERSION,
    PROBE_META,
    UPSTREAM_STATUS,
    Era,
)
from bastion.upstream.base import IdMap, decode_message, header_value, mcp_name, restore_id

log = logging.getLogger("bastion.upstream")

MAX_EVENT_BYTES = 16 * 1024 * 1024
_MAX_RESUMES = 20
_ACCEPT = "application/json, text/event-stream"


class HttpClient:
    """The pooled connection to one HTTP upstream, shared by all its channels."""

    def __init__(self, name: str, settings: HttpUpstream) -> None:
        self.name = name
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self.modern: bool | None = (
            None if settings.protocol == "auto" else (settings.protocol == "modern")
        )
        self._probe_lock = asyncio.Lock()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session, made on first use inside the running loop."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.settings.max_connections, ttl_dns_cache=300, force_close=False
            )
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.connect_timeout_seconds,
                sock_read=None,  # bounded per await below; listen streams idle by design
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def supports_modern(self) -> bool:
        """Whether the upstream serves 2026-07-28 requests, probed once with server/discover."""
        if self.modern is not None:
            return self.modern
        async with self._probe_lock:
            if self.modern is None:
                self.modern = await self._probe()
                log.info(
                    "upstream %r speaks %s", self.name, "2026-07-28" if self.modern else "legacy"
                )
        return self.modern

    async def _probe(self) -> bool:
        probe = {
            "jsonrpc": "2.0",
            "id": "bastion-probe",
            "method": "server/discover",
            "params": {"_meta": PROBE_META},
        }
        headers = {"MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": "server/discover"}
        try:
            async for message in self.exchange(probe, headers, "bastion-probe"):
                if "result" in message:
                    versions = message["result"].get("supportedVersions") or []
                    return MODERN_VERSION in versions
                return False
        except UpstreamError:
            return False
        return False

    async def post(self, body: bytes, headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        """POST one message; connection failures become UpstreamUnavailable."""
        all_headers = {"Accept": _ACCEPT, "Content-Type": "application/json", **headers}
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                return await self.session.post(self.settings.url, data=body, headers=all_headers)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(
                f"upstream {self.name!r} did not answer within {self.settings.timeout_seconds:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream {self.name!r} is unreachable: {exc}") from exc

    async def exchange(
        self,
        body_message: JSON,
        headers: Mapping[str, str],
        upstream_id: Any,
        idle: float | None = -1.0,
    ) -> AsyncIterator[JSON]:
        """POST a request and yield every message of its answer up to the response."""
        response = await self.post(orjson.dumps(body_message), headers)
        async with response:
            async for message in self.read_answer(response, upstream_id, idle):
                yield message

    async def read_answer(
        self,
        response: aiohttp.ClientResponse,
        upstream_id: Any,
        idle: float | None = -1.0,
        decoder: Decoder | None = None,
    ) -> AsyncIterator[JSON]:
        """Turn an HTTP answer (JSON, SSE or an error status) into JSON-RPC messages."""
        ctype = response.headers.get("Content-Type", "")
        if response.status >= 400 or not (
            ctype.startswith("application/json") or ctype.startswith("text/event-stream")
        ):
            yield await self._error_answer(response, upstream_id)
            return
        if ctype.startswith("application/json"):
            body = await self._read_body(response)
            yield decode_message(body, self.name)
            return
        async for message in self.read_events(response, idle, decoder):
            yield message
            if "method" not in message and message.get("id") == upstream_id:
                return
        if decoder is None or decoder.last_id is None:
            raise UpstreamError(f"upstream {self.name!r} closed its stream before answering")

    async def read_events(
        self,
        response: aiohttp.ClientResponse,
        idle: float | None = -1.0,
        decoder: Decoder | None = None,
    ) -> AsyncIterator[JSON]:
        """Yield the JSON-RPC messages of an SSE stream; idle time is bounded (None: unbounded).

        -1 means the upstream's own timeout.
        """
        if idle is not None and idle < 0:
            idle = self.settings.timeout_seconds
        decoder = decoder or Decoder()
        buffer = b""
        chunks = response.content.iter_any()
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await anext(chunks, None)
            except TimeoutError as exc:
                raise UpstreamTimeout(
                    f"upstream {self.name!r} sent nothing for {self.settings.timeout_seconds:g} s"
                ) from exc
            except aiohttp.ClientError as exc:
                raise UpstreamUnavailable(
                    f"upstream {self.name!r} broke its stream: {exc}"
                ) from exc
            if chunk is None:
                return
            buffer += chunk
            if len(buffer) > MAX_EVENT_BYTES:
                raise UpstreamError(f"upstream {self.name!r} sent an event over 16 MiB")
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = decoder.feed_line(line)
                if event is not None and event.event == "message":
                    yield decode_message(event.data, self.name)

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                return await response.read()
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"upstream {self.name!r} did not finish its answer within "
                f"{self.settings.timeout_seconds:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream {self.name!r} broke its answer: {exc}") from exc

    async def _error_answer(self, response: aiohttp.ClientResponse, upstream_id: Any) -> JSON:
        body = await self._read_body(response)
        with contextlib.suppress(UpstreamError):
            message = decode_message(body, self.name)
            if isinstance(message.get("error"), dict):
                message["id"] = upstream_id
                message[UPSTREAM_STATUS] = response.status
                return message
        raise UpstreamError(
            f"upstream {self.name!r} answered HTTP {response.status} "
            f"({response.headers.get('Content-Type', 'no content type')})",
            data={"upstream": self.name, "status": response.status},
        )


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

    def _headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        headers = {"MCP-Protocol-Version": self._version, **extra}
        if self._session_id is not None:
            headers["Mcp-Session-Id"] = self._session_id
        return headers

    async def open(self, headers: Mapping[str, str]) -> JSON:
        """Run the initialize handshake if it has not run; return the InitializeResult."""
        async with self._lock:
            if self.initialized is None:
                await self._initialize(headers)
        assert self.initialized is not None  # noqa: S101 - set by _initialize or it raised
        return self.initialized

    async def _initialize(self, headers: Mapping[str, str]) -> None:
        self._session_id = None
        message, upstream_id = self._ids.outgoing(
            {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": self._hello}
        )
        response = await self._client.post(orjson.dumps(message), {**headers})
        async with response:
            session_id = response.headers.get("Mcp-Session-Id")
            answer = None
            async for reply in self._client.read_answer(response, upstream_id):
                if reply.get("id") == upstream_id:
                    answer = reply
        if answer is None or "result" not in answer:
            detail = (answer or {}).get("error", {}).get("message", "no result")
            raise UpstreamError(f"upstream {self._client.name!r} refused initialize: {detail}")
        result = answer["result"]
        self._version = str(result.get("protocolVersion", self._version))
        self._session_id = session_id
        self.initialized = result
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        ack = await self._client.post(orjson.dumps(note), self._headers(headers))
        ack.release()

    async def request(self, message: JSON, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        """Send a request in the session; reopen once if the upstream forgot the session."""
        await self.open(headers)
        original = message["id"]
        for attempt in (1, 2):
            outgoing, upstream_id = self._ids.outgoing(message)
            self.inflight[original] = upstream_id
            try:
                response = await self._client.post(orjson.dumps(outgoing), self._headers(headers))
            except BaseException:
                self.inflight.pop(original, None)
                raise
            async with response:
                if response.status == 404 and self._session_id is not None and attempt == 1:
                    log.info("upstream %r forgot session; reopening", self._client.name)
                    async with self._lock:
                        await self._initialize(headers)
                    continue
                decoder = Decoder()
                try:
                    async for reply in self._client.read_answer(
                        response, upstream_id, decoder=decoder
                    ):
                        if reply.get("id") == upstream_id and "method" not in reply:
                            yield restore_id(reply, original)
                            return
                        yield reply
                    # The upstream closed the stream early (SSE polling): resume it.
                    async for reply in self._resume(decoder, headers):
                        if reply.get("id") == upstream_id and "method" not in reply:
                            yield restore_id(reply, original)
                            return
                        yield reply
                    raise UpstreamError(f"upstream {self._client.name!r} never finished its answer")
                finally:
                    self.inflight.pop(original, None)
                return

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
            try:
                async with asyncio.timeout(self._client.settings.timeout_seconds):
                    response = await self._client.session.get(
                        self._client.settings.url, headers=all_headers
                    )
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise UpstreamUnavailable(
                    f"upstream {self._client.name!r} could not resume its stream: {exc}"
                ) from exc
            async with response:
                if response.status != 200:
                    raise UpstreamError(
                        f"upstream {self._client.name!r} refused to resume its stream "
                        f"(HTTP {response.status})"
                    )
                before = decoder.last_id
                async for message in self._client.read_events(response, decoder=decoder):
                    yield message
                if decoder.last_id == before:
                    return

    async def send(self, message: JSON, headers: Mapping[str, str]) -> None:
        """POST a notification or a response into the session (expects 202)."""
        await self.open(headers)
        response = await self._client.post(orjson.dumps(message), self._headers(headers))
        async with response:
            if response.status >= 400:
                raise UpstreamError(
                    f"upstream {self._client.name!r} refused a message with HTTP {response.status}"
                )

    async def listen(self, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        """Open the session's GET stream; nothing when the upstream offers none (405)."""
        await self.open(headers)
        all_headers = {"Accept": "text/event-stream", **self._headers(headers)}
        try:
            response = await self._client.session.get(
                self._client.settings.url,
                headers=all_headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
            )
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                f"upstream {self._client.name!r} is unreachable: {exc}"
            ) from exc
        async with response:
            if response.status != 200:
                return
            decoder = Decoder()
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    event = decoder.feed_line(line)
                    if event is not None and event.event == "message":
                        yield decode_message(event.data, self._client.name)

    async def close(self) -> None:
        """DELETE the upstream session (best effort: the upstream may already be gone)."""
        if self._session_id is None:
            return
        headers = self._headers({})
        self._session_id = None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with asyncio.timeout(2):
                response = await self._client.session.delete(
                    self._client.settings.url, headers=headers
                )
                response.release()


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

    async def request(self, message: JSON, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        """POST the request with its mirrored headers and relay the answer."""
        original = message["id"]
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
        idle = None if message["method"] == "subscriptions/listen" else -1.0
        async for reply in self._client.exchange(outgoing, all_headers, upstream_id, idle):
            if reply.get("id") == upstream_id and "method" not in reply:
                yield restore_id(reply, original)
                return
            yield reply

    async def send(self, message: JSON, headers: Mapping[str, str]) -> None:
        """The modern era defines no client notifications over HTTP; nothing to deliver."""

    async def listen(self, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        """Modern upstreams push only on subscriptions/listen, which is a request."""
        return
        yield  # pragma: no cover - makes this an async generator

    async def close(self) -> None:
        """Nothing is held per conversation."""
