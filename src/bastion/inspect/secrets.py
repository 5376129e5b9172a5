"""Secrets (rule `secret`) and personal data (rule `personal_data`) in one string.

Each kind has a seed — a Hyperscan expression for the part that makes it recognisable (a
key prefix, `-----BEGIN … PRIVATE KEY`, `@domain.tld`, thirteen digits) — an exact Python
pattern, and often a validator (Luhn for cards, mod 97 for IBANs, a JSON header with `alg`
for JWTs, entropy for generic assignments). One Hyperscan pass over the string finds every
seed; the exact pattern and the validator run only in a window around each seed, so a string
with nothing in it costs that one pass: ~1–3 µs per KiB, where one `re` alternation of the
same patterns costs ~300 (docs/decisions/0005-secret-detection.md).

Hits span the secret itself (the password of a connection string, the value of an
assignment), so redaction keeps the context. A kind found only in a decoded reading of the
string (JSON escapes, percent-encoding, HTML references, base64: `text.decoded_views`) is
reported over the whole string.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import orjson

from bastion.inspect.hits import Hit
from bastion.inspect.text import SeedSearch, decoded_views, encoded, encoded_among, windows

__all__ = ["PERSONAL_KINDS", "SECRET_KINDS", "SecretScanner"]


@dataclass(frozen=True, slots=True)
class _Detector:
    """How one kind is found: seed (Hyperscan), exact pattern, reach, validator."""

    kind: str
    rule: str
    seed: str
    pattern: re.Pattern[str]
    before: int  # how far before a seed's end the match may start
    after: int  # how far after a seed's end the match may end
    valid: Callable[[str], bool] | None = None
    caseless_seed: bool = False


# -- validators --------------------------------------------------------------------------------

_PLACEHOLDERS = frozenset(
    "password pass passwd pwd secret changeme example xxxxxxxx redacted none null true false "
    "your_password yourpassword mypassword placeholder undefined".split()
)


def _placeholder(value: str) -> bool:
    """A value that stands for a secret rather than being one (`<pass>`, `${PWD}`, `****`)."""
    low = value.lower().strip("'\"")
    return (
        low in _PLACEHOLDERS
        or low[:1] in "<{$[%*"
        or set(low) <= {"*", "x", ".", "-", "_", "•"}
        or low.startswith(("your", "my_", "example"))
    )


def _entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def _classes(value: str) -> int:
    return sum(
        (
            any(c.islower() for c in value),
            any(c.isupper() for c in value),
            any(c.isdigit() for c in value),
            any(not c.isalnum() for c in value),
        )
    )


def _random_value(value: str) -> bool:
    """A generic assignment's value that looks generated, not a word or a reference."""
    return (
        not _placeholder(value)
        and _classes(value) >= 2
        and _entropy(value) >= 3.0
        and not value.lower().startswith(("http://", "https://", "env:", "vault:", "file:"))
    )


def _mixed_key(value: str) -> bool:
    """An OpenAI-style key: digits and both cases (kebab-case identifiers are not keys)."""
    body = value.split("-", 2)[-1]
    return _classes(body.replace("_", "").replace("-", "")) >= 3 and _entropy(body) >= 3.5


def _jwt(value: str) -> bool:
    """Three base64url parts whose header decodes to a JSON object with `alg`."""
    header = value.split(".", 1)[0]
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


def _luhn(value: str) -> bool:
    """13–19 digits, one kind of separator at most, Luhn-valid, not one repeated digit."""
    digits = [int(c) for c in value if c.isdigit()]
    separators = {c for c in value if not c.isdigit()}
    if not 13 <= len(digits) <= 19 or len(separators) > 1 or len(set(digits)) == 1:
        return False
    if separators and min(len(g) for g in re.split(r"[ -]", value)) < 3:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# IBAN lengths for the countries most often seen; others need 15–34 characters.
_IBAN_LENGTHS = {
    "AT": 20, "BE": 16, "CH": 21, "CZ": 24, "DE": 22, "DK": 18, "ES": 24, "FI": 18, "FR": 27,
    "GB": 22, "GR": 27, "HU": 28, "IE": 22, "IT": 27, "LU": 20, "NL": 18, "NO": 15, "PL": 28,
    "PT": 25, "SE": 24, "SK": 24,
}  # fmt: skip


def _iban(value: str) -> bool:
    """The right length for its country and mod-97 valid (ISO 13616)."""
    compact = value.replace(" ", "")
    if _IBAN_LENGTHS.get(compact[:2], len(compact)) != len(compact) or not 15 <= len(compact):
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_FILE_SUFFIXES = frozenset("png jpg jpeg gif svg webp ico js mjs css json map txt md html".split())


def _email(value: str) -> bool:
    """Not a retina asset (`icon@2x.png`) or a scoped package path."""
    local, _, domain = value.rpartition("@")
    return (
        domain.rsplit(".", 1)[-1].lower() not in _FILE_SUFFIXES
        and not local.startswith(".")
        and not local.endswith(".")
    )


def _phone(value: str) -> bool:
    return 8 <= sum(c.isdigit() for c in value) <= 15


def _password(value: str) -> bool:
    return not _placeholder(value)


# -- the detectors -----------------------------------------------------------------------------

_B = r"(?<![A-Za-z0-9_-])"  # not inside a longer token
_E = r"(?![A-Za-z0-9_-])"


def _d(
    kind: str,
    seed: str,
    pattern: str,
    reach: tuple[int, int],
    valid: Callable[[str], bool] | None = None,
    *,
    rule: str = "secret",
    caseless_seed: bool = False,
) -> _Detector:
    return _Detector(
        kind, rule, seed, re.compile(pattern), reach[0], reach[1], valid, caseless_seed
    )


_DETECTORS: tuple[_Detector, ...] = (
    _d(
        "aws_access_key",
        r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}",
        rf"{_B}(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{{16}}{_E}",
        (24, 8),
    ),
    _d(
        "aws_secret_key",
        r"secret_?(?:access_?)?key",
        r"(?i:aws_?)?(?i:secret_?(?:access_?)?key)[\"']?\s*[:=]\s*[\"']?"
        r"(?P<secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
        (40, 100),
        _random_value,
        caseless_seed=True,
    ),
    _d(
        "github_token",
        r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22}",
        rf"{_B}(?:gh[pousr]_[A-Za-z0-9]{{36,251}}|github_pat_[A-Za-z0-9_]{{22,255}}){_E}",
        (64, 300),
    ),
    _d(
        "slack_token",
        r"xox[abposr]-[0-9A-Za-z-]{10}|hooks\.slack\.com/services/T",
        rf"{_B}xox[abposr]-(?:[0-9A-Za-z]+-){{1,6}}[0-9A-Za-z]{{8,}}{_E}"
        r"|https://hooks\.slack\.com/services/T[A-Z0-9]{6,}/B[A-Z0-9]{6,}/[A-Za-z0-9]{16,}",
        (40, 300),
    ),
    _d(
        "stripe_key",
        r"[rs]k_(?:live|test)_[0-9A-Za-z]{10}",
        rf"{_B}[rs]k_(?:live|test)_[0-9A-Za-z]{{16,247}}{_E}",
        (20, 260),
    ),
    _d(
        "google_api_key",
        r"AIza[0-9A-Za-z_-]{35}",
        rf"{_B}AIza[0-9A-Za-z_-]{{35}}{_E}",
        (40, 8),
    ),
    _d(
        "openai_key",
        r"sk-[A-Za-z0-9_-]{20}",
        rf"{_B}sk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{{32,300}}{_E}",
        (40, 320),
        _mixed_key,
    ),
    _d(
        "anthropic_key",
        r"sk-ant-[A-Za-z0-9_-]{20}",
        rf"{_B}sk-ant-[A-Za-z0-9_-]{{32,300}}{_E}",
        (40, 320),
    ),
    _d(
        "jwt",
        r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{2}",
        rf"{_B}eyJ[A-Za-z0-9_-]{{10,4096}}\.[A-Za-z0-9_-]{{2,16384}}\.[A-Za-z0-9_-]{{0,4096}}"
        r"(?![A-Za-z0-9_.-])",
        (4200, 20600),
        _jwt,
    ),
    _d(
        "private_key",
        r"-----BEGIN [A-Z0-9 ]{0,30}PRIVATE KEY",
        r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY((?: BLOCK)?)-----"
        r"(?:[\s\S]{0,16384}?-----END \1PRIVATE KEY\2-----|(?:\r?\n?[A-Za-z0-9+/=]{1,80})*)",
        (60, 16500),
    ),
    _d(
        "connection_string",
        r"[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/@'\"]{0,100}:[^\s@/'\"]{1,200}@",
        r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/@'\"<>]{0,100}:"
        r"(?P<secret>[^\s@/'\"<>]{1,200})@[A-Za-z0-9.\[\]_-]+",
        (330, 300),
        _password,
    ),
    _d(
        "password_assignment",
        r"(?:password|passwd|pwd|secret|api[_-]?key|apikey|access[_-]?token|auth[_-]?token"
        r"|client[_-]?secret|token|secret[_-]?key)[\"']?\s*[:=]",
        r"(?i)(?<![A-Za-z0-9])(?:password|passwd|pwd|secret|api[_-]?key|apikey|"
        r"access[_-]?token|auth[_-]?token|client[_-]?secret|token|secret[_-]?key)[\"']?"
        r"[ \t]*[:=][ \t]*[\"']?(?P<secret>[^\s\"',;<>`]{8,200})",
        (40, 260),
        _random_value,
        caseless_seed=True,
    ),
    _d(
        "email",
        r"[A-Za-z0-9._%+-]@[A-Za-z0-9-]+\.[A-Za-z]{2}",
        # Not right after ":" or "/" (the password of a URL), unless after "mailto:".
        r"(?:(?<=mailto:)|(?<![A-Za-z0-9._%+:/-]))[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}"
        r"[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}"
        r"(?![A-Za-z0-9-])",
        (80, 260),
        _email,
        rule="personal_data",
    ),
    _d(
        "card",
        r"\b[2-6]\d{3}[ -]?\d{4}[ -]?\d{4}[ -]?\d",
        r"(?<![\d.,+-])[2-6]\d{3}(?:[ -]?\d){9,15}(?![\d-]|[.,]\d)",
        (30, 30),
        _luhn,
        rule="personal_data",
    ),
    _d(
        "phone",
        r"\+\d{1,3}[ .-]?\(?\d|\(\d{2,4}\)\s?\d{3,4}[ -]\d{4}|\b\d{3}[-.]\d{3}[-.]\d{4}\b",
        r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){2,6}(?![\d-]|[.,]\d)"
        r"|(?<![\w(])\(\d{2,4}\)\s?\d{3,4}[ -]\d{4}(?![\d-])"
        r"|(?<![\w.-])\d{3}([-.])\d{3}\1\d{4}(?![\w-]|\.\d)",
        (30, 30),
        _phone,
        rule="personal_data",
    ),
    _d(
        "iban",
        r"\b[A-Z]{2}\d{2} ?[A-Z0-9]{4} ?[A-Z0-9]{4}",
        r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?"
        r"(?![A-Za-z0-9])",
        (20, 50),
        _iban,
        rule="personal_data",
    ),
)

SECRET_KINDS: tuple[str, ...] = tuple(d.kind for d in _DETECTORS if d.rule == "secret")
PERSONAL_KINDS: tuple[str, ...] = tuple(d.kind for d in _DETECTORS if d.rule == "personal_data")
# Group names a caller may use instead of listing every kind.
_GROUPS = {"secret": SECRET_KINDS, "personal_data": PERSONAL_KINDS}


class SecretScanner:
    """Finds secrets and personal data of the enabled kinds in one string; pure, thread-safe.

    `kinds` names kinds of `SECRET_KINDS` and `PERSONAL_KINDS`, or the groups `secret` and
    `personal_data`; the default is every kind.
    """

    def __init__(self, kinds: Iterable[str] | None = None) -> None:
        wanted: set[str] = set()
        for name in ("secret", "personal_data") if kinds is None else kinds:
            if name in _GROUPS:
                wanted.update(_GROUPS[name])
            elif name in SECRET_KINDS or name in PERSONAL_KINDS:
                wanted.add(name)
            else:
                raise ValueError(
                    f"unknown secret or personal-data kind {name[:40]!r}; expected one of "
                    f"{sorted([*_GROUPS, *SECRET_KINDS, *PERSONAL_KINDS])}"
                )
        self.kinds = frozenset(wanted)
        self._detectors = tuple(d for d in _DETECTORS if d.kind in wanted)
        self._seeds = SeedSearch(
            [d.seed for d in self._detectors],
            caseless=[d.caseless_seed for d in self._detectors],
        )

    @classmethod
    def for_kinds(cls, kinds: Iterable[str]) -> SecretScanner:
        """A scanner for `kinds` (kind names or the groups `secret`, `personal_data`)."""
        return cls(kinds)

    def scan(self, text: str) -> list[Hit]:
        """Every secret and personal datum in `text`, ordered by position."""
        hits = self._scan_view(text)
        if encoded(text):
            found = {h.kind for h in hits}
            for view in decoded_views(text)[1:]:
                for hit in self._scan_view(view):
                    if hit.kind not in found:
                        found.add(hit.kind)
                        hits.append(Hit(hit.rule, hit.kind, 0, len(text)))
        return sorted(hits, key=lambda h: (h.start, h.end, h.kind))

    def scan_many(self, texts: Sequence[str]) -> list[list[Hit]]:
        """`scan` of each string, with one pass over all of them to find the few worth it.

        A message's strings are many and short (keys, ids, dates); scanning each alone costs
        ~1 µs of fixed overhead, this costs one pass over their total length.
        """
        out: list[list[Hit]] = [[] for _ in texts]
        worth = self._seeds.found_in(texts)
        worth.update(encoded_among(texts))
        for index in worth:
            out[index] = self.scan(texts[index])
        return out

    def _scan_view(self, text: str) -> list[Hit]:
        hits: list[Hit] = []
        for index, ends in self._seeds.ends(text).items():
            detector = self._detectors[index]
            spans = _spans(detector, text, ends)
            hits.extend(Hit(detector.rule, detector.kind, s, e) for s, e in sorted(spans))
        return hits


def _spans(detector: _Detector, text: str, ends: list[int]) -> set[tuple[int, int]]:
    """The validated spans of one detector around its seed ends."""
    spans: set[tuple[int, int]] = set()
    for lo, hi in windows(ends, detector.before, detector.after, len(text)):
        for match in detector.pattern.finditer(text, lo, hi):
            group = "secret" if "secret" in detector.pattern.groupindex else 0
            value = match.group(group)
            if value and (detector.valid is None or detector.valid(value)):
                spans.add(match.span(group))
    return spans
