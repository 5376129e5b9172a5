"""Bastion's HTTP/1.1 server, attacked with raw bytes: smuggling-shaped requests, slow
clients, oversized heads and bodies, pipelining. Every case ends in a precise answer or a
closed connection within its bound, never a hang."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bastion.transport.server import HttpServer


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with what it saw; `/stream` answers in three chunks."""
    body = b""
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            return
        body += event.get("body", b"")
        if not event.get("more_body"):
            break
    if len(body) > 100:
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b"too large"})
        return
    if scope["path"] == "/stream":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for part in (b"one", b"two", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if scope["path"] == "/boom":
        raise RuntimeError("the app failed")
    seen = {
        "method": scope["method"],
        "path": scope["path"],
        "body": body.decode(),
        "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
    }
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(seen).encode()})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    srv = HttpServer(echo_app, max_body=100, keepalive_timeout=0.5, header_timeout=0.5)
    port = await srv.start("127.0.0.1", 0)
    yield "127.0.0.1", port
    await srv.stop(grace=1)


async def exchange(addr: tuple[str, int], raw: bytes, read_for: float = 2.0) -> bytes:
    """Send raw bytes, read until the server closes or `read_for` passes."""
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(raw)
    await writer.drain()
    data = b""
    try:
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        pass
    writer.close()
    return data


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST "
        + path.encode()
        + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


async def test_keep_alive_and_pipelining_in_order(server: tuple[str, int]) -> None:
    raw = post("/a", b"first") + post("/b", b"second") + post("/c", b"third")
    data = await exchange(server, raw, read_for=1.5)
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.index(b'"/a"') < data.index(b'"/b"') < data.index(b'"/c"')


async def test_chunked_request_body(server: tuple[str, int]) -> None:
    raw = (
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    data = await exchange(server, raw, read_for=1)
    assert b'"body": "hello world"' in data


async def test_content_length_with_chunked_is_refused(server: tuple[str, int]) -> None:
    """Request smuggling: two framings in one request. It must not reach the app."""
    raw = (
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    data = await exchange(server, raw, read_for=1)
    assert b"/smuggled" not in data
    assert data.startswith(b"HTTP/1.1 400")


async def test_malformed_request_line(server: tuple[str, int]) -> None:
    data = await exchange(server, b"NOT HTTP AT ALL\r\n\r\n", read_for=1)
    assert data.startswith(b"HTTP/1.1 400") and b"malformed" in data


async def test_oversized_head_is_431(server: tuple[str, int]) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
    data = await exchange(server, raw, read_for=1)
    assert data.startswith(b"HTTP/1.1 431")


async def test_oversized_body_answered_before_the_upload_ends(server: tuple[str, int]) -> None:
    """The client announces 10 MB but sends 1 KiB and stalls: the answer comes anyway, and
    the connection closes (the rest of the body would otherwise be read as a request)."""
    head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    data = await exchange(server, head + b"z" * 1024, read_for=1.5)
    assert data.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in data.lower()


async def test_expect_continue(server: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*server)
    writer.write(
        b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    async with asyncio.timeout(2):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"ok")
    async with asyncio.timeout(2):
        final = await reader.readuntil(b"}")
    assert b"200 OK" in final and b'"body": "ok"' in final
    writer.close()


async def test_slow_head_is_cut_off(server: tuple[str, int]) -> None:
    """Slowloris: a head that never ends is dropped after header_timeout."""
    reader, writer = await asyncio.open_connection(*server)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    async with asyncio.timeout(3):
        assert await reader.read() == b""  # closed by the server
    writer.close()


async def test_idle_keep_alive_is_closed(server: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*server)
    writer.write(post("/i", b"x"))
    async with asyncio.timeout(3):
        data = await reader.read()  # the answer, then the close after 0.5 s idle
    assert data.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_connection_close_and_http_1_0(server: tuple[str, int]) -> None:
    data = await exchange(server, post("/c", b"x", b"Connection: close\r\n"), read_for=2)
    assert b"connection: close" in data.lower()
    data = await exchange(server, b"GET /old HTTP/1.0\r\n\r\n", read_for=2)
    assert data.startswith(b"HTTP/1.1 200") and b'"/old"' in data


async def test_streamed_answer_is_chunked(server: tuple[str, int]) -> None:
    data = await exchange(server, post("/stream", b""), read_for=1)
    assert b"transfer-encoding: chunked" in data.lower()
    assert b"3\r\none\r\n3\r\ntwo\r\n5\r\nthree\r\n0\r\n\r\n" in data


async def test_app_failure_is_a_bare_500(server: tuple[str, int]) -> None:
    data = await exchange(server, post("/boom", b""), read_for=1)
    assert data.startswith(b"HTTP/1.1 500")
    assert b"Traceback" not in data and b"the app failed" not in data


async def test_upgrade_is_refused(server: tuple[str, int]) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    data = await exchange(server, raw, read_for=1)
    assert data.startswith(b"HTTP/1.1 400")
