"""The admin API: the operators' HTTP interface to the audit trail and the agent registry.

The same operations as `bastion audit` and `bastion agents`, mounted under /admin on the
gateway's port (Starlette), behind `AdminGuard` (a bearer token, see auth.py):

```
GET  /admin/audit/records?tenant=&agent=&tool=&decision=&phase=&since=&until=&limit=
GET  /admin/audit/tail?count=
GET  /admin/audit/export?format=jsonl|ocsf&<the filters of records>   (application/x-ndjson)
GET  /admin/audit/verify            200 intact, 409 tampered (naming the first bad record)
GET  /admin/agents?tenant=&status=
GET  /admin/agents/{id}
POST /admin/agents/{id}/suspend|resume|offboard    {"reason": "..."} (suspend, offboard)
GET  /admin/inventory?days=                         `bastion inventory --json`
POST /admin/owners/{owner}/offboard                 {"reason": "...", "reassign": "NEW_OWNER"}
GET  /admin/pins?state=approved|pending&upstream=&kind=
GET  /admin/pins/{upstream}/{kind}/{name}/diff     the pin and each pending version's diff
POST /admin/pins/{upstream}/{kind}/{name}/approve  {"digest": "...", "reason": "..."}
GET  /admin/quarantines?all=true
POST /admin/quarantines/{upstream}/release         {"reason": "..."}
GET  /admin/approvals, /admin/approvals/{id}        held calls (see approvals.py)
POST /admin/approvals/{id}/approve|deny|links
```

Errors are `{"error": code, "message": ...}` with the status the error knows (400 naming the
parameter, 404 unknown agent, 409 conflict). Store reads and registry writes run in worker
threads, never on the event loop that serves MCP. A registry change made here takes effect on
the running gateway at once: its view reloads and the agent's sessions and cached upstream
credentials are dropped when it may no longer call; the change is written to the audit trail.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route

from bastion.asgi import ASGIApp
from bastion.audit import AuditRecord, AuditStore, AuditWriter, Query
from bastion.audit.chain import Entry
from bastion.audit.export import jsonl_line, ocsf_line
from bastion.audit.keys import audit_dir
from bastion.audit.read import matches, report_json, verify_trail
from bastion.audit.trail import open_trail_reader
from bastion.config import Settings
from bastion.control.admin import params as ask
from bastion.control.admin.approvals import ApprovalApi
from bastion.control.admin.auth import AdminGuard
from bastion.control.admin.params import FILTERS, MAX_LIMIT
from bastion.control.admin.reviews import ReviewApi
from bastion.control.governance.inventory import build_inventory, read_usage
from bastion.control.governance.offboard import offboard_owner
from bastion.control.governance.offboard import records as offboard_records
from bastion.control.registry.agents import Agent, AgentStatus
from bastion.control.registry.locator import RegistryLocator, registry_call, trust_call
from bastion.control.registry.store import SqlRegistry
from bastion.control.registry.trust import SqlTrustStore
from bastion.errors import AuditUnavailable, BadRequest, BastionError, NotAvailable, shown
from bastion.inspect.pins import KINDS
from bastion.pipeline.chain import Pipeline

log = logging.getLogger("bastion.admin")
T = TypeVar("T")

PREFIX = "/admin"
EXPORT_BATCH = 500  # lines per chunk (and per worker-thread hop) of an export
_MAX_DAYS = 3650  # the inventory's usage window
_ACTIONS = {
    "suspend": AgentStatus.SUSPENDED,
    "resume": AgentStatus.ACTIVE,
    "offboard": AgentStatus.OFFBOARDED,
}


def admin_app(
    settings: Settings,
    pipeline: Pipeline,
    writer: AuditWriter | None,
    token: str,
    registry: RegistryLocator | None,
    trust: RegistryLocator | None = None,
) -> ASGIApp:
    """The guarded admin application for the front to mount at `PREFIX`."""
    return AdminGuard(AdminApi(settings, pipeline, writer, registry, trust).app(), token)


class AdminApi:
    """The admin endpoints over one gateway's pipeline, audit writer and registry file."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        writer: AuditWriter | None,
        registry: RegistryLocator | None,
        trust: RegistryLocator | None = None,
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._writer = writer
        self._registry = registry
        self._trust = trust
        self._folder = audit_dir(settings.state_dir)

    def app(self) -> Starlette:
        """The Starlette application with every route and JSON error answers."""
        routes = [
            Route("/audit/records", self.records),
            Route("/audit/tail", self.tail),
            Route("/audit/export", self.export),
            Route("/audit/verify", self.verify),
            Route("/agents", self.agents),
            Route("/agents/{agent_id}", self.agent),
            Route("/agents/{agent_id}/{action}", self.change, methods=["POST"]),
            Route("/inventory", self.inventory),
            Route("/owners/{owner}/offboard", self.offboard, methods=["POST"]),
            Route("/pins", self.pins),
            Route("/pins/{upstream}/{kind}/{name:path}/diff", self.pin_diff),
            Route("/pins/{upstream}/{kind}/{name:path}/approve", self.approve, methods=["POST"]),
            Route("/quarantines", self.quarantines),
            Route("/quarantines/{upstream}/release", self.release, methods=["POST"]),
            *ReviewApi(self._settings, self._pipeline, self._writer).routes(),
            *ApprovalApi(self._settings, self._pipeline.approval.approvals).routes(),
        ]
        return Starlette(
            routes=[Mount(PREFIX, routes=routes)],
            exception_handlers={BastionError: _bastion_error, HTTPException: _http_error},
        )

    # --- the audit trail --------------------------------------------------------------------

    async def records(self, request: Request) -> Response:
        """Records matching the filters, the newest `limit` (default 100), oldest first."""
        params = ask.params(request, (*FILTERS, "limit"))
        query = ask.audit_query(params, ask.count(params, "limit", 100))
        return await self._read(lambda store: _records_body(store.query(query)))

    async def tail(self, request: Request) -> Response:
        """The last `count` records (default 20), oldest first."""
        count = ask.count(ask.params(request, ("count",)), "count", 20)
        return await self._read(
            lambda store: _records_body([entry for _, entry in store.tail(count)])
        )

    async def export(self, request: Request) -> Response:
        """Every matching record in append order, one JSON object a line, streamed."""
        params = ask.params(request, (*FILTERS, "format"))
        kind = params.get("format", "jsonl")
        if kind not in ("jsonl", "ocsf"):
            raise BadRequest("format", f"expected jsonl or ocsf, found {shown(kind)}")
        query = ask.audit_query(params, MAX_LIMIT)
        filtered = any(name in params for name in FILTERS)
        store = await asyncio.to_thread(self._open)
        line = jsonl_line if kind == "jsonl" else ocsf_line
        lines = _export(store, line, query if filtered else None)
        return StreamingResponse(
            lines, media_type="application/x-ndjson", headers={"cache-control": "no-store"}
        )

    async def verify(self, request: Request) -> Response:
        """`bastion audit verify --json`'s report: 200 when intact, 409 when tampered."""
        ask.params(request, ())
        report = await self._read(lambda store: verify_trail(store, self._folder, self._settings))
        body = report_json(report)
        if report.ok:
            return _json(200, body)
        log.error("admin verify: the audit trail was tampered with: %s", report.first)
        return _json(409, {"error": "audit.tampered", "message": str(report.first), **body})

    def _open(self) -> AuditStore:
        """The configured trail (SQLite or PostgreSQL), opened for reading."""
        if not self._settings.audit.enabled:
            raise NotAvailable("the audit trail is off (audit.enabled: false)")
        return open_trail_reader(self._settings)

    async def _read(self, work: Callable[[AuditStore], T]) -> T:
        """Open the trail, do `work` and close it, in a worker thread."""

        def run() -> T:
            store = self._open()
            try:
                return work(store)
            finally:
                store.close()

        return await asyncio.to_thread(run)

    # --- agents -----------------------------------------------------------------------------

    async def agents(self, request: Request) -> Response:
        """Registered agents by tenant and id, optionally of one tenant and/or status."""
        params = ask.params(request, ("tenant", "status"))
        status = params.get("status")
        if status is not None and status not in set(AgentStatus):
            choices = ", ".join(AgentStatus)
            raise BadRequest("status", f"expected one of {choices}, found {shown(status)}")
        tenant = params.get("tenant")
        found = await self._registry_call(
            lambda registry: registry.list(tenant, None if status is None else AgentStatus(status))
        )
        return _json(200, {"agents": [agent.to_dict() for agent in found]})

    async def agent(self, request: Request) -> Response:
        """One agent, keys included; 404 when there is none with this id."""
        ask.params(request, ())
        agent_id = request.path_params["agent_id"]
        found = await self._registry_call(lambda registry: registry.get(agent_id))
        return _json(200, {"agent": found.to_dict()})

    async def change(self, request: Request) -> Response:
        """Suspend, resume or offboard an agent, with the CLI's effect on this gateway."""
        ask.params(request, ())
        action = request.path_params["action"]
        status = _ACTIONS.get(action)
        if status is None:
            raise HTTPException(404)
        agent_id = request.path_params["agent_id"]
        reason = await ask.reason(request)
        agent = await self._registry_call(
            lambda registry: registry.set_status(agent_id, status, reason)
        )
        directory = self._pipeline.agents
        if directory is not None:  # in force here before answering, not at the next poll
            await directory.reread()
        audited = await self._audit(agent, action, reason, request)
        log.info("admin %s agent %r of tenant %r: %s", action, agent.id, agent.tenant, reason)
        return _json(200, {"agent": agent.to_dict(), "audited": audited})

    # --- governance: inventory, offboarding ---------------------------------------------------

    async def inventory(self, request: Request) -> Response:
        """`bastion inventory --json`, from this gateway's policy in force and its registry."""
        days = ask.count(ask.params(request, ("days",)), "days", 30)
        if days > _MAX_DAYS:
            raise BadRequest("days", f"expected at most {_MAX_DAYS}, found {days}")
        agents = [] if self._registry is None else await self._registry_call(lambda r: r.list())
        now = time.time()
        usage = await asyncio.to_thread(read_usage, self._settings, now - days * 86400.0)
        engine = self._pipeline.authz.engine
        found = build_inventory(self._settings, agents, engine, usage, now, days)
        return _json(200, found.to_dict())

    async def offboard(self, request: Request) -> Response:
        """Suspend (or with `reassign`, hand over) every agent of an owner; in force here
        before answering (sessions ended, cached credentials dropped); audited."""
        ask.params(request, ())
        owner = request.path_params["owner"]
        given = await ask.fields(request, ("reason", "reassign"))
        done = await self._registry_call(
            lambda registry: offboard_owner(
                registry, owner, new_owner=given.get("reassign"), reason=given.get("reason")
            )
        )
        directory = self._pipeline.agents
        if directory is not None:
            await directory.reread()
        client = request.client
        where = f"{client.host}:{client.port}" if client else None
        audited = await self._append(offboard_records(done, "admin", where))
        changed = len(done.changed)
        log.warning("admin offboarded owner %r (%s): %d agents", owner, done.action, changed)
        return _json(200, {"offboarding": done.to_dict(), "audited": audited})

    async def _append(self, batch: list[AuditRecord]) -> bool:
        """Write operator records to the trail; whether all were committed."""
        if self._writer is None:
            return False
        try:
            for record in batch:
                await self._writer.append(record, True)
        except AuditUnavailable as exc:
            log.error("admin act not audited: %s", exc.message)
            return False
        return True

    async def _registry_call(self, work: Callable[[SqlRegistry], T]) -> T:
        return await registry_call(self._registry, work)

    # --- upstream trust: pins and quarantines --------------------------------------------------

    async def pins(self, request: Request) -> Response:
        """Pinned and pending definitions, optionally of one state, upstream and kind."""
        params = ask.params(request, ("state", "upstream", "kind"))
        state = params.get("state")
        if state is not None and state not in ("approved", "pending"):
            raise BadRequest("state", f"expected approved or pending, found {shown(state)}")
        kind = params.get("kind")
        if kind is not None and kind not in KINDS:
            raise BadRequest("kind", f"expected one of {', '.join(KINDS)}, found {shown(kind)}")
        found = await self._trust_call(
            lambda store: store.pins(state, params.get("upstream"), kind)
        )
        return _json(200, {"pins": [pin.to_dict() for pin in found]})

    async def pin_diff(self, request: Request) -> Response:
        """One definition's pin and its pending versions, each with its diff."""
        ask.params(request, ())
        upstream, kind, name = _pin_key(request)
        body = await self._trust_call(lambda store: store.versions(upstream, kind, name))
        return _json(200, body)

    async def approve(self, request: Request) -> Response:
        """Make a pending version the pin: shown and callable again on every gateway of the
        store within its poll; audited."""
        ask.params(request, ())
        upstream, kind, name = _pin_key(request)
        given = await ask.fields(request, ("digest", "reason"))
        pin = await self._trust_call(
            lambda store: store.approve(upstream, kind, name, given.get("digest"), "admin")
        )
        detail = {"upstream": upstream, "kind": kind, "name": name, "digest": pin.digest}
        audited = await self._record("admin/tools/approve", detail, given.get("reason"), request)
        log.info("admin approved %s %r of upstream %r (%s)", kind, name, upstream, pin.digest)
        return _json(200, {"pin": pin.to_dict(), "audited": audited})

    async def quarantines(self, request: Request) -> Response:
        """Quarantined upstreams (every quarantine ever with `all=true`)."""
        params = ask.params(request, ("all",))
        every = params.get("all", "false")
        if every not in ("true", "false"):
            raise BadRequest("all", f"expected true or false, found {shown(every)}")
        found = await self._trust_call(lambda store: store.quarantines(every == "false"))
        return _json(200, {"quarantines": [q.to_dict() for q in found]})

    async def release(self, request: Request) -> Response:
        """Put a quarantined upstream back in service (every gateway of the store, within its
        poll); audited."""
        ask.params(request, ())
        upstream = request.path_params["upstream"]
        reason = await ask.reason(request)
        released = await self._trust_call(lambda store: store.release(upstream, "admin"))
        detail = {"upstream": upstream, "quarantined_for": released.reason}
        audited = await self._record("admin/quarantines/release", detail, reason, request)
        log.warning("admin released upstream %r from quarantine: %s", upstream, reason)
        return _json(200, {"quarantine": released.to_dict(), "audited": audited})

    async def _trust_call(self, work: Callable[[SqlTrustStore], T]) -> T:
        return await trust_call(self._trust, work)

    async def _record(
        self, method: str, detail: dict[str, Any], reason: str | None, request: Request
    ) -> bool:
        """An operator's act on upstream trust, in the trail; whether it was committed."""
        if self._writer is None:
            return False
        client = request.client
        record = AuditRecord(
            time=time.time(),
            request_id=uuid.uuid4().hex,
            phase="decision",
            client=f"{client.host}:{client.port}" if client else None,
            route=PREFIX,
            method=method,
            server=detail.get("upstream"),
            decision="allow",
            reason=reason,
            detail={"actor": "admin", **detail},
        )
        try:
            await self._writer.append(record, True)
        except AuditUnavailable as exc:
            log.error("admin %s not audited: %s", method, exc.message)
            return False
        return True

    async def _audit(self, agent: Agent, action: str, reason: str | None, request: Request) -> bool:
        """Record the change in the trail; whether it was committed."""
        if self._writer is None:
            return False
        client = request.client
        # The agent is named in `detail`, not `agent`: the change is the operator's act, and
        # the detectors must not count it as a call of the agent's.
        record = AuditRecord(
            time=time.time(),
            request_id=uuid.uuid4().hex,
            phase="decision",
            tenant=agent.tenant,
            client=f"{client.host}:{client.port}" if client else None,
            route=PREFIX,
            method=f"admin/agents/{action}",
            decision="allow",
            reason=reason,
            detail={"actor": "admin", "target_agent": agent.id, "status": str(agent.status)},
        )
        try:
            await self._writer.append(record, True)
        except AuditUnavailable as exc:
            log.error("admin %s of agent %r not audited: %s", action, agent.id, exc.message)
            return False
        return True


def _pin_key(request: Request) -> tuple[str, str, str]:
    """(upstream, kind, name) of a pin route; the kind checked."""
    kind = request.path_params["kind"]
    if kind not in KINDS:
        raise BadRequest("kind", f"expected one of {', '.join(KINDS)}, found {shown(kind)}")
    return request.path_params["upstream"], kind, request.path_params["name"]


# --- output -----------------------------------------------------------------------------------


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(
        orjson.dumps(body),
        status,
        headers={"cache-control": "no-store"},
        media_type="application/json",
    )


def _records_body(entries: list[Entry]) -> Response:
    """`{"count", "records"}`, each record as one `bastion audit export` line."""
    lines = b",".join(jsonl_line(entry) for entry in entries)
    body = b'{"count":%d,"records":[%b]}' % (len(entries), lines)
    return Response(body, headers={"cache-control": "no-store"}, media_type="application/json")


def _export(
    store: AuditStore, line: Callable[[Entry], bytes], query: Query | None
) -> Iterator[bytes]:
    """Chunks of export lines (Starlette pulls each in a worker thread); closes the store.

    A record that does not parse ends the stream with an error line: the status is sent.
    """
    batch: list[bytes] = []
    try:
        for entry in store.read():
            if query is not None and not matches(query, AuditRecord.from_json(entry.record)):
                continue
            batch.append(line(entry) + b"\n")
            if len(batch) >= EXPORT_BATCH:
                yield b"".join(batch)
                batch = []
        yield b"".join(batch)
    except (ValueError, BastionError) as exc:
        log.error("admin export stopped: %s", exc)
        error = {"error": "audit.unreadable", "message": f"{exc}; run bastion audit verify"}
        yield b"".join(batch) + orjson.dumps(error) + b"\n"
    finally:
        store.close()


async def _bastion_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BastionError)  # noqa: S101 - registered for BastionError only
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    parameter = getattr(exc, "parameter", None)
    if parameter is not None:
        body["parameter"] = parameter
    status = exc.http_status if 400 <= exc.http_status < 600 else 400
    return _json(status, body)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    what = f"{request.method} {shown(request.url.path)}"  # the path is the client's
    if exc.status_code == 405:
        body = {"error": "admin.method", "message": f"{what}: method not allowed"}
    else:
        body = {"error": "admin.not_found", "message": f"no admin endpoint {what}"}
    response = _json(exc.status_code, body)
    response.headers.update(exc.headers or {})
    return response
