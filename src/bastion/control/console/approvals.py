"""The approvals queue: held calls a person approves or denies while the agent waits.

```
GET  /console/approvals                 the queue (page)
GET  /console/approvals/queue           the queue as an HTML fragment (approvals.js polls it)
POST /console/approvals/{id}/decide     decision=approve|deny, reason (approvers and admins)
```

The pending store and its rules (who may decide, once, never the requesting agent) are the
approval stage's (`pipeline.approval.approvals`); this page only shows them and passes a
person's decision on, naming the person as the console knows them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.control.console.auth import refused
from bastion.control.console.sessions import Person, Session, may
from bastion.errors import BadRequest, NotAvailable
from bastion.pipeline.chain import Pipeline
from bastion.policy.approval import Person as Decider

if TYPE_CHECKING:
    from bastion.control.console.app import Console

__all__ = ["ApprovalPages"]

Handler = Callable[[Request], Awaitable[Response]]
Page = Callable[[Request, Session], Awaitable[Response]]


class ApprovalPages:
    """The queue's page, its live fragment and the decide form."""

    def __init__(self, pipeline: Pipeline, console: Console) -> None:
        self._pipeline = pipeline
        self._console = console

    def routes(
        self, page: Callable[[Page], Handler], errors: Callable[[Handler], Handler]
    ) -> list[Route]:
        """The routes, relative to the console's prefix."""
        return [
            Route("/approvals", page(self.page)),
            Route("/approvals/queue", page(self.queue)),
            Route("/approvals/{approval_id}/decide", errors(self.decide), methods=["POST"]),
        ]

    def _store(self) -> Any:
        store = getattr(self._pipeline.approval, "approvals", None)
        if store is None:
            raise NotAvailable("this gateway holds no calls for approval")
        return store

    async def _items(self) -> list[dict[str, Any]]:
        items = await self._store().list(status="pending")
        return [item.to_dict() for item in items]

    async def page(self, request: Request, session: Session) -> Response:
        """The queue, with its decide forms."""
        items = await self._items()
        return self._console.render(
            request, session, "approvals.html", items=items, now=time.time()
        )

    async def queue(self, request: Request, session: Session) -> Response:
        """The queue alone, for the page to refresh itself."""
        items = await self._items()
        return self._console.templates.render(
            "approvals_queue.html", items=items, now=time.time(), csrf=session.csrf,
            can=lambda right: may(session.person, right),
        )  # fmt: skip

    async def decide(self, request: Request) -> Response:
        """Approve or deny one held call; the approval stage checks who may."""
        session, fields = await self._console.logins.posted(request, "approve")
        decision = fields.get("decision", "")
        if decision not in ("approve", "deny"):
            raise BadRequest("decision", "expected approve or deny")
        approval_id = request.path_params["approval_id"]
        reason = fields.get("reason", "").strip()[:500] or None
        client = request.client
        item = await self._store().decide(
            approval_id,
            decision,
            by=_decider(session.person),
            reason=reason,
            client=f"{client.host}:{client.port}" if client else None,
        )
        verb = "Approved" if decision == "approve" else "Denied"
        return self._console.done(session, f"{verb} {item.called_as}.", "/approvals")


def _decider(person: Person) -> Decider:
    """The console's person as the approval stage names deciders."""
    if not person.roles:
        raise refused(403, "no role")
    subject = person.actor.rpartition("#")[2] if person.via == "oidc" else None
    name = "admin" if person.via == "token" else (subject or person.name)
    return Decider(name=name, roles=tuple(sorted(person.roles)), channel="console", subject=subject)
