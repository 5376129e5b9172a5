"""A FastMCP proxy in front of one MCP server: the benchmark's FastMCP peer (bench/peers.py).

Runs in its own virtual environment (`.bench-venvs/fastmcp`, made by bench/peers.py with the
pinned `fastmcp` release), never in the project's: it imports nothing of Bastion's. The proxy
is FastMCP's own `create_proxy(url)` served over Streamable HTTP with FastMCP's defaults
(sessions on, SSE answers) unless `--stateless` / `--json-response` ask otherwise; the
uvicorn access log is off and the log level is warning, as for every target of the run.

Usage::

    .bench-venvs/fastmcp/bin/python bench/fastmcp_proxy.py --upstream http://127.0.0.1:9102/mcp \
        --port 9105 [--stateless] [--json-response]

The MCP endpoint is `/mcp`; `/healthz` answers 200 once the server is up.
"""

from __future__ import annotations

import argparse
import sys

from fastmcp.server import create_proxy  # type: ignore[import-not-found]
from starlette.requests import Request
from starlette.responses import PlainTextResponse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FastMCP proxy (benchmark peer)")
    parser.add_argument("--upstream", required=True, help="upstream MCP URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stateless", action="store_true", help="stateless_http=True")
    parser.add_argument("--json-response", action="store_true", help="json_response=True")
    args = parser.parse_args(argv)
    proxy = create_proxy(args.upstream, name="bench-fastmcp-proxy")

    @proxy.custom_route("/healthz", methods=["GET"])
    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    proxy.run(
        transport="http",
        host=args.host,
        port=args.port,
        path="/mcp",
        show_banner=False,
        log_level="WARNING",
        stateless_http=args.stateless or None,
        json_response=args.json_response or None,
        uvicorn_config={"access_log": False},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
