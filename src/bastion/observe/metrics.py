"""Prometheus metrics: requests and decisions by outcome, latency, upstream errors, audit queue.

One registry per gateway (no process-global state), rendered at `/metrics`. Label values are
bounded sets (route paths, MCP methods, upstream names, outcome codes), never ids or tenants'
data, so the series count stays small.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_KNOWN_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",
        "tools/list",
        "tools/call",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "completion/complete",
        "logging/setLevel",
        "subscriptions/listen",
    }
)


class Metrics:
    """The gateway's metrics; each update is a counter or histogram observation."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "bastion_requests",
            "MCP requests answered, by route, method and outcome",
            ["route", "method", "outcome"],
            registry=self.registry,
        )
        self._decisions = Counter(
            "bastion_decisions",
            "Authorization decisions, by route and decision",
            ["route", "decision"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "bastion_request_seconds",
            "Time from request to answer, by route and stage",
            ["route", "stage"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._upstream_errors = Counter(
            "bastion_upstream_errors",
            "Upstream failures, by upstream and error code",
            ["upstream", "code"],
            registry=self.registry,
        )
        self._audit_queue = Gauge(
            "bastion_audit_queue_depth",
            "Audit records queued or being written",
            registry=self.registry,
        )

    def watch_audit_queue(self, depth: Callable[[], int]) -> None:
        """Read the audit queue depth at every scrape."""
        self._audit_queue.set_function(lambda: float(depth()))

    def answered(
        self, route: str, method: str, outcome: str, admitted: float, total: float
    ) -> None:
        """One request answered: `admitted` and `total` seconds since it arrived."""
        method = method if method in _KNOWN_METHODS else "other"
        self._requests.labels(route, method, outcome).inc()
        self._latency.labels(route, "admission").observe(admitted)
        self._latency.labels(route, "total").observe(total)

    def decided(self, route: str, allowed: bool) -> None:
        """One authorization decision."""
        self._decisions.labels(route, "allow" if allowed else "deny").inc()

    def upstream_failed(self, upstream: str, code: str) -> None:
        """One upstream failure (timeout, unreachable, garbage)."""
        self._upstream_errors.labels(upstream, code).inc()

    def render(self) -> bytes:
        """The exposition text for a scrape."""
        return generate_latest(self.registry)
