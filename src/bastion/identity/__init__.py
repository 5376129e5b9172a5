"""Pure JOSE: JWK keys and thumbprints, JWT verification and minting, DPoP proofs (RFC 9449)."""

__all__ = [
    "dpop",
    "jwt",
    "keys",
]
