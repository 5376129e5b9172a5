"""Bastion: an identity-aware security gateway for the Model Context Protocol (MCP)."""

__all__ = [
    "app",
    "asgi",
    "audit",
    "background",
    "cli",
    "config",
    "control",
    "errors",
    "identity",
    "methods",
    "observe",
    "pipeline",
    "policy",
    "rpc",
    "sse",
    "state",
    "transport",
    "types",
    "upstream",
    "wire",
]
