"""A lean HTTP/1.1 server for the ASGI front: httptools parsing, keep-alive, streaming.

Chosen over uvicorn by measurement (docs/decisions/0002-upstream-http-client.md): the same
pipeline cost 0.31–0.37 ms CPU per call under uvicorn and about 0.16 ms here, mostly because a
whole response goes out in one write and a request needs no task of its own beyond the app's.
It serves exactly what the gateway needs: one request at a time per connection (pipelined
requests wait their turn), bodies buffered up to a limit, responses with Content-Length or
chunked, Expect: 100-continue, and bounded waits everywhere (slow headers, idle keep-alive).

TLS (transport/tls.py) is the event loop's: the server listens with the context it is given.
A shutdown drains (`drain`): every answer from then on closes its connection, idle connections
close at once, open GET event streams get a `retry:` hint and a clean end (the client resumes
with Last-Event-ID, through the balancer, on another replica), answers in progress get until
the deadline, and what is left then is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from typing import cast

import httptools

from bastion.asgi import ASGIApp
from bastion.transport.response import Request, Response, head

log = logging.getLogger("bastion.server")

MAX_HEAD_BYTES = 64 * 1024


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and runs them through the app in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client: tuple[str, int] | None = None
        self._local: tuple[str, int] | None = None
        self._current: Request | None = None
        self._queue: deque[Request] = deque()
        self._head_bytes = 0
        self._head_too_large = False
        self._url = b""
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._changed = asyncio.Event()  # body complete or connection lost
        self._timer: asyncio.TimerHandle | None = None
        self.response: Response | None = None  # the answer in progress

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self._client = (str(peer[0]), int(peer[1])) if peer else None
        self._local = (str(sock[0]), int(sock[1])) if sock else None
        self._server.connections.add(self)
        self._arm(self._server.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, b"protocol upgrades are not supported")
        except httptools.HttpParserError:
            self._reject(400, b"malformed HTTP request")
        if self._head_too_large:
            self._reject(431, b"request head too large")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        self._server.quiet.set()
        if not self._server.connections:
            self._server.drained.set()
        self._writable.set()
        self._changed.set()
        self._disarm()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._current = Request()
        self._url = b""
        self._head_bytes = 0
        if self._task is None:
            self._arm(self._server.header_timeout)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None  # noqa: S101 - set in on_message_begin
        self._count_head(len(name) + len(value) + 4)
        name = name.lower()
        self._current.headers.append((name, value.strip(b" \t")))
        if name == b"expect" and value.strip().lower() == b"100-continue":
            self._current.expect_continue = True

    def on_headers_complete(self) -> None:
        request = self._current
        assert request is not None  # noqa: S101 - set in on_message_begin
        parsed = httptools.parse_url(self._url)
        request.path = parsed.path.decode("latin-1") if parsed.path else "/"
        request.query = parsed.query or b""
        request.method = self._parser.get_method().decode("latin-1")
        request.version = self._parser.get_http_version()
        request.keep_alive = self._parser.should_keep_alive()
        if request.expect_continue:
            # The app runs once the body is here, so the server answers the expectation.
            length = dict(request.headers).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self._server.max_body:
                request.keep_alive = False
                request.overflow = True
                request.complete = True
                self._enqueue(request)  # the app sees the length and refuses it
            else:
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        request = self._current
        assert request is not None  # noqa: S101 - set in on_message_begin
        if request.overflow:
            return  # the rest of an oversized body is read and dropped
        before = request.size
        request.size += len(body)
        limit = self._server.max_body
        if request.size <= limit:
            request.body.append(body)
            return
        # Keep one byte past the limit, so the app sees it was passed and answers 413, and
        # answer now rather than after the whole upload; the connection closes after that.
        request.body.append(body[: limit + 1 - before])
        request.overflow = True
        request.keep_alive = False
        request.complete = True
        self._enqueue(request)

    def on_message_complete(self) -> None:
        request = self._current
        assert request is not None  # noqa: S101 - set in on_message_begin
        self._current = None
        if request.overflow:
            return
        request.complete = True
        self._changed.set()
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        self._queue.append(request)
        if self._task is None:
            self._disarm()
            self._task = self._loop.create_task(self._serve())
        elif self._transport is not None:
            # Pipelined requests wait; stop reading until the current one is answered.
            self._transport.pause_reading()

    # -- serving ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self._queue and not self._closed:
                request = self._queue.popleft()
                keep = await self._run(request)
                if not keep:
                    self._close()
                    return
            if self._transport is not None and not self._closed:
                self._transport.resume_reading()
                self._arm(self._server.keepalive_timeout)
        finally:
            self._task = None
            self.response = None
            if self._queue and not self._closed:
                self._task = self._loop.create_task(self._serve())
            self._server.quiet.set()

    async def _run(self, request: Request) -> bool:
        response = self.response = Response(self, request)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.version,
            "method": request.method,
            "scheme": self._server.scheme,
            "path": request.path,
            "raw_path": request.path.encode("latin-1"),
            "query_string": request.query,
            "root_path": "",
            "headers": request.headers,
            "client": self._client,
            "server": self._local,
        }
        try:
            await self._server.app(scope, response.receive, response.send)
        except OSError:
            return False  # the client went away mid-answer
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            if not response.started:
                await response.send_error(500)
            return False
        if not response.finished:
            return False
        keep = request.keep_alive and request.complete and not response.must_close
        return keep and not self._server.draining

    def write(self, data: bytes) -> None:
        """Write to the client (ignored once the connection is gone)."""
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    async def drain(self) -> None:
        """Wait until the client's socket buffer has room."""
        await self._writable.wait()

    async def wait_change(self) -> None:
        """Wait for the current request's body to complete or the connection to close."""
        self._changed.clear()
        await self._changed.wait()

    @property
    def closed(self) -> bool:
        """Whether the client went away."""
        return self._closed

    @property
    def draining(self) -> bool:
        """Whether the server is shutting down (every answer closes its connection)."""
        return self._server.draining

    @property
    def busy(self) -> bool:
        """Whether an answer is in progress on this connection, still open."""
        return self._task is not None and not self._closed

    def _reject(self, status: int, detail: bytes) -> None:
        body = b'{"error":"' + detail + b'"}'
        self.write(
            head(
                status,
                [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            )
            + body
        )
        self._close()

    def close(self) -> None:
        """Close the connection now (the app's next send fails, its receive disconnects)."""
        self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.close()
        self._closed = True
        # The app learns at once (a disconnect, a failed send), not when the socket is gone.
        self._changed.set()
        self._writable.set()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self._loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        if self._task is None:  # idle keep-alive or a request too slow to arrive
            self._close()

    def shutdown(self) -> None:
        """Close now if idle; otherwise after the response in progress."""
        if self._task is None:
            self._close()
        else:
            self._queue.clear()

    def wind_down(self) -> None:
        """The server drains: close now if idle, end an open GET event stream with the hint
        to reconnect, else close after the answer in progress."""
        response = self.response
        if response is not None and response.listening:
            response.hang_up()
        else:
            self.shutdown()

    def cut(self) -> None:
        """The drain's deadline passed: end an event stream with the hint, close the rest."""
        if self.response is not None and self.response.streaming:
            self.response.hang_up()
        self._close()


class HttpServer:
    """Serves an ASGI app over HTTP/1.1 (over TLS when given a context) until asked to stop."""

    def __init__(
        self,
        app: ASGIApp,
        max_body: int,
        keepalive_timeout: float = 75.0,
        header_timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self.connections: set[_Connection] = set()
        self.drained = asyncio.Event()
        self.quiet = asyncio.Event()  # set whenever an answer ends or a connection goes
        self.draining = False
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; return the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            reuse_address=True,
            backlog=1024,
            ssl=self.tls,
            # A handshake is part of a request's head: as long to arrive, at most.
            ssl_handshake_timeout=self.header_timeout if self.tls is not None else None,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def drain(self, seconds: float) -> int:
        """Begin a shutdown, still listening (a health check sees the gateway not ready):
        from now on every answer closes its connection, idle connections close, GET event
        streams are told to reconnect elsewhere; answers in progress get `seconds` to end.
        Return how many were cut at the deadline (0 when all ended in time)."""
        self.draining = True
        for conn in list(self.connections):
            conn.wind_down()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self._busy():
                    self.quiet.clear()
                    await self.quiet.wait()
        busy = self._busy()
        for conn in busy:
            conn.cut()
        return len(busy)

    def _busy(self) -> list[_Connection]:
        return [conn for conn in self.connections if conn.busy]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let answers in progress finish (up to `grace` s), close the rest."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self.drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.drained.wait()
        for conn in list(self.connections):
            conn._close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
