"""What an upstream's message carries, as strings with their places, and the same message
with chosen items withheld.

Every string of a message is looked at — results, errors, notification and request params,
`_meta` included, object keys too — whatever the field and however deep: an upstream decides
where it puts data, so the gateway does not guess. Below `_MAX_DEPTH` levels the strings of
a subtree are all reported at the subtree's place (so that what is found there withholds the
subtree). A text that is itself JSON (a tool's JSON printed into a text block) is opened, so
that withholding can take out one item of it rather than the whole text.

Withholding works on items, not characters: a task whose id names another tenant goes whole
(its title is as much the other tenant's as its id). An item is the nearest element of an
array around what was found: a content block or a prompt message is replaced by a text
saying what was withheld; an element of any other array (a listed resource, a row of
structured content) is dropped. Outside any array the item is the object around the string
(`structuredContent.task` for `structuredContent.task.id`), dropped from its parent; only a
string directly in the message's body (an error's `message`) is replaced by that text. A key
that names something is dropped with its value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

__all__ = [
    "JSON_TEXT",
    "KEY",
    "MARKER",
    "Place",
    "keys_found",
    "marker_text",
    "opened",
    "prefixes",
    "strings",
    "withhold",
]

# A place: the keys and indexes from the message to a string. Two steps no JSON key or index
# can be: `JSON_TEXT` steps into a string that holds JSON; `KEY` ends the place of an object's
# key (the member before it is the one the key names).
Place = tuple[str | int, ...]
JSON_TEXT = -2
KEY = -1
MARKER = "[withheld by Bastion: {why}]"
# Message members that are the envelope, not what the upstream says.
_ENVELOPE = frozenset({"jsonrpc", "id", "method"})
# Arrays whose items the client renders: an item there becomes a text, not a gap.
_RENDERED = frozenset({"content", "messages"})
# Levels walked one by one; below, a subtree's strings are read at its place.
_MAX_DEPTH = 64


def marker_text(why: str) -> str:
    """The text that stands where an item was withheld."""
    return MARKER.format(why=why)


def strings(message: dict[str, Any], *, open_json: bool = False) -> Iterator[tuple[Place, str]]:
    """Every string a message carries, object keys included, with its place; with
    `open_json`, also the strings inside texts that hold JSON (parsed: a copy)."""
    for key, value in message.items():
        if key not in _ENVELOPE:
            yield (key, KEY), key
            yield from _walk(value, (key,), 0, open_json)


def opened(text: str, place: Place, depth: int = 0) -> Iterator[tuple[Place, str]]:
    """The strings inside a text that holds JSON, with their places; none otherwise."""
    inner = _json_in(text)
    if inner is not None:
        yield from _walk(inner, (*place, JSON_TEXT), depth + 1, True)


def _walk(value: Any, place: Place, depth: int, open_json: bool) -> Iterator[tuple[Place, str]]:
    if isinstance(value, str):
        yield place, value
        if open_json and depth < _MAX_DEPTH:
            yield from opened(value, place, depth)
    elif depth >= _MAX_DEPTH:
        # Deeper than any answer needs to be: read whole, found at this place.
        yield from ((place, text) for text in _below(value))
    elif isinstance(value, dict):
        for key, item in value.items():
            here = (*place, key)
            yield (*here, KEY), key
            yield from _walk(item, here, depth + 1, open_json)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*place, index), depth + 1, open_json)


def _below(value: Any) -> Iterator[str]:
    """Every string and key in a subtree, without recursion (a subtree may be deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            yield from item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def keys_found(places: Any) -> set[str]:
    """The object keys among `places` (places ending in `KEY`): text a record must not show."""
    return {str(place[-2]) for place in places if len(place) >= 2 and place[-1] == KEY}


def prefixes(places: Any) -> set[Place]:
    """Every place on the way to one of `places`, the message itself (`()`) included."""
    return {place[:index] for place in places for index in range(len(place) + 1)}


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
    # A string directly in the message's body (an error's message) stands replaced, unless
    # its key named something too.
    named = {place[:-1] for place in places if place and place[-1] == KEY}
    replaced = {place for place in places if len(place) <= 2 and place[-1] != KEY} - named
    on_the_way = prefixes(items)
    count = 0

    def member(value: Any, here: Place) -> tuple[bool, Any]:
        """Whether the member at `here` stays, and as what."""
        nonlocal count
        if here not in items:
            return True, rewrite(value, here)
        count += 1
        if here in replaced and isinstance(value, str):
            return True, marker_text(why)
        return False, None

    def rewrite(value: Any, place: Place) -> Any:
        nonlocal count
        if place not in on_the_way:
            return value
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                keep, item = member(item, (*place, key))
                if keep:
                    out[key] = item
            return out
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
            inner = _json_in(value)
            if inner is not None:
                try:
                    return orjson.dumps(rewrite(inner, (*place, JSON_TEXT))).decode()
                except orjson.JSONEncodeError:  # too deep to write back: the text goes whole
                    count += 1
                    return marker_text(why)
        return value

    body: dict[str, Any] = {}
    for key, value in message.items():
        keep, value = (True, value) if key in _ENVELOPE else member(value, (key,))
        if keep:
            body[key] = value
    return body, count


def _item(place: Place) -> Place:
    """The item around a string: up to the innermost array element; else, for a key, its
    member; else the object around the string (below the message's body); else the member
    itself. Inside a JSON text, outside its arrays, a member of the text's top object stands
    for the text."""
    keyed = bool(place) and place[-1] == KEY
    if keyed:
        place = place[:-1]  # the key names the member it is the key of
    start = 0
    for index, step in enumerate(place):
        if step == JSON_TEXT:
            start = index + 1
    for index in range(len(place) - 1, start - 1, -1):
        step = place[index]
        if isinstance(step, int) and step >= 0:
            return place[: index + 1]
    if keyed:
        return place
    if start == 0:
        return place[:-1] if len(place) >= 3 else place
    if len(place) - start >= 2:
        return place[:-1]
    return _item(place[: start - 1])


def _marker_item(element: Any, why: str) -> Any:
    """A content block or prompt message standing for the one withheld."""
    text = {"type": "text", "text": marker_text(why)}
    if isinstance(element, dict) and "role" in element:
        return {"role": element["role"], "content": text}
    return text
