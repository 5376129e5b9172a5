"""How the demo servers serve HTTP: uvicorn on a pre-bound socket, a one-line "listening"
notice on stderr, and a clean exit on SIGTERM/SIGINT. Shared by every demo in examples/."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from typing import Any


async def serve_http(app: Any, host: str, port: int, label: str) -> None:
    """Serve `app` with uvicorn until SIGTERM/SIGINT, then return (exit status 0).

    Prints one line to stderr once the server accepts requests.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                shown = f"[{host}]" if ":" in host else host
                print(
                    f"{label} listening on http://{shown}:{bound_port}/mcp",
                    file=sys.stderr,
                    flush=True,
                )

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        # Open SSE streams (handshake-era GET streams) must not hold up shutdown for long.
        timeout_graceful_shutdown=3,
    )
    # uvicorn captures SIGINT/SIGTERM while serving and re-raises them once it has
    # shut down gracefully; these no-op handlers turn that re-raise into a clean return.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        await _Server(config).serve(sockets=[sock])
    finally:
        sock.close()


def run(coro: Any) -> None:
    """Run a coroutine on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
