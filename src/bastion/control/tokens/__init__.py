"""The embedded authorization server: the token service and its HTTP endpoints."""

__all__ = [
    "endpoints",
    "service",
]
