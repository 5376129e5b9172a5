"""What people do with held calls: list them, read what each would run, approve or deny.

The approval stage (`approval.py`) holds a call of an `approval: human` permit as a
`PendingApproval` and waits; `Approvals` is the one place a decision is made, whatever the
channel — the admin API (and the CLI through it), the console, a signed callback link:

```
Approvals.list(status)                       the held calls (pending by default)
Approvals.get(id)                            one, with exactly what the approver is shown
Approvals.decide(id, "approve"|"deny", by=Person(name, roles, channel), reason)
Approvals.link(id, decision, person)         a signed link for a webhook to deliver
Approvals.decide_by_link(id, decision, query)
```

`decide` refuses (`ApprovalRefused`, 403) an agent's credential, the requesting agent itself
and a person without one of the item's approver roles; an item no longer pending
(`ApprovalClosed`, 409). Every decision, expiry and abandonment is written to the audit trail
naming the person, the channel and the digest of what was shown.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from bastion.audit import AuditRecord, AuditWriter
from bastion.config import Settings
from bastion.errors import ApprovalClosed, ApprovalRefused, AuditUnavailable, NotAvailable, shown
from bastion.policy.approval import ApprovalLinks, Person, may_decide
from bastion.state.approvals import Decided, PendingApproval, PendingApprovals, Status
from bastion.state.secrets import stored_secret

__all__ = ["DECISIONS", "LINK_KEY_FILE", "Approvals"]

log = logging.getLogger("bastion.policy")

DECISIONS: dict[str, Status] = {"approve": "approved", "deny": "denied"}
LINK_KEY_FILE = "approval-link-key"
_REASON_LIMIT = 500


class Approvals:
    """Decisions on held calls, by people, on any channel; each one audited."""

    def __init__(
        self,
        settings: Settings,
        store: PendingApprovals,
        audit: AuditWriter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._settings = settings
        self._audit = audit
        self._clock = clock
        self._links: ApprovalLinks | None = None

    async def list(self, status: str | None = "pending") -> list[PendingApproval]:
        """The held calls of one status (None: every one still kept), oldest first."""
        return await self.store.list(status)

    async def get(self, approval_id: str) -> PendingApproval:
        """One held call; `NotAvailable` (404) when unknown."""
        item = await self.store.get(approval_id)
        if item is None:
            raise NotAvailable(f"no approval {shown(approval_id)}")
        return item

    async def decide(
        self,
        approval_id: str,
        decision: str,
        by: Person,
        reason: str | None = None,
        client: str | None = None,
    ) -> PendingApproval:
        """Approve or deny one held call as `by`; the decided item. Raises `ApprovalRefused`
        (403) when `by` may not decide it, `ApprovalClosed` (409) when it is not pending,
        `NotAvailable` (404) when unknown."""
        status = DECISIONS.get(decision)
        if status is None:
            raise ApprovalRefused(f"expected approve or deny, found {shown(decision)}")
        item = await self.get(approval_id)
        why = may_decide(by, item.approvers, item.requester.agent)
        if why is not None:
            log.warning("approval %s: %s refused: %s", item.id, by.name, why)
            raise ApprovalRefused(why)
        text = (reason or "")[:_REASON_LIMIT] or None
        decided = Decided(by.name, by.channel, self._clock(), text, by.roles)
        closed = await self.store.close(item.id, status, decided)
        if closed is None:
            now = await self.get(approval_id)
            raise ApprovalClosed(f"approval {item.id} is already {now.status}")
        log.info("approval %s %s by %s (%s)", item.id, status, by.name, by.channel)
        await self._append(closed, client)
        return closed

    async def end(self, item: PendingApproval, status: Status, why: str) -> PendingApproval:
        """A held call that ends without a decision: `expired` or `abandoned` (the client
        went away). The closed item, or the item as someone else closed it first."""
        closed = await self.store.close(
            item.id, status, Decided(None, "gateway", self._clock(), why)
        )
        if closed is None:
            found = await self.store.get(item.id)
            return found if found is not None else item
        log.info("approval %s %s: %s", item.id, status, why)
        await self._append(closed, None, durable=False)  # may run while the call is cancelled
        return closed

    # -- signed links -------------------------------------------------------------------------

    def link(self, approval_id: str, decision: str, person: Person) -> str:
        """A signed link (path and query) deciding one held call as `person`, single use
        (the item is decided once) and expiring with the item's own timeout at the latest."""
        if decision not in DECISIONS:
            raise ApprovalRefused(f"expected approve or deny, found {shown(decision)}")
        return self._signer().sign(approval_id, decision, person, self._clock())

    def check_link(self, approval_id: str, decision: str, query: Mapping[str, str]) -> Person:
        """The person a link was made for; `ApprovalRefused` when forged, altered or expired."""
        found = self._signer().verify(approval_id, decision, query, self._clock())
        if isinstance(found, str):
            raise ApprovalRefused(found)
        return found

    def _signer(self) -> ApprovalLinks:
        if self._links is None:  # made on first use: a gateway nobody approves on needs none
            path = Path(self._settings.state_dir) / LINK_KEY_FILE
            key = stored_secret(path, "approval link key").encode()
            self._links = ApprovalLinks(key, self._settings.policy.approval_timeout_seconds)
        return self._links

    # -- the trail ------------------------------------------------------------------------------

    async def _append(
        self, item: PendingApproval, client: str | None, durable: bool = True
    ) -> None:
        if self._audit is None:
            return
        try:
            await self._audit.append(record(item, client), durable)
        except AuditUnavailable as exc:
            log.error("approval %s not audited: %s", item.id, exc.message)


def record(item: PendingApproval, client: str | None = None) -> AuditRecord:
    """The audit record of how a held call was decided or ended (method
    `approvals/<status>`): the requester's tenant and agent, the tool, and in `detail` the
    person, their roles, the channel and the digest of exactly what they were shown."""
    decided = item.decision
    detail: dict[str, Any] = {
        "approval": item.id,
        "status": item.status,
        "call_digest": item.call,
        "shown_digest": item.shown.get("digest"),
        "shown_values": item.shown.get("values"),
    }
    verdict: Literal["allow", "deny"] = "allow" if item.status == "approved" else "deny"
    if decided is not None:
        detail.update(by=decided.by, roles=list(decided.roles), channel=decided.channel)
    return AuditRecord(
        time=time.time(),
        request_id=uuid.uuid4().hex,
        phase="decision",
        tenant=item.requester.tenant,
        user=item.requester.user,
        agent=item.requester.agent,
        client=client,
        method=f"approvals/{item.status}",
        server=item.server,
        tool_original=item.tool,
        tool_exposed=item.called_as,
        decision=verdict,
        policies=(item.policy,),
        reason=decided.reason if decided is not None else None,
        detail=detail,
    )
