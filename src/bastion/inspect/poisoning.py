"""Poisoning and shadowing: definitions that speak to the model, names that pose as another's.

A tool's description is read by the model as instructions it trusts. `description_hits`
finds what a description has no business carrying:

- `hidden_directive`: markup that addresses the model (`<IMPORTANT>`, `<system>`,
  `[INST]`, "AI assistant: you must…");
- `ignore_previous`: "ignore / disregard / forget the previous instructions";
- `concealment`: "do not tell the user", "without informing the user";
- `credential_request`: secret files and keys asked for (`~/.ssh/id_rsa`, `.env`,
  `mcp.json`, "pass the user's API key");
- `invisible_text`: zero-width, bidi-control and Unicode tag characters;
- `other_tool_reference`: the name of another upstream's tool on the same virtual server
  (a description that steers how *another* server's tool is used), or another upstream's
  exposed `<server>__<tool>` name;

plus what the injection scanner (`bastion.inspect.injection`) finds in any answer.

`shadowed` finds a name that collides with, or is confusable with, a name of another upstream
on the same virtual server: both reduced to a skeleton (NFKC, case folded, look-alike letters
and digits folded, invisible characters dropped, `-`, `_`, `.` and spaces folded away).

Everything here is pure: values in, `Hit`s out.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

from bastion.inspect.hits import Hit
from bastion.inspect.injection import InjectionScanner
from bastion.inspect.text import normalise

__all__ = ["RULE", "description_hits", "invisible", "shadowed", "skeleton"]

RULE = "poisoning"
_SEPARATOR = "__"  # how a virtual server exposes `<upstream>__<name>` (config.TOOL_SEPARATOR)

# Characters a reader does not see: zero-width, joiners, word joiner and invisible operators,
# bidi embeddings, overrides and isolates, the BOM, soft hyphen, Mongolian vowel separator,
# and the Unicode tag block (which spells hidden ASCII).
_INVISIBLE = re.compile(
    "[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\U000e0000-\U000e007f]"
)
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "hidden_directive",
        re.compile(
            r"<\s*/?\s*(important|system|instructions?|secret|hidden|admin|critical|"
            r"assistant|sys|override)\s*>"
            r"|\[/?(inst|system)\]|<\|im_start\|>"
            r"|\b(ai|assistant|llm|model|agent)\s*(:|,)\s*(you\s+must|always|never|before)",
        ),
    ),
    (
        "ignore_previous",
        re.compile(
            r"\b(ignore|disregard|forget|override)\s+(all\s+|any\s+|the\s+|your\s+)*"
            r"(previous|prior|above|earlier|other|system|original)\s+"
            r"(instructions?|prompts?|rules|directions|guidelines|messages)"
        ),
    ),
    (
        "concealment",
        re.compile(
            r"\b(do\s+not|don'?t|never)\s+(tell|inform|mention|notify|alert|reveal|show)"
            r"\s+(this\s+to\s+)?(the\s+)?user\b"
            r"|\b(do\s+not|don'?t|never)\s+(mention|reveal|disclose)\s+(this|that|it)\b"
            r"|\bwithout\s+(telling|informing|notifying|alerting)\s+(the\s+)?user\b"
            r"|\b(the\s+)?user\s+(must|should)\s+not\s+(know|see|be\s+told)\b"
        ),
    ),
    (
        "credential_request",
        re.compile(
            r"~/\.ssh|\bid_(rsa|ed25519|ecdsa)\b|\.aws/credentials|\bmcp\.json\b"
            r"|\.cursor/|\.env\b(?!\w)|\bprivate\s+key\b.{0,40}\b(send|pass|include|read)"
            r"|\b(send|pass|include|provide|share|read)\b.{0,40}\b(the\s+)?user'?s?\s+"
            r"(password|api\s*key|secret|credentials?|tokens?)\b"
        ),
    ),
)


# What any answer is scanned for (bastion.inspect.injection), descriptions too.
_SCANNER = InjectionScanner()


def invisible(text: str) -> list[Hit]:
    """Runs of characters a reader does not see (one hit per run)."""
    hits: list[Hit] = []
    for match in re.finditer(f"(?:{_INVISIBLE.pattern})+", text):
        hits.append(Hit(RULE, "invisible_text", match.start(), match.end()))
    return hits


def description_hits(
    text: str, others: Mapping[str, Iterable[str]] | None = None, own: str | None = None
) -> list[Hit]:
    """What a description carries that instructs the model (see the module docstring).

    `others` maps each *other* upstream of the same virtual server to its tool and prompt
    names (empty off a virtual server); `own` is the describing upstream's name. Positions
    of rule hits are those of the normalised text when the description was not plain ASCII
    (the whole description is then reported), never more than the description."""
    hits = invisible(text)
    hits += [Hit(RULE, hit.kind, hit.start, hit.end) for hit in _SCANNER.scan(text)]
    view = normalise(text)
    exact = view == text.lower()
    for kind, pattern in _RULES:
        for match in pattern.finditer(view):
            start, end = (match.start(), match.end()) if exact else (0, len(text))
            hits.append(Hit(RULE, kind, start, end))
            break  # one hit per kind is enough to judge a description
    hits += _references(view, text, exact, others or {}, own)
    return hits


def _references(
    view: str, text: str, exact: bool, others: Mapping[str, Iterable[str]], own: str | None
) -> list[Hit]:
    """Mentions of another upstream's exposed names, or of its distinctive tool names."""
    # A name of word characters and `-` is mentioned exactly where a whole run of such
    # characters equals it: one pass over the description finds every run, and each name is
    # then a dict lookup (a regex compiled per name cost ~25 us, times every tool of every
    # other upstream of a virtual server, for each description judged).
    runs: dict[str, int] = {}
    for run in _RUN.finditer(view):
        runs.setdefault(run.group(), run.start())
    for upstream, names in others.items():
        if upstream == own:
            continue
        for name in names:
            for candidate in _candidates(upstream, name):
                if _RUN.fullmatch(candidate):
                    start = runs.get(candidate)
                    found = None if start is None else (start, start + len(candidate))
                else:  # other characters: the search itself
                    match = re.search(rf"(?<![\w-]){re.escape(candidate)}(?![\w-])", view)
                    found = None if match is None else match.span()
                if found is not None:
                    span = found if exact else (0, len(text))
                    return [Hit(RULE, "other_tool_reference", *span)]
    return []


_RUN = re.compile(r"[\w-]+")


@functools.lru_cache(maxsize=65536)
def _candidates(upstream: str, name: str) -> tuple[str, ...]:
    """How a description would mention another upstream's tool: its exposed name, and the
    name alone when that is distinctive (folded as descriptions are)."""
    folded = normalise(name)
    exposed = f"{normalise(upstream)}{_SEPARATOR}{folded}"
    return (exposed, folded) if _distinctive(folded) else (exposed,)


def _distinctive(name: str) -> bool:
    """A tool name specific enough that a mention is a reference, not an ordinary word:
    compound (`send_email`, `search-tasks`, `listProjects`) and at least 6 characters."""
    return len(name) >= 6 and bool(re.search(r"[_\-.]|[a-z][A-Z]", name))


# Digits and letters that pass for one another once case is folded: `1`, `l`, `I` (folded to
# `i`) and `i` are one stroke; `0` is `o`. Merging `i` and `l` costs nothing: two names that
# differ only there are confusable anyway.
_LOOKALIKES = str.maketrans({"1": "l", "|": "l", "i": "l", "0": "o", "5": "s", "$": "s"})
_FOLD_AWAY = re.compile(r"[\s_\-.·]+")


def skeleton(name: str) -> str:
    """A name as it looks: NFKC, case folded, look-alikes folded (Cyrillic `а` is `a`; `I`,
    `i`, `1` and `l` are one; `0` is `o`), invisible characters dropped, separators removed."""
    return _FOLD_AWAY.sub("", normalise(name).translate(_LOOKALIKES))


def shadowed(name: str, others: Mapping[str, Iterable[str]]) -> tuple[str, str] | None:
    """`(upstream, name)` of another upstream's name that `name` collides with or is
    confusable with (same skeleton), or that its skeleton impersonates as an exposed
    `<upstream>__<name>`; None when it shadows nothing."""
    mine = skeleton(name)
    for upstream, names in others.items():
        prefix = skeleton(upstream)
        for other in names:
            theirs = skeleton(other)
            if mine in (theirs, prefix + theirs):
                return upstream, other
    return None
