"""What an upstream's message carries, as strings with their places, and the same message
with chosen items withheld.

Every string of a message is looked at — results, errors, notification and request params,
`_meta` included — whatever the field: an upstream decides where it puts data, so the
gateway does not guess. A text that is itself JSON (a tool's JSON printed into a text block)
is opened, so that withholding can take out one item of it rather than the whole text.

Withholding works on items, not characters: a task whose id names another tenant goes whole
(its title is as much the other tenant's as its id). An item is the nearest element of an
array around what was found: a content block or a prompt message is replaced by a text
saying what was withheld; an element of any other array (a listed resource, a row of
structured content) is dropped; a string outside any array is replaced by that text.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["JSON_TEXT", "MARKER", "Place", "marker_text", "opened", "strings", "withhold"]

# A place: the keys and indexes from the message to a string. `JSON_TEXT` steps into a
# string that holds JSON.
Place = tuple[str | int, ...]
JSON_TEXT = "#json"
MARKER = "[withheld by Bastion: {why}]"
# Message members that are the envelope, not what the upstream says.
_ENVELOPE = frozenset({"jsonrpc", "id", "method"})
# Arrays whose items the client renders: an item there becomes a text, not a gap.
_RENDERED = frozenset({"content", "messages"})
_MAX_DEPTH = 64


def marker_text(why: str) -> str:
    """The text that stands where an item was withheld."""
    return MARKER.format(why=why)


def strings(message: dict[str, Any], *, open_json: bool = False) -> Iterator[tuple[Place, str]]:
    """Every string a message carries (object keys aside), with its place; with
    `open_json`, also the strings inside texts that hold JSON (parsed: a copy)."""
    for key, value in message.items():
        if key not in _ENVELOPE:
            yield from _walk(value, (key,), 0, open_json)


def opened(text: str, place: Place) -> Iterator[tuple[Place, str]]:
    """The strings inside a text that holds JSON, with their places; none otherwise."""
    inner = _json_in(text)
    if inner is not None:
        yield from _walk(inner, (*place, JSON_TEXT), 1, True)


def _walk(value: Any, place: Place, depth: int, open_json: bool) -> Iterator[tuple[Place, str]]:
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, str):
        yield place, value
        if open_json:
            yield from opened(value, place)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, (*place, key), depth + 1, open_json)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*place, index), depth + 1, open_json)


def _json_in(text: str) -> Any:
    """The JSON a text holds when it is an object or array, else None."""
    stripped = text.strip()
    if len(stripped) < 2 or stripped[0] not in "[{":
        return None
    try:
        return orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return None


def withhold(message: dict[str, Any], places: set[Place], why: str) -> tuple[dict[str, Any], int]:
    """The message without the items around `places`, and how many items went."""
    # A hit in a JSON text is also a hit in the text: withhold inside it, not the text.
    holders = {
        place[:index] for place in places for index, step in enumerate(place) if step == JSON_TEXT
    }
    items = {_item(place) for place in places if place not in holders}
    count = 0

    def rewrite(value: Any, place: Place) -> Any:
        nonlocal count
        if not any(found[: len(place)] == place for found in items):
            return value
        if isinstance(value, dict):
            return {key: rewrite(item, (*place, key)) for key, item in value.items()}
        if isinstance(value, list):
            kept = []
            rendered = bool(place) and place[-1] in _RENDERED
            for index, element in enumerate(value):
                here = (*place, index)
                if here not in items:
                    kept.append(rewrite(element, here))
                    continue
                count += 1
                if rendered:
                    kept.append(_marker_item(element, why))
            return kept
        if isinstance(value, str):
            if place in items:
                count += 1
                return marker_text(why)
            inner = _json_in(value)
            if inner is not None:
                return orjson.dumps(rewrite(inner, (*place, JSON_TEXT))).decode()
        return value

    body = {
        key: value if key in _ENVELOPE else rewrite(value, (key,)) for key, value in message.items()
    }
    return body, count


def _item(place: Place) -> Place:
    """The item around a string: up to the innermost array element, else the string."""
    for index in range(len(place) - 1, -1, -1):
        if isinstance(place[index], int):
            return place[: index + 1]
    return place


def _marker_item(element: Any, why: str) -> Any:
    """A content block or prompt message standing for the one withheld."""
    text = {"type": "text", "text": marker_text(why)}
    if isinstance(element, dict) and "role" in element:
        return {"role": element["role"], "content": text}
    return text
