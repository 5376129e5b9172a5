"""State adapters behind small ports: in-memory caches, files, SQLite."""
