"""The agent registry: agents and their validation, its store on SQLite or PostgreSQL (one SQL
seam, two dialects), where a configuration keeps it, the gateway's in-memory view of it, upstream
trust beside it, and last-use records."""

__all__ = [
    "agents",
    "db",
    "locator",
    "pg",
    "pins",
    "schema",
    "store",
    "trust",
    "usage",
    "view",
]
