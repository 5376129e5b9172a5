"""Token verification: one hostile token per check, each otherwise perfect, and hypothesis."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.errors import TokenError
from bastion.identity import jwt, keys
from bastion.identity.jwt import ALLOWED_ALGS, MAX_TOKEN_BYTES, Expect
from bastion.identity.keys import KeySet, SigningKey, b64url

NOW = 1_800_000_000.0
ISS = "https://bastion.example"
AUD = "https://gw.example/mcp/github"
OTHER_ROUTE = "https://gw.example/mcp/jira"
EXPECT = Expect(issuer=ISS, audience=AUD, typ="at+jwt")
DROP = object()  # a claim or header member to leave out
COGNITO_KID = "ZR+iPrkP5j2j9sFIYfjr6RBNAxA="


@dataclass(frozen=True)
class Ctx:
    es: SigningKey
    ed: SigningKey
    rs: SigningKey
    stranger: SigningKey  # a well-formed key the issuer never published
    keyset: KeySet  # es, ed, rs; "rs-any" (RSA, no declared alg); COGNITO_KID (EC)


def _ctx() -> Ctx:
    es, ed, rs = keys.generate("ES256"), keys.generate("EdDSA"), keys.generate("RS256")
    any_alg = {k: v for k, v in rs.public_jwk().items() if k != "alg"} | {"kid": "rs-any"}
    cognito = es.public_jwk() | {"kid": COGNITO_KID}
    jwks = {"keys": [es.public_jwk(), ed.public_jwk(), rs.public_jwk(), any_alg, cognito]}
    return Ctx(es, ed, rs, keys.generate("ES256"), KeySet.from_jwks(jwks))


CTX = _ctx()  # module level so that hypothesis tests can use it too


def claims(**over: Any) -> dict[str, Any]:
    base = {"iss": ISS, "aud": AUD, "sub": "agent-7", "iat": NOW - 10, "exp": NOW + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not DROP}


def token(
    key: SigningKey, header: dict[str, Any] | None = None, private: Any = None, **over: Any
) -> str:
    """A token signed by `key` (or `private`), with header members and claims overridden."""
    head = {"alg": key.alg, "kid": key.kid, "typ": "at+jwt"} | (header or {})
    head = {k: v for k, v in head.items() if v is not DROP}
    return jwt.encode(head, claims(**over), private if private is not None else key.private)


def segment(part: dict[str, Any] | bytes) -> str:
    raw = part if isinstance(part, bytes) else json.dumps(part).encode()
    return b64url(raw)


def raw(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, sig: bytes = b"") -> str:
    """A compact token assembled by hand, with whatever signature bytes we like."""
    return f"{segment(header)}.{segment(payload)}.{b64url(sig)}"


def hmac_forged(public: Any, alg: str, kid: str, header_alg: str = "HS256") -> str:
    """The algorithm-confusion attack: HMAC with the public key's PEM as the shared secret."""
    secret = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = segment({"alg": header_alg, "kid": kid, "typ": "at+jwt"})
    body = segment(claims())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


def tampered(tok: str, **over: Any) -> str:
    """`tok` with its payload replaced and its signature kept."""
    head, _, sig = tok.split(".")
    return f"{head}.{segment(claims(**over))}.{sig}"


def resigned(tok: str, sig: bytes) -> str:
    return tok.rsplit(".", 1)[0] + "." + b64url(sig)


def signed_as(private: Any, header: dict[str, Any], alg: str) -> str:
    """Perfect claims under `header`, signed with `alg` whatever the header says."""
    head, body = segment(header), segment(claims())
    return f"{head}.{body}.{b64url(jwt.sign(alg, private, f'{head}.{body}'.encode()))}"


def with_kid(kid: Any) -> Callable[[Ctx], str]:
    return lambda c: token(c.es, {"kid": kid})


def der_signature(c: Ctx) -> str:
    """A valid ES256 signature, but DER-encoded rather than the JWS r||s form."""
    tok = token(c.es)
    head, body, _ = tok.split(".")
    return resigned(tok, c.es.private.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256())))


Build = Callable[[Ctx], str]
MAX_AGE = replace(EXPECT, max_age=300.0)
WITH_JTI = replace(EXPECT, require=("exp", "iat", "jti"))

HOSTILE: list[Any] = [
    # size and form
    pytest.param(lambda c: token(c.es, {"pad": "x" * 9000}), EXPECT, "too_large", id="big-header"),
    pytest.param(lambda c: "a" * (MAX_TOKEN_BYTES + 1), EXPECT, "too_large", id="big-junk"),
    pytest.param(lambda c: "", EXPECT, "malformed", id="empty"),
    pytest.param(lambda c: token(c.es).rsplit(".", 1)[0], EXPECT, "malformed", id="two-parts"),
    pytest.param(lambda c: token(c.es) + ".e30", EXPECT, "malformed", id="four-parts"),
    pytest.param(lambda c: "*" + token(c.es), EXPECT, "malformed", id="not-base64url"),
    pytest.param(lambda c: token(c.es) + "==", EXPECT, "malformed", id="padded-signature"),
    pytest.param(lambda c: token(c.es) + "é", EXPECT, "malformed", id="non-ascii"),
    pytest.param(lambda c: raw(b"not json", claims()), EXPECT, "malformed", id="header-not-json"),
    pytest.param(lambda c: raw(b"[]", claims()), EXPECT, "malformed", id="header-array"),
    pytest.param(lambda c: raw(b"[" * 5000, claims()), EXPECT, "malformed", id="deep-nesting"),
    pytest.param(
        lambda c: raw({"alg": "ES256", "kid": c.es.kid}, b'"hello"'),
        EXPECT,
        "malformed",
        id="payload-string",
    ),
    pytest.param(
        lambda c: raw(b'{"alg":"ES256","alg":"none"}', claims()),
        EXPECT,
        "malformed",
        id="duplicate-header-member",
    ),
    pytest.param(
        lambda c: raw({"alg": "ES256"}, b'{"exp": NaN}'), EXPECT, "malformed", id="nan-claim"
    ),
    pytest.param(
        lambda c: token(c.es, {"crit": ["exp"], "exp": 1}), EXPECT, "malformed", id="crit"
    ),
    # the algorithm allow-list
    pytest.param(
        lambda c: raw({"alg": "none", "kid": c.es.kid, "typ": "at+jwt"}, claims()),
        EXPECT,
        "alg_not_allowed",
        id="alg-none-unsigned",
    ),
    pytest.param(
        lambda c: raw({"alg": "None", "typ": "at+jwt"}, claims()),
        EXPECT,
        "alg_not_allowed",
        id="alg-None-no-kid",
    ),
    pytest.param(
        lambda c: signed_as(c.es.private, {"kid": c.es.kid, "typ": "at+jwt"}, "ES256"),
        EXPECT,
        "alg_not_allowed",
        id="alg-missing",
    ),
    pytest.param(
        lambda c: hmac_forged(c.es.private.public_key(), "ES256", c.es.kid),
        EXPECT,
        "alg_not_allowed",
        id="hs256-with-ec-public-pem",
    ),
    pytest.param(
        lambda c: hmac_forged(c.rs.private.public_key(), "RS256", "rs-any"),
        EXPECT,
        "alg_not_allowed",
        id="hs256-with-rsa-public-pem",
    ),
    pytest.param(
        lambda c: raw({"alg": "es256", "kid": c.es.kid}, claims()),
        EXPECT,
        "alg_not_allowed",
        id="alg-lowercase",
    ),
    pytest.param(
        lambda c: raw({"alg": ["ES256"], "kid": c.es.kid}, claims()),
        EXPECT,
        "alg_not_allowed",
        id="alg-list",
    ),
    pytest.param(
        lambda c: token(c.rs, {"kid": c.es.kid}),
        EXPECT,
        "alg_not_allowed",
        id="rs256-for-an-es256-key",
    ),
    pytest.param(
        lambda c: token(c.rs, {"alg": "PS256"}),
        EXPECT,
        "alg_not_allowed",
        id="ps256-for-a-key-declared-rs256",
    ),
    pytest.param(
        lambda c: token(c.ed, {"kid": "rs-any"}),
        EXPECT,
        "alg_not_allowed",
        id="eddsa-for-an-rsa-key-without-alg",
    ),
    # kid injection: refused before any lookup
    *[
        pytest.param(
            with_kid(kid),
            EXPECT,
            "malformed",
            id=f"kid-{name}",
        )
        for name, kid in [
            ("path-traversal", "../../x"),
            ("dotdot", ".."),
            ("sql", "' OR '1'='1"),
            ("sql-drop", "k; DROP TABLE keys"),
            ("too-long", "a" * 129),
            ("int", 123),
            ("list", ["a"]),
            ("object", {"$ne": None}),
            ("empty", ""),
            ("newline", "kid\n"),
            ("percent", "%2e%2e%2fx"),
            ("backslash", "..\\x"),
            ("null-byte", "kid\x00"),
        ]
    ],
    # the key set
    pytest.param(lambda c: token(c.stranger), EXPECT, "unknown_kid", id="stranger-kid"),
    pytest.param(
        lambda c: token(c.stranger, {"kid": "nope"}), EXPECT, "unknown_kid", id="unknown-kid"
    ),
    pytest.param(
        lambda c: token(c.es, {"kid": DROP}), EXPECT, "unknown_kid", id="no-kid-many-keys"
    ),
    # the signature
    pytest.param(
        lambda c: tampered(token(c.es), sub="admin"), EXPECT, "bad_signature", id="flip-sub"
    ),
    pytest.param(
        lambda c: tampered(token(c.ed), exp=NOW + 10**6),
        EXPECT,
        "bad_signature",
        id="extend-exp-eddsa",
    ),
    pytest.param(
        lambda c: tampered(token(c.rs), aud=OTHER_ROUTE), EXPECT, "bad_signature", id="tamper-rs256"
    ),
    pytest.param(
        lambda c: token(c.es, private=c.stranger.private),
        EXPECT,
        "bad_signature",
        id="signed-by-another-key",
    ),
    pytest.param(
        lambda c: token(c.es, {"jwk": c.stranger.public_jwk()}, private=c.stranger.private),
        EXPECT,
        "bad_signature",
        id="embedded-jwk-header",
    ),
    pytest.param(
        lambda c: hmac_forged(c.es.private.public_key(), "ES256", c.es.kid, header_alg="ES256"),
        EXPECT,
        "bad_signature",
        id="hmac-relabelled-es256",
    ),
    pytest.param(
        lambda c: hmac_forged(c.rs.private.public_key(), "RS256", c.rs.kid, header_alg="RS256"),
        EXPECT,
        "bad_signature",
        id="hmac-relabelled-rs256",
    ),
    pytest.param(lambda c: resigned(token(c.es), b""), EXPECT, "bad_signature", id="empty-sig"),
    pytest.param(
        lambda c: resigned(token(c.es), b"\x00" * 64),
        EXPECT,
        "bad_signature",
        id="zero-sig",
    ),
    pytest.param(der_signature, EXPECT, "bad_signature", id="der-encoded-ecdsa"),
    pytest.param(
        lambda c: (lambda t: resigned(t, keys.b64url_decode(t.split(".")[2], "s")[:-1]))(
            token(c.ed)
        ),
        EXPECT,
        "bad_signature",
        id="truncated-eddsa",
    ),
    # typ
    pytest.param(lambda c: token(c.es, {"typ": "JWT"}), EXPECT, "wrong_typ", id="typ-jwt"),
    pytest.param(lambda c: token(c.es, {"typ": DROP}), EXPECT, "wrong_typ", id="typ-missing"),
    pytest.param(lambda c: token(c.es, {"typ": "dpop+jwt"}), EXPECT, "wrong_typ", id="typ-dpop"),
    pytest.param(lambda c: token(c.es, {"typ": 1}), EXPECT, "wrong_typ", id="typ-int"),
    # claims
    pytest.param(
        lambda c: token(c.es, iss="https://evil.example"), EXPECT, "wrong_issuer", id="iss-other"
    ),
    pytest.param(lambda c: token(c.es, iss=ISS + "/"), EXPECT, "wrong_issuer", id="iss-slash"),
    pytest.param(lambda c: token(c.es, iss=ISS.upper()), EXPECT, "wrong_issuer", id="iss-case"),
    pytest.param(lambda c: token(c.es, iss=DROP), EXPECT, "wrong_issuer", id="iss-missing"),
    pytest.param(lambda c: token(c.es, iss=[ISS]), EXPECT, "wrong_issuer", id="iss-list"),
    pytest.param(
        lambda c: token(c.es, aud=OTHER_ROUTE),
        EXPECT,
        "wrong_audience",
        id="another-routes-audience",
    ),
    pytest.param(
        lambda c: token(c.es, aud=[OTHER_ROUTE, "x"]),
        EXPECT,
        "wrong_audience",
        id="aud-list-without-ours",
    ),
    pytest.param(lambda c: token(c.es, aud=AUD[:-1]), EXPECT, "wrong_audience", id="aud-prefix"),
    pytest.param(lambda c: token(c.es, aud=[[AUD]]), EXPECT, "wrong_audience", id="aud-nested"),
    pytest.param(lambda c: token(c.es, aud=DROP), EXPECT, "wrong_audience", id="aud-missing"),
    pytest.param(lambda c: token(c.es, exp=NOW - 31), EXPECT, "expired", id="expired"),
    pytest.param(lambda c: token(c.es, exp=NOW - 30), EXPECT, "expired", id="expired-boundary"),
    pytest.param(lambda c: token(c.es, iat=NOW - 400), MAX_AGE, "expired", id="older-than-max-age"),
    pytest.param(lambda c: token(c.es, nbf=NOW + 31), EXPECT, "not_yet_valid", id="nbf-future"),
    pytest.param(lambda c: token(c.es, iat=NOW + 31), EXPECT, "issued_in_future", id="iat-future"),
    pytest.param(lambda c: token(c.es, exp=DROP), EXPECT, "missing_claim", id="exp-missing"),
    pytest.param(lambda c: token(c.es, iat=DROP), EXPECT, "missing_claim", id="iat-missing"),
    pytest.param(lambda c: token(c.es), WITH_JTI, "missing_claim", id="jti-required"),
    pytest.param(
        lambda c: token(c.es, iat=DROP),
        replace(MAX_AGE, require=("exp",)),
        "missing_claim",
        id="max-age-needs-iat",
    ),
    pytest.param(lambda c: token(c.es, exp="tomorrow"), EXPECT, "malformed", id="exp-string"),
    pytest.param(lambda c: token(c.es, exp=True), EXPECT, "malformed", id="exp-bool"),
    pytest.param(lambda c: token(c.es, nbf=None), EXPECT, "malformed", id="nbf-null"),
    pytest.param(lambda c: token(c.es, iat=[NOW]), EXPECT, "malformed", id="iat-list"),
]


@pytest.mark.parametrize(("build", "expect", "reason"), HOSTILE)
def test_hostile_tokens_are_refused_for_the_right_reason(
    build: Build, expect: Expect, reason: str
) -> None:
    tok = build(CTX)
    with pytest.raises(TokenError) as err:
        jwt.verify(tok, CTX.keyset, expect, NOW)
    assert err.value.reason == reason, err.value.message
    assert tok not in err.value.message or not tok
    assert err.value.rpc_error()["data"]["reason"] == reason


# What a person reads when a token is refused: when it expired, which issuer was expected and
# which was found (cut short: the found one is the sender's), never the whole input.
MESSAGES: list[Any] = [
    pytest.param(
        {"exp": NOW - 90}, EXPECT, "token expired at 2027-01-15T07:58:30Z (90 s ago)", id="expired"
    ),
    pytest.param(
        {"exp": -1.7e308},
        EXPECT,
        "token expired at -1.7e+308 (epoch seconds) (1.7e+308 s ago)",
        id="expired-absurdly",
    ),
    pytest.param(
        {"iat": NOW - 400},
        MAX_AGE,
        "token too old: issued at 2027-01-15T07:53:20Z (400 s ago; at most 300 s)",
        id="max-age",
    ),
    pytest.param(
        {"nbf": NOW + 60}, EXPECT, "token not valid before 2027-01-15T08:01:00Z (in 60 s)", id="nbf"
    ),
    pytest.param(
        {"iss": "https://evil.example"},
        EXPECT,
        "expected iss 'https://bastion.example', found 'https://evil.example'",
        id="iss",
    ),
    pytest.param(
        {"iss": "h" * 5000},
        EXPECT,
        f"expected iss 'https://bastion.example', found '{'h' * 63}...' (5000 characters)",
        id="iss-huge",
    ),
    pytest.param(
        {"iss": [ISS]},
        EXPECT,
        "expected iss 'https://bastion.example', found ['https://bastion.example']",
        id="iss-list",
    ),
    pytest.param(
        {"aud": ["a" * 5000]},
        EXPECT,
        f"expected aud containing {AUD!r}, found ['{'a' * 17}...{'a' * 18}']",
        id="aud-huge",
    ),
]


@pytest.mark.parametrize(("over", "expect", "message"), MESSAGES)
def test_refusals_say_what_was_expected_and_found(
    over: dict[str, Any], expect: Expect, message: str
) -> None:
    with pytest.raises(TokenError) as err:
        jwt.verify(token(CTX.es, **over), CTX.keyset, expect, NOW)
    assert err.value.message == message


GOOD: list[Any] = [
    pytest.param(lambda c: token(c.es), EXPECT, id="es256"),
    pytest.param(lambda c: token(c.ed), EXPECT, id="eddsa"),
    pytest.param(lambda c: token(c.rs), EXPECT, id="rs256"),
    pytest.param(lambda c: token(c.rs, {"alg": "PS256", "kid": "rs-any"}), EXPECT, id="ps256"),
    pytest.param(lambda c: token(c.rs, {"kid": "rs-any"}), EXPECT, id="rs256-no-declared-alg"),
    pytest.param(lambda c: token(c.es, {"kid": COGNITO_KID}), EXPECT, id="base64-kid"),
    pytest.param(lambda c: token(c.es, aud=[OTHER_ROUTE, AUD]), EXPECT, id="aud-list"),
    pytest.param(lambda c: token(c.es, {"typ": "application/at+jwt"}), EXPECT, id="typ-media"),
    pytest.param(lambda c: token(c.es, {"typ": "AT+JWT"}), EXPECT, id="typ-case"),
    pytest.param(lambda c: token(c.es, {"typ": DROP}), replace(EXPECT, typ=None), id="no-typ"),
    pytest.param(lambda c: token(c.es, aud=DROP), replace(EXPECT, audience=None), id="no-aud"),
    pytest.param(lambda c: token(c.es, exp=NOW - 29), EXPECT, id="exp-within-leeway"),
    pytest.param(lambda c: token(c.es, nbf=NOW + 30), EXPECT, id="nbf-within-leeway"),
    pytest.param(lambda c: token(c.es, iat=NOW + 30), EXPECT, id="iat-within-leeway"),
    pytest.param(lambda c: token(c.es, iat=NOW - 320), MAX_AGE, id="max-age-within-leeway"),
    pytest.param(lambda c: token(c.es, exp=int(NOW) + 60, iat=int(NOW)), EXPECT, id="int-times"),
    pytest.param(lambda c: token(c.es, jti="j-1"), WITH_JTI, id="jti-present"),
    pytest.param(
        lambda c: token(c.es, exp=DROP, iat=DROP),
        replace(EXPECT, require=()),
        id="nothing-required",
    ),
]


@pytest.mark.parametrize(("build", "expect"), GOOD)
def test_good_tokens_verify(build: Build, expect: Expect) -> None:
    tok = build(CTX)
    assert jwt.verify(tok, CTX.keyset, expect, NOW) == jwt.unverified_claims(tok)


def test_single_key_set_needs_no_kid() -> None:
    only = KeySet.from_jwks({"keys": [CTX.es.public_jwk()]})
    assert jwt.verify(token(CTX.es, {"kid": DROP}), only, EXPECT, NOW)["sub"] == "agent-7"


def test_mint_writes_alg_kid_and_typ() -> None:
    tok = jwt.mint(CTX.ed, claims(), typ="JWT")
    assert jwt.unverified_header(tok) == {"alg": "EdDSA", "kid": CTX.ed.kid, "typ": "JWT"}
    assert jwt.unverified_claims(tok) == claims()
    assert jwt.verify(jwt.mint(CTX.ed, claims()), CTX.keyset, EXPECT, NOW) == claims()


@pytest.mark.parametrize(
    ("tok", "reason"),
    [
        ("a" * (MAX_TOKEN_BYTES + 1), "too_large"),
        ("a.b", "malformed"),
        ("!.!.x", "malformed"),
        ("W10.W10.x", "malformed"),
    ],
)
def test_unverified_readers_check_size_and_form(tok: str, reason: str) -> None:
    for read in (jwt.unverified_header, jwt.unverified_claims):
        with pytest.raises(TokenError) as err:
            read(tok)
        assert err.value.reason == reason


def test_allowed_algs_are_asymmetric_and_known() -> None:
    assert not {"none", "HS256", "HS384", "HS512"} & set(ALLOWED_ALGS)
    public = {"ES": CTX.es, "Ed": CTX.ed, "RS": CTX.rs, "PS": CTX.rs}
    for alg in ALLOWED_ALGS:
        assert keys.fits(alg, public[alg[:2]].private) or alg in ("ES384", "ES512")


@pytest.mark.parametrize(
    "header",
    [{}, {"alg": None}, {"alg": "none"}, {"alg": "HS256"}, {"alg": "ES256K"}, {"alg": "RSA-OAEP"}],
)
def test_allow_list_refuses_on_its_own(header: dict[str, Any]) -> None:
    # verify() would also refuse these on the key's type; the allow-list must not rely on it.
    with pytest.raises(TokenError) as err:
        jwt.allowed_alg(header)
    assert err.value.reason == "alg_not_allowed"
    assert all(jwt.allowed_alg({"alg": alg}) == alg for alg in ALLOWED_ALGS)


def test_sign_refuses_a_key_of_the_wrong_kind() -> None:
    for alg, key in [("RS256", CTX.es.private), ("ES256", CTX.es.private.public_key())]:
        with pytest.raises(TokenError) as err:
            jwt.sign(alg, key, b"m")
        assert err.value.reason == "alg_not_allowed"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from([*ALLOWED_ALGS, "none", "HS256"]) | JSON_VALUES,
        "kid": st.sampled_from([CTX.es.kid, CTX.ed.kid, "rs-any", COGNITO_KID]) | JSON_VALUES,
        "typ": st.sampled_from(["at+jwt", "JWT"]) | JSON_VALUES,
        "crit": JSON_VALUES,
    },
)
CLAIMS = st.dictionaries(
    st.sampled_from(["iss", "aud", "exp", "nbf", "iat", "sub", "jti"]) | st.text(max_size=6),
    JSON_VALUES | st.sampled_from([ISS, AUD, NOW, NOW + 100, NOW - 100]),
    max_size=7,
)
B64_TEXT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400) | B64_TEXT)
def test_verify_on_arbitrary_text_raises_only_token_error(text: str) -> None:
    try:
        jwt.verify(text, CTX.keyset, EXPECT, NOW)
    except TokenError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HEADERS, CLAIMS, st.binary(max_size=300))
def test_verify_on_arbitrary_json_raises_only_token_error(
    header: dict[str, Any], payload: dict[str, Any], sig: bytes
) -> None:
    try:
        jwt.verify(raw(header, payload, sig), CTX.keyset, EXPECT, NOW)
    except TokenError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CLAIMS)
def test_claim_checks_on_arbitrary_signed_claims_raise_only_token_error(
    payload: dict[str, Any],
) -> None:
    tok = jwt.encode({"alg": "ES256", "kid": CTX.es.kid, "typ": "at+jwt"}, payload, CTX.es.private)
    try:
        assert jwt.verify(tok, CTX.keyset, EXPECT, NOW) == payload
    except TokenError:
        pass
