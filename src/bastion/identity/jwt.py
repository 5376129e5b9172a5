"""Compact JWS tokens: mint them, read them and verify them with every check under our control.

Parsing, the algorithm allow-list, key choice and the claim checks are written out here rather
than left to a library, so that each refusal carries a precise `TokenError.reason` and the clock
is the `now` the caller passes. Signatures are computed with `cryptography` directly. Header
members that point at keys (`jwk`, `jku`, `x5u`, `x5c`) are never used to find a key.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from bastion.errors import TokenError
from bastion.errors import shown as _shown
from bastion.identity.keys import KeySet, SigningKey, b64url, b64url_decode, fits

ALLOWED_ALGS = (
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
)
MAX_TOKEN_BYTES = 8192
MAX_KID_CHARS = 128

# The base64 and base64url alphabets (some issuers' kids are standard base64, "/" included) and
# the punctuation of dates, UUIDs and URNs; no quotes, spaces, "%", ";" or backslash, and ".." is
# refused on its own, so a kid cannot climb a path or break out of a query.
_KID = re.compile(rf"[A-Za-z0-9._~+/=:-]{{1,{MAX_KID_CHARS}}}")
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


@dataclass(frozen=True)
class Expect:
    """What a token must say to be accepted: issuer, audience, type and clock tolerances."""

    issuer: str | None  # None: trust comes from the key alone (JWT-SVIDs carry no fixed iss)
    audience: str | None
    typ: str | None = None
    leeway: float = 30.0
    max_age: float | None = None
    require: tuple[str, ...] = ("exp", "iat")


@dataclass(frozen=True)
class Jws:
    """A compact JWS split and decoded, its signature not yet checked."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def split(token: str) -> list[str]:
    """The three segments of a compact JWS, size- and shape-checked."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError(
            "too_large", f"expected a token of at most {MAX_TOKEN_BYTES} bytes, found {len(token)}"
        )
    parts = token.split(".")
    if not token.isascii() or len(parts) != 3:
        raise TokenError(
            "malformed",
            f"expected a compact JWS of three base64url parts, found {len(parts)} parts",
        )
    return parts


def json_object(segment: str, what: str) -> dict[str, Any]:
    """A base64url segment decoded as a JSON object (duplicate keys and NaN refused)."""
    raw = b64url_decode(segment, what)
    try:
        value = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as exc:
        raise TokenError("malformed", f"expected the {what} to be JSON, found other bytes") from exc
    if not isinstance(value, dict):
        raise TokenError(
            "malformed", f"expected the {what} to be a JSON object, found {type(value).__name__}"
        )
    return value


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header of `token`, unverified: only for choosing a key set before `verify`."""
    return json_object(split(token)[0], "header")


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of `token`, unverified: only for choosing the issuer before `verify`."""
    return json_object(split(token)[1], "payload")


def parse(token: str) -> Jws:
    """Split and decode a compact JWS without checking its signature (`crit` is refused)."""
    head, body, sig = split(token)
    header = json_object(head, "header")
    claims = json_object(body, "payload")
    if "crit" in header:
        raise TokenError("malformed", "expected no critical header extensions, found 'crit'")
    return Jws(header, claims, f"{head}.{body}".encode("ascii"), b64url_decode(sig, "signature"))


def allowed_alg(header: Mapping[str, Any]) -> str:
    """The header's alg if it is on the asymmetric allow-list, else `alg_not_allowed`."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise TokenError(
            "alg_not_allowed", f"expected alg one of {', '.join(ALLOWED_ALGS)}, found {_shown(alg)}"
        )
    return alg


def _rsa_padding(alg: str, digest: hashes.HashAlgorithm) -> padding.AsymmetricPadding:
    if alg.startswith("PS"):
        return padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
    return padding.PKCS1v15()


def sign(alg: str, private: Any, message: bytes) -> bytes:
    """The JWS signature (RFC 7518 §3) of `message` by the private key `private` under `alg`."""
    if not fits(alg, private):
        raise TokenError(
            "alg_not_allowed", f"expected a private key for {alg}, found {type(private).__name__}"
        )
    if isinstance(private, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return private.sign(message)
    digest = _HASHES[alg[2:]]()
    if isinstance(private, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(private.sign(message, ec.ECDSA(digest)))
        size = (private.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if isinstance(private, rsa.RSAPrivateKey):
        return private.sign(message, _rsa_padding(alg, digest), digest)
    raise TokenError("alg_not_allowed", f"expected a private key for {alg}, found a public key")


def verify_signature(alg: str, public: Any, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is a valid `alg` signature of `message` by the public key `public`."""
    if not fits(alg, public):
        return False
    try:
        if isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public.verify(signature, message)
            return True
        digest = _HASHES[alg[2:]]()
        if isinstance(public, ec.EllipticCurvePublicKey):
            size = (public.curve.key_size + 7) // 8
            if len(signature) != 2 * size:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            public.verify(der, message, ec.ECDSA(digest))
            return True
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, message, _rsa_padding(alg, digest), digest)
            return True
    except (InvalidSignature, ValueError):
        return False
    return False  # a private key: verification takes the public half


def encode(header: Mapping[str, Any], claims: Mapping[str, Any], private: Any) -> str:
    """A compact JWS of `claims` under `header`, signed by `private` with the header's alg."""
    head = b64url(json.dumps(dict(header), separators=(",", ":")).encode("utf-8"))
    body = b64url(json.dumps(dict(claims), separators=(",", ":")).encode("utf-8"))
    signing_input = f"{head}.{body}".encode("ascii")
    return f"{head}.{body}.{b64url(sign(str(header['alg']), private, signing_input))}"


def mint(key: SigningKey, claims: dict[str, Any], typ: str = "at+jwt") -> str:
    """A signed token carrying `claims`, with the key's alg and kid and the given typ."""
    return encode({"alg": key.alg, "kid": key.kid, "typ": typ}, claims, key.private)


def _checked_kid(header: Mapping[str, Any]) -> str | None:
    kid = header.get("kid")
    if kid is None:
        return None
    if not isinstance(kid, str) or not _KID.fullmatch(kid) or ".." in kid:
        raise TokenError(
            "malformed",
            f"expected kid as a plain string of 1-{MAX_KID_CHARS} characters, found "
            f"{_shown(kid) if not isinstance(kid, str) else 'other characters or length'}",
        )
    return kid


def _time(claims: Mapping[str, Any], name: str) -> int | float | None:
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise TokenError(
            "malformed", f"expected claim {name!r} as a NumericDate, found {_shown(value)}"
        )
    return value


def _iso(epoch: float) -> str:
    """A NumericDate as ISO 8601 UTC for a message; the number itself when out of range."""
    try:
        return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{epoch:g} (epoch seconds)"


def _secs(seconds: float) -> str:
    return f"{seconds:.0f}" if abs(seconds) < 1e9 else f"{seconds:.3g}"  # a forged date


def _media(typ: str) -> str:
    return typ.lower().removeprefix("application/")


def check_claims(claims: Mapping[str, Any], expect: Expect, now: float) -> None:
    """Check iss, aud, exp, nbf, iat, max age and required claims against `expect` at `now`."""
    if expect.issuer is not None and claims.get("iss") != expect.issuer:
        raise TokenError(
            "wrong_issuer", f"expected iss {expect.issuer!r}, found {_shown(claims.get('iss'))}"
        )
    if expect.audience is not None:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if expect.audience not in [a for a in audiences if isinstance(a, str)]:
            raise TokenError(
                "wrong_audience",
                f"expected aud containing {expect.audience!r}, found {_shown(aud)}",
            )
    exp, nbf, iat = _time(claims, "exp"), _time(claims, "nbf"), _time(claims, "iat")
    if exp is not None and exp <= now - expect.leeway:
        raise TokenError("expired", f"token expired at {_iso(exp)} ({_secs(now - exp)} s ago)")
    if nbf is not None and nbf > now + expect.leeway:
        raise TokenError(
            "not_yet_valid", f"token not valid before {_iso(nbf)} (in {_secs(nbf - now)} s)"
        )
    if iat is not None and iat > now + expect.leeway:
        raise TokenError(
            "issued_in_future",
            f"token issued in the future, at {_iso(iat)} ({_secs(iat - now)} s from now; "
            f"clocks may differ by {expect.leeway:g} s)",
        )
    oldest = None if expect.max_age is None else now - expect.max_age - expect.leeway
    if oldest is not None and iat is not None and iat < oldest:
        raise TokenError(
            "expired",
            f"token too old: issued at {_iso(iat)} ({_secs(now - iat)} s ago; "
            f"at most {expect.max_age:g} s)",
        )
    required = (*expect.require, "iat") if expect.max_age is not None else expect.require
    missing = [name for name in required if name not in claims]
    if missing:
        raise TokenError("missing_claim", f"expected claims {', '.join(missing)}, found none")


def verify(token: str, keys: KeySet, expect: Expect, now: float) -> dict[str, Any]:
    """The claims of `token` once its form, alg, key, signature, typ and claims all pass.

    A max-age failure reports `expired`; an absent `iat` when `expect.max_age` is set reports
    `missing_claim`.
    """
    jws = parse(token)
    alg = allowed_alg(jws.header)
    public, key_alg = keys.get(_checked_kid(jws.header))
    if (key_alg is not None and key_alg != alg) or not fits(alg, public):
        raise TokenError(
            "alg_not_allowed",
            f"expected the alg the key is for ({key_alg or type(public).__name__}), found {alg}",
        )
    if not verify_signature(alg, public, jws.signing_input, jws.signature):
        raise TokenError(
            "bad_signature", f"expected a valid {alg} signature by the key, found another"
        )
    typ = jws.header.get("typ")
    if expect.typ is not None and (not isinstance(typ, str) or _media(typ) != _media(expect.typ)):
        raise TokenError("wrong_typ", f"expected typ {expect.typ!r}, found {_shown(typ)}")
    check_claims(jws.claims, expect, now)
    return jws.claims
