"""The upstream port and its adapters: HTTP (both eras), stdio, the pool, JWKS, token exchange."""

__all__ = [
    "base",
    "client",
    "http",
    "issuers",
    "oauth",
    "pool",
    "stdio",
]
