"""Signing keys, public key sets and RFC 7638 thumbprints: the key half of the token core.

Nothing here does I/O: a JWKS arrives as a dict that an adapter fetched, and keys leave as
`cryptography` objects that :func:`verify_signature` (or PyJWT) can use. Only asymmetric keys
exist here; a symmetric ("oct") JWK is refused wherever one could appear.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from bastion.errors import TokenError

SIGNING_ALGS = ("ES256", "EdDSA", "RS256")

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
_CRV_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_EC_ALGS = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_OKP_CURVES = {"Ed25519": 32, "Ed448": 57}
_REQUIRED = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_RSA_MIN_BITS, _RSA_MAX_BITS = 2048, 8192
_RSA_TYPES = (rsa.RSAPublicKey, rsa.RSAPrivateKey)
_EC_TYPES = (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)
_ED_TYPES = (
    ed25519.Ed25519PublicKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PublicKey,
    ed448.Ed448PrivateKey,
)
_PUBLIC_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


def b64url(data: bytes) -> str:
    """`data` as base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str) -> bytes:
    """Strictly decode unpadded, canonical base64url; `what` names the part for the message."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise TokenError("malformed", f"expected {what} as unpadded base64url, found other text")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(raw) != text:
        raise TokenError("malformed", f"expected {what} as canonical base64url, found stray bits")
    return raw


def _malformed(message: str) -> TokenError:
    return TokenError("malformed", message)


def fits(alg: str, key: Any) -> bool:
    """Whether `key` (public or private) has the type and curve that JWS `alg` signs with."""
    if alg in _EC_ALGS:
        return isinstance(key, _EC_TYPES) and isinstance(key.curve, _CURVES[_EC_ALGS[alg]])
    if alg[:2] in ("RS", "PS") and alg[2:] in ("256", "384", "512"):
        return isinstance(key, _RSA_TYPES)
    return alg == "EdDSA" and isinstance(key, _ED_TYPES)


def _public_members(public: Any) -> dict[str, str]:
    """The RFC 7638 required members of a public key's JWK, which are all of them."""
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in _CRV_NAMES:
        crv = _CRV_NAMES[public.curve.name]
        size = (public.curve.key_size + 7) // 8
        nums = public.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64url(nums.x.to_bytes(size, "big")),
            "y": b64url(nums.y.to_bytes(size, "big")),
        }
    if isinstance(public, rsa.RSAPublicKey):
        rnums = public.public_numbers()
        return {
            "kty": "RSA",
            "n": b64url(rnums.n.to_bytes((rnums.n.bit_length() + 7) // 8, "big")),
            "e": b64url(rnums.e.to_bytes((rnums.e.bit_length() + 7) // 8, "big")),
        }
    if isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        crv = "Ed25519" if isinstance(public, ed25519.Ed25519PublicKey) else "Ed448"
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": crv, "x": b64url(raw)}
    raise _malformed(f"expected an EC, RSA or OKP public key, found {type(public).__name__}")


@dataclass(frozen=True)
class SigningKey:
    """A private key Bastion signs tokens with, named by `kid` and bound to one `alg`."""

    kid: str
    alg: str
    private: Any = field(repr=False)

    def __post_init__(self) -> None:
        if (
            self.alg not in SIGNING_ALGS
            or not fits(self.alg, self.private)
            or isinstance(self.private, _PUBLIC_TYPES)
        ):
            raise _malformed(
                f"expected a private key for one of {', '.join(SIGNING_ALGS)}, "
                f"found {type(self.private).__name__} for alg {self.alg!r}"
            )

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK with kid, alg and use="sig", ready for a JWKS document."""
        jwk: dict[str, Any] = _public_members(self.private.public_key())
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS8 PEM, for the state store or a key file."""
        return bytes(
            self.private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    @classmethod
    def from_pem(cls, pem: bytes, kid: str, alg: str) -> SigningKey:
        """Load a key written by :meth:`private_pem` (or any unencrypted PEM private key)."""
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise _malformed(
                "expected an unencrypted PEM private key, found something that does not load as one"
            ) from exc
        return cls(kid=kid, alg=alg, private=private)


def generate(alg: str = "ES256", kid: str | None = None) -> SigningKey:
    """A fresh signing key; its kid defaults to the RFC 7638 thumbprint of its public JWK."""
    private: Any
    if alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    elif alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise _malformed(f"expected alg one of {', '.join(SIGNING_ALGS)}, found {alg!r}")
    if kid is None:
        kid = thumbprint(_public_members(private.public_key()))
    return SigningKey(kid=kid, alg=alg, private=private)


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of an EC, RSA or OKP JWK, base64url without padding."""
    kty = jwk.get("kty")
    required = _REQUIRED.get(kty) if isinstance(kty, str) else None
    if required is None:
        raise _malformed("expected a JWK with kty EC, RSA or OKP, found another kty")
    missing = [name for name in required if not isinstance(jwk.get(name), str)]
    if missing:
        raise _malformed(f"expected string JWK members {', '.join(missing)}, found none")
    canonical = json.dumps(
        {name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True
    )
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def _member(jwk: Mapping[str, Any], name: str, size: int | None = None) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise _malformed(f"expected JWK member {name!r} as a string, found none")
    raw = b64url_decode(value, f"JWK member {name!r}")
    if size is not None and len(raw) != size:
        raise _malformed(f"expected JWK member {name!r} of {size} bytes, found {len(raw)}")
    return raw


def public_key_from_jwk(jwk: Mapping[str, Any]) -> Any:
    """The public key object for a JWK that carries no private members and is asymmetric."""
    kty = jwk.get("kty")
    if kty == "oct":
        raise _malformed("expected an asymmetric JWK, found a symmetric (oct) key")
    if not isinstance(kty, str) or kty not in _REQUIRED:
        raise _malformed("expected a JWK with kty EC, RSA or OKP, found another kty")
    if _PRIVATE_MEMBERS.intersection(jwk):
        raise _malformed("expected a public JWK, found private key members in it")
    crv = jwk.get("crv")
    try:
        if kty == "EC" and isinstance(crv, str) and crv in _CURVES:
            curve = _CURVES[crv]()
            size = (curve.key_size + 7) // 8
            x = int.from_bytes(_member(jwk, "x", size), "big")
            y = int.from_bytes(_member(jwk, "y", size), "big")
            return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        if kty == "OKP" and isinstance(crv, str) and crv in _OKP_CURVES:
            raw = _member(jwk, "x", _OKP_CURVES[crv])
            if crv == "Ed25519":
                return ed25519.Ed25519PublicKey.from_public_bytes(raw)
            return ed448.Ed448PublicKey.from_public_bytes(raw)
        if kty == "RSA":
            n = int.from_bytes(_member(jwk, "n"), "big")
            e = int.from_bytes(_member(jwk, "e"), "big")
            if not _RSA_MIN_BITS <= n.bit_length() <= _RSA_MAX_BITS or e.bit_length() > 64:
                raise _malformed(
                    f"expected an RSA modulus of {_RSA_MIN_BITS}-{_RSA_MAX_BITS} "
                    f"bits and a small exponent, found {n.bit_length()} bits"
                )
            return rsa.RSAPublicNumbers(e, n).public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _malformed(
            f"expected a valid {kty} public key, found one that does not load"
        ) from exc
    raise _malformed(f"expected a supported curve for kty {kty}, found another crv")


def _entry(jwk: Any) -> tuple[str, Any, str | None] | None:
    """(kid, public key, alg) for one JWKS entry, or None when the entry is not usable."""
    if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig":
        return None
    ops, alg, kid = jwk.get("key_ops"), jwk.get("alg"), jwk.get("kid")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    if (alg is not None and not isinstance(alg, str)) or (
        kid is not None and not isinstance(kid, str)
    ):
        return None
    try:
        public = public_key_from_jwk(jwk)
    except TokenError:
        return None
    if alg is not None and not fits(alg, public):
        return None
    return (kid if kid is not None else thumbprint(jwk)), public, alg


class KeySet:
    """An immutable set of public verification keys, read from a JWKS document."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, tuple[Any, str | None]]) -> None:
        self._keys: Mapping[str, tuple[Any, str | None]] = MappingProxyType(dict(keys))

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> KeySet:
        """Keep each signing key; skip other uses, unknown kinds, private and "oct" keys.

        A key without a kid is filed under its RFC 7638 thumbprint; of two keys that share a
        kid, the first one listed is kept.
        """
        entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
        if not isinstance(entries, list):
            raise _malformed("expected a JWKS object with a 'keys' list, found something else")
        keys: dict[str, tuple[Any, str | None]] = {}
        for jwk in entries:
            usable = _entry(jwk)
            if usable is not None:
                keys.setdefault(usable[0], (usable[1], usable[2]))
        return cls(keys)

    def get(self, kid: str | None) -> tuple[Any, str | None]:
        """(public key, its declared alg or None) for `kid`; None picks the only key there is."""
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if kid is None:
            raise TokenError(
                "unknown_kid", f"expected a kid to choose among {len(self)} keys, found none"
            )
        found = self._keys.get(kid)
        if found is None:
            raise TokenError(
                "unknown_kid",
                f"expected a kid from the key set ({len(self)} keys), found one it does not list",
            )
        return found

    @property
    def kids(self) -> tuple[str, ...]:
        """The kids of the keys in the set, in JWKS order."""
        return tuple(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeySet(kids={self.kids!r})"
