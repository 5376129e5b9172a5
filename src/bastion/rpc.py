"""Strict JSON-RPC 2.0 for MCP: parse, classify and build messages.

Pure functions over bytes and dicts. Stricter than a plain JSON parser on purpose: a gateway that
resolves a duplicated key differently from the server behind it can be walked around, so
duplicate keys are refused rather than silently resolved.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import orjson

from bastion.errors import BastionError, InvalidRequest, ParseError, shown
from bastion.types import JSON

__all__ = [
    "MAX_DEPTH",
    "MAX_ID_CHARS",
    "Kind",
    "classify",
    "dumps",
    "error",
    "loads",
    "request_id",
    "result",
]

MAX_DEPTH = 64

# A JSON string literal; what is left when they are removed has one ':' per object member.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_REQUEST_KEYS = frozenset(("jsonrpc", "id", "method", "params"))
_RESPONSE_KEYS = frozenset(("jsonrpc", "id", "result", "error"))


class Kind(enum.Enum):
    """The three shapes of a JSON-RPC message MCP uses (batches are refused)."""

    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"


def loads(body: bytes) -> Any:
    """Parse JSON, refusing duplicate keys and nesting deeper than MAX_DEPTH."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"body is not valid JSON: {exc.args[0] if exc.args else exc}") from exc
    members, depth = _count_members(value)
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"JSON nests {depth} levels deep; at most {MAX_DEPTH} are allowed")
    # Colons outside strings count the members as written; when the body has no more colons
    # than parsed members, none can be inside strings and none was a duplicate.
    colons = body.count(b":")
    if colons != members and members != _STRING.sub(b"", body).count(b":"):
        raise ParseError("body repeats a key within one JSON object; duplicate keys are refused")
    return value


def _count_members(value: Any) -> tuple[int, int]:
    """Count object members (after parsing, so duplicates collapsed) and the nesting depth."""
    members = 0
    max_depth = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            members += len(item)
            max_depth = max(max_depth, depth)
            if depth <= MAX_DEPTH:
                stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            max_depth = max(max_depth, depth)
            if depth <= MAX_DEPTH:
                stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return members, max_depth


def classify(message: Any) -> Kind:
    """Check one decoded message against JSON-RPC 2.0 and say which kind it is."""
    if isinstance(message, list):
        raise InvalidRequest("JSON-RPC batches are not supported by MCP; send one message a POST")
    if not isinstance(message, dict):
        raise InvalidRequest(f"expected a JSON-RPC object, found {type(message).__name__}")
    if message.get("jsonrpc") != "2.0":
        raise InvalidRequest('expected "jsonrpc": "2.0"')
    if "method" in message:
        extra = message.keys() - _REQUEST_KEYS
        if extra:
            raise InvalidRequest(f"unexpected member {shown(min(extra))} in a JSON-RPC request")
        method = message["method"]
        if not isinstance(method, str) or not method:
            raise InvalidRequest("method must be a non-empty string")
        params = message.get("params")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequest("params must be an object in MCP")
        if "id" not in message:
            return Kind.NOTIFICATION
        _check_id(message["id"])
        return Kind.REQUEST
    extra = message.keys() - _RESPONSE_KEYS
    if extra:
        raise InvalidRequest(f"unexpected member {shown(min(extra))} in a JSON-RPC response")
    if ("result" in message) == ("error" in message):
        raise InvalidRequest("a JSON-RPC response has exactly one of result and error")
    if "id" not in message:
        raise InvalidRequest("a JSON-RPC response needs an id")
    _check_id(message["id"])
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict) or not isinstance(error.get("code"), int):
            raise InvalidRequest("error must be an object with an integer code")
    return Kind.RESPONSE


MAX_ID_CHARS = 256  # an id is echoed in every answer: a longer one is refused, not echoed


def _check_id(value: Any) -> None:
    # bool is an int subclass in Python; JSON-RPC ids are strings or integers, never null.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidRequest("id must be a string or an integer")
    if isinstance(value, str) and len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"id must be at most {MAX_ID_CHARS} characters, found {len(value)}")


def request_id(message: Any) -> Any:
    """The id to answer with when a message is refused: its own when usable, else null."""
    if isinstance(message, dict):
        value = message.get("id")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and len(value) <= MAX_ID_CHARS:
            return value
    return None


def result(id_: Any, value: JSON) -> JSON:
    """A JSON-RPC success response."""
    return {"jsonrpc": "2.0", "id": id_, "result": value}


def error(id_: Any, exc: BastionError) -> JSON:
    """A JSON-RPC error response for a Bastion error."""
    return {"jsonrpc": "2.0", "id": id_, "error": exc.rpc_error()}


def dumps(message: Any) -> bytes:
    """Serialize a message for the wire."""
    return orjson.dumps(message)
