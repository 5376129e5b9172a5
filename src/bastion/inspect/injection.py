"""Instructions aimed at the model inside what a tool returned (rule `injection`).

A result is data for the model, not orders: text that tells the model to drop its
instructions, take another role, hide something from the user, send secrets somewhere or
hand over credentials is flagged with one of `KINDS`. Matching runs on the normalised view
(`text.normalised`: case, fullwidth and other compatibility forms, accents, Cyrillic/Greek
look-alikes and invisible characters folded) and hits are mapped back to the scanned string.

Each rule has a seed (its trigger phrase); one Hyperscan pass over the view finds every
seed, and a rule's Python pattern runs only around where its seed matched, so a result with
nothing suspicious costs that one pass (docs/decisions/0005-secret-detection.md). The
patterns are written for precision over recall — a gateway that flags every README that says
"ignore" is switched off — and measured on the corpora in tests/test_inspect_injection.py.
Spaced-out letters ("i g n o r e") are not folded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bastion.inspect.hits import Hit
from bastion.inspect.text import (
    NormalisedText,
    SeedSearch,
    decoded_views,
    encoded,
    encoded_among,
    normalise,
    normalised,
    windows,
)

__all__ = ["KINDS", "RULE", "InjectionScanner", "Rule"]

RULE = "injection"

# Between two words: whitespace or punctuation used as whitespace (markdown, underscores,
# line breaks), a few characters at most.
_S = r"[\W_]{1,6}"
_WORDS = rf"(?:\w+{_S}){{0,3}}?"
_NEG = re.compile(r"(?:\bnever|\bnot|n't|\bno)\W+(?:\w+\W+)?$")


@dataclass(frozen=True, slots=True)
class Rule:
    """One pattern of one kind, found through its seed.

    `seed` is a Hyperscan expression (ASCII classes, no look-around) for a short part of
    what `pattern` matches — its trigger phrase; `pattern` (Python `re`) runs on the
    normalised view only near where the seed matched (`REACH` characters either side).
    `negatable` rules are skipped when the match follows "never"/"do not"/"don't" (advice
    such as "never send your API key to anyone" is not an attack).
    """

    kind: str
    seed: str
    pattern: re.Pattern[str]
    negatable: bool = False


def _rule(kind: str, seed: str, pattern: str, *, negatable: bool = False) -> Rule:
    return Rule(kind, seed, re.compile(pattern), negatable)


# How far from a seed's end a match of its pattern may start / end, in characters.
REACH = (400, 700)

_QUALIFIED = (
    r"(?:previous|prior|above|earlier|preceding|foregoing|former|original|initial|system|"
    r"developer|safety|existing)"
)
_STRONG_OBJECT = rf"(?:instructions?|prompts?|directives|programming|guardrails|system{_S}prompt)"
_WEAK_OBJECT = r"(?:rules|guidelines|restrictions|constraints|context|messages|commands|orders)"
_SECRET_WORD = (
    rf"(?:passwords?|passphrases?|passcodes?|api{_S}?keys?|access{_S}keys?|secret{_S}keys?|"
    rf"private{_S}keys?|ssh{_S}keys?|tokens?|credentials|secrets|seed{_S}phrases?|"
    rf"recovery{_S}phrases?|mnemonic|2fa{_S}codes?|otp|one{_S}time{_S}(?:codes?|passwords?)|"
    rf"session{_S}cookies?|cookies|environment{_S}variables|env{_S}vars)"
)
_SENSITIVE_PATH = (
    r"(?:~?/?\.ssh/(?:id_\w+|identity)\b(?!\.pub)|\bid_(?:rsa|ed25519|ecdsa|dsa)\b(?!\.pub)|"
    r"\.aws/credentials|/etc/shadow|/etc/passwd|\.netrc\b|\.pgpass\b|\.git-credentials|"
    r"\.docker/config\.json|\.kube/config|claude_desktop_config\.json|\bmcp\.json)"
)
# Seeds are Hyperscan expressions: ASCII classes, no look-around.
_H = r"[\W_]{1,6}"

DEFAULT_RULES: tuple[Rule, ...] = (
    # -- ignore_instructions ------------------------------------------------------------------
    _rule(
        "ignore_instructions",
        r"\b(?:ignore|disregard|forget|override|overrule|supersede|bypass)\b",
        rf"\b(?:ignore|disregard|forget|override|overrule|supersede|bypass){_S}"
        rf"(?:(?:all|any|every|of|the|your|my|its){_S}){{0,3}}"
        rf"(?:(?:{_QUALIFIED}|all|any|your|every){_S}{_WORDS}{_STRONG_OBJECT}"
        rf"|{_QUALIFIED}{_S}{_WORDS}{_WEAK_OBJECT})\b",
    ),
    _rule(
        "ignore_instructions",
        rf"\bforget{_H}(?:everything|all)\b",
        rf"\bforget{_S}(?:everything|all){_S}(?:above|before|previously|so far|"
        rf"you{_S}(?:were|have{_S}been){_S}told)\b",
    ),
    _rule(
        "ignore_instructions",
        rf"instructions[\W_]{{0,6}}(?::|are\b)|(?:not|n't|stop){_H}(?:follow|obey)",
        rf"\b(?:new{_S}system|your{_S}(?:real|actual|true|new)){_S}instructions{_S}?"
        rf"(?::|are\b)|\b(?:do{_S}not|don't|stop){_S}(?:follow|following|obey|obeying)"
        rf"{_S}(?:the|your|any){_S}{_QUALIFIED}{_S}(?:instructions|rules|prompt)\b",
    ),
    # -- role_override ------------------------------------------------------------------------
    _rule(
        "role_override",
        r"<\|[a-z_]{2,20}\|>|\[/?inst\]|<</?sys>>|_of_turn>|</?(?:system|system_prompt|sys_prompt)>",
        r"<\|(?:im_start|im_end|im_sep|system|user|assistant|endoftext|start_header_id|"
        r"end_header_id|eot_id|begin_of_text)\|>|\[/?inst\]|<</?sys>>|<(?:start|end)_of_turn>"
        r"|</?(?:system|system_prompt|sys_prompt)>",
    ),
    _rule(
        "role_override",
        rf"\byou(?:{_H}are|'re){_H}now\b",
        rf"\byou(?:{_S}are|'re){_S}now{_S}(?:(?:no{_S}longer|free|unrestricted|unfiltered|"
        rf"jailbroken|dan)\b|(?:an?|the|my|in){_S}{_WORDS}(?:ai|assistant|chatbot|"
        rf"language{_S}model|llm|persona|character|bot)\b|in{_S}(?:\w+{_S})?mode\b)",
    ),
    _rule(
        "role_override",
        rf"\bfrom{_H}now{_H}on\b|\bhenceforth\b|\brest{_H}of{_H}this{_H}conversation\b",
        rf"\b(?:from{_S}now{_S}on|henceforth|for{_S}the{_S}rest{_S}of{_S}this{_S}"
        rf"conversation),?{_S}you{_S}(?:will|must|shall|should|are{_S}to|are{_S}going{_S}to)"
        rf"{_S}(?:\w+{_S})?(?:act|respond|answer|reply|ignore|obey|pretend|roleplay|role-play|"
        rf"behave|speak|refuse|comply|only)\b",
    ),
    _rule(
        "role_override",
        rf"\bpretend\b|\bno{_H}longer\b|(?:dan|jailbreak|jailbroken|god|unrestricted|unfiltered|"
        rf"evil){_H}mode\b",
        rf"\bpretend{_S}(?:that{_S})?you(?:{_S}are|'re){_S}{_WORDS}(?:an?{_S})?(?:ai|assistant|"
        rf"chatbot|unrestricted|unfiltered|jailbroken|not{_S}an{_S}ai)\b"
        rf"|\byou(?:{_S}are|'re){_S}no{_S}longer{_S}(?:an?{_S})?(?:ai|assistant|bound|"
        rf"restricted|limited|claude|chatgpt)\b"
        rf"|\b(?:dan|jailbreak|jailbroken|god|unrestricted|unfiltered|evil){_S}mode\b",
    ),
    _rule(
        "role_override",
        r"(?:^|\n)[ \t>#*]{0,20}(?:system|assistant)\b",
        rf"(?m)^[ \t>#*]*(?:system|assistant)(?:{_S}(?:prompt|message|note))?[ \t]*:[ \t]*"
        rf"(?:you|ignore|disregard|from{_S}now|new{_S}instructions|always|never|do{_S}not|"
        rf"don't|forget)\b",
    ),
    # -- hidden_directive ---------------------------------------------------------------------
    _rule(
        "hidden_directive",
        r"<\s*/?\s*!?\s*(?:important|hidden|[a-z]+_instructions?|instructions_for)",
        r"<\s*/?\s*!?\s*(?:important|hidden|(?:system|hidden|secret|ai|assistant|admin|model)"
        r"_instructions?|instructions_for_(?:the_)?(?:ai|assistant|model|agent))\s*>",
    ),
    _rule(
        "hidden_directive",
        r"<!--",
        r"<!--(?:(?!-->)[\s\S]){0,400}?(?:\b(?:ai|llm|assistant|model|agent|claude|chatgpt|"
        r"copilot)\b(?:(?!-->)[\s\S]){0,80}?\b(?:must|should|shall|needs?\s+to|always|never|do\s+"
        r"not|don't)\b|\b(?:ignore|disregard)\b|do\s+not\s+(?:tell|mention)|don't\s+(?:tell|"
        r"mention)|without\s+telling)",
    ),
    _rule(
        "hidden_directive",
        rf"(?:not|n't|never){_H}(?:tell|inform|notify|alert|mention|reveal|disclose|show)\b"
        rf"|\bwithout{_H}(?:telling|informing|alerting)\b|\b(?:keep|hide){_H}(?:this|it|these|"
        rf"that)\b|\bthe{_H}user{_H}(?:must|should|need)",
        rf"\b(?:do{_S}not|don't|never|must{_S}not|mustn't)\s+(?:tell|inform|notify|alert)"
        rf"{_S}(?:the{_S})?users?\b(?:{_S}(?:about|of))?{_S}(?:this|it|these|that|anything)\b"
        rf"|\b(?:do{_S}not|don't|never|must{_S}not|mustn't)\s+(?:tell|mention|reveal|disclose|"
        rf"show)\s+(?:this|it|these|that|anything)(?:{_S}\w+){{0,2}}?{_S}(?:to|with)"
        rf"{_S}(?:the{_S})?users?\b"
        rf"|\bwithout{_S}(?:telling|informing|alerting){_S}(?:the{_S})?users?\b"
        rf"|\b(?:keep|hide){_S}(?:this|it|these|that){_S}(?:(?:secret|hidden|confidential)"
        rf"{_S})?from{_S}(?:the{_S})?users?\b"
        rf"|\bthe{_S}user{_S}(?:must|should|need|needs{_S}to)(?:{_S}not|n't){_S}(?:know|"
        rf"be{_S}told|find{_S}out|be{_S}informed)\b",
    ),
    _rule(
        "hidden_directive",
        rf"\b(?:silently|secretly|quietly|covertly){_H}\w",
        rf"\b(?:silently|secretly|quietly|covertly){_S}(?:send|upload|forward|email|post|"
        rf"exfiltrate|copy|append|invoke|call|transmit|read)\b",
    ),
    # -- exfiltration -------------------------------------------------------------------------
    _rule(
        "exfiltration",
        rf"\b(?:to|into|at|via)\s+(?:https?://|[\w.+-]+@[\w-]+\.\w|the{_H}(?:following|url|"
        rf"endpoint|webhook|address|server))",
        rf"\b(?:send|upload|post|forward|transmit|exfiltrate|leak|email|e-mail|share|append|"
        rf"submit){_S}(?:[^.\n]{{0,80}}?)(?:\b(?:{_SECRET_WORD}|conversation|chat{_S}history|"
        rf"system{_S}prompt)|\.env\b|{_SENSITIVE_PATH})[^.\n]{{0,80}}?\b(?:to|into|at|via)"
        rf"\s+(?:https?://|[\w.+-]+@[\w-]+\.\w|the{_S}(?:following|url|endpoint|webhook|"
        rf"address|server))",
        negatable=True,
    ),
    _rule("exfiltration", r"exfiltrat", r"\bexfiltrat(?:e|ing)\b"),
    _rule(
        "exfiltration",
        r"!\[[^\]\n]{0,100}\]\(https?://",
        r"!\[[^\]\n]{0,100}\]\(https?://[^)\s]{1,200}?[?&][\w.-]{1,30}=(?:\{|\$|<|%7b|\[)",
    ),
    # -- credential_request -------------------------------------------------------------------
    _rule(
        "credential_request",
        rf"\b(?:reveal|disclose|share|give|send|tell|email|provide|ask){_H}(?:me|us|your|the|"
        rf"their|all|any|of|them|him|her)\b",
        rf"\b(?:reveal|disclose|share|(?:give|send|tell|email){_S}(?:me|us)|provide{_S}"
        rf"(?:me|us){_S}with){_S}(?:(?:your|the{_S}user'?s?|their|all|any|the|of){_S}){{1,3}}"
        rf"(?:\w+{_S}){{0,2}}?{_SECRET_WORD}\b"
        rf"|\bask{_S}(?:the{_S}user|them|him|her){_S}for{_S}(?:their|his|her|the|an?|your)"
        rf"{_S}(?:\w+{_S})?{_SECRET_WORD}\b",
        negatable=True,
    ),
    _rule(
        "credential_request",
        r"\.ssh/|\bid_(?:rsa|ed25519|ecdsa|dsa)|\.aws/credentials|/etc/(?:shadow|passwd)|\.netrc"
        r"|\.pgpass|\.git-credentials|\.docker/config\.json|\.kube/config|"
        r"claude_desktop_config\.json|mcp\.json",
        rf"\b(?:read|cat|print|output|send|upload|attach|return|share|exfiltrate|post|dump|leak|"
        rf"reveal|display|show|include){_S}(?:[^.\n]{{0,40}}?){_SENSITIVE_PATH}",
        negatable=True,
    ),
    _rule(
        "credential_request",
        r"\.env",
        rf"\b(?:contents?{_S}of|send|upload|share|post|leak|exfiltrate|reveal|dump){_S}"
        rf"(?:(?:the|your|my|this){_S})?(?:`)?\.env(?![\w.])",
        negatable=True,
    ),
)

KINDS: tuple[str, ...] = (
    "ignore_instructions",
    "role_override",
    "hidden_directive",
    "exfiltration",
    "credential_request",
    "invisible_text",
)

# Zero-width and word-joining characters, bidi embeddings/overrides/isolates, tag characters.
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff\u180e"
_INVISIBLE = re.compile(f"[{_ZERO_WIDTH}]+|[\u202a-\u202e\u2066-\u2069]+|[\U000e0000-\U000e007f]+")
_WAVING_BLACK_FLAG = "\U0001f3f4"
# The same characters as UTF-8 bytes, for the one-pass search (a Python class scan costs
# ~30 us per KiB of non-ASCII text; this costs ~1).
_INVISIBLE_SEED = SeedSearch(
    [
        r"\xe2\x80[\x8b-\x8d\xaa-\xae]|\xe2\x81[\xa0-\xa4\xa6-\xa9]|\xef\xbb\xbf|\xe1\xa0\x8e"
        r"|\xf3\xa0\x80[\x80-\xbf]|\xf3\xa0\x81[\x80-\xbf]"
    ]
)


def _benign_invisible(text: str, start: int, end: int) -> bool:
    """Invisible characters with an ordinary use: emoji joiners, script joiners, a BOM, flags."""
    run = text[start:end]
    first = run[0]
    if "\U000e0000" <= first <= "\U000e007f":
        # Subdivision flags (England, Scotland, Wales): U+1F3F4, a few tags, then CANCEL TAG.
        return (
            start > 0
            and text[start - 1] == _WAVING_BLACK_FLAG
            and len(run) <= 8
            and run.endswith("\U000e007f")
        )
    if "\u202a" <= first <= "\u202e" or "\u2066" <= first <= "\u2069":
        return False  # bidi overrides reorder what a reader sees (Trojan Source)
    if len(run) >= 2:
        return False  # runs of zero-width characters encode hidden data
    if run == "\ufeff" and start == 0:
        return True  # a byte order mark
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    # A joiner hidden inside an ASCII word splits it for a filter but not for a model.
    return not (before.isascii() and before.isalnum() and after.isascii() and after.isalnum())


class InjectionScanner:
    """Finds instructions aimed at the model in one string; pure and thread-safe.

    `kinds` limits the kinds reported (default: all of `KINDS`); `extra_rules` adds rules
    of any kind (the poisoning checks add theirs), matched on the same normalised view.
    """

    def __init__(
        self, kinds: Iterable[str] | None = None, extra_rules: Sequence[Rule] = ()
    ) -> None:
        wanted = set(KINDS if kinds is None else kinds)
        unknown = wanted - set(KINDS)
        if unknown:
            raise ValueError(
                f"unknown injection kind(s) {sorted(unknown)}; expected some of {list(KINDS)}"
            )
        self._rules = tuple(r for r in DEFAULT_RULES if r.kind in wanted) + tuple(extra_rules)
        self._seeds = SeedSearch([r.seed for r in self._rules], caseless=True)
        self._invisible = "invisible_text" in wanted
        self.kinds = frozenset(wanted | {r.kind for r in extra_rules})

    def scan(self, text: str) -> list[Hit]:
        """Every injection marker in `text`, ordered by position, overlapping ones merged.

        A marker found only in a decoded reading of `text` (JSON escapes, percent-encoding,
        HTML references, base64: `text.decoded_views`) is reported as covering the whole
        string.
        """
        hits = self._scan_view(text)
        if encoded(text):
            found = {h.kind for h in hits}
            for view in decoded_views(text)[1:]:
                for hit in self._scan_view(view):
                    if hit.kind not in found:
                        found.add(hit.kind)
                        hits.append(Hit(RULE, hit.kind, 0, len(text)))
        return _merged(hits)

    def scan_many(self, texts: Sequence[str]) -> list[list[Hit]]:
        """`scan` of each string, with one pass over all of them to find the few worth it.

        A message's strings are many and short (keys, ids, dates); scanning each alone costs
        ~1 µs of fixed overhead, this costs one pass over their total length.
        """
        out: list[list[Hit]] = [[] for _ in texts]
        views = [text.lower() if text.isascii() else normalise(text) for text in texts]
        worth = self._seeds.found_in(views)
        if self._invisible:
            odd = [i for i, text in enumerate(texts) if not text.isascii()]
            worth.update(odd[k] for k in _INVISIBLE_SEED.found_in([texts[i] for i in odd]))
        worth.update(encoded_among(texts))
        for index in worth:
            out[index] = self.scan(texts[index])
        return out

    def _scan_view(self, text: str) -> list[Hit]:
        """The hits on one reading of the text, positions in that reading."""
        hits: list[Hit] = []
        plain = text.isascii()
        if not plain and self._invisible:
            hits.extend(_invisible_hits(text))
        view = text.lower() if plain else normalise(text)
        seen = self._seeds.ends(view)
        if not seen:
            return hits
        back: NormalisedText | None = None
        for index, ends in seen.items():
            rule = self._rules[index]
            for start, end in self._matches(rule, view, ends):
                if not plain:
                    # The position map is built only once something matched (the rare case).
                    back = back or normalised(text)
                    start, end = back.span(start, end)
                hits.append(Hit(RULE, rule.kind, start, end))
        return hits

    @staticmethod
    def _matches(rule: Rule, view: str, ends: list[int]) -> set[tuple[int, int]]:
        """The spans of `rule.pattern` in `view` near the seed ends."""
        spans: set[tuple[int, int]] = set()
        for lo, hi in windows(ends, REACH[0], REACH[1], len(view)):
            for found in rule.pattern.finditer(view, lo, hi):
                # Confirmed on the whole view: a window's edge must not cut a match short.
                match = rule.pattern.match(view, found.start())
                if match is None:
                    continue
                if rule.negatable and _NEG.search(view, max(0, match.start() - 24), match.start()):
                    continue
                spans.add(match.span())
        return spans


def _invisible_hits(text: str) -> list[Hit]:
    """Runs of invisible characters that have no ordinary use where they stand."""
    hits: list[Hit] = []
    for ends in _INVISIBLE_SEED.ends(text).values():
        for lo, hi in windows(ends, 8, 8, len(text)):
            hits.extend(
                Hit(RULE, "invisible_text", m.start(), m.end())
                for m in _INVISIBLE.finditer(text, lo, hi)
                if not _benign_invisible(text, m.start(), m.end())
            )
    return hits


def _merged(hits: list[Hit]) -> list[Hit]:
    """Hits ordered by position, with overlapping hits of one kind joined into one."""
    out: list[Hit] = []
    for hit in sorted(hits, key=lambda h: (h.kind, h.start, h.end)):
        last = out[-1] if out else None
        if last is not None and last.kind == hit.kind and hit.start <= last.end:
            out[-1] = Hit(RULE, hit.kind, last.start, max(last.end, hit.end))
        else:
            out.append(hit)
    return sorted(out, key=lambda h: (h.start, h.end, h.kind))
