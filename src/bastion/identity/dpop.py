"""DPoP proofs (RFC 9449): check one where a request arrives, or make one as a client would.

Checking is pure: the proof, the request's method and URL, the clock and (optionally) the
access token and the nonce the server expects go in; a :class:`Proof` or a `TokenError` comes
out. Remembering which `jti`s were seen is the caller's job, since it needs shared state.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bastion.errors import TokenError
from bastion.identity.jwt import allowed_alg, encode, json_object, split, verify_signature
from bastion.identity.keys import (
    SigningKey,
    b64url,
    b64url_decode,
    fits,
    public_key_from_jwk,
    thumbprint,
)

DPOP_TYP = "dpop+jwt"
MAX_JTI_CHARS = 256
LEEWAY = 5.0  # seconds of clock skew allowed around a proof's iat

_DEFAULT_PORTS = {"http": 80, "https": 443}
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


@dataclass(frozen=True)
class Proof:
    """A DPoP proof that passed: the key it binds to (`jkt`) and what a replay cache needs."""

    jkt: str
    jti: str
    iat: float
    nonce: str | None


def ath(access_token: str) -> str:
    """The `ath` claim for `access_token`: base64url of the SHA-256 of its ASCII bytes."""
    return b64url(hashlib.sha256(access_token.encode("utf-8")).digest())


def _unescape_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group()[1:], 16))
    return char if char in _UNRESERVED else match.group().upper()


@functools.lru_cache(maxsize=1024)
def canonical_url(url: str) -> str:
    """`url` as htu is compared (RFC 9449 §4.3, RFC 3986 §6.2.2-6.2.3).

    The query and fragment are dropped, scheme and host lowercased, a default port removed,
    percent-escapes of unreserved characters decoded and the others uppercased. Dot segments
    are left alone: a client names the URL it requests, not a resolved one.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TokenError(
            "htu", "expected an absolute http(s) URL, found one that does not parse"
        ) from exc
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or "@" in parts.netloc:
        raise TokenError(
            "htu",
            "expected an absolute http(s) URL with a host and no userinfo, found another kind",
        )
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{_PERCENT.sub(_unescape_unreserved, parts.path) or '/'}"


def _string_claim(claims: Mapping[str, Any], name: str) -> str:
    if name not in claims:
        raise TokenError("missing_claim", f"expected claim {name!r} in the DPoP proof, found none")
    value = claims[name]
    if not isinstance(value, str):
        raise TokenError(
            "malformed", f"expected claim {name!r} as a string, found {type(value).__name__}"
        )
    return value


def _check_iat(claims: Mapping[str, Any], now: float, max_age: float, leeway: float) -> float:
    if "iat" not in claims:
        raise TokenError("missing_claim", "expected claim 'iat' in the DPoP proof, found none")
    iat = claims["iat"]
    if isinstance(iat, bool) or not isinstance(iat, int | float) or iat != iat:
        raise TokenError("malformed", f"expected iat as a NumericDate, found {type(iat).__name__}")
    earliest, latest = now - max_age - leeway, now + leeway
    if not earliest <= iat <= latest:
        raise TokenError(
            "iat",
            f"expected iat within [{earliest:.0f}, {latest:.0f}], found "
            f"{'a later' if iat > latest else 'an earlier'} time",
        )
    return float(iat)


@functools.lru_cache(maxsize=4096)
def _proof_key(head: str) -> tuple[str, Any, str]:
    """The alg, public key and thumbprint a proof header names, checked once per distinct header.

    A client signs every proof with the same key and so sends the same header segment; caching
    by that segment keeps key construction and thumbprinting off the per-request path. Refused
    headers raise and are not cached.
    """
    header = json_object(head, "header")
    if "crit" in header:
        raise TokenError("malformed", "expected no critical header extensions, found 'crit'")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() != DPOP_TYP:
        raise TokenError(
            "wrong_typ",
            f"expected typ {DPOP_TYP!r}, found "
            f"{typ if isinstance(typ, str) and len(typ) < 40 else 'another'!r}",
        )
    alg = allowed_alg(header)
    public, jwk = _check_key(header, alg)
    return alg, public, thumbprint(jwk)


def _check_key(header: Mapping[str, Any], alg: str) -> tuple[Any, Mapping[str, Any]]:
    jwk = header.get("jwk")
    if not isinstance(jwk, Mapping):
        raise TokenError(
            "malformed", "expected a 'jwk' header with the proof's public key, found none"
        )
    public = public_key_from_jwk(jwk)
    if jwk.get("alg", alg) != alg or not fits(alg, public):
        raise TokenError(
            "alg_not_allowed",
            f"expected an alg that fits the jwk ({type(public).__name__}), found {alg}",
        )
    return public, jwk


def verify_proof(
    proof: str,
    *,
    method: str,
    url: str,
    now: float,
    access_token: str | None = None,
    nonce: str | None = None,
    max_age: float = 60.0,
    leeway: float = LEEWAY,
) -> Proof:
    """Check a DPoP proof against the request it came with (RFC 9449 §4.3) at time `now`.

    Checks typ, alg, the embedded public jwk, the signature by that jwk, htm, htu, iat, jti,
    and, when given, ath against `access_token` and the nonce against `nonce`. Replay is NOT
    checked here: the caller must keep (jkt, jti) until `iat + max_age + leeway`, when the
    iat check starts refusing the proof anyway, and refuse a proof whose jti it has seen with
    `TokenError("replayed", ...)`. Binding to the access token's `cnf.jkt` is also the
    caller's, using the returned `Proof.jkt`.
    """
    head, body, signature = split(proof)
    alg, public, jkt = _proof_key(head)
    claims = json_object(body, "payload")
    if not verify_signature(
        alg, public, f"{head}.{body}".encode("ascii"), b64url_decode(signature, "signature")
    ):
        raise TokenError(
            "bad_signature",
            "expected a proof signed by the key in its jwk "
            "header, found a signature that does not verify",
        )
    if _string_claim(claims, "htm") != method:
        raise TokenError("htm", f"expected htm {method!r}, found another method")
    if canonical_url(_string_claim(claims, "htu")) != canonical_url(url):
        raise TokenError("htu", f"expected htu {canonical_url(url)!r}, found another URL")
    iat = _check_iat(claims, now, max_age, leeway)
    jti = _string_claim(claims, "jti")
    if not 0 < len(jti) <= MAX_JTI_CHARS:
        raise TokenError(
            "malformed", f"expected a jti of 1-{MAX_JTI_CHARS} characters, found {len(jti)}"
        )
    if access_token is not None:
        found = claims.get("ath")
        if not isinstance(found, str) or not hmac.compare_digest(
            found.encode("utf-8"), ath(access_token).encode("ascii")
        ):
            raise TokenError(
                "ath",
                "expected ath to be the hash of the access token sent with "
                f"the proof, found {'none' if found is None else 'another value'}",
            )
    proof_nonce = _string_claim(claims, "nonce") if "nonce" in claims else None
    if nonce is not None and proof_nonce != nonce:
        raise TokenError(
            "nonce",
            "expected the nonce the server issued, found "
            f"{'none' if proof_nonce is None else 'another one'}",
        )
    return Proof(jkt=jkt, jti=jti, iat=iat, nonce=proof_nonce)


def make_proof(
    key: SigningKey,
    method: str,
    url: str,
    now: float,
    access_token: str | None = None,
    nonce: str | None = None,
    jti: str | None = None,
) -> str:
    """A DPoP proof for one request, signed by `key` and carrying only its public members."""
    parts = urlsplit(url)
    jwk = {
        name: value for name, value in key.public_jwk().items() if name not in ("kid", "alg", "use")
    }
    claims: dict[str, Any] = {
        "jti": jti if jti is not None else secrets.token_urlsafe(16),
        "htm": method,
        "htu": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
        "iat": int(now),
    }
    if access_token is not None:
        claims["ath"] = ath(access_token)
    if nonce is not None:
        claims["nonce"] = nonce
    return encode({"typ": DPOP_TYP, "alg": key.alg, "jwk": jwk}, claims, key.private)
