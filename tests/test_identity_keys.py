"""Signing keys, JWK export and import, RFC 7638 thumbprints and JWKS key sets."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bastion.errors import TokenError
from bastion.identity import keys
from bastion.identity.jwt import sign, verify_signature
from bastion.identity.keys import KeySet, SigningKey

# RFC 7638 §3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
    "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2Q"
    "vzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6We"
    "Zu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.fixture(scope="module")
def signing() -> dict[str, SigningKey]:
    return {alg: keys.generate(alg) for alg in keys.SIGNING_ALGS}


def test_rfc7638_example_thumbprint() -> None:
    assert keys.thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT
    # Only the required members count: optional ones change nothing.
    assert keys.thumbprint({**RFC7638_JWK, "use": "sig", "kid": "other"}) == RFC7638_THUMBPRINT


def test_rfc7638_example_key_loads() -> None:
    public = keys.public_key_from_jwk(RFC7638_JWK)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048


@pytest.mark.parametrize("alg", keys.SIGNING_ALGS)
def test_generated_key_round_trips(signing: dict[str, SigningKey], alg: str) -> None:
    key = signing[alg]
    jwk = key.public_jwk()
    assert jwk["kid"] == key.kid == keys.thumbprint(jwk)
    assert (jwk["alg"], jwk["use"]) == (alg, "sig")
    assert not {"d", "p", "q", "dp", "dq", "qi"} & jwk.keys()
    public = keys.public_key_from_jwk(jwk)
    signature = sign(alg, key.private, b"message")
    assert verify_signature(alg, public, b"message", signature)
    assert not verify_signature(alg, public, b"massage", signature)
    again = SigningKey.from_pem(key.private_pem(), key.kid, alg)
    assert again.public_jwk() == jwk
    assert b"BEGIN PRIVATE KEY" in key.private_pem()  # PKCS8, unencrypted


def test_explicit_kid_and_repr_hides_the_key() -> None:
    key = keys.generate("EdDSA", kid="2026-01")
    assert key.kid == "2026-01" and key.public_jwk()["kid"] == "2026-01"
    assert "private" not in repr(key)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: keys.generate("HS256"), id="generate-hs256"),
        pytest.param(lambda: keys.generate("none"), id="generate-none"),
        pytest.param(lambda: SigningKey.from_pem(b"not a pem", "k", "ES256"), id="bad-pem"),
        pytest.param(lambda: SigningKey("k", "ES256", object()), id="not-a-key"),
    ],
)
def test_key_creation_refusals(make: Any) -> None:
    with pytest.raises(TokenError) as err:
        make()
    assert err.value.reason == "malformed"


def test_from_pem_refuses_an_alg_the_key_cannot_make(signing: dict[str, SigningKey]) -> None:
    pem = signing["ES256"].private_pem()
    for alg in ("RS256", "EdDSA", "HS256", "ES384"):
        with pytest.raises(TokenError) as err:
            SigningKey.from_pem(pem, "k", alg)
        assert err.value.reason == "malformed"


@pytest.mark.parametrize(
    ("jwk", "words"),
    [
        pytest.param({"kty": "oct", "k": "c2VjcmV0"}, "kty", id="oct"),
        pytest.param({"kty": "EC", "crv": "P-256", "x": "AA"}, "y", id="ec-missing-y"),
        pytest.param({"kty": "RSA", "n": "AA"}, "e", id="rsa-missing-e"),
        pytest.param({"kty": "OKP", "crv": "Ed25519"}, "x", id="okp-missing-x"),
        pytest.param({"kty": "RSA", "n": 1, "e": "AQAB"}, "n", id="non-string-member"),
        pytest.param({"crv": "P-256", "x": "AA", "y": "AA"}, "kty", id="no-kty"),
        pytest.param({"kty": ["EC"]}, "kty", id="kty-list"),
    ],
)
def test_thumbprint_refusals(jwk: dict[str, Any], words: str) -> None:
    with pytest.raises(TokenError) as err:
        keys.thumbprint(jwk)
    assert err.value.reason == "malformed"
    assert words in err.value.message


def _ec_jwk(signing: dict[str, SigningKey]) -> dict[str, Any]:
    return signing["ES256"].public_jwk()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"d": "AAAA"}, id="ec-private-d"),
        pytest.param({"p": "AAAA", "q": "AAAA"}, id="rsa-primes"),
        pytest.param({"kty": "oct", "k": "c2VjcmV0"}, id="symmetric"),
        pytest.param({"kty": "oct"}, id="symmetric-without-k"),
        pytest.param({"kty": "EC-HSM"}, id="unknown-kty"),
        pytest.param({"crv": "secp256k1"}, id="unknown-curve"),
        pytest.param({"crv": ["P-256"]}, id="curve-list"),
        pytest.param({"x": "AAAA"}, id="short-coordinate"),
        pytest.param({"x": "A" * 43}, id="not-on-curve"),
        pytest.param({"x": None}, id="null-coordinate"),
        pytest.param({"y": "ab+c/def" * 5 + "abc"}, id="plain-base64-alphabet"),
        pytest.param({"y": "AAAA=="}, id="padded"),
    ],
)
def test_public_key_from_jwk_refusals(signing: dict[str, SigningKey], change: Any) -> None:
    jwk = {**_ec_jwk(signing), **change}
    with pytest.raises(TokenError) as err:
        keys.public_key_from_jwk(jwk)
    assert err.value.reason == "malformed"


def test_public_key_from_jwk_refuses_a_private_rsa_jwk(signing: dict[str, SigningKey]) -> None:
    jwk = {**signing["RS256"].public_jwk(), "d": "AQAB"}
    with pytest.raises(TokenError, match="private"):
        keys.public_key_from_jwk(jwk)


def test_public_key_from_jwk_refuses_a_small_rsa_key() -> None:
    # A weak key on purpose: the point is that it is refused.
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    numbers = small.public_key().public_numbers()
    jwk = {
        "kty": "RSA",
        "n": keys.b64url(numbers.n.to_bytes(128, "big")),
        "e": keys.b64url(numbers.e.to_bytes(3, "big")),
    }
    with pytest.raises(TokenError, match="2048"):
        keys.public_key_from_jwk(jwk)


def test_keyset_keeps_signing_keys_only(signing: dict[str, SigningKey]) -> None:
    es, ed, rs = signing["ES256"], signing["EdDSA"], signing["RS256"]
    kidless = {k: v for k, v in ed.public_jwk().items() if k != "kid"}
    other_curve = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    p384 = {
        "kty": "EC",
        "crv": "P-384",
        "kid": "p384",
        "x": keys.b64url(other_curve.x.to_bytes(48, "big")),
        "y": keys.b64url(other_curve.y.to_bytes(48, "big")),
    }
    jwks = {
        "keys": [
            es.public_jwk(),
            {**rs.public_jwk(), "kid": "enc", "use": "enc"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"},
            {**es.public_jwk(), "kid": "private", "d": "AAAA"},
            {**es.public_jwk(), "kid": "weird", "kty": "EC-HSM"},
            {**es.public_jwk(), "kid": "broken", "x": "AAAA"},
            {**es.public_jwk(), "kid": "lying-alg", "alg": "RS256"},
            {**es.public_jwk(), "kid": "hs-alg", "alg": "HS256"},
            {**es.public_jwk(), "kid": "no-verify", "key_ops": ["encrypt"]},
            {**es.public_jwk(), "kid": 7},
            "not an object",
            kidless,
            p384,
            {**rs.public_jwk(), "kid": es.kid},  # a second key under the first one's kid
        ]
    }
    keyset = KeySet.from_jwks(jwks)
    assert keyset.kids == (es.kid, ed.kid, "p384")
    assert len(keyset) == 3
    public, alg = keyset.get(es.kid)
    assert isinstance(public, ec.EllipticCurvePublicKey) and alg == "ES256"
    assert keyset.get(ed.kid)[1] == "EdDSA"  # the kidless entry, filed under its thumbprint
    assert keyset.get("p384")[1] is None
    assert es.kid in repr(keyset)


def test_keyset_lookup(signing: dict[str, SigningKey]) -> None:
    es, ed = signing["ES256"], signing["EdDSA"]
    single = KeySet.from_jwks({"keys": [es.public_jwk()]})
    assert single.get(None) == single.get(es.kid)
    pair = KeySet.from_jwks({"keys": [es.public_jwk(), ed.public_jwk()]})
    for kid in (None, "unknown", ed.kid + "x"):
        with pytest.raises(TokenError) as err:
            pair.get(kid)
        assert err.value.reason == "unknown_kid"
    with pytest.raises(TokenError) as err:
        KeySet.from_jwks({"keys": []}).get(None)
    assert err.value.reason == "unknown_kid"


@pytest.mark.parametrize("jwks", [{}, {"keys": {}}, {"keys": "x"}, [], "keys"])
def test_keyset_refuses_a_document_that_is_not_a_jwks(jwks: Any) -> None:
    with pytest.raises(TokenError) as err:
        KeySet.from_jwks(jwks)
    assert err.value.reason == "malformed"


@pytest.mark.parametrize(
    ("alg", "fits_es256", "fits_rs256", "fits_eddsa"),
    [
        ("ES256", True, False, False),
        ("ES384", False, False, False),
        ("RS256", False, True, False),
        ("PS512", False, True, False),
        ("EdDSA", False, False, True),
        ("HS256", False, False, False),
        ("none", False, False, False),
        ("", False, False, False),
    ],
)
def test_fits(
    signing: dict[str, SigningKey], alg: str, fits_es256: bool, fits_rs256: bool, fits_eddsa: bool
) -> None:
    assert keys.fits(alg, signing["ES256"].private.public_key()) is fits_es256
    assert keys.fits(alg, signing["RS256"].private.public_key()) is fits_rs256
    assert keys.fits(alg, signing["EdDSA"].private.public_key()) is fits_eddsa


@pytest.mark.parametrize(
    ("text", "ok"),
    [("", True), ("AQAB", True), ("AQAB=", False), ("AQ+B", False), ("A", False), ("AR", False)],
)
def test_b64url_decode_is_strict(text: str, ok: bool) -> None:
    if ok:
        assert keys.b64url(keys.b64url_decode(text, "x")) == text
    else:
        with pytest.raises(TokenError):
            keys.b64url_decode(text, "x")
