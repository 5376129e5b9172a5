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
from bastion.methods import PROMPTS_GET, RESOURCES_READ, TOOLS_CALL
from bastion.types import JSON, MODERN_VERSION, UPSTREAM_STATUS, Era

_HEADER_SAFE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")


@dataclass(slots=True)
class Answer:
    """What an upstream said about one request: the first message and, when the answer
    streamed (notifications or server requests before the response), the rest of it.

    The common case, one response, needs no generator at all.
    """

    first: JSON
    rest: AsyncGenerator[JSON, None] | None = None
    # The streams `rest` reads, innermost first: a wrapper never started would not close
    # them (closing a generator that never ran runs none of it), so `close` does.
    inner: tuple[AsyncGenerator[JSON, None], ...] = ()

    async def close(self) -> None:
        """Stop reading the rest (and let the upstream connection go)."""
        if self.rest is not None:
            await self.rest.aclose()
        for stream in reversed(self.inner):
            await stream.aclose()

    def wrapped(self, first: JSON, rest: AsyncGenerator[JSON, None]) -> Answer:
        """An answer whose `rest` reads this one's; closing it closes this one's too."""
        inner = (*self.inner, self.rest) if self.rest is not None else self.inner
        return Answer(first, rest, inner)

    def map_result(self, id_: Any, fix: Callable[[JSON], JSON]) -> Answer:
        """This answer with `fix` applied to the result of the response to request `id_`
        (whether it comes alone or at the end of a stream)."""

        def one(message: JSON) -> JSON:
            body = message.get("result")
            if message.get("id") == id_ and isinstance(body, dict):
                return {**message, "result": fix(body)}
            return message

        if self.rest is None:
            return Answer(one(self.first))
        rest = self.rest

        async def fixed() -> AsyncGenerator[JSON, None]:
            try:
                async for message in rest:
                    yield one(message)
            finally:
                await rest.aclose()

        return self.wrapped(one(self.first), fixed())


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

    async def close(self, headers: Mapping[str, str] | None = None) -> None:
        """End the conversation and release what it holds; `headers` carry the credential an
        upstream expects on the request that ends it (a legacy session's DELETE)."""
        ...


class IdMap:
    """Gives outgoing requests ids unique on one upstream connection and maps them back."""

    def __init__(self, start: int = 1) -> None:
        self._counter = itertools.count(start)

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


def response_for(message: JSON, original: Any, upstream: str) -> JSON:
    """The upstream's response to a request, under the caller's id, when it is a well-formed
    JSON-RPC response; otherwise an `upstream.error` response saying what was wrong with it.

    Only the response members travel on: whatever else the upstream added stays behind, so
    the client and the audit trail see exactly one of `result` and `error`.
    """
    problem = _response_problem(message)
    if problem is not None:
        exc = UpstreamError(f"upstream {upstream!r} sent an invalid response: {problem}")
        return {"jsonrpc": "2.0", "id": original, "error": exc.rpc_error()}
    out: JSON = {"jsonrpc": "2.0", "id": original}
    for key in ("result", "error", UPSTREAM_STATUS):
        if key in message:
            out[key] = message[key]
    return out


def _response_problem(message: JSON) -> str | None:
    if ("result" in message) == ("error" in message):
        both = "result" in message
        return "it has both result and error" if both else "it has neither result nor error"
    if "result" in message:
        return None
    error = message["error"]
    if not isinstance(error, dict):
        return f"error is a JSON {_kind(error)}, not an object"
    code = error.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        return f"error.code is a JSON {_kind(code)}, not an integer"
    if not isinstance(error.get("message"), str):
        return f"error.message is a JSON {_kind(error.get('message'))}, not a string"
    return None


def _kind(value: Any) -> str:
    """The JSON type of a decoded value, for messages that must not quote the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def usable_id(value: Any) -> bool:
    """Whether a message id can name a pending request: a string or an integer (JSON-RPC);
    anything else (an array, an object) cannot even be looked up."""
    return isinstance(value, str | int) and not isinstance(value, bool)


def message_problem(message: Any) -> str | None:
    """Why a decoded message from an upstream is not usable JSON-RPC 2.0, or None."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return "something that is not JSON-RPC 2.0"
    if "method" not in message:
        return None  # a response: checked by response_for once it is known to be one
    if not isinstance(message["method"], str):
        return f"a message whose method is a JSON {_kind(message['method'])}"
    params = message.get("params")
    if params is not None and not isinstance(params, dict):
        return f"a message whose params are a JSON {_kind(params)}, not an object"
    if "id" in message and not usable_id(message["id"]):
        return f"a request whose id is a JSON {_kind(message['id'])}"
    return None


def decode_message(data: bytes | str, upstream: str) -> JSON:
    """Parse one message from an upstream, refusing anything that is not a JSON-RPC object."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"upstream {upstream!r} sent invalid JSON") from exc
    problem = message_problem(message)
    if problem is not None:
        raise UpstreamError(f"upstream {upstream!r} sent {problem}")
    # Only the gateway sets this member; an upstream's own must not pick the client's status.
    message.pop(UPSTREAM_STATUS, None)
    return message  # type: ignore[no-any-return]


def speaks_modern(reply: JSON) -> bool:
    """Whether a server/discover reply lists the 2026-07-28 protocol among its versions."""
    result = reply.get("result")
    versions = result.get("supportedVersions") if isinstance(result, dict) else None
    return isinstance(versions, list) and MODERN_VERSION in versions


def refusal(reply: JSON) -> str:
    """What an upstream's error reply says, cut short (its message when it is a string)."""
    error = reply.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return "no result"
    return message if len(message) <= 200 else message[:200] + "..."


def header_value(value: str) -> str:
    """Encode an Mcp-Name value: as-is when header-safe, else the base64 sentinel form."""
    if _HEADER_SAFE.match(value) and not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


def mcp_name(message: JSON) -> str | None:
    """The value the Mcp-Name header mirrors: params.name or params.uri."""
    method = message.get("method")
    params = message.get("params") or {}
    if method in (TOOLS_CALL, PROMPTS_GET):
        name = params.get("name")
        return name if isinstance(name, str) else None
    if method == RESOURCES_READ:
        uri = params.get("uri")
        return uri if isinstance(uri, str) else None
    return None
