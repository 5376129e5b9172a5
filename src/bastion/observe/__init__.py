"""Observability: Prometheus metrics and W3C trace context with OpenTelemetry spans."""

__all__ = [
    "metrics",
    "tracing",
]
