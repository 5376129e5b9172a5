"""Prometheus metrics: requests and decisions by outcome, latency, upstream errors, audit queue.

One registry per gateway (no process-global state), rendered at `/metrics`. Label values are
bounded sets (route paths, MCP methods, upstream names, outcome codes), never ids or tenants'
data, so the series count stays small.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bastion.methods import KNOWN_METHODS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def method_label(method: str) -> str:
    """An MCP method as a label value: itself when known, else "other" (bounded series)."""
    return method if method in KNOWN_METHODS else "other"


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
            "Time from request to answer (total), to admission, and in each stage (authn, "
            "authz, credentials, upstream), by route",
            ["route", "stage"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        # Label values -> child, per metric: labels() takes a lock and validates on every call,
        # and every label here has a bounded set of values (routes, stages, known methods,
        # gateway codes).
        self._stages: dict[tuple[str, str], Histogram] = {}
        self._answers: dict[tuple[str, str, str], Counter] = {}
        self._verdicts: dict[tuple[str, bool], Counter] = {}
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
        self._alerts = Counter(
            "bastion_alerts",
            "Anomaly alerts raised, by rule and severity",
            ["rule", "severity"],
            registry=self.registry,
        )
        self._sink_lag = Gauge(
            "bastion_audit_sink_lag",
            "Audit records committed but not yet delivered, by sink",
            ["sink"],
            registry=self.registry,
        )
        self._sink_failures = Counter(
            "bastion_audit_sink_failures",
            "Failed deliveries to an audit sink (each retried), by sink",
            ["sink"],
            registry=self.registry,
        )

    def watch_audit_queue(self, depth: Callable[[], int]) -> None:
        """Read the audit queue depth at every scrape."""
        self._audit_queue.set_function(lambda: float(depth()))

    def answered(
        self,
        route: str,
        method: str,
        outcome: str,
        admitted: float,
        total: float,
        stages: Mapping[str, float] | None = None,
    ) -> None:
        """One request answered: `admitted` and `total` seconds since it arrived, and the
        seconds it spent in each stage that ran."""
        key = (route, method_label(method), outcome)  # the label: a client names the method
        counted = self._answers.get(key)
        if counted is None:
            counted = self._answers[key] = self._requests.labels(*key)
        counted.inc()
        self._stage(route, "admission").observe(admitted)
        self._stage(route, "total").observe(total)
        if stages:
            for stage, seconds in stages.items():
                self._stage(route, stage).observe(seconds)

    def _stage(self, route: str, stage: str) -> Histogram:
        child = self._stages.get((route, stage))
        if child is None:
            child = self._stages[(route, stage)] = self._latency.labels(route, stage)
        return child

    def decided(self, route: str, allowed: bool) -> None:
        """One authorization decision."""
        counted = self._verdicts.get((route, allowed))
        if counted is None:
            verdict = "allow" if allowed else "deny"
            counted = self._verdicts[(route, allowed)] = self._decisions.labels(route, verdict)
        counted.inc()

    def upstream_failed(self, upstream: str, code: str) -> None:
        """One upstream failure (timeout, unreachable, garbage)."""
        self._upstream_errors.labels(upstream, code).inc()

    def alerted(self, rule: str, severity: str) -> None:
        """One anomaly alert."""
        self._alerts.labels(rule, severity).inc()

    def sink_lag(self, sink: str, records: int) -> None:
        """How far a sink is behind the trail."""
        self._sink_lag.labels(sink).set(records)

    def sink_failed(self, sink: str) -> None:
        """One failed delivery to a sink (it is retried)."""
        self._sink_failures.labels(sink).inc()

    def render(self) -> bytes:
        """The exposition text for a scrape."""
        return generate_latest(self.registry)
