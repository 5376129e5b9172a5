"""The operators' console: server-rendered pages under /console (Starlette + Jinja2).

```
GET  /console/                      overview: calls, denials, contained answers, alerts per hour
GET  /console/agents                inventory; POST .../agents/{id}/suspend|resume|offboard|rotate
GET  /console/upstreams             changed definitions to approve, quarantines, environments
GET  /console/policy                grants, Cedar text, lint; POST /console/policy/explain
GET  /console/audit                 search; /audit/record?writer=&seq=, /audit/export, /verify
GET  /console/alerts                the newest alerts
GET  /console/reviews               the open access review; POST start, decide, close
GET  /console/approvals             held calls, live (approvals.js polls /approvals/queue)
```

Logins, sessions, CSRF and roles: see auth.py. Assets are shipped in the package (static/),
nothing is fetched from elsewhere, and the pages work offline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bastion.asgi import ASGIApp
from bastion.audit import AuditWriter
from bastion.audit.export import jsonl_line
from bastion.audit.read import matches
from bastion.audit.record import AuditRecord
from bastion.config import Settings
from bastion.control.admin import params as ask
from bastion.control.admin.params import FILTERS, MAX_LIMIT
from bastion.control.console import views
from bastion.control.console.actions import Acts
from bastion.control.console.approvals import ApprovalPages
from bastion.control.console.auth import Logins, refused
from bastion.control.console.explain import explain
from bastion.control.console.oidc import OidcClient
from bastion.control.console.sessions import Session, may
from bastion.control.console.web import HERE, PREFIX, SecurityHeaders, Templates
from bastion.control.registry.locator import RegistryLocator
from bastion.errors import BastionError
from bastion.pipeline.chain import Pipeline
from bastion.policy.lint import lint
from bastion.state.secrets import resolve

__all__ = ["PREFIX", "console_app"]

Handler = Callable[[Request], Awaitable[Response]]
NAV = (
    ("overview", "/", "Overview"),
    ("agents", "/agents", "Agents"),
    ("upstreams", "/upstreams", "Upstreams & tools"),
    ("policy", "/policy", "Policy"),
    ("audit", "/audit", "Audit trail"),
    ("alerts", "/alerts", "Alerts"),
    ("reviews", "/reviews", "Access reviews"),
    ("approvals", "/approvals", "Approvals"),
)


async def console_app(
    settings: Settings,
    pipeline: Pipeline,
    writer: AuditWriter | None,
    token: str | None,
    registry: RegistryLocator | None,
    trust: RegistryLocator | None,
) -> ASGIApp:
    """The console for the front to mount at `PREFIX` (its OIDC secret resolved here)."""
    console = settings.console
    oidc = None
    if console.issuer is not None:
        secret = None
        if console.client_secret is not None:
            secret = await resolve(console.client_secret, "console.client_secret")
        oidc = OidcClient(console, secret)
    return SecurityHeaders(Console(settings, pipeline, writer, token, registry, trust, oidc).app())


class Console:
    """The console's pages over one gateway's settings, pipeline, trail, registry and pins."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        writer: AuditWriter | None,
        token: str | None,
        registry: RegistryLocator | None,
        trust: RegistryLocator | None,
        oidc: OidcClient | None,
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._registry = registry
        self._trust = trust
        self.templates = Templates()
        self.acts = Acts(settings, pipeline, writer, registry, trust)
        self.logins = Logins(settings, token, oidc, self.templates, self.acts.audit)
        self.approvals = ApprovalPages(pipeline, self)

    def app(self) -> Starlette:
        """The Starlette application: pages, forms, the shipped assets."""
        page = self._guarded
        routes = [
            Route("/", page(self.overview)),
            Route("/login", self.logins.page),
            Route("/login/token", self._errors(self.logins.with_token), methods=["POST"]),
            Route("/login/oidc", self._errors(self.logins.oidc_start)),
            Route("/auth/callback", self._errors(self.logins.oidc_callback)),
            Route("/logout", self._errors(self.logins.logout), methods=["POST"]),
            Route("/agents", page(self.agents)),
            Route("/agents/{agent_id}/{action}", self._errors(self.agent_act), methods=["POST"]),
            Route("/upstreams", page(self.upstreams)),
            Route("/upstreams/approve", self._errors(self.approve_pin), methods=["POST"]),
            Route("/upstreams/release", self._errors(self.release), methods=["POST"]),
            Route("/policy", page(self.policy)),
            Route("/policy/explain", self._errors(self.explain), methods=["POST"]),
            Route("/audit", page(self.audit)),
            Route("/audit/record", page(self.record)),
            Route("/audit/verify", page(self.verify)),
            Route("/audit/export", page(self.export)),
            Route("/alerts", page(self.alerts)),
            Route("/reviews", page(self.reviews)),
            Route("/reviews/{act}", self._errors(self.review_act), methods=["POST"]),
            *self.approvals.routes(page, self._errors),
        ]
        static = StaticFiles(directory=HERE / "static")
        return Starlette(
            routes=[Mount(PREFIX, routes=[*routes, Mount("/static", static, name="static")])],
            exception_handlers={HTTPException: self._http_error},
        )

    # -- plumbing ----------------------------------------------------------------------------

    def _guarded(self, handler: Callable[[Request, Session], Awaitable[Response]]) -> Handler:
        """A page for anyone logged in (viewer and up); the login page otherwise."""

        async def run(request: Request) -> Response:
            if self.logins.session(request) is None:
                return RedirectResponse(f"{PREFIX}/login", 303)
            return await self._errors(lambda r: handler(r, self.logins.require(r, "view")))(request)

        return run

    def _errors(self, handler: Handler) -> Handler:
        """Refusals and bad input as a page with the right status, never a traceback."""

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as exc:
                if exc.status_code == 401:
                    return await self.logins.page(request, exc.detail, 401)
                return self.problem(request, exc.status_code, exc.detail)
            except BastionError as exc:
                status = exc.http_status if 400 <= exc.http_status < 600 else 400
                return self.problem(request, status, exc.message)

        return run

    def problem(self, request: Request, status: int, message: str) -> Response:
        """An error page."""
        session = self.logins.session(request)
        return self.render(request, session, "problem.html", status, message=message)

    def render(
        self, request: Request, session: Session | None, name: str, status: int = 200, **values: Any
    ) -> Response:
        """A page in the console's frame, with the session's CSRF token and pending notice."""
        current = request.url.path.removeprefix(PREFIX).split("/")[1] or "overview"
        notice = None
        if session is not None:
            notice, session.notice = session.notice, None
        return self.templates.render(
            name,
            status,
            nav=NAV,
            current=current,
            session=session,
            person=session.person if session else None,
            csrf=session.csrf if session else "",
            can=(lambda right: session is not None and may(session.person, right)),
            notice=notice,
            **values,
        )

    def done(self, session: Session, message: str, where: str) -> Response:
        """After a form: back to its page (303), which shows what was done."""
        session.notice = message
        return RedirectResponse(f"{PREFIX}{where}", 303)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # noqa: S101 - registered for it only
        message = "no such page" if exc.status_code == 404 else "method not allowed"
        return self.problem(request, exc.status_code, message)

    # -- pages ---------------------------------------------------------------------------------

    async def overview(self, request: Request, session: Session) -> Response:
        """Calls, denials, contained answers and alerts of the last day, per hour."""
        data = await asyncio.to_thread(views.overview, self._settings, time.time())
        return self.render(request, session, "overview.html", **data)

    async def agents(self, request: Request, session: Session) -> Response:
        """The agent inventory with its actions."""
        found = await asyncio.to_thread(views.agents, self._registry)
        return self.render(request, session, "agents.html", agents=found, when=_when)

    async def upstreams(self, request: Request, session: Session) -> Response:
        """Upstreams and their environments, pending definitions, quarantines."""
        trust = await asyncio.to_thread(views.trust, self._trust)
        where = self._settings.environment_of
        upstreams = [
            {"name": name, "transport": up.transport, "environment": where(name)}
            for name, up in sorted(self._settings.upstreams.items())
        ]
        return self.render(
            request, session, "upstreams.html", upstreams=upstreams, trust=trust,
            environment=self._settings.environment, when=_when, dumps=_dumps,
        )  # fmt: skip

    async def policy(self, request: Request, session: Session, result: Any = None) -> Response:
        """Grants, the Cedar text in force, lint findings and the explain form."""
        engine = self._pipeline.authz.engine
        docs = [] if engine is None else sorted(engine.docs.values(), key=lambda d: d.id)
        findings = [] if engine is None else await asyncio.to_thread(lint, engine)
        return self.render(
            request, session, "policy.html", grants=self._settings.policy.grants, docs=docs,
            findings=findings, result=result, problem=self._pipeline.authz.problem,
        )  # fmt: skip

    async def audit(self, request: Request, session: Session) -> Response:
        """The search form and the newest matching records."""
        params = ask.params(request, (*FILTERS, "limit"))
        query = ask.audit_query(params, ask.count(params, "limit", 100))
        rows = await asyncio.to_thread(views.search, self._settings, query)
        export = request.url.query
        return self.render(request, session, "audit.html", rows=rows, params=params, export=export)

    async def record(self, request: Request, session: Session) -> Response:
        """One record: its content, chain position, and whether its links hold."""
        params = ask.params(request, ("writer", "seq"))
        writer = params.get("writer", "")
        seq = ask.count(params, "seq", 0)
        found = await asyncio.to_thread(views.record_view, self._settings, writer, seq)
        return self.render(request, session, "record.html", **found)

    async def verify(self, request: Request, session: Session) -> Response:
        """The whole trail verified, as `bastion audit verify` does."""
        ask.params(request, ())
        report = await asyncio.to_thread(views.verify, self._settings)
        return self.render(request, session, "verify.html", report=report)

    async def export(self, request: Request, session: Session) -> Response:
        """Matching records as JSON lines (`bastion audit export`), streamed."""
        params = ask.params(request, (*FILTERS, "limit"))
        query = ask.audit_query(params, MAX_LIMIT)
        store = await asyncio.to_thread(views._open, self._settings)

        def lines() -> Iterator[bytes]:
            try:
                for entry in store.read():
                    if matches(query, AuditRecord.from_json(entry.record)):
                        yield jsonl_line(entry) + b"\n"
            finally:
                store.close()

        headers = {"content-disposition": 'attachment; filename="bastion-audit.jsonl"'}
        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)

    async def alerts(self, request: Request, session: Session) -> Response:
        """The newest alerts."""
        rows = await asyncio.to_thread(views.alerts, self._settings)
        return self.render(request, session, "alerts.html", rows=rows)

    async def reviews(self, request: Request, session: Session) -> Response:
        """The open (else the last) access review with its findings and decisions."""
        review = await asyncio.to_thread(views.reviews, self._settings, self._registry)
        decided = {} if review is None else {d.finding_id: d for d in review.decisions}
        return self.render(
            request, session, "reviews.html", review=review, decided=decided, when=_when
        )

    # -- forms ---------------------------------------------------------------------------------

    async def agent_act(self, request: Request) -> Response:
        """Suspend, resume, offboard or rotate the key of an agent (operators)."""
        session, fields = await self.logins.posted(request, "operate")
        agent_id, action = request.path_params["agent_id"], request.path_params["action"]
        person = session.person
        if action == "rotate":
            message = await self.acts.rotate_key(person, agent_id, fields.get("key", ""), request)
        else:
            reason = fields.get("reason", "").strip()[:500]
            message = await self.acts.agent_status(person, agent_id, action, reason, request)
        return self.done(session, message, "/agents")

    async def approve_pin(self, request: Request) -> Response:
        """Approve a changed tool, prompt or template (operators)."""
        session, fields = await self.logins.posted(request, "operate")
        return self.done(session, await self.acts.approve_pin(session.person, fields, request),
                         "/upstreams")  # fmt: skip

    async def release(self, request: Request) -> Response:
        """Release a quarantined upstream (operators)."""
        session, fields = await self.logins.posted(request, "operate")
        return self.done(session, await self.acts.release(session.person, fields, request),
                         "/upstreams")  # fmt: skip

    async def explain(self, request: Request) -> Response:
        """Why a request would be allowed or denied (anyone logged in: it changes nothing)."""
        session, fields = await self.logins.posted(request, "view")
        result = await explain(self._settings, self._pipeline, fields)
        return await self.policy(request, session, result)

    async def review_act(self, request: Request) -> Response:
        """Start the review, decide a finding, or close the review (operators)."""
        session, fields = await self.logins.posted(request, "operate")
        act, person = request.path_params["act"], session.person
        if act == "start":
            message = await self.acts.start_review(person, request)
        elif act == "decide":
            message = await self.acts.decide_finding(person, fields, request)
        elif act == "close":
            message = await self.acts.close_review(person, request)
        else:
            raise refused(404, "no such review act")
        return self.done(session, message, "/reviews")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
