"""The anomaly detectors over streams of records: each rule raises its alert when its
threshold is crossed, not a record before, and stays quiet for ordinary traffic."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.audit.detect import Alert, Detectors
from bastion.audit.record import AuditRecord
from bastion.config import Alerts

T0 = 1_800_000_000.0  # a Wednesday, 08:00 UTC
HOUR = 3600.0


def rec(time: float, agent: str = "a1", **fields: Any) -> AuditRecord:
    base: dict[str, Any] = {
        "phase": "decision",
        "tenant": "acme",
        "decision": "allow",
        "server": "workspace",
        "tool_exposed": "workspace__list_tasks",
        "client": "127.0.0.1",
    }
    base.update(fields)
    return AuditRecord(time=time, request_id=f"r{time}", agent=agent, **base)


def feed(detectors: Detectors, records: list[AuditRecord], *, replay: bool = False) -> list[Alert]:
    alerts: list[Alert] = []
    for record in records:
        alerts += detectors.observe(record, replay=replay)
    return alerts


def only(settings: dict[str, Any]) -> Alerts:
    """Every rule off except those named (with their settings)."""
    rules = (
        "rate_spike",
        "denial_burst",
        "cross_tenant",
        "first_use",
        "unusual_hours",
        "new_client",
    )
    off = {rule: {"enabled": False} for rule in rules}
    return Alerts.model_validate({**off, **settings})


def rules(alerts: list[Alert]) -> list[str]:
    return [alert.rule for alert in alerts]


# -- cross-tenant ---------------------------------------------------------------------------


def test_every_cross_tenant_attempt_alerts_and_the_third_suspends() -> None:
    detectors = Detectors(only({"cross_tenant": {"count": 3, "window_seconds": 600}}))
    crossing = {"decision": "deny", "detail": {"foreign_tenants": ["globex"]}}
    alerts = feed(detectors, [rec(T0 + i, **crossing) for i in range(3)])
    assert rules(alerts) == ["cross_tenant"] * 3
    assert [a.suspend for a in alerts] == [False, False, True]
    assert alerts[0].facts["tenants"] == ["globex"]
    assert alerts[2].severity == "critical"
    record = alerts[2].record()
    assert record.phase == "alert" and record.agent == "a1" and record.tenant == "acme"
    assert record.detail["rule"] == "cross_tenant" and record.detail["suspend"] is True
    assert "globex" in (record.reason or "")


def test_cross_tenant_attempts_spread_beyond_the_window_do_not_suspend() -> None:
    detectors = Detectors(only({"cross_tenant": {"count": 3, "window_seconds": 60}}))
    crossing = {"decision": "deny", "detail": {"foreign_tenants": ["globex"]}}
    alerts = feed(detectors, [rec(T0 + i * 40, **crossing) for i in range(4)])
    assert rules(alerts) == ["cross_tenant"] * 4
    assert not any(a.suspend for a in alerts)


def test_another_principals_session_is_a_crossing() -> None:
    detectors = Detectors(only({"cross_tenant": {}}))
    alerts = feed(detectors, [rec(T0, decision="deny", detail={"error": "session.foreign"})])
    assert rules(alerts) == ["cross_tenant"]
    assert "session" in alerts[0].message


def test_suspension_can_be_turned_off() -> None:
    detectors = Detectors(only({"cross_tenant": {"suspend": False, "count": 1}}))
    crossing = {"decision": "deny", "detail": {"foreign_tenants": ["globex"]}}
    assert [a.suspend for a in feed(detectors, [rec(T0, **crossing)] * 2)] == [False, False]


# -- denial bursts --------------------------------------------------------------------------


def test_denial_burst_alerts_at_the_count_within_the_window() -> None:
    detectors = Detectors(only({"denial_burst": {"count": 5, "window_seconds": 60}}))
    denials = [rec(T0 + i, decision="deny") for i in range(4)]
    assert feed(detectors, denials) == []
    alerts = feed(detectors, [rec(T0 + 4, decision="deny")])
    assert rules(alerts) == ["denial_burst"]
    # The cooldown: the sixth denial in the same burst does not alert again.
    assert feed(detectors, [rec(T0 + 5, decision="deny")]) == []


def test_denials_spread_out_are_no_burst() -> None:
    detectors = Detectors(only({"denial_burst": {"count": 3, "window_seconds": 10}}))
    assert feed(detectors, [rec(T0 + i * 6, decision="deny") for i in range(10)]) == []


def test_refused_authentications_count_as_denials() -> None:
    detectors = Detectors(only({"denial_burst": {"count": 3, "window_seconds": 60}}))
    refusals = [rec(T0 + i, phase="authn", decision="deny") for i in range(3)]
    assert rules(feed(detectors, refusals)) == ["denial_burst"]


# -- rate spikes ----------------------------------------------------------------------------


def steady(minutes: int, per_minute: int, start: float = T0) -> list[AuditRecord]:
    return [
        rec(start + m * 60 + i * (60 / per_minute))
        for m in range(minutes)
        for i in range(per_minute)
    ]


def test_rate_spike_against_the_agents_own_average() -> None:
    settings = {"rate_spike": {"factor": 5, "min_calls": 20, "warmup_minutes": 10}}
    detectors = Detectors(only(settings))
    assert feed(detectors, steady(15, 10)) == []  # 10 a minute is this agent's normal
    spike = [rec(T0 + 15 * 60 + i * 0.1) for i in range(60)]
    alerts = feed(detectors, spike)
    assert rules(alerts) == ["rate_spike"]  # once, not once per call over the limit
    assert alerts[0].facts["calls"] == 51  # the first call above 5 x 10


def test_a_busy_agent_at_its_usual_pace_does_not_spike() -> None:
    detectors = Detectors(only({"rate_spike": {"factor": 5, "min_calls": 20}}))
    assert feed(detectors, steady(30, 100)) == []


def test_no_spike_before_the_warmup() -> None:
    detectors = Detectors(only({"rate_spike": {"min_calls": 5, "warmup_minutes": 10}}))
    assert feed(detectors, steady(3, 2) + [rec(T0 + 180 + i * 0.1) for i in range(50)]) == []


# -- habits: first use, hours, addresses ----------------------------------------------------


def test_first_use_of_a_server_and_of_a_tool() -> None:
    detectors = Detectors(only({"first_use": {"min_calls": 0}}))
    alerts = feed(detectors, [rec(T0), rec(T0 + 1)])
    assert [a.facts for a in alerts] == [
        {"server": "workspace"},
        {"server": "workspace", "tool": "workspace__list_tasks"},
    ]
    alerts = feed(detectors, [rec(T0 + 2, tool_exposed="workspace__get_task")])
    assert [a.facts.get("tool") for a in alerts] == ["workspace__get_task"]
    # Denied calls are no use of a tool.
    assert feed(detectors, [rec(T0 + 3, tool_exposed="workspace__x", decision="deny")]) == []


def test_unusual_hours_after_the_baseline() -> None:
    detectors = Detectors(only({"unusual_hours": {"min_calls": 50}}))
    workday = [
        rec(T0 + d * 24 * HOUR + h * HOUR + i) for d in range(5) for h in range(8) for i in range(2)
    ]
    assert feed(detectors, workday) == []  # 08:00-16:00 UTC, every day
    night = feed(detectors, [rec(T0 + 5 * 24 * HOUR + 17 * HOUR)])  # 01:00 UTC
    assert rules(night) == ["unusual_hours"] and night[0].facts["hour"] == 1
    assert feed(detectors, [rec(T0 + 5 * 24 * HOUR + 2 * HOUR)]) == []  # 10:00, usual


def test_new_client_address_once_the_agent_has_a_history() -> None:
    detectors = Detectors(only({"new_client": {"min_calls": 10}}))
    assert feed(detectors, [rec(T0 + i, client="10.0.0.1") for i in range(10)]) == []
    alerts = feed(detectors, [rec(T0 + 20, client="203.0.113.9")])
    assert rules(alerts) == ["new_client"] and alerts[0].facts["client"] == "203.0.113.9"
    assert feed(detectors, [rec(T0 + 21, client="203.0.113.9")]) == []


def test_a_new_agent_address_is_learned_not_alerted() -> None:
    detectors = Detectors(only({"new_client": {"min_calls": 0}}))
    assert feed(detectors, [rec(T0, client="10.0.0.1")]) == []


def test_new_connections_from_a_known_host_are_no_new_client() -> None:
    # Every TCP connection has a new source port: hundreds of them are one client, not
    # hundreds (each raised an alert when the port was part of the key).
    detectors = Detectors(only({"new_client": {"min_calls": 5}}))
    calls = [rec(T0 + i, client=f"10.0.0.1:{40000 + i}") for i in range(300)]
    calls += [rec(T0 + 300 + i, client=f"[2001:db8::1]:{40000 + i}") for i in range(2)]
    alerts = feed(detectors, calls)
    # One new host (the IPv6 one), alerted once; its second connection is known already.
    assert [(a.rule, a.facts["client"]) for a in alerts] == [("new_client", "2001:db8::1")]
    assert feed(detectors, [rec(T0 + 400, client="10.0.0.1:65000")]) == []
    assert rules(feed(detectors, [rec(T0 + 401, client="10.0.0.2:40000")])) == ["new_client"]


@pytest.mark.parametrize(
    ("history", "now"),
    [
        ("10.0.0.1:40000", "10.0.0.1"),  # behind a trusted proxy: the forwarded address
        ("::1:40000", "[::1]:50000"),  # history written before IPv6 peers were bracketed
        ("2001:db8::7", "[2001:db8::7]:1234"),
    ],
)
def test_the_host_is_the_key_whatever_the_form(history: str, now: str) -> None:
    detectors = Detectors(only({"new_client": {"min_calls": 0}}))
    assert feed(detectors, [rec(T0, client=history)], replay=True) == []
    assert feed(detectors, [rec(T0 + 1, client=now)]) == []


def test_repeats_within_the_cooldown_are_counted_into_the_next_alert() -> None:
    settings = {"cooldown_seconds": 600, "denial_burst": {"count": 3, "window_seconds": 60}}
    detectors = Detectors(only(settings))
    denials = [rec(T0 + i, decision="deny") for i in range(10)]
    first = feed(detectors, denials)
    # The third denial alerts; the seven bursts after it within the cooldown are held back.
    assert rules(first) == ["denial_burst"] and "repeats" not in first[0].facts
    later = feed(detectors, [rec(T0 + 700 + i, decision="deny") for i in range(3)])
    assert rules(later) == ["denial_burst"]
    assert later[0].facts["repeats"] == 7 and "7 more" in later[0].message
    # Counted from the alert on: none held back since this one.
    again = feed(detectors, [rec(T0 + 1400 + i, decision="deny") for i in range(3)])
    assert "repeats" not in again[0].facts


def test_held_back_alerts_are_bounded_per_agent() -> None:
    detectors = Detectors(only({"new_client": {"min_calls": 0}}))
    for i in range(3000):
        detectors.observe(rec(T0 + i, client=f"10.{i // 250}.{i % 250}.1"))
    state = next(iter(detectors._agents.values()))
    assert len(state.quiet) <= 1024


# -- the stream as a whole ------------------------------------------------------------------


def test_replay_rebuilds_baselines_without_alerting() -> None:
    settings = {"first_use": {"min_calls": 0}, "new_client": {"min_calls": 5}}
    detectors = Detectors(only(settings))
    history = [rec(T0 + i, client="10.0.0.1") for i in range(10)]
    assert feed(detectors, history, replay=True) == []
    # After the replay the agent's server, tool and address are known: no alert for them ...
    assert feed(detectors, [rec(T0 + 100, client="10.0.0.1")]) == []
    # ... and a new address is new.
    assert rules(feed(detectors, [rec(T0 + 101, client="10.9.9.9")])) == ["new_client"]


def test_agents_are_kept_apart() -> None:
    detectors = Detectors(only({"denial_burst": {"count": 3, "window_seconds": 60}}))
    mixed = [rec(T0 + i, agent=f"a{i % 3}", decision="deny") for i in range(6)]
    assert feed(detectors, mixed) == []  # two denials each
    assert rules(feed(detectors, [rec(T0 + 7, agent="a1", decision="deny")])) == ["denial_burst"]


@pytest.mark.parametrize("phase", ["outcome", "alert"])
def test_outcome_and_alert_records_feed_no_rule(phase: str) -> None:
    detectors = Detectors(Alerts(first_use={"min_calls": 0}))
    assert feed(detectors, [rec(T0, phase=phase, decision="deny")] * 20) == []


def test_records_without_an_agent_and_disabled_detectors_raise_nothing() -> None:
    crossing = {"decision": "deny", "detail": {"foreign_tenants": ["globex"]}}
    assert (
        Detectors(Alerts()).observe(
            rec(T0, **crossing).__class__(
                time=T0, request_id="x", phase="decision", detail={"foreign_tenants": ["g"]}
            )
        )
        == []
    )
    assert Detectors(Alerts(enabled=False)).observe(rec(T0, **crossing)) == []


def test_state_is_bounded_in_agents() -> None:
    detectors = Detectors(only({"first_use": {"min_calls": 0}}), max_agents=100)
    for i in range(1000):
        detectors.observe(rec(T0 + i, agent=f"agent-{i}"))
    assert len(detectors._agents) == 100
