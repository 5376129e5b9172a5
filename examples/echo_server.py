"""Demo upstream: the leanest MCP server the SDK allows, one tool ``echo(text)``.

The baseline for Bastion's latency benchmarks (gateway overhead = latency through
the gateway minus latency straight to this server). Choices, all to keep the
per-request server cost low:

* Streamable HTTP with ``json_response=True``: every POST is answered with one
  ``application/json`` body, never an SSE stream (no event framing, no priming
  events, no open GET stream).
* ``stateless_http=True``: handshake-era clients (2025-06-18 / 2025-11-25) still
  send ``initialize`` but get no ``Mcp-Session-Id``; no session table, no idle
  reaper. 2026-07-28 requests take the SDK's single-exchange path (handled in
  the ASGI task itself in JSON mode) on the same endpoint.
* ``echo`` is registered with ``structured_output=False``: the result is one
  text content block, not a text block plus a duplicate ``structuredContent``.
* The SDK's default OpenTelemetry middleware is dropped (``--otel`` keeps it).
* uvicorn with uvloop and httptools when installed, access log off.

Usage::

    python examples/echo_server.py [--host 127.0.0.1] [--port 9102]
                                   [--transport http|stdio] [--otel]
"""

from __future__ import annotations

import argparse
import sys

from demo_serving import run, serve_http
from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations


def build_server(*, otel: bool = False) -> MCPServer:
    mcp = MCPServer(name="bastion-demo-echo", version="0.1.0", log_level="WARNING")
    if not otel:
        from mcp.server._otel import OpenTelemetryMiddleware

        mcp.middleware[:] = [
            m for m in mcp.middleware if not isinstance(m, OpenTelemetryMiddleware)
        ]

    @mcp.tool(
        title="Echo",
        description="Return the given text unchanged.",
        annotations=ToolAnnotations(
            title="Echo",
            read_only_hint=True,
            destructive_hint=False,
            idempotent_hint=True,
            open_world_hint=False,
        ),
        structured_output=False,
    )
    async def echo(text: str) -> str:
        return text

    return mcp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Minimal MCP echo server (benchmark baseline)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=9102, help="TCP port (0 = pick a free one)")
    parser.add_argument("--transport", choices=["http", "stdio"], default="http")
    parser.add_argument(
        "--otel", action="store_true", help="keep the SDK's OpenTelemetry middleware"
    )
    args = parser.parse_args(argv)

    mcp = build_server(otel=args.otel)
    if args.transport == "stdio":
        mcp.run("stdio")
        return 0

    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

    @mcp.custom_route("/healthz", methods=["GET"])
    async def healthz(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        json_response=True,
        stateless_http=True,
        host=args.host,  # loopback bind => the SDK's Host/Origin allow-list for loopback
    )
    run(serve_http(app, args.host, args.port, "echo server"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
