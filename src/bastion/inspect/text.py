"""Views of a string that detectors match against: normalised and de-escaped.

`normalise` folds the tricks that make one word look like another to a machine but not to a
model: compatibility forms (fullwidth, ligatures, mathematical letters), case, accents,
Cyrillic and Greek look-alikes of Latin letters, zero-width and other invisible format
characters, and Unicode tag characters (which carry hidden ASCII: they are decoded to it).
`normalised` does the same and keeps a map back to the original positions, so a hit on the
view is reported where it is in the string that was scanned.

`decoded_views` yields the other readings of a string that a model or a client would see
through: JSON string escapes inside a text field (`\\u0069gnore`), percent-encoding
(`%69gnore`), HTML character references (`&#105;gnore`) and base64 (a resource's `blob`, an
image's `data`) — each also applied to what the others decoded, a few rounds deep
(`%5Cu0069`, JSON inside JSON). `encoded` says, without copying, whether a string could have
such readings. Hits on those views are *approximate* in position: callers report them as
covering the whole string.

`SeedSearch` is the one pass over a whole string that the detectors share: a Hyperscan
database of short "seed" patterns (a key prefix, a trigger phrase) that says where something
may start, so the exact Python patterns and validators run only on small windows around those
places (measured in docs/decisions/0005-secret-detection.md).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import html
import json
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import hyperscan

__all__ = [
    "NormalisedText",
    "SeedSearch",
    "decoded_views",
    "encoded",
    "encoded_among",
    "normalise",
    "normalised",
    "windows",
]

# Latin look-alikes that NFKC leaves alone (they are letters of their own scripts). Only the
# lower-case forms: casefolding runs first.
_CONFUSABLES = {
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "е": "e", "һ": "h", "і": "i", "ј": "j", "к": "k",
    "м": "m", "н": "h", "о": "o", "р": "p", "ԛ": "q", "ѕ": "s", "т": "t", "у": "y",
    "х": "x", "ԝ": "w", "ӏ": "l", "ё": "e", "ї": "i", "ɡ": "g", "ց": "g",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j",
    # Dashes a reader takes for a hyphen (`acme‑t1` with U+2011 is still acme-t1)
    "‐": "-", "‒": "-", "–": "-", "—": "-", "―": "-", "⁃": "-", "−": "-", "﹣": "-",
}  # fmt: skip

_TAG_FIRST, _TAG_LAST = 0xE0000, 0xE007F
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


def _fold_char(char: str) -> str:
    """One non-ASCII character as the view shows it (possibly several, possibly none)."""
    code = ord(char)
    if _TAG_FIRST <= code <= _TAG_LAST:
        # Tag characters spell ASCII invisibly (U+E0041 is a hidden "A"): show what they say.
        return chr(code - _TAG_FIRST) if 0x20 <= code - _TAG_FIRST <= 0x7E else ""
    out = []
    for part in unicodedata.normalize("NFKD", char).casefold():
        category = unicodedata.category(part)
        if category in ("Mn", "Me", "Cf"):
            continue  # accents and invisible format characters (zero-width, bidi controls)
        if category.startswith("Z"):
            part = " "  # every space and separator is a plain space
        out.append(_CONFUSABLES.get(part, part))
    return "".join(out)


_FOLDED: dict[str, str] = {}


def _fold(char: str) -> str:
    """`_fold_char`, remembered: the same few characters recur through a text."""
    folded = _FOLDED.get(char)
    if folded is None:
        folded = _fold_char(char)
        if len(_FOLDED) < 65536:
            _FOLDED[char] = folded
    return folded


@dataclass(frozen=True, slots=True)
class NormalisedText:
    """A normalised view and the way back: `span(i, j)` of the view is where in the original.

    `starts[k]` is the view position where piece `k` begins and `origins[k]` the original
    position it came from; ASCII runs map one to one, each non-ASCII character is its own
    piece.
    """

    text: str
    original_length: int
    starts: tuple[int, ...]
    origins: tuple[int, ...]
    ascii_piece: tuple[bool, ...]

    def position(self, index: int) -> int:
        """The original position of the character that view position `index` came from."""
        if not self.starts or index >= len(self.text):
            return self.original_length
        k = bisect.bisect_right(self.starts, index) - 1
        if self.ascii_piece[k]:
            return self.origins[k] + index - self.starts[k]
        return self.origins[k]  # one original character expanded to several view characters

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original `[start, end)` that view `[start, end)` came from."""
        if end <= start:
            first = self.position(start)
            return first, first
        # Every piece stands for exactly one original character per view character (ASCII)
        # or for one original character in all (non-ASCII), so the end is one past the last.
        return self.position(start), self.position(end - 1) + 1


def normalise(text: str) -> str:
    """`text` with case, compatibility forms, accents, look-alikes and invisibles folded."""
    if text.isascii():
        return text.lower()
    return _NON_ASCII_RUN.sub(lambda m: "".join(map(_fold, m.group())), text).lower()


def normalised(text: str) -> NormalisedText:
    """`normalise(text)` with the map back to positions in `text`."""
    pieces: list[str] = []
    starts: list[int] = []
    origins: list[int] = []
    ascii_piece: list[bool] = []
    at = 0
    last = 0

    def add(piece: str, origin: int, is_ascii: bool) -> None:
        nonlocal at
        if not piece:
            return
        pieces.append(piece)
        starts.append(at)
        origins.append(origin)
        ascii_piece.append(is_ascii)
        at += len(piece)

    for run in _NON_ASCII_RUN.finditer(text):
        add(text[last : run.start()].lower(), last, True)
        for offset, char in enumerate(run.group()):
            add(_fold(char).lower(), run.start() + offset, False)
        last = run.end()
    add(text[last:].lower(), last, True)
    return NormalisedText(
        "".join(pieces), len(text), tuple(starts), tuple(origins), tuple(ascii_piece)
    )


_JSON_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|[\"\\/bfnrt])")
_PERCENT = re.compile(r"%[0-9a-fA-F]{2}")


def _json_unescaped(text: str) -> str:
    """`text` with JSON string escapes decoded where they are well formed."""

    def one(match: re.Match[str]) -> str:
        try:
            value: str = json.loads(f'"{match.group()}"')
        except ValueError:
            return match.group()
        return value

    # Decode escapes one by one so that a stray backslash elsewhere does not void the rest;
    # surrogate pairs decode to lone surrogates here, which is fine for matching ASCII words.
    return _JSON_ESCAPE.sub(one, text)


# A whole string that is base64 (standard or URL-safe alphabet, MIME line breaks allowed);
# short ones are ids and words, not encoded text.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/_-]|\r?\n){16,}={0,2}\s*")
# Rounds of decoding applied to what an earlier round decoded, and readings kept per string.
_ROUNDS = 3
_MAX_VIEWS = 12


def encoded(text: str) -> bool:
    """Whether `text` could read differently decoded (JSON escapes, percent-encoding, HTML
    references, base64): False means `decoded_views(text)` is `[text]`."""
    if "\\" in text or "%" in text or "&" in text:
        return True
    return len(text) >= 16 and _base64_like(text)


def encoded_among(texts: Sequence[str]) -> set[int]:
    """The indices of the strings for which `encoded` holds, in one sweep (a message's
    strings are many and short: a call per string would cost more than the answer)."""
    joined = "\0".join(texts)
    found: set[int] = set()
    if "\\" in joined or "%" in joined or "&" in joined:
        found.update(i for i, t in enumerate(texts) if "\\" in t or "%" in t or "&" in t)
    full = _BASE64.fullmatch
    # The alphabet first: most text fails it at its first space or quote.
    found.update(
        i
        for i, t in enumerate(texts)
        if len(t) >= 16
        and full(t) is not None
        and not t.islower()
        and not t.isupper()
        and not t.isdigit()
    )
    return found


def _base64_like(text: str) -> bool:
    """Long enough, both cases of letters (hex hashes, uuids, upper-case ids and numbers are
    not base64 of text), and only base64's alphabet."""
    return (
        len(text) >= 16
        and _BASE64.fullmatch(text) is not None
        and not text.islower()
        and not text.isupper()
        and not text.isdigit()
    )


def _unescaped(view: str) -> str | None:
    return _json_unescaped(view) if "\\" in view else None


def _percent_decoded(view: str) -> str | None:
    return unquote(view, errors="replace") if "%" in view and _PERCENT.search(view) else None


def _html_decoded(view: str) -> str | None:
    return html.unescape(view) if "&" in view else None


def _base64_decoded(view: str) -> str | None:
    """The UTF-8 text a base64 string encodes; None when it is not base64 of text (an image's
    bytes are not text: nothing a model reads as words is hidden there)."""
    if not _base64_like(view):
        return None
    compact = "".join(view.split()).rstrip("=").replace("-", "+").replace("_", "/")
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        return data.decode("utf-8")
    except (binascii.Error, ValueError):
        return None


_DECODERS = (_unescaped, _percent_decoded, _html_decoded, _base64_decoded)


def decoded_views(text: str) -> list[str]:
    """`text`, then each different reading of it: JSON-unescaped, percent-decoded, with HTML
    references resolved, base64-decoded, and those decoded again (a few rounds, a bounded
    number of readings).

    Positions in the extra views do not map back to `text`: a hit found only there is
    reported as covering the whole string.
    """
    views = [text]
    if not encoded(text):
        return views
    frontier = [text]
    for _ in range(_ROUNDS):
        following: list[str] = []
        for view in frontier:
            for decode in _DECODERS:
                found = decode(view)
                if found is not None and found not in views and len(views) < _MAX_VIEWS:
                    views.append(found)
                    following.append(found)
        if not following:
            break
        frontier = following
    return views


class SeedSearch:
    """Where each of several seed patterns ends in a string, in one Hyperscan pass.

    `patterns` are Hyperscan (PCRE-like) expressions over UTF-8 bytes, matched
    case-insensitively when `caseless` (one flag for all, or one per pattern). `ends(text)`
    maps the index of each seed that matched to the character positions where its matches
    end. Safe to share between threads: each thread scans with its own scratch space.
    """

    def __init__(self, patterns: Sequence[str], *, caseless: bool | Sequence[bool] = False) -> None:
        self._count = len(patterns)
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        each = [caseless] * len(patterns) if isinstance(caseless, bool) else list(caseless)
        if patterns:
            self._db.compile(
                expressions=[p.encode() for p in patterns],
                ids=list(range(len(patterns))),
                elements=len(patterns),
                flags=[hyperscan.HS_FLAG_CASELESS if c else 0 for c in each],
            )
        self._local = threading.local()

    def ends(self, text: str) -> dict[int, list[int]]:
        """Seed index -> end positions (characters into `text`) of its matches."""
        if not self._count or not text:
            return {}
        data = text.encode("utf-8", "surrogatepass")
        found: list[tuple[int, int]] = []

        def on_match(seed: int, _start: int, end: int, _flags: int, _ctx: object) -> None:
            found.append((seed, end))

        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        self._db.scan(data, match_event_handler=on_match, scratch=scratch)
        if not found:
            return {}
        to_char = _identity if len(data) == len(text) else _byte_to_char(data)
        out: dict[int, list[int]] = {}
        for seed, end in found:
            out.setdefault(seed, []).append(to_char(end))
        return out

    def found_in(self, texts: Sequence[str]) -> set[int]:
        """The indices of the strings in which some seed matches, in one pass over all.

        The strings are scanned joined by newlines, so a seed may also match across two of
        them: that only makes a string a candidate it need not have been.
        """
        if not self._count or not texts:
            return set()
        starts: list[int] = []
        at = 0
        for text in texts:
            starts.append(at)
            at += len(text) + 1
        return {
            bisect.bisect_right(starts, max(0, end - 1)) - 1
            for ends in self.ends("\n".join(texts)).values()
            for end in ends
        }


def _identity(offset: int) -> int:
    return offset


def _byte_to_char(data: bytes) -> _ByteToChar:
    return _ByteToChar(data)


class _ByteToChar:
    """Byte offsets into UTF-8 data as character offsets (decoding up to each, remembered)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._known: dict[int, int] = {}

    def __call__(self, offset: int) -> int:
        known = self._known.get(offset)
        if known is None:
            # A seed can end inside a multi-byte character; the partial one is not counted.
            known = len(self._data[:offset].decode("utf-8", "ignore"))
            self._known[offset] = known
        return known


def windows(ends: Sequence[int], before: int, after: int, length: int) -> list[tuple[int, int]]:
    """The merged `[end - before, end + after)` ranges around each seed end, within `length`."""
    out: list[tuple[int, int]] = []
    for end in sorted(ends):
        lo, hi = max(0, end - before), min(length, end + after)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
