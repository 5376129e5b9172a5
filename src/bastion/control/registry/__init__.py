"""The agent registry: agents and their validation, the SQLite store, the gateway's in-memory
view of it, and last-use records."""

__all__ = [
    "agents",
    "store",
    "trust",
    "usage",
    "view",
]
