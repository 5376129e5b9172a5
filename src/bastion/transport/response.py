"""One HTTP/1.1 request as the server parsed it, and the ASGI receive/send pair that answers
it: a whole body with Content-Length or a streamed one, chunked; an event stream that a
shutdown ends with a hint to reconnect (`hang_up`)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Protocol

from bastion.asgi import Message

__all__ = [
    "RECONNECT",
    "Connection",
    "Request",
    "Response",
    "head",
]

# What an event stream ended by a shutdown ends with: reconnect after this many milliseconds
# (an event with no data, so no id: the client's Last-Event-ID stays the last one it got).
RECONNECT = b"retry: 1000\n\n"
_SSE = b"text/event-stream"
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class Connection(Protocol):
    """What a response needs of the connection it is written to."""

    @property
    def closed(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    async def wait_change(self) -> None: ...

    def close(self) -> None: ...


class Request:
    """One parsed request waiting for, or in, the app."""

    __slots__ = (
        "body",
        "complete",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "overflow",
        "path",
        "query",
        "size",
        "version",
    )

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.overflow = False
        self.complete = False
        self.keep_alive = True
        self.expect_continue = False
        self.method = "GET"
        self.path = "/"
        self.query = b""
        self.version = "1.1"


class Response:
    """The ASGI receive/send pair for one request."""

    def __init__(self, conn: Connection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self._delivered = False
        self._status = 200
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunked = False
        self._head_sent = False
        self.started = False
        self.finished = False
        self.must_close = False
        self.streaming = False  # an SSE body, written as it comes

    @property
    def listening(self) -> bool:
        """Whether this answers a GET with an event stream (that only ends when told to)."""
        return self.streaming and self._request.method == "GET"

    def hang_up(self) -> None:
        """End the event stream with the hint to reconnect soon, and the connection."""
        if self._chunked and not self.finished:
            self._conn.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(RECONNECT), RECONNECT))
        self.finished = True
        self.must_close = True
        self._conn.close()

    async def receive(self) -> Message:
        request = self._request
        if not self._delivered:
            while not request.complete and not self._conn.closed:
                await self._conn.wait_change()
            if self._conn.closed and not request.complete:
                return {"type": "http.disconnect"}
            self._delivered = True
            return {"type": "http.request", "body": b"".join(request.body), "more_body": False}
        while not self._conn.closed:
            await self._conn.wait_change()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self._conn.closed:
            raise ConnectionResetError("the client closed the connection")
        kind = message["type"]
        if kind == "http.response.start":
            self._status = int(message["status"])
            self._headers = list(message.get("headers", []))
            self.started = True
            return
        if kind != "http.response.body" or self.finished:
            return
        body: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if not self._head_sent:
            self._write_head(body, more)
            return
        if self._chunked:
            data = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + (
                b"" if more else b"0\r\n\r\n"
            )
            self._conn.write(data)
        else:
            self._conn.write(body)
        if not more:
            self.finished = True
        await self._conn.drain()

    def _write_head(self, body: bytes, more: bool) -> None:
        self._head_sent = True
        names = {name.lower() for name, _ in self._headers}
        headers = self._headers
        if b"content-length" not in names:
            if more:
                self._chunked = True
                headers = [*headers, (b"transfer-encoding", b"chunked")]
            else:
                headers = [*headers, (b"content-length", str(len(body)).encode())]
        draining = self._conn.draining
        if not self._request.keep_alive or not self._request.complete or draining:
            self.must_close = True
            headers = [*headers, (b"connection", b"close")]
        if self._chunked:
            payload = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            self.streaming = any(
                name.lower() == b"content-type" and value.startswith(_SSE)
                for name, value in headers
            )
        else:
            payload = body
        self._conn.write(head(self._status, headers) + payload)
        if not more:
            self.finished = True
        elif draining and self.listening:
            self.hang_up()  # a stream opened while draining: told at once to go elsewhere

    async def send_error(self, status: int) -> None:
        """Answer a request the app failed on, without detail."""
        body = b'{"error":"internal error"}'
        self.must_close = True
        self._headers = [(b"content-type", b"application/json")]
        self._status = status
        self._write_head(body, False)


def head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A response's status line and headers, ready to write."""
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown"))]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"
