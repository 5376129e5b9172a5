"""A fixture MCP server for bench/scale.py: many upstreams with many tools, in one process.

Plain ASGI on uvicorn, JSON answers only, no sessions (the 2025-11-25 handshake without an
`Mcp-Session-Id`). Every path `/u<K>/n<COUNT>/mcp` is its own MCP server: upstream K with
COUNT generated tools `s<K>_tool_000` … (each takes `text` and echoes it back), so twenty
upstreams of a hundred tools cost one process, not twenty. `/healthz` answers 200.

    python bench/tools_fixture.py --port 9300
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import orjson
import uvicorn

__all__ = ["app", "tools"]

_PATH = re.compile(r"^/u([0-9]{1,4})/n([0-9]{1,5})/mcp$")
Scope = dict[str, Any]


def tools(upstream: int, count: int) -> list[dict[str, Any]]:
    """The tools upstream `upstream` lists: `count` of them, plain descriptions."""
    return [
        {
            # Names unique across upstreams: shared names on one virtual server are shadowing,
            # which the gateway withholds.
            "name": f"s{upstream}_tool_{i:03d}",
            "title": f"Tool {i} of service {upstream}",
            "description": f"Return the given text unchanged (tool {i} of service {upstream}).",
            "inputSchema": {
                "type": "object",
                "properties": {"text": {"type": "string", "description": "what to return"}},
                "required": ["text"],
            },
            "annotations": {"readOnlyHint": True, "idempotentHint": True},
        }
        for i in range(count)
    ]


_LISTS: dict[tuple[int, int], list[dict[str, Any]]] = {}


def _answer(upstream: int, count: int, message: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON-RPC answer to one message, None for a notification."""
    method, params = message.get("method"), message.get("params") or {}
    if "id" not in message:
        return None
    if method == "initialize":
        result: dict[str, Any] = {
            "protocolVersion": params.get("protocolVersion", "2025-11-25"),
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": f"bench-service-{upstream}", "version": "0.1.0"},
        }
    elif method == "tools/list":
        key = (upstream, count)
        listed = _LISTS.get(key) or _LISTS.setdefault(key, tools(upstream, count))
        result = {"tools": listed}
    elif method == "tools/call":
        text = str((params.get("arguments") or {}).get("text", ""))
        result = {"content": [{"type": "text", "text": text}], "isError": False}
    elif method == "ping":
        result = {}
    else:
        error = {"code": -32601, "message": f"method not found: {str(method)[:40]}"}
        return {"jsonrpc": "2.0", "id": message["id"], "error": error}
    return {"jsonrpc": "2.0", "id": message["id"], "result": result}


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        event = await receive()
        chunks.append(event.get("body", b""))
        if not event.get("more_body"):
            return b"".join(chunks)


async def _send(send: Any, status: int, body: bytes = b"") -> None:
    headers = [(b"content-type", b"application/json")] if body else []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """The ASGI app: every `/u<K>/n<COUNT>/mcp` path an MCP server, `/healthz`."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/healthz":
        await _send(send, 200, b'{"ok": true}')
        return
    found = _PATH.match(scope["path"])
    if found is None:
        await _send(send, 404)
        return
    if scope["method"] == "DELETE":
        await _send(send, 200)
        return
    if scope["method"] != "POST":
        await _send(send, 405)
        return
    try:
        message = orjson.loads(await _body(receive))
    except orjson.JSONDecodeError:
        await _send(send, 400)
        return
    answer = _answer(int(found[1]), int(found[2]), message)
    if answer is None:
        await _send(send, 202)
        return
    await _send(send, 200, orjson.dumps(answer))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
