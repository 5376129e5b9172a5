"""Observability: Prometheus metrics of the request path."""
