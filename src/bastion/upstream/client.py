"""The pooled HTTP connection to one upstream: `HttpClient`.

Shared by every channel (http.py) to that upstream: it sends a message, turns the HTTP answer
(JSON, an SSE stream or an error status) into an `Answer`, and reads bodies and SSE events
within bounds (`MAX_EVENT_BYTES`, the idle timeout), naming the upstream in every failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import orjson

from bastion.config import HttpUpstream
from bastion.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable, WireError
from bastion.methods import SERVER_DISCOVER
from bastion.sse import Decoder
from bastion.types import JSON, MODERN_VERSION, PROBE_META, UPSTREAM_STATUS
from bastion.upstream.base import Answer, answer_from, decode_message, response_for, speaks_modern
from bastion.wire import Pool, Response

__all__ = ["MAX_EVENT_BYTES", "HttpClient", "Resume"]

log = logging.getLogger("bastion.upstream")

MAX_EVENT_BYTES = 16 * 1024 * 1024
_ACCEPT = "application/json, text/event-stream"

# Called when an SSE answer ended without the response: resumes the stream, or yields nothing.
Resume = Callable[[Decoder], AsyncIterator[JSON]]


class _EventLines:
    """Cuts an SSE byte stream into lines (ended by LF, CRLF or CR) and keeps the size of the
    event being read: its data lines so far plus the line not yet ended.

    Only each new chunk is searched for line breaks and the unended line grows in place, so a
    long line sent in small pieces costs work in proportion to its length, not its square.
    """

    __slots__ = ("_after_cr", "_data", "_tail")

    def __init__(self) -> None:
        self._tail = bytearray()  # the line begun and not yet ended
        self._after_cr = False  # the last chunk ended in CR: a LF opening the next one pairs it
        self._data = 0  # bytes of the current event's data lines

    @property
    def held(self) -> int:
        """Bytes of the current event held so far: its data lines and the unended line."""
        return self._data + len(self._tail)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """The lines this chunk ends, each with its line ending, counted as they are taken."""
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        lines = chunk.splitlines(keepends=True)  # bytes split only at LF, CRLF and CR
        rest = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        if lines and self._tail:
            self._tail += lines[0]
            lines[0] = bytes(self._tail)
            self._tail.clear()
        self._tail += rest
        for line in lines:
            if line in (b"\n", b"\r\n", b"\r"):
                self._data = 0  # a blank line ends the event
            elif line.startswith(b"data:") or line.rstrip(b"\r\n") == b"data":
                # The decoder keeps every data line until the blank line: an upstream that
                # never sends one must not make it keep them without end.
                self._data += len(line)
            yield line


class HttpClient:
    """The pooled connection to one HTTP upstream, shared by all its channels."""

    def __init__(self, name: str, settings: HttpUpstream) -> None:
        self.name = name
        self.settings = settings
        # The read timeout bounds every wait for bytes (headers, body, the gap between SSE
        # events): an idle timeout, so progress notifications keep a long call alive.
        self.pool = Pool(
            settings.url,
            settings.max_connections,
            settings.connect_timeout_seconds,
            settings.timeout_seconds,
        )
        self.modern: bool | None = (
            None if settings.protocol == "auto" else (settings.protocol == "modern")
        )
        self._probe_lock = asyncio.Lock()

    async def close(self) -> None:
        """Close the pool."""
        self.pool.close()

    async def supports_modern(self) -> bool:
        """Whether the upstream serves 2026-07-28 requests, probed once with server/discover."""
        if self.modern is not None:
            return self.modern
        async with self._probe_lock:
            if self.modern is None:
                self.modern = await self._probe()
                era = "2026-07-28" if self.modern else "legacy"
                log.info("upstream %r speaks %s", self.name, era)
        return self.modern

    async def _probe(self) -> bool:
        probe = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": SERVER_DISCOVER,
            "params": {"_meta": PROBE_META},
        }
        headers = {"MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": SERVER_DISCOVER}
        try:
            answer = await self.exchange(probe, headers, 0, "probe")
            await answer.close()
        except UpstreamError:
            return False
        return speaks_modern(answer.first)

    async def post(
        self, body: bytes, headers: Mapping[str, str], long_lived: bool = False
    ) -> Response:
        """POST one message; failures become UpstreamTimeout or UpstreamUnavailable."""
        all_headers = {"Accept": _ACCEPT, "Content-Type": "application/json", **headers}
        return await self.send("POST", all_headers, body, long_lived)

    async def send(
        self, method: str, headers: dict[str, str], body: bytes = b"", long_lived: bool = False
    ) -> Response:
        """Any request to the upstream's MCP endpoint, with errors named for the upstream."""
        try:
            return await self.pool.request(method, headers, body, long_lived)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"upstream {self.name!r} did not answer within {self.settings.timeout_seconds:g} s"
            ) from exc
        except (OSError, WireError) as exc:
            raise UpstreamUnavailable(f"upstream {self.name!r} is unreachable: {exc}") from exc

    async def exchange(
        self,
        message: JSON,
        headers: Mapping[str, str],
        upstream_id: Any,
        original: Any,
        long_lived: bool = False,
    ) -> Answer:
        """POST a request (already carrying `upstream_id`) and answer under `original`."""
        response = await self.post(orjson.dumps(message), headers, long_lived)
        return await self.answer(response, upstream_id, original)

    async def answer(
        self,
        response: Response,
        upstream_id: Any,
        original: Any,
        resume: Resume | None = None,
        done: Callable[[], None] | None = None,
    ) -> Answer:
        """Turn an HTTP answer (JSON, SSE or an error status) into an Answer; the response is
        released here for single messages and by the stream otherwise."""
        ctype = response.headers.get("content-type", "")
        if response.status >= 400 or not ctype.startswith(
            ("application/json", "text/event-stream")
        ):
            try:
                error = await self._error_answer(response, upstream_id)
            finally:
                response.release()
                if done is not None:
                    done()
            return Answer(response_for(error, original, self.name))
        if ctype.startswith("application/json"):
            try:
                message = decode_message(await self.read_body(response), self.name)
            finally:
                response.release()
                if done is not None:
                    done()
            return Answer(response_for(message, original, self.name))
        stream = self._stream(response, upstream_id, original, resume, done)
        return await answer_from(stream, self.name)

    async def _stream(
        self,
        response: Response,
        upstream_id: Any,
        original: Any,
        resume: Resume | None,
        done: Callable[[], None] | None,
    ) -> AsyncGenerator[JSON, None]:
        decoder = Decoder()

        async def messages() -> AsyncGenerator[JSON, None]:
            async with response:
                async for message in self.read_events(response, decoder):
                    yield message
            if resume is not None and decoder.last_id is not None:
                # The upstream closed the stream early (SSE polling): resume it. Closed here,
                # not by the garbage collector: it holds the resumed response.
                resumed = resume(decoder)
                try:
                    async for message in resumed:
                        yield message
                finally:
                    if isinstance(resumed, AsyncGenerator):
                        await resumed.aclose()

        try:
            async with contextlib.aclosing(messages()) as stream:
                async for message in stream:
                    if "method" in message:
                        yield message
                    elif message.get("id") == upstream_id:
                        yield response_for(message, original, self.name)
                        return
                    else:
                        self._stray()
            raise UpstreamError(f"upstream {self.name!r} closed its stream before answering")
        finally:
            if done is not None:
                done()

    def _stray(self) -> None:
        # A response to some other request on this request's stream: passed on, the client
        # would take it for its own answer.
        log.warning("upstream %r answered another request on a call's stream; dropped", self.name)

    async def read_events(
        self, response: Response, decoder: Decoder | None = None
    ) -> AsyncIterator[JSON]:
        """Yield the JSON-RPC messages of an SSE stream (idle time bounded by the timeout)."""
        decoder = decoder or Decoder()
        lines = _EventLines()
        chunks = response.iter_chunks()
        while True:
            try:
                chunk = await anext(chunks, None)
            except TimeoutError as exc:
                raise UpstreamTimeout(
                    f"upstream {self.name!r} sent nothing for {self.settings.timeout_seconds:g} s"
                ) from exc
            except (OSError, WireError) as exc:
                raise UpstreamUnavailable(
                    f"upstream {self.name!r} broke its stream: {exc}"
                ) from exc
            if chunk is None:
                return
            for line in lines.feed(chunk):
                self._check_event_size(lines)
                event = decoder.feed_line(line)
                if event is not None and event.event == "message":
                    yield decode_message(event.data, self.name)
            self._check_event_size(lines)

    def _check_event_size(self, lines: _EventLines) -> None:
        # One bound for the whole event, not per line: an event of many short data lines
        # would otherwise hold memory until the idle timeout.
        if lines.held > MAX_EVENT_BYTES:
            raise UpstreamError(
                f"upstream {self.name!r} sent an event over {MAX_EVENT_BYTES >> 20} MiB"
            )

    async def read_body(self, response: Response) -> bytes:
        """The whole body of a response (at most 16 MiB), with failures named for the upstream.

        A bigger body is refused before it is all in memory; the connection is then dropped,
        since the rest of the answer was never read.
        """
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in response.iter_chunks():
                size += len(chunk)
                if size > MAX_EVENT_BYTES:
                    raise UpstreamError(
                        f"upstream {self.name!r} sent an answer over {MAX_EVENT_BYTES >> 20} MiB"
                    )
                parts.append(chunk)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"upstream {self.name!r} did not finish its answer within "
                f"{self.settings.timeout_seconds:g} s"
            ) from exc
        except (OSError, WireError) as exc:
            raise UpstreamUnavailable(f"upstream {self.name!r} broke its answer: {exc}") from exc
        return b"".join(parts)

    async def _error_answer(self, response: Response, upstream_id: Any) -> JSON:
        body = await self.read_body(response)
        with contextlib.suppress(UpstreamError):
            message = decode_message(body, self.name)
            if isinstance(message.get("error"), dict):
                message["id"] = upstream_id
                message[UPSTREAM_STATUS] = response.status
                return message
        raise UpstreamError(
            f"upstream {self.name!r} answered HTTP {response.status} "
            f"({response.headers.get('content-type', 'no content type')})",
            data={"upstream": self.name, "status": response.status},
        )
