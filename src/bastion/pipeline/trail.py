"""The audit stage: one record when a request reaches the decision, one when it is answered.

Under `durability: strict` a call goes upstream only after its decision record is committed,
and when the trail cannot be written the call is refused (fail closed). The outcome record
(latency, sizes, result digest) follows the answer without delaying it. Refused
authentications are recorded too.

Every record also goes through the anomaly detectors (`bastion.audit.detect`); an alert is
written to the trail as an `alert` record, counted, and may suspend the agent. When the trail
is shared by replicas, the detectors run once for the whole fleet instead (audit/fleet.py) and
this process's are off (`leave_detection`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any

from bastion import methods
from bastion.audit import AuditRecord, AuditWriter, digest
from bastion.audit.detect import Alert, Detectors
from bastion.audit.record import Outcome
from bastion.config import AuditSettings, HttpUpstream, Settings
from bastion.errors import AuditUnavailable
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route
from bastion.rpc import dumps
from bastion.types import JSON

log = logging.getLogger("bastion.audit")
_REFUSAL = "the audit trail cannot be written, so calls are refused until it can"


class Trail:
    """Builds audit records from exchanges and hands them to the writer."""

    def __init__(self, settings: Settings, writer: AuditWriter | None) -> None:
        self._writer = writer
        self._audit: AuditSettings = settings.audit
        self._strict = settings.audit.durability == "strict"
        self._upstreams = {
            name: (up.url if isinstance(up, HttpUpstream) else " ".join(up.command))
            for name, up in settings.upstreams.items()
        }
        alerts = settings.audit.alerts
        self.detectors = Detectors(alerts) if writer is not None and alerts.enabled else None
        # Set by the gateway: suspend an agent (agent id, reason); count an alert.
        self.suspend: Callable[[str, str], Awaitable[None]] | None = None
        self.alerted: Callable[[Alert], None] | None = None

    @property
    def enabled(self) -> bool:
        """Whether records are written at all."""
        return self._writer is not None

    @property
    def writable(self) -> bool:
        """Whether records are written and the trail takes them now."""
        return self._writer is not None and self._writer.healthy

    def check(self) -> None:
        """Refuse to serve while the trail cannot be written (fail closed)."""
        if self._writer is not None and not self._writer.healthy:
            log.error("audit trail unavailable: %s", self._writer.problem)
            raise AuditUnavailable(_REFUSAL)

    async def decision(self, exchange: Exchange, route: Route) -> None:
        """Record the decision. Under strict durability an allowed call waits until its record
        is committed (nothing goes upstream unrecorded); a denial never waits."""
        if self._writer is None:
            return
        allowed = exchange.denial is None
        if allowed:
            self.check()
        record = self._record(exchange, route, "decision")
        try:
            await self._writer.append(record, self._strict and allowed)
        except AuditUnavailable as exc:
            # The operator's log gets the detail (a path, the SQLite error); the client a
            # refusal that names the cause without it.
            log.error("audit trail unavailable: %s", exc.message)
            raise AuditUnavailable(_REFUSAL) from exc
        await self._watch(record)

    async def outcome(
        self, exchange: Exchange, route: Route, answer: JSON | None, failure: str | None = None
    ) -> None:
        """Record how the call ended (written behind the answer, whatever the answer holds).

        `failure` says why the gateway could not answer as it meant to (the answer then is
        the error it sent instead, or None when it could send nothing)."""
        if self._writer is None:
            return
        result = answer.get("result") if answer is not None else None
        size, result_digest = _measure(answer, result)
        outcome = outcome_of(exchange.denial is not None, answer, failure)
        record = self._record(
            exchange,
            route,
            "outcome",
            outcome="blocked" if exchange.blocked and outcome != "denied" else outcome,
            latency_ms=round((time.perf_counter() - exchange.started) * 1000, 3),
            response_bytes=size,
            result_digest=result_digest,
            credential_id=exchange.credential_id,
            failure=failure,
        )
        await self._writer.append(record, False)

    async def refused(self, exchange: Exchange, route: Route) -> None:
        """Record a refused authentication (never waits: refusals must stay cheap)."""
        if self._writer is None:
            return
        record = self._record(exchange, route, "authn")
        await self._writer.append(record, False)
        await self._watch(record)

    def leave_detection(self) -> None:
        """Run no detectors here: the fleet's leader runs them over every replica's records
        (each replica's own would see a share of the traffic, and alert once per replica)."""
        self.detectors = None

    def warm(self, records: Iterable[AuditRecord]) -> int:
        """Rebuild the detectors' baselines from history (no alerts); how many were read."""
        count = 0
        if self.detectors is not None:
            for record in records:
                self.detectors.observe(record, replay=True)
                count += 1
        return count

    async def _watch(self, record: AuditRecord) -> None:
        """Run the detectors over a written record and act on what they raise."""
        if self.detectors is None:
            return
        for alert in self.detectors.observe(record):
            await self._raise(alert)

    async def alert(self, alert: Alert, *, durable: bool = False) -> None:
        """An alert raised outside the detectors (an upstream caught leaking, a changed tool
        definition, a claimed URI, the fleet's detectors): logged, counted, and written to the
        trail when there is one; `durable` returns once its record is committed (the fleet's
        leader: whoever leads next must see which alerts were raised). Never raises: the alert
        is the operator's, the request goes on."""
        await self._raise(alert, durable)

    async def _raise(self, alert: Alert, durable: bool = False) -> None:
        """An alert: logged, written to the trail, counted, and the agent suspended if due."""
        log.warning("alert %s (%s): %s", alert.rule, alert.severity, alert.message)
        if self.alerted is not None:
            self.alerted(alert)
        suspended = False
        if alert.suspend and self.suspend is not None:
            try:
                await self.suspend(alert.agent, f"{alert.rule}: {alert.message}")
                suspended = True
            except Exception:  # a failed suspension is the operator's to see, not the client's
                log.exception("alert %s: suspending agent %r failed", alert.rule, alert.agent)
        record = alert.record()
        record = _replace(record, detail={**record.detail, "suspended": suspended})
        if self._writer is None:
            return
        try:
            await self._writer.append(record, durable)
        except AuditUnavailable as exc:
            log.error("alert %s could not be written to the trail: %s", alert.rule, exc.message)

    def _record(
        self,
        exchange: Exchange,
        route: Route,
        phase: str,
        *,
        failure: str | None = None,
        outcome: Outcome | None = None,
        **measured: Any,
    ) -> AuditRecord:
        """The record of `exchange` at `phase`; an outcome record also gets what was
        `measured` of the answer, and `failure` in its detail."""
        principal = exchange.principal
        params = exchange.params
        arguments: Any = (
            params.get("arguments", params) if exchange.method == methods.TOOLS_CALL else params
        )
        decision = exchange.decision
        target = exchange.target
        denial = exchange.denial
        return AuditRecord(
            time=time.time(),
            request_id=exchange.request_id,
            phase=phase,  # type: ignore[arg-type]
            trace_id=exchange.trace_id,
            tenant=principal.tenant if principal else None,
            user=principal.user if principal else None,
            agent=principal.agent if principal else None,
            delegation=principal.delegation if principal else (),
            session=digest(exchange.session.id) if exchange.session else None,
            client=exchange.client or None,
            route=route.path,
            method=exchange.method or None,
            server=target.upstream if target else None,
            tool_original=target.name if target and exchange.method == methods.TOOLS_CALL else None,
            tool_exposed=params.get("name") if exchange.method == methods.TOOLS_CALL else None,
            args_digest=self._args_digest(exchange, arguments, params),
            args=arguments
            if self._audit.record_arguments and isinstance(arguments, dict)
            else None,
            decision=("deny" if denial is not None else "allow") if phase != "authn" else "deny",
            policies=decision.policies if decision else (),
            reason=(
                denial.message
                if denial is not None
                else "; ".join(decision.reasons)
                if decision
                else None
            ),
            obligations=dict(decision.obligations) if decision else {},
            upstream=self._upstreams.get(target.upstream) if target else None,
            request_bytes=exchange.request_bytes or None,
            outcome="denied" if phase == "authn" else outcome,
            detail=_detail(exchange, failure),
            **measured,
        )

    @staticmethod
    def _args_digest(exchange: Exchange, arguments: Any, params: JSON) -> str | None:
        """The arguments' digest, made once per exchange (the decision and the outcome record
        name the same arguments: the arguments as received). Params standing in for absent
        arguments are digested each time: an approval's retry loses members after the
        decision, and a record's digest must be of the arguments it names."""
        if not arguments:
            return None
        if arguments is params:
            return digest(arguments)
        if exchange.args_digest is None:
            exchange.args_digest = digest(arguments)
        return exchange.args_digest


def error_code(answer: JSON | None) -> str | None:
    """The machine-readable code of an error answer: the gateway's `error.data.code` when it
    is a string, else "error"; None when the answer is not an error. Upstreams put anything in
    `data` (the MCP SDK a plain string), so nothing about its shape is assumed."""
    error = answer.get("error") if answer is not None else None
    if error is None:
        return None
    data = error.get("data") if isinstance(error, dict) else None
    code = data.get("code") if isinstance(data, dict) else None
    return code if isinstance(code, str) else "error"


def outcome_of(denied: bool, answer: JSON | None, failure: str | None = None) -> Outcome:
    """The `outcome` of a call's record from its final answer."""
    if denied:
        return "denied"
    code = error_code(answer)
    if code is not None and code.startswith("upstream."):
        return "upstream_error"
    if code is not None or failure is not None:
        return "error"
    return "ok"


def _measure(answer: JSON | None, result: Any) -> tuple[int | None, str | None]:
    """The answer's size and its result's digest; None for what cannot be encoded (JSON
    nested past the encoder's depth), which the record then leaves out rather than fail."""
    try:
        size = len(dumps(answer)) if answer is not None else None
        return size, digest(result) if result is not None else None
    except TypeError:
        return None, None


def _replace(record: AuditRecord, **changes: Any) -> AuditRecord:
    return replace(record, **changes)


def _detail(exchange: Exchange, failure: str | None = None) -> dict[str, Any]:
    """What else the trail keeps: the failed check, any reach across a tenant line, and why
    the gateway could not answer as it meant to (`failure`)."""
    detail: dict[str, Any] = {}
    denial = exchange.denial
    if denial is not None and denial.data:
        detail["error"] = denial.data.get("reason")
    if exchange.foreign_session:
        detail["error"] = "session.foreign"
    if exchange.foreign_tenants:
        detail["foreign_tenants"] = list(exchange.foreign_tenants)
    if exchange.inspected:
        # What the answer carried (never the text): the detectors' cross-tenant rule reads
        # `foreign_tenants` (the caller reaching out); this is the upstream's doing.
        inspection: dict[str, Any] = {"count": exchange.inspected, "findings": exchange.findings}
        if exchange.answer_tenants:
            inspection["foreign_tenants"] = list(exchange.answer_tenants)
        detail["inspection"] = inspection
    if failure is not None:
        detail["failure"] = failure
    return detail
