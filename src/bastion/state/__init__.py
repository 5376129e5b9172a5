"""State adapters behind small ports: replay and TTL caches, keys, rate counters, secrets,
pending approvals; in this process, or shared by replicas in Redis (`redis`)."""

__all__ = [
    "approvals",
    "keystore",
    "memory",
    "rates",
    "redis",
    "secrets",
    "sessions",
    "shared",
    "shared_approvals",
]
