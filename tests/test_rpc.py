"""Strict JSON-RPC parsing: tables of cases, and hypothesis for the duplicate-key check."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion import rpc
from bastion.errors import InvalidRequest, ParseError


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, rpc.Kind.REQUEST),
        ({"jsonrpc": "2.0", "id": "a", "method": "x", "params": {}}, rpc.Kind.REQUEST),
        ({"jsonrpc": "2.0", "method": "notifications/initialized"}, rpc.Kind.NOTIFICATION),
        ({"jsonrpc": "2.0", "id": 3, "result": {}}, rpc.Kind.RESPONSE),
        ({"jsonrpc": "2.0", "id": 3, "error": {"code": -1, "message": "m"}}, rpc.Kind.RESPONSE),
    ],
)
def test_valid_messages(message: dict[str, Any], kind: rpc.Kind) -> None:
    assert rpc.classify(message) is kind


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        ([{"jsonrpc": "2.0", "id": 1, "method": "x"}], "batches"),
        ({"id": 1, "method": "x"}, '"jsonrpc": "2.0"'),
        ({"jsonrpc": "2.0", "id": True, "method": "x"}, "id must be"),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "x"}, "id must be"),
        ({"jsonrpc": "2.0", "id": None, "method": "x"}, "id must be"),
        ({"jsonrpc": "2.0", "id": 1, "method": ""}, "non-empty"),
        ({"jsonrpc": "2.0", "id": 1, "method": "x", "params": "p"}, "params must be"),
        ({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1}}, "exactly one"),
        ({"jsonrpc": "2.0", "result": {}}, "needs an id"),
        ({"jsonrpc": "2.0", "id": 1, "error": {"code": "x"}}, "integer code"),
        ({"jsonrpc": "2.0", "id": 1, "method": "x", "smuggled": 1}, "unexpected member"),
    ],
)
def test_invalid_messages(message: Any, needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        rpc.classify(message)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1,"a":2}',
        b'{"x":{"b":1,"b":1}}',
        b'[{"k":1},{"k":2,"k":3}]',
        b'{"s":"has \\" and : inside","s":0}',
    ],
)
def test_duplicate_keys_are_refused(raw: bytes) -> None:
    with pytest.raises(ParseError, match="repeats a key"):
        rpc.loads(raw)


@pytest.mark.parametrize(
    "raw", [b'{"a":"x:y","b":"::"}', b'{"a":{"b":{"c":[1,{"d":"e"}]}}}', b'{"k\\"ey":1}']
)
def test_colons_and_escapes_inside_strings_are_not_members(raw: bytes) -> None:
    assert rpc.loads(raw) == json.loads(raw)


def test_depth_limit() -> None:
    with pytest.raises(InvalidRequest, match="nests"):
        rpc.loads(b'{"a":' * 80 + b"1" + b"}" * 80)
    assert rpc.loads(b'{"a":' * 30 + b"1" + b"}" * 30)


def _has_duplicates(raw: str) -> bool:
    found = False

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        keys = [k for k, _ in pairs]
        found = found or len(keys) != len(set(keys))
        return dict(pairs)

    json.loads(raw, object_pairs_hook=hook)
    return found


_keys = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=4)
_leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=6)


@st.composite
def json_with_maybe_duplicates(draw: st.DrawFn) -> str:
    """JSON text whose objects may repeat keys (built as text, since dicts cannot)."""

    def value(depth: int) -> str:
        if depth > 3 or draw(st.booleans()):
            return json.dumps(draw(_leaves))
        if draw(st.booleans()):
            items = [value(depth + 1) for _ in range(draw(st.integers(0, 3)))]
            return "[" + ",".join(items) + "]"
        keys = draw(st.lists(_keys, max_size=4))
        if keys and draw(st.booleans()):
            keys.append(draw(st.sampled_from(keys)))
        return "{" + ",".join(f"{json.dumps(k)}:{value(depth + 1)}" for k in keys) + "}"

    return value(0)


@settings(max_examples=400, deadline=None)
@given(json_with_maybe_duplicates())
def test_duplicate_detection_agrees_with_a_reference_parser(raw: str) -> None:
    if _has_duplicates(raw):
        with pytest.raises(ParseError):
            rpc.loads(raw.encode())
    else:
        assert rpc.loads(raw.encode()) == json.loads(raw)


def test_a_long_id_is_refused_not_echoed() -> None:
    """Every answer echoes the id: a 6 KB id came back whole in each refusal."""
    message = {"jsonrpc": "2.0", "id": "x" * 6000, "method": "ping"}
    with pytest.raises(InvalidRequest, match="at most 256 characters, found 6000"):
        rpc.classify(message)
    assert rpc.request_id(message) is None
    assert rpc.request_id({"id": "y" * 256}) == "y" * 256
