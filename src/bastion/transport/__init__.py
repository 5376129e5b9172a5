"""The Streamable HTTP front (plain ASGI), its header checks, and the HTTP/1.1 server it runs on
(over TLS when configured)."""

__all__ = [
    "checks",
    "client_ip",
    "delivery",
    "front",
    "intake",
    "response",
    "resumption",
    "server",
    "tls",
]
