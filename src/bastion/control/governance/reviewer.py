"""Carrying out access reviews: the facts gathered, decisions applied and audited, the report.

```
gather()               facts from the registry, the config and the trail (I/O) → review.find
decide()               a reviewer's decision and its effect: `revoke` suspends the agent (an
                       agent already suspended is offboarded); for a grant or an upstream it
                       names the change to make in the config file, which the gateway never
                       writes
record()               the audit record of a review act (start, decide, close)
report_json/markdown   the review for auditors: every finding, every decision
ReviewReminder         the gateway's daily check: a review is due `review_every_days` after
                       the last closed one (or after the oldest agent was registered, when
                       none ever was); an `alert` record then
```
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bastion.audit.detect import Alert
from bastion.audit.record import AuditRecord
from bastion.background import Refresher
from bastion.config import Settings
from bastion.control.governance import inventory
from bastion.control.governance.review import DAY, AgentReach, Facts, Finding, find, grant_uses
from bastion.control.governance.reviews import VERDICTS, Decision, Review, ReviewStore
from bastion.control.registry.agents import AgentStatus, check_text
from bastion.control.registry.locator import locate, open_registry
from bastion.errors import BastionError, RegistryConflict, RegistryInvalid, shown

__all__ = [
    "ReviewReminder",
    "decide",
    "decision_record",
    "findings",
    "gather",
    "record",
    "registry_file",
    "review_store",
    "report_json",
    "report_markdown",
    "review_due",
]


# --- gathering the facts ----------------------------------------------------------------------


def registry_file(settings: Settings) -> Path:
    """The registry (and review store) of a configuration: `<state_dir>/registry.db`, its
    folder created (0700) when missing, as the gateway does at its first start."""
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    return state / "registry.db"


def review_store(settings: Settings) -> ReviewStore:
    """The review store of a configuration, beside its registry (`registry.store`: the
    SQLite file of `state_dir`, created as the gateway does at its first start, or the
    PostgreSQL database)."""
    locator = locate(settings)
    if locator.path is not None:
        registry_file(settings)  # the state folder, created (0700) when missing
    return ReviewStore(locator.database(create=True))


def gather(settings: Settings, since: float, now: float) -> Facts:
    """The facts of a review (blocking I/O): agents and their key and status times from the
    registry, each grant's permitted and called tools (the inventory's reach when the policy
    catalog is there, else the grants' own tool lists) and the upstreams' credentials."""
    with open_registry(settings, create=True) as registry:
        agents = registry.list()
        times = registry.lifecycle()
    try:
        engine = inventory.load_engine(settings)
    except BastionError:
        engine = None  # no catalog yet: grants are judged by their own tool lists
    usage = inventory.read_usage(settings, since)
    days = max(1, round((now - since) / DAY))
    listed = inventory.build_inventory(settings, agents, engine, usage, now, days)
    reach = [
        AgentReach(
            entry.id,
            entry.tenant,
            tuple((r.upstream, t.tool, t.permits) for r in entry.reach for t in r.tools),
            tuple((u.upstream, u.tool, u.allowed) for u in entry.used),
        )
        for entry in listed.agents
        if entry.status != "offboarded"
    ]
    credentials = {
        name: {
            "mode": up.credentials.mode,
            "secret": up.credentials.secret,  # a reference (env:, file:, vault:), no value
            "header": up.credentials.header,
        }
        for name, up in settings.upstreams.items()
    }
    return Facts(
        agents=tuple(agents),
        keys_rotated_at={agent_id: t[0] for agent_id, t in times.items()},
        status_changed_at={agent_id: t[1] for agent_id, t in times.items()},
        grants=grant_uses(settings, reach, listed.reach_known),
        credentials=credentials,
        since=since,
    )


def findings(settings: Settings, since: float, now: float) -> list[Finding]:
    """Every finding of the rules over the gathered facts (blocking I/O)."""
    return find(gather(settings, since, now), settings.governance, now)


# --- deciding ---------------------------------------------------------------------------------


def decide(
    settings: Settings,
    review_id: str | None,
    finding_id: str,
    verdict: str,
    reason: str | None,
    by: str,
    now: float,
) -> tuple[Review, Finding, Decision]:
    """Record a decision on a finding of the review (None: the open one) and carry it out.

    `keep` needs a reason. `revoke` suspends an agent (offboards one already suspended); for
    a grant or an upstream it names the change to make in the config file, which the gateway
    does not write. Blocking I/O.
    """
    if verdict not in VERDICTS:
        raise RegistryInvalid(f"decision: expected keep or revoke, found {shown(verdict)}")
    if verdict == "keep" or reason is not None:
        check_text("reason", reason, 500)
    check_text("by", by, 200)
    with review_store(settings) as store:
        review = store.current() if review_id is None else store.get(review_id)
        if review.status != "open":
            raise RegistryConflict(f"review {review.id} is closed")
        finding = review.finding(finding_id)
        if any(d.finding_id == finding_id for d in review.decisions):
            raise RegistryConflict(f"finding {finding_id} was decided already")
        why = reason or f"access review {review.id}: {finding.rule}"
        effect = "none" if verdict == "keep" else _revoke(settings, finding, why)
        decision = Decision(finding_id, verdict, reason, by, now, effect)
        store.decide(review.id, decision)
    return review, finding, decision


def _revoke(settings: Settings, finding: Finding, reason: str) -> str:
    if finding.kind == "grant":
        tools = finding.evidence.get("unused_tools")
        change = f"remove {', '.join(tools)} from it" if tools else "narrow or remove it"
        return (
            f"to do in the config file: grant {finding.subject!r} of policy.grants: {change} "
            "(the gateway does not write its config file)"
        )
    if finding.kind == "upstream":
        return (
            f"to do in the config file: upstreams.{finding.subject}.credentials.mode: mint or "
            "token_exchange (the gateway does not write its config file)"
        )
    with open_registry(settings) as registry:
        agent = registry.get(finding.subject)
        if agent.status is AgentStatus.OFFBOARDED:
            return f"agent {agent.id} was offboarded already"
        status = AgentStatus.SUSPENDED
        if agent.status is AgentStatus.SUSPENDED:
            status = AgentStatus.OFFBOARDED  # revoking a suspension left standing ends it
        registry.set_status(agent.id, status, reason[:500])
    return f"{status} agent {agent.id}"


def record(
    act: str,
    review: Review,
    actor: str,
    client: str | None = None,
    route: str = "/admin",
    **detail: Any,
) -> AuditRecord:
    """The audit record of a review act (`start`, `decide`, `close`). The agent a decision is
    about is named in `detail`: the act is the reviewer's, not a call of the agent's."""
    tenant = detail.pop("tenant", None)
    return AuditRecord(
        time=time.time(),
        request_id=uuid.uuid4().hex,
        phase="decision",
        tenant=tenant,
        client=client,
        route=route,  # "/admin", or "cli" for `bastion review`
        method=f"admin/reviews/{act}",
        decision="allow",
        reason=detail.pop("reason", None),
        detail={"actor": actor, "review": review.id, **detail},
    )


def decision_record(
    review: Review,
    finding: Finding,
    decision: Decision,
    actor: str,
    client: str | None = None,
    route: str = "/admin",
) -> AuditRecord:
    """The audit record of one decision."""
    return record(
        "decide", review, actor, client, route, tenant=finding.tenant, reason=decision.reason,
        finding=finding.id, rule=finding.rule, kind=finding.kind, subject=finding.subject,
        verdict=decision.decision, effect=decision.effect, by=decision.by,
    )  # fmt: skip


# --- the report -------------------------------------------------------------------------------


def report_json(review: Review) -> dict[str, Any]:
    """The review for auditors as JSON: every finding with its decision."""
    decisions = {d.finding_id: d.to_dict() for d in review.decisions}
    data = review.to_dict()
    data["findings"] = [{**f.to_dict(), "decision": decisions.get(f.id)} for f in review.findings]
    return data


def _cell(value: object) -> str:
    """Text safe in a Markdown table cell: no pipes, newlines or HTML from free-text fields."""
    text = "-" if value is None else str(value)
    return (
        text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
        .replace("\r", " ").replace("\n", " ")
    )  # fmt: skip


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report_markdown(review: Review) -> str:
    """The review for auditors as Markdown: a summary, then one row per finding."""
    decisions = {d.finding_id: d for d in review.decisions}
    lines = [
        f"# Access review {review.id}",
        "",
        f"- status: {review.status}",
        f"- started: {_when(review.started_at)} by {_cell(review.started_by)}",
        f"- closed: {_when(review.closed_at)} by {_cell(review.closed_by)}",
        f"- parameters: {_cell(json.dumps(review.params, sort_keys=True))}",
        f"- findings: {len(review.findings)}, decided: {len(decisions)}",
        "",
        "| finding | rule | subject | found | suggested | decision | reason | by | at | effect |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in review.findings:
        d = decisions.get(f.id)
        row: list[object] = [f.id, f.rule, f"{f.kind} {f.subject}", f.message, f.action]
        row += [d.decision, d.reason, d.by, _when(d.at), d.effect] if d else ["undecided"]
        row += [None] * (10 - len(row))
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    lines += ["", "## Evidence", ""]
    for f in review.findings:
        lines.append(f"- `{_cell(f.id)}`: {_cell(json.dumps(f.evidence, sort_keys=True))}")
    return "\n".join(lines) + "\n"


# --- the reminder -----------------------------------------------------------------------------


def review_due(
    last_closed: float | None, oldest_agent: float | None, every_days: int, now: float
) -> float | None:
    """Since when a review is due (`every_days` after the last closed one, or after the oldest
    agent was registered when none ever was), or None when none is due yet."""
    start = last_closed if last_closed is not None else oldest_agent
    if start is None:
        return None
    due = start + every_days * DAY
    return due if now >= due else None


class ReviewReminder:
    """The gateway's daily check that an access review is due; an alert when it is."""

    def __init__(
        self,
        settings: Settings,
        alert: Callable[[Alert], Awaitable[None]],
        every: float = DAY,
    ) -> None:
        self._settings = settings
        self._alert = alert
        self.watch = Refresher("access review reminder", self._round, every=every)

    async def _round(self) -> bool:
        now = time.time()
        due = await asyncio.to_thread(self._due, now)
        if due is not None:
            await self._alert(self.alert(due, now))
        return False

    def _due(self, now: float) -> float | None:
        with review_store(self._settings) as store:
            last = store.last_closed_at()
        with open_registry(self._settings, create=True) as registry:
            oldest = min((a.created_at for a in registry.list()), default=None)
        return review_due(last, oldest, self._settings.governance.review_every_days, now)

    def alert(self, due: float, now: float) -> Alert:
        """The alert saying a review is due since `due`."""
        every = self._settings.governance.review_every_days
        return Alert(
            "review_due", "medium", None, "bastion",
            f"an access review is due since {_when(due)} (every {every} days); "
            "run bastion review start",
            uuid.uuid4().hex, now,
            {"due_since": due, "review_every_days": every},
        )  # fmt: skip
