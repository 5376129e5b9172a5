"""State adapters behind small ports: replay and TTL caches, keys, rate counters, secrets,
pending approvals."""

__all__ = [
    "approvals",
    "keystore",
    "memory",
    "rates",
    "secrets",
]
