"""The benchmark's anchor: one bare Python proxy hop, with no MCP logic at all.

Plain ASGI on uvicorn (uvloop + httptools), forwarding each request's body and the
MCP-relevant headers to one upstream URL through a pooled aiohttp ClientSession, and
answering with the upstream's status, body, Content-Type and Mcp-Session-Id. It parses
nothing, checks nothing and keeps no state, so "bastion minus bare hop" is the cost of the
gateway's own work and "bare hop minus direct" is the cost of any Python hop.

Usage::

    python bench/bare_hop.py --upstream http://127.0.0.1:9102/mcp [--port 9103]

Every path except /healthz is forwarded to the upstream URL. Bodies are read whole and
answered whole (the echo server answers JSON, never SSE, so no streaming is needed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Request headers the upstream needs; everything else (Host, Content-Length, ...) is the
# client library's business on the upstream leg.
FORWARD = frozenset(
    {
        b"content-type",
        b"accept",
        b"authorization",
        b"mcp-protocol-version",
        b"mcp-method",
        b"mcp-name",
        b"mcp-session-id",
        b"last-event-id",
    }
)


class BareHop:
    """An ASGI app forwarding every request to one upstream URL."""

    def __init__(self, upstream: str, max_connections: int = 64) -> None:
        self.upstream = upstream
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=self.max_connections),
                    timeout=aiohttp.ClientTimeout(total=30, connect=5),
                    skip_auto_headers=("User-Agent",),
                )
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/healthz":
            await _answer(send, 200, b'{"status":"ok"}', [(b"content-type", b"application/json")])
            return
        chunks = []
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            chunks.append(event.get("body", b""))
            if not event.get("more_body", False):
                break
        body = b"".join(chunks)
        headers = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope["headers"]
            if key in FORWARD or key.startswith(b"mcp-param-")
        }
        assert self.session is not None
        try:
            async with self.session.request(
                scope["method"], self.upstream, data=body, headers=headers
            ) as response:
                data = await response.read()
                out = []
                content_type = response.headers.get("Content-Type")
                if content_type is not None:
                    out.append((b"content-type", content_type.encode("latin-1")))
                session_id = response.headers.get("Mcp-Session-Id")
                if session_id is not None:
                    out.append((b"mcp-session-id", session_id.encode("latin-1")))
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            message = f'{{"error":"upstream unreachable: {type(exc).__name__}"}}'.encode()
            await _answer(send, 502, message, [(b"content-type", b"application/json")])
            return
        await _answer(send, status, data, out)


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bare pass-through proxy (benchmark anchor)")
    parser.add_argument("--upstream", required=True, help="upstream URL, e.g. http://h:p/mcp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9103)
    parser.add_argument("--max-connections", type=int, default=64)
    args = parser.parse_args(argv)
    uvicorn.run(
        BareHop(args.upstream, args.max_connections),
        host=args.host,
        port=args.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
