"""Definition pins: what a tool, prompt or resource template declared when it was first seen.

A definition is reduced to the fields that tell the model what it does and what it takes —
for a tool its name, title, description, input and output schema and annotations — written
as canonical JSON (sorted keys, no white space) and hashed with SHA-256. Anything else an
upstream adds (`_meta`, icons, unknown members) does not move the digest; a changed word of a
description or a new schema property does. `diff` shows an operator what changed, field by
field, long text as a unified diff cut to a bound.
"""

from __future__ import annotations

import difflib
import hashlib
from typing import Any, Literal

import orjson

from bastion.types import JSON

__all__ = ["FIELDS", "KINDS", "Kind", "canonical", "diff", "digest", "item_name", "pinned"]

Kind = Literal["tool", "prompt", "template"]
KINDS: tuple[Kind, ...] = ("tool", "prompt", "template")
# The members of a definition that are pinned, per kind: what the model reads and relies on.
FIELDS: dict[Kind, tuple[str, ...]] = {
    "tool": ("name", "title", "description", "inputSchema", "outputSchema", "annotations"),
    "prompt": ("name", "title", "description", "arguments"),
    "template": ("uriTemplate", "name", "title", "description", "mimeType"),
}
_TEXT_LINES = 40  # lines of a unified diff kept per field
_TEXT_CHARS = 4000  # characters of a unified diff kept per field
_VALUE_CHARS = 2000  # characters of a short value's JSON kept


def pinned(kind: Kind, definition: JSON) -> JSON:
    """The pinned members of a definition (absent ones stay absent: null and missing differ
    only in that an upstream sent null, which it may)."""
    return {key: definition[key] for key in FIELDS[kind] if key in definition}


def canonical(kind: Kind, definition: JSON) -> bytes:
    """The canonical JSON of a definition's pinned members: sorted keys, no white space."""
    return orjson.dumps(pinned(kind, definition), option=orjson.OPT_SORT_KEYS)


def digest(kind: Kind, definition: JSON) -> str:
    """`sha256:<hex>` of the canonical JSON: equal exactly when the pinned members are."""
    return "sha256:" + hashlib.sha256(canonical(kind, definition)).hexdigest()


def item_name(kind: Kind, definition: JSON) -> str | None:
    """The name a definition is pinned under: a tool's or prompt's `name`, a template's
    `uriTemplate` (its name is only a label and need not be unique); None when missing."""
    value = definition.get("uriTemplate" if kind == "template" else "name")
    return value if isinstance(value, str) and value else None


def diff(kind: Kind, old: JSON | None, new: JSON) -> dict[str, Any]:
    """What changed between two definitions, field by field: `{field: {"old", "new"}}` for
    short values, `{field: {"diff": "<unified diff>"}}` for text of several lines or long
    text, each cut to a bound (`"cut": true` when it was). Unchanged fields are left out;
    with no old definition every present field is "new"."""
    before = pinned(kind, old or {})
    after = pinned(kind, new)
    changes: dict[str, Any] = {}
    for key in FIELDS[kind]:
        if key in before and key in after and before[key] == after[key]:
            continue
        if key not in before and key not in after:
            continue
        changes[key] = _change(before.get(key), after.get(key))
    return changes


def _change(old: Any, new: Any) -> dict[str, Any]:
    old_text, new_text = _text(old), _text(new)
    if "\n" not in old_text + new_text and len(old_text) + len(new_text) <= _VALUE_CHARS:
        return {"old": old, "new": new}
    lines = list(
        difflib.unified_diff(
            old_text.splitlines(), new_text.splitlines(), "pinned", "offered", lineterm="", n=1
        )
    )
    text = "\n".join(lines[:_TEXT_LINES])
    cut = len(lines) > _TEXT_LINES or len(text) > _TEXT_CHARS
    return {"diff": text[:_TEXT_CHARS], "cut": cut}


def _text(value: Any) -> str:
    """A value as diffable text: strings as they are, anything else as indented JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode()
