"""`@redact` paths applied to values: pure, shared by the decision stage (arguments) and the
inspection stage (results)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bastion.policy.source import parse_redaction

__all__ = ["REDACTED", "paths", "redact"]

REDACTED = "[redacted by policy]"


def paths(obligations: Mapping[str, Any], root: str) -> list[tuple[Any, ...]]:
    """The steps of every `@redact` path of a decision's obligations under `root`
    (`arguments` or `result`)."""
    out: list[tuple[Any, ...]] = []
    for text in obligations.get("redact", ()):
        out.extend(steps for found, steps in parse_redaction(text) if found == root)
    return out


def redact(value: Any, steps: tuple[Any, ...]) -> Any:
    """`value` with what `steps` reach replaced by a marker (a copy; `value` is unchanged)."""
    if not steps:
        return REDACTED
    step, rest = steps[0], steps[1:]
    if step is None and isinstance(value, list):
        return [redact(item, rest) for item in value]
    if step is None and isinstance(value, dict):
        return {k: redact(v, rest) for k, v in value.items()}
    if isinstance(step, int) and isinstance(value, list) and -len(value) <= step < len(value):
        copy = list(value)
        copy[step] = redact(value[step], rest)
        return copy
    if isinstance(step, str) and isinstance(value, dict) and step in value:
        return {**value, step: redact(value[step], rest)}
    return value
