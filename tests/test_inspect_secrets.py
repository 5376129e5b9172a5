"""The secret and personal-data scanner: each kind on values generated here, nothing on the
look-alikes tool output is full of, exact positions, escapes seen through."""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import string
import uuid
from urllib.parse import quote

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.inspect.secrets import PERSONAL_KINDS, SECRET_KINDS, SecretScanner

SCANNER = SecretScanner()
ALNUM = string.ascii_letters + string.digits
UPPER = string.ascii_uppercase + string.digits


def rand(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def luhn_complete(prefix: str, length: int) -> str:
    """A Luhn-valid card number of `length` digits starting with `prefix`."""
    body = prefix + rand(string.digits, length - len(prefix) - 1)
    for check in string.digits:
        number = body + check
        total = 0
        for i, c in enumerate(reversed(number)):
            d = int(c)
            if i % 2:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        if total % 10 == 0:
            return number
    raise AssertionError("unreachable")


def iban(country: str, length: int) -> str:
    """A mod-97-valid IBAN with a random account part."""
    bban = rand(string.digits, length - 4)
    moved = bban + country + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in moved)) % 97
    return f"{country}{check:02d}{bban}"


def pem(key: object) -> str:
    return key.private_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def grouped(value: str, size: int = 4) -> str:
    return " ".join(value[i : i + size] for i in range(0, len(value), size))


# (kind, context before, secret, context after): the hit must be exactly the secret.
def positives() -> list[tuple[str, str, str, str]]:
    hs = jwt.encode({"sub": "agent-1", "tenant": "acme"}, secrets.token_bytes(32), "HS256")
    es = jwt.encode({"sub": "x"}, ec.generate_private_key(ec.SECP256R1()), "ES256")
    card = luhn_complete("4", 16)
    return [
        ("aws_access_key", "key id ", "AKIA" + rand(UPPER, 16), " in us-east-1"),
        ("aws_access_key", '{"k":"', "ASIA" + rand(UPPER, 16), '"}'),
        ("aws_secret_key", "aws_secret_access_key = ", rand(ALNUM + "/+", 40), "\n"),
        ("aws_secret_key", '"SecretAccessKey": "', rand(ALNUM + "/+", 40), '"'),
        ("github_token", "token ", "ghp_" + rand(ALNUM, 36), " expires"),
        ("github_token", "", "gho_" + rand(ALNUM, 36), ""),
        ("github_token", "GH=", "ghs_" + rand(ALNUM, 36), ";"),
        ("github_token", "pat: ", "github_pat_" + rand(ALNUM + "_", 82), "."),
        ("slack_token", "SLACK=", "xoxb-" + rand("0123456789", 12) + "-" + rand(ALNUM, 24), ""),
        ("stripe_key", "stripe ", "sk_live_" + rand(ALNUM, 24), " end"),
        ("stripe_key", "", "rk_test_" + rand(ALNUM, 30), ""),
        ("google_api_key", "maps key=", "AIza" + rand(ALNUM + "_-", 35), "&q=1"),
        ("openai_key", "OPENAI_API_KEY=", "sk-proj-" + rand(ALNUM, 40) + "T3BlbkFJ1a", ""),
        ("openai_key", "", "sk-" + rand(ALNUM, 20) + "Aa1" + rand(ALNUM, 25), " "),
        ("anthropic_key", "x-api-key: ", "sk-ant-api03-" + rand(ALNUM + "_-", 93) + "AA", ""),
        ("jwt", "Authorization: Bearer ", hs, ""),
        ("jwt", "id_token=", es, "&state=1"),
        ("private_key", "here: ", pem(rsa.generate_private_key(65537, 2048)).strip(), "\nok"),
        ("private_key", "", pem(ed25519.Ed25519PrivateKey.generate()).strip(), ""),
        (
            "private_key",
            "cut: ",
            "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB" + rand(ALNUM, 40),
            "",
        ),
        ("connection_string", "DSN postgres://app:", rand(ALNUM, 16), "@db.internal:5432/x"),
        ("connection_string", "redis://:", rand(ALNUM, 20) + "Z9", "@cache:6379/0"),
        ("password_assignment", "password=", rand(ALNUM, 6) + "#9xQ" + rand(ALNUM, 6), " "),
        ("password_assignment", '"api_key": "', rand(ALNUM, 32), '"'),
        ("password_assignment", "CLIENT_SECRET: ", rand(ALNUM, 24), "\n"),
        ("email", "write to ", "jane.doe+mcp@example.co.uk", " today"),
        ("email", '"email":"', "a_b@sub.example.org", '"'),
        ("email", "mailto:", "ops@example.com", ""),
        ("card", "card ", card, " exp 12/29"),
        ("card", "card ", grouped(card), "."),
        ("card", "amex ", luhn_complete("37", 15), ""),
        ("card", "mc ", "-".join(grouped(luhn_complete("51", 16)).split()), ""),
        ("phone", "call ", "+49 30 1234567", " now"),
        ("phone", "tel:", "+1-415-555-0134", ""),
        ("phone", "office ", "(415) 555-0134", ""),
        ("phone", "fax ", "415.555.0134", ";"),
        ("iban", "IBAN: ", iban("DE", 22), " (Berlin)"),
        ("iban", "pay to ", grouped(iban("FR", 27)), "."),
        ("iban", "", iban("NL", 18), ""),
    ]


POSITIVES = positives()


@pytest.mark.parametrize(("kind", "before", "value", "after"), POSITIVES, ids=[
    f"{p[0]}-{i}" for i, p in enumerate(POSITIVES)
])  # fmt: skip
def test_each_kind_is_found_exactly_where_it_is(
    kind: str, before: str, value: str, after: str
) -> None:
    text = before + value + after
    hits = [h for h in SCANNER.scan(text) if h.kind == kind]
    assert [(h.start, h.end) for h in hits] == [(len(before), len(before) + len(value))]
    expected_rule = "personal_data" if kind in PERSONAL_KINDS else "secret"
    assert hits[0].rule == expected_rule


@pytest.mark.parametrize(("kind", "before", "value", "after"), POSITIVES, ids=[
    f"{p[0]}-{i}" for i, p in enumerate(POSITIVES)
])  # fmt: skip
def test_a_kind_that_is_not_enabled_gets_through(
    kind: str, before: str, value: str, after: str
) -> None:
    """Fail open without the check: a scanner without the kind does not report it."""
    others = SecretScanner([k for k in (*SECRET_KINDS, *PERSONAL_KINDS) if k != kind])
    assert kind not in {h.kind for h in others.scan(before + value + after)}


NEGATIVES = [
    ("uuid", str(uuid.uuid4())),
    ("sha256", hashlib.sha256(b"x").hexdigest()),
    ("sha1 in git log", "commit " + hashlib.sha1(b"y").hexdigest()),  # noqa: S324
    ("base64 blob", "data: " + "QUJD" * 30),
    ("date", "2024-05-01T12:00:00Z and 01/05/2024"),
    ("version", "v1.22.3 and 2.0.0-rc.1 and 10.0.19045.3803"),
    ("order id", "order ORD-48213377 shipped; ticket #1234567890"),
    ("timestamp ms", '{"ts": 1714567890123, "n": 4111111111111112}'),
    ("invalid luhn", "card 4111 1111 1111 1112"),
    ("invalid iban", "DE89 3704 0044 0532 0130 01"),
    ("ip and port", "10.0.0.12:8080 and 192.168.100.200"),
    ("price", "total 1234.56 EUR, 4 500 000 units"),
    ("phone-like id", "id 1234567890 and 12345678"),
    ("short number with plus", "score +12, delta +3.5"),
    ("placeholder password", "password=<your-password> and DB_PASSWORD=${DB_PASSWORD}"),
    ("placeholder url", "postgres://user:password@localhost/db"),
    ("masked", "password: ********"),
    ("word password", "password: correcthorse"),
    ("token type", '"token_type": "Bearer", "expires_in": 3600'),
    ("retina asset", "icon@2x.png and logo@3x.webp"),
    ("scoped package", "npm i @types/node@20.1.0"),
    ("prose", "The secret to good APIs is consistency; keep tokens short-lived."),
    ("code", "def connect(user, password):\n    return db.connect(user=user, password=password)"),
    ("kebab class", "sk-some-very-long-kebab-case-css-class-name-here"),
    ("jwt-like without alg", "eyJmb28iOiJiYXIifQ.eyJzdWIiOiIxIn0.c2ln"),
    ("aws doc key id lowercase", "akiaiosfodnn7example"),
    ("sk without key", "sk-learn is a library"),
]


@pytest.mark.parametrize(("label", "text"), NEGATIVES, ids=[n[0] for n in NEGATIVES])
def test_look_alikes_are_not_reported(label: str, text: str) -> None:
    assert SCANNER.scan(text) == []


def test_corpus_counts() -> None:
    """The FN/FP figures the decision record quotes."""
    missed = [p for p in POSITIVES if p[0] not in {h.kind for h in SCANNER.scan("".join(p[1:]))}]
    flagged = [n for n in NEGATIVES if SCANNER.scan(n[1])]
    assert (len(missed), len(flagged)) == (0, 0), (missed, flagged)


def test_a_connection_string_password_is_not_also_an_email() -> None:
    text = "postgres://app:Zq8vNw3kLp@db.example.com/x"
    assert [h.kind for h in SCANNER.scan(text)] == ["connection_string"]


# -- escapes -----------------------------------------------------------------------------------


def test_a_key_json_escaped_inside_a_text_field_is_found_over_the_whole_string() -> None:
    key = "AKIA" + rand(UPPER, 16)
    text = json.dumps({"note": key}).replace("AKIA", "\\u0041KIA")
    assert key not in text
    hits = SCANNER.scan(text)
    assert [(h.kind, h.start, h.end) for h in hits] == [("aws_access_key", 0, len(text))]


def test_a_percent_encoded_connection_string_is_found() -> None:
    text = "next=" + quote("mysql://root:" + rand(ALNUM, 14) + "@db/prod", safe="")
    assert "://" not in text
    assert [h.kind for h in SCANNER.scan(text)] == ["connection_string"]


# -- configuration -----------------------------------------------------------------------------


def test_groups_expand_and_unknown_kinds_are_named() -> None:
    assert SecretScanner.for_kinds(["secret"]).kinds == frozenset(SECRET_KINDS)
    assert SecretScanner(["personal_data", "jwt"]).kinds == frozenset({*PERSONAL_KINDS, "jwt"})
    with pytest.raises(ValueError, match="'passport'"):
        SecretScanner(["email", "passport"])


def test_only_enabled_personal_kinds_are_reported() -> None:
    text = "mail a@example.com card " + luhn_complete("4", 16)
    assert [h.kind for h in SecretScanner(["email"]).scan(text)] == ["email"]


# -- properties --------------------------------------------------------------------------------

FILLER = st.text(
    alphabet=st.sampled_from(list(string.ascii_lowercase + " \n.,:;()[]{}\"'äöü€日本")),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(before=FILLER, after=FILLER, pick=st.integers(0, len(POSITIVES) - 1))
def test_a_secret_anywhere_in_benign_text_is_found_with_its_position(
    before: str, after: str, pick: int
) -> None:
    kind, left, value, right = POSITIVES[pick]
    text = f"{before} {left}{value}{right} {after}"
    at = len(before) + 1 + len(left)
    spans = {(h.start, h.end) for h in SCANNER.scan(text) if h.kind == kind}
    assert (at, at + len(value)) in spans


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_the_scanner_never_raises_and_spans_stay_in_bounds(text: str) -> None:
    for hit in SCANNER.scan(text):
        assert 0 <= hit.start < hit.end <= len(text)


def test_random_benign_records_are_clean() -> None:
    """A page of realistic tool output (ids, hashes, dates, prices, prose) has no hit."""
    rng = random.Random(5)
    rows = [
        {
            "id": str(uuid.UUID(int=rng.getrandbits(128))),
            "sha": hashlib.sha256(str(i).encode()).hexdigest(),
            "at": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "ms": 1714567890123 + i,
            "price": round(rng.random() * 1000, 2),
            "note": "shipped to the customer in Zürich",
        }
        for i in range(200)
    ]
    assert SCANNER.scan(json.dumps(rows, ensure_ascii=False)) == []


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(FILLER, st.sampled_from(["".join(p[1:]) for p in POSITIVES]), st.text()),
        max_size=12,
    )
)
def test_scan_many_finds_what_scanning_each_string_finds(texts: list[str]) -> None:
    assert SCANNER.scan_many(texts) == [SCANNER.scan(t) for t in texts]
