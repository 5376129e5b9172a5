"""Anomaly detectors: streaming rules over the audit records, each agent against its own past.

`Detectors.observe(record)` takes every record the trail writes and returns the alerts it
raises; nothing here does I/O, and each record costs a few dictionary operations. The rules:

- `rate_spike`: an agent's calls in one minute above `factor` times its moving average (and
  above `min_calls`), once it has `warmup_minutes` of history;
- `denial_burst`: `count` denials of one agent within `window_seconds`;
- `cross_tenant`: any request naming another tenant's data or presenting another tenant's
  session; `count` of them within `window_seconds` suspend the agent (on by default);
- `first_use`: the first call of an agent to a server, and to a tool;
- `unusual_hours`: a call in an hour of the day (UTC) the agent was never active in, once it
  has `min_calls` calls;
- `new_client`: a call from a host the agent never used, once it has `min_calls` calls. The
  host only: every new connection has a new port. Behind a trusted proxy the record's
  `client` is the forwarded address already (`security.trusted_proxies`).

One alert per rule, agent and subject within `cooldown_seconds`: the repeats in between are
counted, and the next alert after the cooldown carries their number (`repeats`). Rules that
alert on every attempt (`cross_tenant`) and alerts that suspend are never held back.

State is per (tenant, agent), bounded (`max_agents`, least recently seen dropped first), and
rebuilt at start by replaying recent history through `observe(…, replay=True)`.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from bastion.audit.record import AuditRecord
from bastion.config import Alerts

Severity = Literal["low", "medium", "high", "critical"]

_MINUTE = 60.0
_ALPHA = 0.1  # weight of the newest minute in an agent's moving average
_GAP_CAP = 24 * 60  # minutes of silence after which the average is as good as zero
_MAX_ADDRESSES = 256  # addresses remembered per agent
_MAX_QUIET = 1024  # (rule, subject) cooldowns remembered per agent
_SEVERITY_IDS = {"low": 2, "medium": 3, "high": 4, "critical": 5}


@dataclass(frozen=True, slots=True)
class Alert:
    """One anomaly: which rule, whose, why, and whether the agent is to be suspended."""

    rule: str
    severity: Severity
    tenant: str | None
    agent: str
    message: str
    request_id: str
    time: float
    facts: dict[str, Any] = field(default_factory=dict)
    suspend: bool = False

    def record(self) -> AuditRecord:
        """The alert as an audit record (phase `alert`), linked to the request that raised it."""
        return AuditRecord(
            time=self.time,
            request_id=self.request_id,
            phase="alert",
            tenant=self.tenant,
            agent=self.agent,
            reason=self.message,
            detail={
                "rule": self.rule,
                "severity": self.severity,
                "severity_id": _SEVERITY_IDS[self.severity],  # OCSF's scale
                "suspend": self.suspend,
                **self.facts,
            },
        )


# An alert with what its cooldown is keyed by, and whether it ignores the cooldown.
_Raised = tuple[Alert, str, bool]


@dataclass(slots=True)
class _Agent:
    """What the detectors remember of one agent."""

    calls: int = 0
    minute: int = -1  # the minute being counted
    in_minute: int = 0  # calls in it
    average: float = 0.0  # calls per minute, moving average of the minutes before
    minutes: int = 0  # minutes of history behind `average`
    spiked: int = -1  # the minute a spike was last raised for
    denials: deque[float] = field(default_factory=deque)
    crossings: deque[float] = field(default_factory=deque)
    servers: set[str] = field(default_factory=set)
    tools: set[str] = field(default_factory=set)
    hours: list[int] = field(default_factory=lambda: [0] * 24)
    addresses: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # (rule, subject) → until when its alerts are held back, and how many were since.
    quiet: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)


class Detectors:
    """The configured rules over one stream of records."""

    def __init__(self, settings: Alerts, max_agents: int = 100_000) -> None:
        self._settings = settings
        self._max_agents = max_agents
        self._agents: OrderedDict[tuple[str | None, str], _Agent] = OrderedDict()

    def observe(self, record: AuditRecord, *, replay: bool = False) -> list[Alert]:
        """Feed one record; the alerts it raises (none while replaying history)."""
        if not self._settings.enabled or record.agent is None or record.phase == "alert":
            return []
        if record.phase == "outcome":
            return []
        state = self._state(record.tenant, record.agent)
        raised: list[_Raised] = []
        denied = record.decision == "deny"
        crossing = _crossing(record)
        if crossing is not None:
            self._cross_tenant(state, record, crossing, raised)
        if denied:
            self._denial_burst(state, record, raised)
        if record.phase == "decision":
            self._rate_spike(state, record, raised)
            if not denied:
                self._habits(state, record, raised)
            state.calls += 1
        if replay:
            return []
        due = (self._due(state, alert, subject, repeat) for alert, subject, repeat in raised)
        return [alert for alert in due if alert is not None]

    # --- the rules ---------------------------------------------------------------------------

    def _cross_tenant(
        self, state: _Agent, record: AuditRecord, crossing: tuple[str, ...], raised: list[_Raised]
    ) -> None:
        rule = self._settings.cross_tenant
        if not rule.enabled:
            return
        window = _window(state.crossings, record.time, rule.window_seconds)
        suspend = rule.suspend and len(window) >= rule.count
        what = (
            f"named data of tenant {', '.join(crossing)}"
            if crossing
            else "presented another principal's session"
        )
        raised.append(
            self._alert(
                "cross_tenant",
                "critical" if suspend else "high",
                record,
                f"agent {record.agent!r} of tenant {record.tenant!r} {what} "
                f"(attempt {len(window)} within {rule.window_seconds:g} s)",
                {"tenants": list(crossing), "attempts": len(window)},
                suspend=suspend,
                subject="",
                repeat=True,
            )
        )

    def _denial_burst(self, state: _Agent, record: AuditRecord, raised: list[_Raised]) -> None:
        rule = self._settings.denial_burst
        if not rule.enabled:
            return
        window = _window(state.denials, record.time, rule.window_seconds)
        if len(window) >= rule.count:
            raised.append(
                self._alert(
                    "denial_burst",
                    "medium",
                    record,
                    f"agent {record.agent!r} was denied {len(window)} times in "
                    f"{rule.window_seconds:g} s",
                    {"denials": len(window)},
                    suspend=rule.suspend,
                )
            )

    def _rate_spike(self, state: _Agent, record: AuditRecord, raised: list[_Raised]) -> None:
        rule = self._settings.rate_spike
        minute = int(record.time // _MINUTE)
        if minute > state.minute:
            if state.minute >= 0:
                gap = min(minute - state.minute, _GAP_CAP)
                # The minute that ended, then the silent minutes since (each a zero).
                if state.minutes == 0:  # the first minute seeds the average
                    state.average = float(state.in_minute)
                else:
                    state.average += _ALPHA * (state.in_minute - state.average)
                state.average *= (1 - _ALPHA) ** (gap - 1)
                state.minutes += gap
            state.minute, state.in_minute = minute, 0
        state.in_minute += 1
        if not rule.enabled or state.minutes < rule.warmup_minutes or state.spiked == minute:
            return
        limit = max(rule.min_calls, rule.factor * state.average)
        if state.in_minute > limit:
            state.spiked = minute
            raised.append(
                self._alert(
                    "rate_spike",
                    "medium",
                    record,
                    f"agent {record.agent!r} made {state.in_minute} calls this minute, "
                    f"{state.in_minute / max(state.average, 1e-9):.0f}x its average of "
                    f"{state.average:.1f}",
                    {"calls": state.in_minute, "average": round(state.average, 2)},
                    suspend=rule.suspend,
                )
            )

    def _habits(self, state: _Agent, record: AuditRecord, raised: list[_Raised]) -> None:
        settings = self._settings
        server, tool = record.server, record.tool
        first = settings.first_use
        if server is not None and server not in state.servers:
            state.servers.add(server)
            if first.enabled and state.calls >= first.min_calls:
                raised.append(
                    self._alert(
                        "first_use",
                        "low",
                        record,
                        f"agent {record.agent!r} used server {server!r} for the first time",
                        {"server": server},
                        suspend=first.suspend,
                        subject=f"server:{server}",
                    )
                )
        if tool is not None and server is not None:
            key = f"{server}/{tool}"
            if key not in state.tools:
                state.tools.add(key)
                if first.enabled and state.calls >= first.min_calls:
                    raised.append(
                        self._alert(
                            "first_use",
                            "low",
                            record,
                            f"agent {record.agent!r} called tool {tool!r} of {server!r} for "
                            "the first time",
                            {"server": server, "tool": tool},
                            suspend=first.suspend,
                            subject=f"tool:{key}",
                        )
                    )
        hour = int(record.time // 3600) % 24
        hours = settings.unusual_hours
        if hours.enabled and state.calls >= hours.min_calls and state.hours[hour] == 0:
            raised.append(
                self._alert(
                    "unusual_hours",
                    "medium",
                    record,
                    f"agent {record.agent!r} is active at {hour:02d}:00 UTC, an hour it has "
                    f"not been active in before ({state.calls} calls seen)",
                    {"hour": hour},
                    suspend=hours.suspend,
                    subject=str(hour),
                )
            )
        state.hours[hour] += 1
        client = _host(record.client) if record.client else None
        if client is not None:
            known = client in state.addresses
            new = settings.new_client
            if not known and new.enabled and state.calls >= new.min_calls and state.addresses:
                raised.append(
                    self._alert(
                        "new_client",
                        "medium",
                        record,
                        f"agent {record.agent!r} called from {client}, an address it has not "
                        "used before",
                        {"client": client, "known_addresses": len(state.addresses)},
                        suspend=new.suspend,
                        subject=client,
                    )
                )
            state.addresses[client] = None
            state.addresses.move_to_end(client)
            if len(state.addresses) > _MAX_ADDRESSES:
                state.addresses.popitem(last=False)

    # --- plumbing ----------------------------------------------------------------------------

    def _state(self, tenant: str | None, agent: str) -> _Agent:
        key = (tenant, agent)
        state = self._agents.get(key)
        if state is None:
            # Windows keep at most `count` times: enough to tell whether `count` fall in it.
            state = self._agents[key] = _Agent(
                denials=deque(maxlen=self._settings.denial_burst.count),
                crossings=deque(maxlen=self._settings.cross_tenant.count),
            )
            if len(self._agents) > self._max_agents:
                self._agents.popitem(last=False)
        else:
            self._agents.move_to_end(key)
        return state

    def _alert(
        self,
        rule: str,
        severity: Severity,
        record: AuditRecord,
        message: str,
        facts: dict[str, Any],
        *,
        suspend: bool,
        subject: str = "",
        repeat: bool = False,
    ) -> _Raised:
        alert = Alert(
            rule,
            severity,
            record.tenant,
            str(record.agent),
            message,
            record.request_id,
            record.time,
            facts,
            suspend,
        )
        return alert, subject, repeat

    def _due(self, state: _Agent, alert: Alert, subject: str, repeat: bool) -> Alert | None:
        """`alert` if it is to be raised now, else None: once per rule and subject within the
        cooldown (the repeats held back are counted, and the next alert says how many), except
        for rules that alert on every attempt and for any alert that suspends."""
        if repeat or alert.suspend:
            return alert
        key = (alert.rule, subject)
        until, held = state.quiet.get(key, (-math.inf, 0))
        if alert.time < until:
            state.quiet[key] = (until, held + 1)
            return None
        if len(state.quiet) >= _MAX_QUIET and key not in state.quiet:
            _forget_quiet(state.quiet, alert.time)
        state.quiet[key] = (alert.time + self._settings.cooldown_seconds, 0)
        if held == 0:
            return alert
        message = f"{alert.message} ({held} more since the last such alert)"
        return replace(alert, message=message, facts={**alert.facts, "repeats": held})


def _forget_quiet(quiet: dict[tuple[str, str], tuple[float, int]], now: float) -> None:
    """Drop the cooldowns that ended (their held-back counts were never followed by another
    alert), or the oldest half when none has: the map stays bounded."""
    ended = [key for key, (until, _) in quiet.items() if until <= now]
    for key in ended or list(quiet)[: len(quiet) // 2]:
        del quiet[key]


def _host(client: str) -> str:
    """The host of a record's client address: `host:port`, `[v6]:port`, or a bare address
    (history written before addresses were bracketed has `v6:port`)."""
    if client.startswith("["):
        end = client.find("]")
        return client[1:end] if end > 0 else client
    if client.count(":") == 1:
        return client.partition(":")[0]
    if client.count(":") > 1:
        try:
            ipaddress.ip_address(client)
        except ValueError:
            return client.rpartition(":")[0]
    return client


def _window(times: deque[float], now: float, seconds: float) -> deque[float]:
    """Add `now` to `times` and drop what fell out of the last `seconds`."""
    times.append(now)
    while times and times[0] <= now - seconds:
        times.popleft()
    return times


def _crossing(record: AuditRecord) -> tuple[str, ...] | None:
    """The other tenants a record shows the agent reaching for (empty for another principal's
    session), or None when it reaches for none."""
    detail = record.detail
    if not detail:
        return None
    foreign = detail.get("foreign_tenants")
    if foreign:
        return tuple(str(t) for t in foreign)
    if detail.get("error") == "session.foreign":
        return ()
    return None
