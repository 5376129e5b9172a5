"""Bastion's upstream HTTP client against raw, scripted HTTP servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bastion.errors import WireError
from bastion.wire import Pool

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Any]


class Scripted:
    """A server that runs `script(reader, writer, connection_number)` per connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self.connections)
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Any]]:
    servers: list[asyncio.Server] = []

    async def make(script: Script) -> tuple[Scripted, Pool]:
        state = Scripted(script)
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return state, Pool(f"http://127.0.0.1:{port}/mcp", 4, 2.0, 1.0)

    yield make
    for server in servers:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_keep_alive_reuses_one_connection(scripted: Any) -> None:
    async def script(reader: Any, writer: Any, n: int) -> None:
        for _ in range(3):
            await read_request(reader)
            writer.write(OK)

    state, pool = await scripted(script)
    for _ in range(3):
        async with await pool.request("POST", {}, b"{}") as response:
            assert await response.read() == b"ok"
    assert state.connections == 1


async def test_stale_pooled_connection_is_replaced(scripted: Any) -> None:
    """The upstream closes an idle keep-alive connection; the next call must not fail."""

    async def script(reader: Any, writer: Any, n: int) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()  # then close without saying so

    state, pool = await scripted(script)
    for _ in range(2):
        async with await pool.request("POST", {}, b"{}") as response:
            assert await response.read() == b"ok"
        await asyncio.sleep(0.05)
    assert state.connections == 2


async def test_chunked_and_until_close_bodies(scripted: Any) -> None:
    async def script(reader: Any, writer: Any, n: int) -> None:
        await read_request(reader)
        if n == 1:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")

    _, pool = await scripted(script)
    async with await pool.request("POST", {}, b"{}") as response:
        assert await response.read() == b"abcde"
    async with await pool.request("POST", {}, b"{}") as response:
        assert await response.read() == b"until the end"


async def test_streaming_arrives_before_the_end(scripted: Any) -> None:
    release = asyncio.Event()

    async def script(reader: Any, writer: Any, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"4\r\nlast\r\n0\r\n\r\n")

    _, pool = await scripted(script)
    async with await pool.request("POST", {}, b"{}") as response:
        chunks = response.iter_chunks()
        assert await anext(chunks) == b"first"
        release.set()
        assert [c async for c in chunks] == [b"last"]


async def test_silent_upstream_times_out(scripted: Any) -> None:
    async def script(reader: Any, writer: Any, n: int) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    _, pool = await scripted(script)
    async with asyncio.timeout(5):
        with pytest.raises(TimeoutError):
            await pool.request("POST", {}, b"{}")


async def test_garbage_response_is_a_wire_error(scripted: Any) -> None:
    async def script(reader: Any, writer: Any, n: int) -> None:
        await read_request(reader)
        writer.write(b"SPEAKING NONSENSE\r\n\r\n")

    _, pool = await scripted(script)
    with pytest.raises(WireError):
        await pool.request("POST", {}, b"{}")


async def test_connection_lost_mid_body(scripted: Any) -> None:
    async def script(reader: Any, writer: Any, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")

    _, pool = await scripted(script)
    async with await pool.request("POST", {}, b"{}") as response:
        with pytest.raises(WireError, match="before its answer ended"):
            await response.read()


async def test_header_injection_is_refused(scripted: Any) -> None:
    async def script(reader: Any, writer: Any, n: int) -> None:
        await read_request(reader)

    _, pool = await scripted(script)
    with pytest.raises(ValueError, match="line break"):
        await pool.request("POST", {"X-Tenant": "acme\r\nX-Tenant: globex"}, b"{}")


async def test_unreachable(scripted: Any) -> None:
    pool = Pool("http://127.0.0.1:9/mcp", 1, 1.0, 1.0)
    with pytest.raises(OSError):
        await pool.request("POST", {}, b"{}")
