"""The admin API's held calls, the same operations as `bastion approvals`:

```
GET  /admin/approvals?status=pending|approved|denied|expired|abandoned|all
GET  /admin/approvals/{id}             exactly what the approver is shown, and the decision
POST /admin/approvals/{id}/approve     {"reason": "...", "via": "cli"}
POST /admin/approvals/{id}/deny        {"reason": "...", "via": "cli"}
POST /admin/approvals/{id}/links       {"for": "alice", "roles": "approver"}
                                       → signed approve and deny links for a webhook to deliver
```

The admin token's holder decides as the person `admin` (role `admin`) on the channel
`admin-api` (or `cli` when the CLI says so). Refusals: 403 `approval.refused`, 409
`approval.closed` (decided, expired or abandoned), 404 unknown id.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.config import Settings
from bastion.control.admin import params as ask
from bastion.errors import BadRequest, shown
from bastion.pipeline.approvals import DECISIONS, Approvals
from bastion.policy.approval import ADMIN_ROLE, Person
from bastion.state.approvals import CLOSED

__all__ = ["ADMIN_PERSON", "ApprovalApi"]

ADMIN_PERSON = "admin"
_STATUSES = ("pending", *sorted(CLOSED), "all")
_CHANNELS = ("admin-api", "cli")


class ApprovalApi:
    """The approval endpoints over one gateway's `Approvals`."""

    def __init__(self, settings: Settings, approvals: Approvals) -> None:
        self._settings = settings
        self._approvals = approvals

    def routes(self) -> list[Route]:
        """The routes, relative to the admin prefix."""
        return [
            Route("/approvals", self.list),
            Route("/approvals/{approval_id}", self.show),
            Route("/approvals/{approval_id}/links", self.links, methods=["POST"]),
            Route("/approvals/{approval_id}/{decision}", self.decide, methods=["POST"]),
        ]

    async def list(self, request: Request) -> Response:
        """The held calls of one status (pending by default), oldest first."""
        status = ask.params(request, ("status",)).get("status", "pending")
        if status not in _STATUSES:
            raise BadRequest(
                "status", f"expected one of {', '.join(_STATUSES)}, found {shown(status)}"
            )
        items = await self._approvals.list(None if status == "all" else status)
        return _json(200, {"count": len(items), "approvals": [i.to_dict() for i in items]})

    async def show(self, request: Request) -> Response:
        """One held call."""
        ask.params(request, ())
        item = await self._approvals.get(request.path_params["approval_id"])
        return _json(200, {"approval": item.to_dict()})

    async def decide(self, request: Request) -> Response:
        """Approve or deny one held call as the admin token's holder."""
        ask.params(request, ())
        decision = request.path_params["decision"]
        if decision not in DECISIONS:
            raise BadRequest("decision", f"expected approve or deny, found {shown(decision)}")
        given = await ask.fields(request, ("reason", "via"))
        via = given.get("via", "admin-api")
        if via not in _CHANNELS:
            raise BadRequest("via", f"expected one of {', '.join(_CHANNELS)}, found {shown(via)}")
        person = Person(ADMIN_PERSON, (ADMIN_ROLE,), via)
        item = await self._approvals.decide(
            request.path_params["approval_id"],
            decision,
            person,
            given.get("reason"),
            _client(request),
        )
        return _json(200, {"approval": item.to_dict()})

    async def links(self, request: Request) -> Response:
        """Signed approve and deny links for one person (the admin vouches for their roles)."""
        ask.params(request, ())
        given = await ask.fields(request, ("for", "roles"))
        name = given.get("for", "").strip()
        if not name or len(name) > 200:
            raise BadRequest("for", "expected the name of the person the links are for")
        roles = tuple(r.strip() for r in given.get("roles", "").split(",") if r.strip())
        item = await self._approvals.get(request.path_params["approval_id"])
        person = Person(name, roles, "link")
        base = self._settings.base_url()
        body: dict[str, Any] = {
            decision: base + self._approvals.link(item.id, decision, person)
            for decision in DECISIONS
        }
        return _json(200, {"approval": item.id, "for": name, "links": body})


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(
        orjson.dumps(body),
        status,
        headers={"cache-control": "no-store"},
        media_type="application/json",
    )


def _client(request: Request) -> str | None:
    client = request.client
    return f"{client.host}:{client.port}" if client else None
