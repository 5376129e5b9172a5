"""State adapters behind small ports: replay and TTL caches, keys, rate counters, secrets."""

__all__ = [
    "keystore",
    "memory",
    "rates",
    "secrets",
]
