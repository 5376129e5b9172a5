"""Audit delivery: committed records forwarded to the configured sinks."""

__all__ = [
    "forward",
]
