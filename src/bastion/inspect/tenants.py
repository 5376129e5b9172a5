"""The tenant guard: identifiers of tenant-owned objects found in what an upstream sends.

An upstream says how its objects are named in `tenant_arguments` (`{tenant}-t*`,
`workspace://{tenant}/*`); the same patterns, searched for inside any string, find another
tenant's task ids and URIs in an answer, whatever the field. Only tenants the gateway knows
(its agents', its grants', `inspection.tenants`) are looked for: an alternation of known names
cannot mistake an English word for a tenant, and a tenant with no agent here has no caller to
leak to unless named.

A string is searched as sent and in the forms an upstream or a client could decode it to:
percent-decoded, with JSON escapes and HTML references resolved (JSON inside a text field),
base64-decoded (a resource's `blob`), those chained, and folded for case, compatibility
forms, look-alike letters, dashes and invisible characters (`text.decoded_views`,
`text.normalise`). A hit on
the string as sent carries its position; a hit found only in a decoded form covers the whole
string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bastion.inspect.hits import Hit
from bastion.inspect.text import decoded_views, encoded, normalise

__all__ = ["TenantGuard", "pattern_regex"]

# What a `*` of a pattern stands for inside running text: an identifier's characters, up to
# white space, quotes or brackets (a URI's path keeps its slashes).
_REST = r"[^\s\"'<>()\[\]{},;`]*"
# Names come before and after an identifier without letters or digits touching them.
_BEFORE = r"(?<![a-z0-9])"


def pattern_regex(pattern: str, tenants: Iterable[str]) -> str:
    """The search regex of one `tenant_arguments` pattern with `{tenant}` one of `tenants`
    (lower-case; the regex is used case-insensitively on folded text)."""
    names = "|".join(re.escape(t) for t in sorted(set(tenants), key=lambda t: (-len(t), t)))
    out = [] if pattern.startswith("{tenant}") else [_BEFORE]
    for part in re.split(r"(\{tenant\}|\*)", pattern):
        if part == "{tenant}":
            out.append(rf"{_BEFORE}(?P<tenant>{names})")
        elif part == "*":
            out.append(_REST)
        elif part:
            out.append(re.escape(part.lower()))
    return "".join(out)


class TenantGuard:
    """Finds the objects of known tenants in strings, by the upstreams' naming patterns."""

    def __init__(self, patterns: Iterable[str], tenants: Iterable[str]) -> None:
        known = {t.lower() for t in tenants}
        wanted = sorted({p for p in patterns if "{tenant}" in p})
        self.tenants = frozenset(known)
        self._regex: re.Pattern[str] | None = None
        self._names_regex: re.Pattern[str] | None = None
        if known and wanted:
            names = "|".join(re.escape(t) for t in sorted(known, key=lambda t: (-len(t), t)))
            self._names_regex = re.compile(names, re.IGNORECASE)
            parts = "|".join(f"(?:{pattern_regex(p, known)})" for p in wanted)
            # One named group per alternative is not allowed twice: number them instead.
            self._regex = re.compile(_numbered(parts), re.IGNORECASE)

    @property
    def active(self) -> bool:
        """Whether there is anything to look for."""
        return self._regex is not None

    def scan(self, text: str) -> list[Hit]:
        """Every known tenant's object named in `text` (kind: the tenant)."""
        regex = self._regex
        if regex is None:
            return []
        hits = [Hit("tenant", _tenant(m), m.start(), m.end()) for m in regex.finditer(text)]
        seen = {hit.kind for hit in hits}
        for view in views(text)[1:]:
            for match in regex.finditer(view):
                tenant = _tenant(match)
                if tenant not in seen:
                    seen.add(tenant)
                    hits.append(Hit("tenant", tenant, 0, len(text)))
        return hits

    def may_name(self, text: str) -> bool:
        """Whether `text` could name a known tenant's object: a tenant's name in any case, or
        anything a decoded reading could turn into one (non-ASCII, `text.encoded`). False
        means `scan` finds nothing in it; reads `text` in place, without copying it."""
        if self._names_regex is None:
            return False
        return not text.isascii() or self._names_regex.search(text) is not None or encoded(text)


def views(text: str) -> list[str]:
    """`text` as sent, then every other reading of it (`text.decoded_views`: JSON-unescaped,
    percent-decoded, HTML references resolved, base64-decoded, chained), and each folded
    (`text.normalise`)."""
    out = decoded_views(text)
    out += [normalise(view) for view in out if not view.isascii()]
    seen: set[str] = set()
    return [v for v in out if not (v in seen or seen.add(v))]  # type: ignore[func-returns-value]


def _numbered(alternatives: str) -> str:
    count = 0

    def rename(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"(?P<tenant{count}>"

    return re.sub(r"\(\?P<tenant>", rename, alternatives)


def _tenant(match: re.Match[str]) -> str:
    for name, value in match.groupdict().items():
        if value is not None and name.startswith("tenant"):
            return value.lower()
    return ""
