"""What a rule found in one string: which rule, what kind of thing, and where."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Hit"]


@dataclass(frozen=True, slots=True)
class Hit:
    """One finding inside a string: `text[start:end]` is what was found.

    `rule` is the rule's name (`tenant`, `secret`, `personal_data`, `injection`,
    `poisoning`); `kind` what it found (`aws_access_key`, `email`, `ignore_previous`, or the
    foreign tenant's name for `tenant`). Records carry the rule, the kind and a digest of the
    text, never the text itself.
    """

    rule: str
    kind: str
    start: int
    end: int
