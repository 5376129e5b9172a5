"""The port every upstream implements: a channel that carries one conversation."""

from __future__ import annotations

import base64
import itertools
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from bastion.errors import UpstreamError
from bastion.types import JSON, Era

_HEADER_SAFE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")


@dataclass(slots=True)
class Answer:
    """What an upstream said about one request: the first message and, when the answer
    streamed (notifications or server requests before the response), the rest of it.

    The common case, one response, needs no generator at all.
    """

    first: JSON
    rest: AsyncGenerator[JSON, None] | None = None

    async def close(self) -> None:
        """Stop reading the rest (and let the upstream connection go)."""
        if self.rest is not None:
            await self.rest.aclose()


async def answer_from(
    messages: AsyncGenerator[JSON, None], upstream: str, done: Callable[[], None] | None = None
) -> Answer:
    """An Answer from a stream of messages: the first now, the rest when it is not final."""
    try:
        first = await anext(messages)
    except StopAsyncIteration:
        raise UpstreamError(f"upstream {upstream!r} closed its stream before answering") from None
    if "method" in first:
        return Answer(first, messages)
    await messages.aclose()
    if done is not None:
        done()
    return Answer(first)


class Channel(Protocol):
    """One conversation with one upstream: a legacy session, or the stateless modern path."""

    era: Era
    inflight: dict[Any, Any]  # the caller's request id → the upstream's, while in flight

    async def open(self, headers: Mapping[str, str]) -> JSON | None:
        """Run the legacy handshake if this channel has one; its InitializeResult, else None."""
        ...

    async def call(self, message: JSON, headers: Mapping[str, str]) -> Answer:
        """Send a request; the Answer ends with the response, under the caller's id."""
        ...

    async def send(self, message: JSON, headers: Mapping[str, str]) -> None:
        """Deliver a notification, or the client's answer to a server request."""
        ...

    def listen(self, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        """Yield messages the upstream starts on its own (legacy GET stream)."""
        ...

    async def close(self) -> None:
        """End the conversation and release what it holds."""
        ...


class IdMap:
    """Gives outgoing requests ids unique on one upstream connection and maps them back."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def outgoing(self, message: JSON) -> tuple[JSON, int]:
        """A copy of `message` carrying a fresh id, and that id."""
        upstream_id = next(self._counter)
        out = dict(message)
        out["id"] = upstream_id
        return out, upstream_id


def restore_id(response: JSON, original: Any) -> JSON:
    """The upstream's response, answered under the id the caller used."""
    out = dict(response)
    out["id"] = original
    return out


def decode_message(data: bytes | str, upstream: str) -> JSON:
    """Parse one message from an upstream, refusing anything that is not a JSON-RPC object."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"upstream {upstream!r} sent invalid JSON") from exc
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise UpstreamError(f"upstream {upstream!r} sent something that is not JSON-RPC 2.0")
    return message


def header_value(value: str) -> str:
    """Encode an Mcp-Name value: as-is when header-safe, else the base64 sentinel form."""
    if _HEADER_SAFE.match(value) and not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


def mcp_name(message: JSON) -> str | None:
    """The value the Mcp-Name header mirrors: params.name or params.uri."""
    method = message.get("method")
    params = message.get("params") or {}
    if method in ("tools/call", "prompts/get"):
        name = params.get("name")
        return name if isinstance(name, str) else None
    if method == "resources/read":
        uri = params.get("uri")
        return uri if isinstance(uri, str) else None
    return None
