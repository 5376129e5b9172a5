"""DPoP proofs (RFC 9449): one hostile proof per check, each otherwise perfect, and hypothesis."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.errors import TokenError
from bastion.identity import dpop, jwt, keys
from bastion.identity.dpop import ath, canonical_url, make_proof, verify_proof
from bastion.identity.keys import SigningKey, b64url

NOW = 1_800_000_000.0
URL = "https://gw.example/mcp/github"
NONCE = "n-5f3a"
DROP = object()


@dataclass(frozen=True)
class Ctx:
    es: SigningKey
    ed: SigningKey
    rs: SigningKey
    stranger: SigningKey
    access_token: str


def _ctx() -> Ctx:
    issuer = keys.generate("ES256")
    claims = {"iss": "https://bastion.example", "exp": NOW + 300, "iat": NOW}
    at = jwt.mint(issuer, claims)
    return Ctx(keys.generate(), keys.generate("EdDSA"), keys.generate("RS256"), keys.generate(), at)


CTX = _ctx()


def public_members(key: SigningKey) -> dict[str, Any]:
    return {k: v for k, v in key.public_jwk().items() if k not in ("kid", "alg", "use")}


def proof(
    key: SigningKey, header: dict[str, Any] | None = None, private: Any = None, **over: Any
) -> str:
    """A proof for POST URL at NOW, bound to the access token and nonce, with overrides."""
    head = {"typ": "dpop+jwt", "alg": key.alg, "jwk": public_members(key)} | (header or {})
    body = {
        "jti": "jti-1",
        "htm": "POST",
        "htu": URL,
        "iat": NOW,
        "ath": ath(CTX.access_token),
        "nonce": NONCE,
    } | over
    head = {k: v for k, v in head.items() if v is not DROP}
    body = {k: v for k, v in body.items() if v is not DROP}
    return jwt.encode(head, body, private if private is not None else key.private)


def unsigned(header: dict[str, Any], sig: bytes = b"") -> str:
    body = {"jti": "j", "htm": "POST", "htu": URL, "iat": NOW, "ath": ath(CTX.access_token)}
    parts = [b64url(json.dumps(part).encode()) for part in (header, body | {"nonce": NONCE})]
    return ".".join([*parts, b64url(sig)])


def hs256(c: Ctx) -> str:
    """HS256 keyed with the public key's JSON: the symmetric-confusion attack on DPoP."""
    jwk = public_members(c.es)
    head = b64url(json.dumps({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}).encode())
    tok = unsigned({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk})
    body = tok.split(".")[1]
    mac = hmac.new(json.dumps(jwk).encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


def tampered(tok: str, **over: Any) -> str:
    head, body, sig = tok.split(".")
    claims = jwt.unverified_claims(tok) | over
    return f"{head}.{b64url(json.dumps(claims).encode())}.{sig}"


Build = Callable[[Ctx], str]
BOUND = {"access_token": None, "nonce": NONCE}  # None: use CTX.access_token
NO_NONCE = {"access_token": None, "nonce": None}


def check(tok: str, **kwargs: Any) -> dpop.Proof:
    options = BOUND | kwargs
    token = options.pop("access_token") or CTX.access_token
    return verify_proof(tok, method="POST", url=URL, now=NOW, access_token=token, **options)


HOSTILE: list[Any] = [
    pytest.param(lambda c: proof(c.es, {"pad": "x" * 9000}), BOUND, "too_large", id="too-large"),
    pytest.param(lambda c: "not.a.proof", BOUND, "malformed", id="garbage"),
    pytest.param(lambda c: proof(c.es, {"typ": "JWT"}), BOUND, "wrong_typ", id="typ-jwt"),
    pytest.param(lambda c: proof(c.es, {"typ": "at+jwt"}), BOUND, "wrong_typ", id="typ-at-jwt"),
    pytest.param(lambda c: proof(c.es, {"typ": DROP}), BOUND, "wrong_typ", id="typ-missing"),
    pytest.param(
        lambda c: unsigned({"typ": "dpop+jwt", "alg": "none", "jwk": public_members(c.es)}),
        BOUND,
        "alg_not_allowed",
        id="alg-none-unsigned",
    ),
    pytest.param(hs256, BOUND, "alg_not_allowed", id="hs256-keyed-with-the-jwk"),
    pytest.param(
        lambda c: proof(c.ed, {"jwk": public_members(c.es)}, private=c.ed.private),
        BOUND,
        "alg_not_allowed",
        id="eddsa-alg-with-ec-jwk",
    ),
    pytest.param(
        lambda c: proof(c.es, {"jwk": public_members(c.es) | {"alg": "ES384"}}),
        BOUND,
        "alg_not_allowed",
        id="jwk-declares-another-alg",
    ),
    pytest.param(lambda c: proof(c.es, {"jwk": DROP}), BOUND, "malformed", id="jwk-missing"),
    pytest.param(lambda c: proof(c.es, {"jwk": "key"}), BOUND, "malformed", id="jwk-string"),
    pytest.param(
        lambda c: proof(c.es, {"jwk": public_members(c.es) | {"d": "AAAA"}}),
        BOUND,
        "malformed",
        id="private-key-in-jwk",
    ),
    pytest.param(
        lambda c: proof(c.rs, {"jwk": public_members(c.rs) | {"p": "AQAB", "q": "AQAB"}}),
        BOUND,
        "malformed",
        id="rsa-primes-in-jwk",
    ),
    pytest.param(
        lambda c: proof(c.es, {"jwk": {"kty": "oct", "k": "c2VjcmV0"}}),
        BOUND,
        "malformed",
        id="symmetric-jwk",
    ),
    pytest.param(
        lambda c: proof(c.es, {"jwk": public_members(c.es) | {"x": "A" * 43}}),
        BOUND,
        "malformed",
        id="jwk-point-not-on-curve",
    ),
    pytest.param(
        lambda c: proof(c.es, private=c.stranger.private),
        BOUND,
        "bad_signature",
        id="signed-by-another-key-than-its-jwk",
    ),
    pytest.param(
        lambda c: tampered(proof(c.es), htu="https://evil.example/mcp"),
        BOUND,
        "bad_signature",
        id="tampered-htu",
    ),
    pytest.param(lambda c: proof(c.ed, htm="GET"), BOUND, "htm", id="another-method"),
    pytest.param(lambda c: proof(c.es, htm="post"), BOUND, "htm", id="method-case"),
    pytest.param(lambda c: proof(c.es, htm=DROP), BOUND, "missing_claim", id="htm-missing"),
    pytest.param(lambda c: proof(c.es, htm=["POST"]), BOUND, "malformed", id="htm-list"),
    pytest.param(lambda c: proof(c.es, htu=URL + "/x"), BOUND, "htu", id="another-path"),
    pytest.param(
        lambda c: proof(c.es, htu="https://gw.example/mcp/jira"), BOUND, "htu", id="another-route"
    ),
    pytest.param(
        lambda c: proof(c.es, htu=URL.replace("gw.", "gx.")), BOUND, "htu", id="another-host"
    ),
    pytest.param(
        lambda c: proof(c.rs, htu=URL.replace("https", "http")), BOUND, "htu", id="another-scheme"
    ),
    pytest.param(
        lambda c: proof(c.es, htu=URL.replace(".example", ".example:8443")),
        BOUND,
        "htu",
        id="another-port",
    ),
    pytest.param(
        lambda c: proof(c.es, htu=URL.replace("//", "//user@")), BOUND, "htu", id="userinfo"
    ),
    pytest.param(lambda c: proof(c.es, htu="/mcp/github"), BOUND, "htu", id="relative-htu"),
    pytest.param(lambda c: proof(c.es, htu="https://[::1/mcp"), BOUND, "htu", id="unparseable-htu"),
    pytest.param(lambda c: proof(c.es, htu=DROP), BOUND, "missing_claim", id="htu-missing"),
    pytest.param(lambda c: proof(c.es, iat=NOW - 66), BOUND, "iat", id="stale-iat"),
    pytest.param(lambda c: proof(c.es, iat=NOW + 6), BOUND, "iat", id="future-iat"),
    pytest.param(lambda c: proof(c.es, iat=DROP), BOUND, "missing_claim", id="iat-missing"),
    pytest.param(lambda c: proof(c.es, iat="now"), BOUND, "malformed", id="iat-string"),
    pytest.param(lambda c: proof(c.es, iat=True), BOUND, "malformed", id="iat-bool"),
    pytest.param(lambda c: proof(c.es, jti=DROP), BOUND, "missing_claim", id="jti-missing"),
    pytest.param(lambda c: proof(c.es, jti="j" * 257), BOUND, "malformed", id="jti-too-long"),
    pytest.param(lambda c: proof(c.es, jti=""), BOUND, "malformed", id="jti-empty"),
    pytest.param(lambda c: proof(c.es, jti=7), BOUND, "malformed", id="jti-int"),
    pytest.param(lambda c: proof(c.es, ath=DROP), BOUND, "ath", id="ath-missing"),
    pytest.param(
        lambda c: proof(c.es, ath=ath(c.access_token + "x")), BOUND, "ath", id="ath-other-token"
    ),
    pytest.param(lambda c: proof(c.es, ath=1), BOUND, "ath", id="ath-int"),
    pytest.param(lambda c: proof(c.es, ath="é"), BOUND, "ath", id="ath-non-ascii"),
    pytest.param(lambda c: proof(c.es, nonce=DROP), BOUND, "nonce", id="nonce-required"),
    pytest.param(lambda c: proof(c.es, nonce="n-old"), BOUND, "nonce", id="nonce-mismatch"),
    pytest.param(lambda c: proof(c.es, nonce=5), NO_NONCE, "malformed", id="nonce-int"),
]


@pytest.mark.parametrize(("build", "options", "reason"), HOSTILE)
def test_hostile_proofs_are_refused_for_the_right_reason(
    build: Build, options: dict[str, Any], reason: str
) -> None:
    tok = build(CTX)
    with pytest.raises(TokenError) as err:
        check(tok, **options)
    assert err.value.reason == reason, err.value.message
    assert tok not in err.value.message and CTX.access_token not in err.value.message


@pytest.mark.parametrize(
    ("build", "url"),
    [
        pytest.param(lambda c: proof(c.es), URL, id="es256"),
        pytest.param(lambda c: proof(c.ed), URL, id="eddsa"),
        pytest.param(lambda c: proof(c.rs), URL, id="rs256"),
        pytest.param(lambda c: proof(c.es), URL + "?cursor=2#frag", id="request-has-query"),
        pytest.param(lambda c: proof(c.es, htu=URL + "?a=1"), URL, id="proof-has-query"),
        pytest.param(
            lambda c: proof(c.es, htu="HTTPS://GW.Example:443/mcp/github"), URL, id="case-and-port"
        ),
        pytest.param(
            lambda c: proof(c.es, htu="https://gw.example/mcp/%67ithub"), URL, id="percent"
        ),
        pytest.param(
            lambda c: proof(c.es, htu="http://[::1]:80/mcp"), "http://[::1]/mcp", id="ipv6"
        ),
        pytest.param(lambda c: proof(c.es, iat=NOW - 65), URL, id="oldest-iat"),
        pytest.param(lambda c: proof(c.es, iat=NOW + 5), URL, id="newest-iat"),
        pytest.param(lambda c: proof(c.es, iat=int(NOW)), URL, id="int-iat"),
    ],
)
def test_good_proofs_verify(build: Build, url: str) -> None:
    tok = build(CTX)
    token = CTX.access_token
    got = verify_proof(tok, method="POST", url=url, now=NOW, access_token=token, nonce=NONCE)
    jwk = jwt.unverified_header(tok)["jwk"]
    assert got.jkt == keys.thumbprint(jwk)
    assert (got.jti, got.nonce) == ("jti-1", NONCE)


def test_ath_and_nonce_are_only_checked_when_asked() -> None:
    tok = proof(CTX.es, ath=DROP, nonce=DROP)
    got = verify_proof(tok, method="POST", url=URL, now=NOW)
    assert got.nonce is None and got.iat == NOW


def test_replay_is_the_callers_job() -> None:
    """The same proof verifies twice: the caller's (jkt, jti) cache must refuse the second."""
    tok = make_proof(CTX.ed, "POST", URL, NOW)
    first = verify_proof(tok, method="POST", url=URL, now=NOW)
    second = verify_proof(tok, method="POST", url=URL, now=NOW + 1)
    assert (first.jkt, first.jti) == (second.jkt, second.jti)


@pytest.mark.parametrize("key_alg", keys.SIGNING_ALGS)
def test_make_proof_round_trips(key_alg: str) -> None:
    key = {"ES256": CTX.es, "EdDSA": CTX.ed, "RS256": CTX.rs}[key_alg]
    tok = make_proof(key, "GET", URL + "?q=1#f", NOW, access_token="at", nonce="n", jti="j-9")
    header, claims = jwt.unverified_header(tok), jwt.unverified_claims(tok)
    assert header["typ"] == "dpop+jwt" and header["alg"] == key_alg
    assert not {"kid", "d", "use"} & header["jwk"].keys()
    assert claims == {
        "jti": "j-9",
        "htm": "GET",
        "htu": URL,
        "iat": int(NOW),
        "ath": ath("at"),
        "nonce": "n",
    }
    got = verify_proof(tok, method="GET", url=URL, now=NOW, access_token="at", nonce="n")
    assert got == dpop.Proof(jkt=key.kid, jti="j-9", iat=NOW, nonce="n")


def test_make_proof_picks_fresh_jtis() -> None:
    jtis = {jwt.unverified_claims(make_proof(CTX.es, "POST", URL, NOW))["jti"] for _ in range(5)}
    assert len(jtis) == 5


def test_ath_is_rfc9449_example() -> None:
    # RFC 9449 §7.1: the example access token and its ath.
    assert ath("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == (
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    )


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("https://a.example/p", "HTTPS://A.EXAMPLE/p", True),
        ("https://a.example/p", "https://a.example:443/p", True),
        ("http://a.example/p", "http://a.example:80/p", True),
        ("https://a.example", "https://a.example/", True),
        ("https://a.example/%7euser", "https://a.example/~user", True),
        ("https://a.example/a%2fb", "https://a.example/a%2Fb", True),
        ("https://a.example/p?x#y", "https://a.example/p", True),
        ("https://a.example/P", "https://a.example/p", False),
        ("https://a.example/a%2fb", "https://a.example/a/b", False),
        ("https://a.example:8443/p", "https://a.example/p", False),
        ("http://a.example/p", "https://a.example/p", False),
    ],
)
def test_canonical_url(a: str, b: str, same: bool) -> None:
    assert (canonical_url(a) == canonical_url(b)) is same


@pytest.mark.parametrize(
    "url",
    ["ftp://a.example/", "a.example/p", "https:///p", "https://a:b@a.example/", "http://a:x/"],
)
def test_canonical_url_refusals(url: str) -> None:
    with pytest.raises(TokenError) as err:
        canonical_url(url)
    assert err.value.reason == "htu"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
JWKS = st.fixed_dictionaries(
    {"kty": st.sampled_from(["EC", "RSA", "OKP", "oct"]) | JSON_VALUES},
    optional={
        name: st.sampled_from(["P-256", "Ed25519", "AQAB", "A" * 43, ""]) | JSON_VALUES
        for name in ("crv", "x", "y", "n", "e", "d", "k", "alg")
    },
)
HEADERS = st.fixed_dictionaries(
    {"typ": st.just("dpop+jwt") | JSON_VALUES, "jwk": JWKS | JSON_VALUES},
    optional={"alg": st.sampled_from([*jwt.ALLOWED_ALGS, "none", "HS256"]) | JSON_VALUES},
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_verify_proof_on_arbitrary_text_raises_only_token_error(text: str) -> None:
    try:
        verify_proof(text, method="POST", url=URL, now=NOW, access_token="at", nonce="n")
    except TokenError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HEADERS, st.dictionaries(st.sampled_from(["jti", "htm", "htu", "iat", "ath"]), JSON_VALUES))
def test_verify_proof_on_arbitrary_json_raises_only_token_error(
    header: dict[str, Any], claims: dict[str, Any]
) -> None:
    parts = [b64url(json.dumps(part).encode()) for part in (header, claims)]
    try:
        verify_proof(".".join([*parts, "AAAA"]), method="POST", url=URL, now=NOW)
    except TokenError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["jti", "htm", "htu", "iat", "ath", "nonce"]),
        JSON_VALUES | st.sampled_from([URL, "POST", NOW]),
        max_size=6,
    )
)
def test_claim_checks_on_arbitrary_signed_claims_raise_only_token_error(
    claims: dict[str, Any],
) -> None:
    header = {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": public_members(CTX.ed)}
    tok = jwt.encode(header, claims, CTX.ed.private)
    try:
        verify_proof(tok, method="POST", url=URL, now=NOW, access_token="at", nonce="n")
    except TokenError:
        pass
