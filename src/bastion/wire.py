"""A lean HTTP/1.1 client: keep-alive pool, httptools parser, streaming.

It carries the upstream calls, and also Vault reads, audit webhooks and JWKS fetches, so it is a
leaf below them all. Chosen over aiohttp by measurement (docs/decisions/0002): on this workload
aiohttp spent 0.18 ms CPU per call, this client 0.035 ms. It does only what an MCP upstream
needs: one request at a time per connection, Content-Length request bodies, responses
with Content-Length, chunked or until-close bodies, streamed as they arrive, and TLS.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

from bastion.errors import WireError

__all__ = ["Pool", "Response"]

_HIGH_WATER = 1 << 20  # pause reading when this much body is buffered and unread
_LOW_WATER = 1 << 18


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.begin()

    def begin(self) -> None:
        """Forget the previous response; get ready for the next one."""
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self.headers_done = False
        self._keep_alive = False
        self.complete = False
        self.received = False
        self.error: BaseException | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak the same API.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = WireError(f"unparsable HTTP response: {exc}")
            self.abort()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and self._until_close():
            self.complete = True
        elif not self.complete and self.error is None:
            self.error = WireError("the upstream closed the connection before its answer ended")
        self._wake()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    # -- used by Response -------------------------------------------------------------------

    def _until_close(self) -> bool:
        return (
            "content-length" not in self.headers
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
        )

    def keep_alive(self) -> bool:
        """Whether the connection can carry another request."""
        return self.complete and not self.closed and self._keep_alive

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, limit: float | None) -> None:
        """Wait for the next parser event (or the connection's end), at most `limit` s.

        A timer rather than asyncio.timeout: this runs for every response, and the timer is
        the cheaper of the two.
        """
        if self.error is not None:
            raise self.error
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(limit, _expire, waiter) if limit is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def take(self) -> bytes | None:
        """The next buffered body chunk, or None."""
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < _LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def abort(self) -> None:
        """Drop the connection now."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _NoSlot:
    """Stands in for the pool's semaphore for long-lived requests."""

    async def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


class Response:
    """An upstream's answer: status and headers now, the body as it arrives."""

    def __init__(
        self,
        pool: Pool,
        conn: _Connection,
        timeout: float | None,
        slots: _NoSlot | asyncio.Semaphore,
    ) -> None:
        self._pool = pool
        self._slots = slots
        self._conn = conn
        self._timeout = timeout
        self.status = conn.status
        self.headers = conn.headers
        self._released = False

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; a WireError once it passes `limit` bytes (when given)."""
        parts = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if limit is not None and size > limit:
                raise WireError(f"the answer is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; each wait for data is bounded by the read timeout."""
        conn = self._conn
        while True:
            chunk = conn.take()
            if chunk is not None:
                yield chunk
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._timeout)

    def release(self) -> None:
        """Give the connection back to the pool, or drop it if the answer was not read whole."""
        if self._released:
            return
        self._released = True
        self._pool.put(self._conn, self._slots)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class Pool:
    """Keep-alive connections to one upstream origin, at most `limit` at once."""

    def __init__(
        self,
        url: str,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,  # default: the system's trust store
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = host if default_port else f"{host}:{self.port}"
        self._ssl = (ssl_context or ssl.create_default_context()) if self.tls else None
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    async def request(
        self, method: str, headers: dict[str, str], body: bytes = b"", long_lived: bool = False
    ) -> Response:
        """Send a request; return once the response headers are in.

        A long-lived request (a stream that stays open by design) has no read timeout and
        takes no slot, so open streams cannot starve ordinary calls.
        """
        read_timeout = None if long_lived else self.read_timeout
        head = self._head(method, headers, body)
        slots = _NoSlot() if long_lived else self._slots
        await slots.acquire()
        try:
            for attempt in (1, 2):
                conn = self._take_idle()
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                assert conn.transport is not None  # noqa: S101 - connected
                conn.transport.write(head + body)
                try:
                    while not conn.headers_done:
                        await conn.wait(read_timeout)
                        if conn.error is not None and not conn.headers_done:
                            raise conn.error
                except WireError:
                    conn.abort()
                    # A reused connection the upstream had closed while idle: try a fresh one.
                    if reused and not conn.received and attempt == 1:
                        continue
                    raise
                except BaseException:
                    conn.abort()
                    raise
                return Response(self, conn, read_timeout, slots)
            raise WireError("unreachable")  # pragma: no cover - the loop returns or raises
        except BaseException:
            slots.release()
            raise

    def _head(self, method: str, headers: dict[str, str], body: bytes) -> bytes:
        lines = [f"{method} {self.path} HTTP/1.1", f"Host: {self._host_header}"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} contains a line break")
            lines.append(f"{name}: {value}")
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                conn.begin()
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError as exc:
            raise ConnectionError(f"connect timed out after {self.connect_timeout:g} s") from exc
        return conn

    def put(self, conn: _Connection, slots: _NoSlot | asyncio.Semaphore) -> None:
        """Return a connection after its response ended (or drop it)."""
        if conn.keep_alive():
            self._idle.append(conn)
        else:
            conn.abort()
        slots.release()

    def close(self) -> None:
        """Drop every idle connection."""
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
