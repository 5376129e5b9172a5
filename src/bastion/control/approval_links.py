"""Signed callback links: a person decides on a held call from a chat message or an email.

```
GET  /approvals/{id}/{approve|deny}?by=&roles=&exp=&sig=   a confirmation page: what would
                                                           run, and a button (nothing decided)
POST /approvals/{id}/{approve|deny}?by=&roles=&exp=&sig=   the decision (form field `reason`)
```

A GET never decides, so a chat client or a mail scanner that prefetches the link approves
nothing. A link is made for one person, one item and one decision, and expires (see
`ApprovalLinks`); the item is decided once, so the link works once. A request that carries an
access token (`Authorization` or `DPoP`) is a program's, typically the agent's own: refused.
Pages are never cached, never framed and send no Referer (the link is the credential).
"""

from __future__ import annotations

import html
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from bastion.asgi import ASGIApp
from bastion.errors import ApprovalRefused, BastionError
from bastion.pipeline.approvals import DECISIONS, Approvals
from bastion.policy.approval import Person
from bastion.state.approvals import PendingApproval

__all__ = ["PREFIX", "approval_links"]

PREFIX = "/approvals"
_MAX_FORM = 4096
_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
}
_AGENT = (
    "approval links are opened by a person in a browser; a request carrying an access token "
    "(an agent's) cannot decide"
)


def approval_links(approvals: Approvals) -> ASGIApp:
    """The link endpoint for the front to mount at `PREFIX`."""
    return _Links(approvals).app()


class _Links:
    def __init__(self, approvals: Approvals) -> None:
        self._approvals = approvals

    def app(self) -> Starlette:
        route = Route(PREFIX + "/{approval_id}/{decision}", self.handle, methods=["GET", "POST"])
        return Starlette(routes=[route])

    async def handle(self, request: Request) -> HTMLResponse:
        """GET: the confirmation page; POST: the decision."""
        try:
            person, item, decision = await self._check(request)
            if request.method == "GET":
                return _page(200, _confirm(item, decision, person, str(request.url.query)))
            reason = await _reason(request)
            client = f"{request.client.host}:{request.client.port}" if request.client else None
            item = await self._approvals.decide(item.id, decision, person, reason, client)
        except BastionError as exc:
            status = exc.http_status if 400 <= exc.http_status < 600 else 400
            return _page(status, f"<h1>Refused</h1><p>{html.escape(exc.message)}</p>")
        done = "approved" if item.status == "approved" else "denied"
        return _page(200, f"<h1>The call was {done}</h1><p>Recorded as {_e(person.name)}.</p>")

    async def _check(self, request: Request) -> tuple[Person, PendingApproval, str]:
        """Who the link is for, the item and the decision; refusing a program's request, a
        link not signed here and an item no longer pending before anything is shown."""
        if "authorization" in request.headers or "dpop" in request.headers:
            raise ApprovalRefused(_AGENT)
        approval_id = request.path_params["approval_id"]
        decision = request.path_params["decision"]
        if decision not in DECISIONS:
            raise ApprovalRefused("expected approve or deny in the link")
        query = dict(request.query_params)
        person = self._approvals.check_link(approval_id, decision, query)
        item = await self._approvals.get(approval_id)
        return person, item, decision


async def _reason(request: Request) -> str | None:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            raise ApprovalRefused(f"the form is larger than {_MAX_FORM} bytes")
    fields = dict(parse_qsl(body.decode("utf-8", "replace")))
    reason = fields.get("reason", "").strip()
    return reason or None


def _confirm(item: PendingApproval, decision: str, person: Person, query: str) -> str:
    status = "" if item.status == "pending" else f"<p><b>Already {_e(item.status)}.</b></p>"
    tools = ", ".join(item.history.get("tools", [])) or "none"
    return (
        f"<h1>{_e(decision.capitalize())} this call, {_e(person.name)}?</h1>{status}"
        f"<pre>{_e(str(item.shown.get('text', '')))}</pre>"
        f"<p>Tools this agent called recently: {_e(tools)}</p>"
        f'<form method="post" action="{_e(PREFIX)}/{_e(item.id)}/{_e(decision)}?{_e(query)}">'
        '<label>Reason <input name="reason" maxlength="500"></label> '
        f'<button type="submit">{_e(decision.capitalize())}</button></form>'
    )


def _page(status: int, body: str) -> HTMLResponse:
    text = (
        '<!doctype html><html><head><meta charset="utf-8"><title>Bastion approval</title>'
        f"</head><body>{body}</body></html>"
    )
    return HTMLResponse(text, status, headers=_HEADERS)


def _e(text: str) -> str:
    return html.escape(text, quote=True)
