"""Demo upstream: a multi-tenant "workspace" MCP server (tasks and projects).

Modelled on the June 2025 Asana MCP incident, where one customer's data became
visible to another through the MCP integration. Two tenants, ``acme`` and
``globex``, share one server process; every tool is meant to see only the
caller's tenant. ``--leaky`` reintroduces the bug class on purpose: the
``search_tasks`` cache is keyed by the query string alone, so one tenant's
cached results are served to another tenant that searches for the same thing.

Who is calling? The Bastion gateway authenticates users and tells this server
the tenant. Until the identity work lands, the tenant is read from the HTTP
request header ``X-Bastion-Tenant`` (HTTP transport) or from the environment
variable ``WORKSPACE_TENANT`` (stdio transport); all of that lives in
``caller_tenant()`` so it can be swapped for verification of a gateway-minted
JWT without touching the tools.

Transports: Streamable HTTP at ``/mcp`` serving both protocol eras on the one
endpoint (handshake-era sessions for 2025-06-18 / 2025-11-25, and the stateless
per-request 2026-07-28 era, routed by the SDK on the ``MCP-Protocol-Version``
header), plus stdio (also dual-era). ``GET /healthz`` answers ``ok``.

All data is fake and lives in memory. ``send_report`` only appends to an
in-memory outbox; nothing ever leaves the process.

Usage::

    python examples/workspace_server.py [--host 127.0.0.1] [--port 9101]
                                        [--transport http|stdio] [--leaky]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from demo_serving import run, serve_http
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations

TENANT_HEADER = "x-bastion-tenant"
TENANT_ENV = "WORKSPACE_TENANT"
_TENANT_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

Status = Literal["todo", "in_progress", "done"]


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


@dataclass
class Project:
    id: str
    name: str
    owner: str


@dataclass
class Task:
    id: str
    project_id: str
    title: str
    status: str
    assignee: str


def _seed() -> dict[str, dict[str, Any]]:
    """Fresh copy of the demo data. Every id starts with its tenant."""
    return {
        "acme": {
            "projects": {
                "acme-p1": Project("acme-p1", "Website relaunch", "wile.e@acme.example"),
                "acme-p2": Project(
                    "acme-p2", "Customer onboarding revamp", "road.runner@acme.example"
                ),
            },
            "tasks": {
                "acme-t1": Task(
                    "acme-t1",
                    "acme-p1",
                    "Draft new homepage copy",
                    "in_progress",
                    "wile.e@acme.example",
                ),
                "acme-t2": Task(
                    "acme-t2", "acme-p1", "Move DNS to the new CDN", "todo", "ops@acme.example"
                ),
                "acme-t3": Task(
                    "acme-t3",
                    "acme-p1",
                    "Accessibility audit of checkout",
                    "todo",
                    "qa@acme.example",
                ),
                "acme-t4": Task(
                    "acme-t4",
                    "acme-p2",
                    "Welcome email sequence for Initrode",
                    "done",
                    "road.runner@acme.example",
                ),
                "acme-t5": Task(
                    "acme-t5", "acme-p2", "Onboarding call script v2", "todo", "sales@acme.example"
                ),
            },
        },
        "globex": {
            "projects": {
                "globex-p1": Project(
                    "globex-p1", "Q3 corporate development", "hank.scorpio@globex.example"
                ),
                "globex-p2": Project(
                    "globex-p2", "Cypress Creek plant safety", "safety@globex.example"
                ),
            },
            "tasks": {
                "globex-t1": Task(
                    "globex-t1",
                    "globex-p2",
                    "Update OSHA incident log",
                    "in_progress",
                    "safety@globex.example",
                ),
                "globex-t2": Task(
                    "globex-t2",
                    "globex-p2",
                    "Vendor shortlist for hammock supplier",
                    "todo",
                    "ops@globex.example",
                ),
                "globex-t3": Task(
                    "globex-t3",
                    "globex-p1",
                    "Q3 merger plan — confidential",
                    "in_progress",
                    "hank.scorpio@globex.example",
                ),
                "globex-t4": Task(
                    "globex-t4",
                    "globex-p1",
                    "Board deck: acquisition targets",
                    "todo",
                    "cfo@globex.example",
                ),
            },
        },
    }


class Workspace:
    """In-memory store for all tenants. Single event loop, async tools only: no locking needed."""

    def __init__(self, *, leaky: bool = False) -> None:
        self.leaky = leaky
        self.data = _seed()
        self.outbox: list[dict[str, str]] = []
        # The search cache. Leaky mode keys it by query only: the Asana bug class.
        self.search_cache: dict[Any, list[dict[str, Any]]] = {}
        self._report_ids = itertools.count(1)

    # -- tenant scoping ------------------------------------------------------ #

    def tenant_data(self, tenant: str) -> dict[str, Any]:
        try:
            return self.data[tenant]
        except KeyError:
            raise ToolError(f"unknown tenant {tenant!r}") from None

    def project(self, tenant: str, project_id: str) -> Project:
        project: Project | None = self.tenant_data(tenant)["projects"].get(project_id)
        if project is None:
            raise ToolError(f"project {project_id!r} not found")
        return project

    def task(self, tenant: str, task_id: str) -> Task:
        task: Task | None = self.tenant_data(tenant)["tasks"].get(task_id)
        if task is None:
            raise ToolError(f"task {task_id!r} not found")
        return task

    def project_tasks(self, tenant: str, project_id: str) -> list[Task]:
        return [t for t in self.tenant_data(tenant)["tasks"].values() if t.project_id == project_id]

    def _next_id(self, tenant: str, kind: str) -> str:
        used = self.tenant_data(tenant)["tasks" if kind == "t" else "projects"]
        numbers = [
            int(m.group(1))
            for k in used
            if (m := re.fullmatch(rf"{re.escape(tenant)}-{kind}(\d+)", k))
        ]
        return f"{tenant}-{kind}{max(numbers, default=0) + 1}"

    # -- operations ---------------------------------------------------------- #

    def search(self, tenant: str, query: str) -> list[dict[str, Any]]:
        normalized = query.strip().lower()
        key: Any = normalized if self.leaky else (tenant, normalized)
        cached = self.search_cache.get(key)
        if cached is not None:
            return copy.deepcopy(cached)
        hits = [
            asdict(t)
            for t in self.tenant_data(tenant)["tasks"].values()
            if normalized in t.title.lower()
        ]
        self.search_cache[key] = hits
        return copy.deepcopy(hits)

    def create_task(self, tenant: str, project_id: str, title: str) -> Task:
        self.project(tenant, project_id)
        title = title.strip()
        if not title:
            raise ToolError("title must not be empty")
        task = Task(self._next_id(tenant, "t"), project_id, title, "todo", "")
        self.tenant_data(tenant)["tasks"][task.id] = task
        self.search_cache.clear()
        return task

    def update_task(self, tenant: str, task_id: str, status: str) -> Task:
        task = self.task(tenant, task_id)
        task.status = status
        self.search_cache.clear()
        return task

    def delete_project(self, tenant: str, project_id: str) -> list[str]:
        self.project(tenant, project_id)
        data = self.tenant_data(tenant)
        removed = [t.id for t in self.project_tasks(tenant, project_id)]
        for task_id in removed:
            del data["tasks"][task_id]
        del data["projects"][project_id]
        self.search_cache.clear()
        return removed

    def send_report(self, tenant: str, to: str, body: str) -> dict[str, str]:
        report = {
            "id": f"{tenant}-r{next(self._report_ids)}",
            "tenant": tenant,
            "to": to,
            "body": body,
        }
        self.outbox.append(report)
        return report


# --------------------------------------------------------------------------- #
# Caller identity (the one place to replace with JWT verification)
# --------------------------------------------------------------------------- #


class NoTenant(Exception):
    """The request carries no usable tenant."""


def caller_tenant(ctx: Context) -> str:
    """Return the tenant of the caller of the current request.

    HTTP behind Bastion (``--issuer``): the ``tenant`` claim of the JWT Bastion minted for
    this call, verified against Bastion's JWKS (issuer, this server's audience, ≤ 60 s).
    HTTP without ``--issuer`` (standalone development): the ``X-Bastion-Tenant`` header.
    stdio (no HTTP request behind the message): ``$WORKSPACE_TENANT``.
    An HTTP request without the header never falls back to the environment.

    Raises:
        NoTenant: no (valid) tenant in the credential.
    """
    headers: Mapping[str, str] | None
    try:
        headers = ctx.headers
    except ValueError:  # no request context at all
        headers = None
    if headers is not None and _VERIFIER is not None:
        raw = _VERIFIER.tenant(headers.get("authorization"))
    elif headers is not None:
        raw = headers.get(TENANT_HEADER)
    else:
        raw = os.environ.get(TENANT_ENV)
    tenant = (raw or "").strip().lower()
    if not tenant or not _TENANT_RE.fullmatch(tenant):
        raise NoTenant("no tenant in the credential")
    return tenant


class BastionCredential:
    """Checks the short-lived JWT Bastion sends with each call and reads the tenant from it."""

    def __init__(self, issuer: str, audience: str) -> None:
        import jwt

        self._jwt = jwt
        self._issuer = issuer.rstrip("/")
        self._audience = audience
        self._keys = jwt.PyJWKClient(f"{self._issuer}/.well-known/jwks.json", lifespan=300)

    def tenant(self, authorization: str | None) -> str:
        """The verified tenant claim, or NoTenant saying what was wrong."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise NoTenant("no tenant in the credential: expected a Bearer token from Bastion")
        try:
            key = self._keys.get_signing_key_from_jwt(token)
            claims = self._jwt.decode(
                token,
                key.key,
                algorithms=["ES256", "EdDSA", "RS256"],
                audience=self._audience,
                issuer=self._issuer,
                leeway=5,
                options={"require": ["exp", "iat", "tenant"]},
            )
        except self._jwt.PyJWTError as exc:
            raise NoTenant(f"no tenant in the credential: {exc}") from None
        if float(claims["exp"]) - float(claims["iat"]) > 60:
            raise NoTenant("no tenant in the credential: Bastion credentials live at most 60 s")
        return str(claims["tenant"])


_VERIFIER: BastionCredential | None = None


def _tool_tenant(ctx: Context) -> str:
    try:
        return caller_tenant(ctx)
    except NoTenant as exc:
        raise ToolError(str(exc)) from None


# --------------------------------------------------------------------------- #
# Server
# --------------------------------------------------------------------------- #


def _read_only(title: str) -> ToolAnnotations:
    return ToolAnnotations(
        title=title,
        read_only_hint=True,
        destructive_hint=False,
        idempotent_hint=True,
        open_world_hint=False,
    )


def build_server(*, leaky: bool = False) -> tuple[MCPServer, Workspace]:
    ws = Workspace(leaky=leaky)
    mcp = MCPServer(
        name="bastion-demo-workspace",
        title="Demo workspace (projects & tasks)",
        version="0.1.0",
        instructions=(
            "Projects and tasks of the caller's workspace. Ids look like <tenant>-p<n> (projects) "
            "and <tenant>-t<n> (tasks)."
        ),
        log_level="WARNING",
    )

    @mcp.tool(
        title="List projects",
        description="List the projects in the caller's workspace.",
        annotations=_read_only("List projects"),
    )
    async def list_projects(ctx: Context) -> dict[str, Any]:
        tenant = _tool_tenant(ctx)
        data = ws.tenant_data(tenant)
        return {
            "projects": [
                {**asdict(p), "task_count": len(ws.project_tasks(tenant, p.id))}
                for p in data["projects"].values()
            ]
        }

    @mcp.tool(
        title="Search tasks",
        description="Case-insensitive substring search over task titles in the caller's workspace.",
        annotations=_read_only("Search tasks"),
    )
    async def search_tasks(query: str, ctx: Context) -> dict[str, Any]:
        tenant = _tool_tenant(ctx)
        ws.tenant_data(tenant)
        return {"query": query, "tasks": ws.search(tenant, query)}

    @mcp.tool(
        title="Get task",
        description="Fetch one task of the caller's workspace by id (e.g. acme-t1).",
        annotations=_read_only("Get task"),
    )
    async def get_task(task_id: str, ctx: Context) -> dict[str, Any]:
        return asdict(ws.task(_tool_tenant(ctx), task_id))

    @mcp.tool(
        title="Create task",
        description="Create a new task (status 'todo') in one of the caller's projects.",
        annotations=ToolAnnotations(
            title="Create task",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=False,
        ),
    )
    async def create_task(project_id: str, title: str, ctx: Context) -> dict[str, Any]:
        return asdict(ws.create_task(_tool_tenant(ctx), project_id, title))

    @mcp.tool(
        title="Update task status",
        description="Set the status of one of the caller's tasks to todo, in_progress or done.",
        annotations=ToolAnnotations(
            title="Update task status",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    async def update_task(task_id: str, status: Status, ctx: Context) -> dict[str, Any]:
        return asdict(ws.update_task(_tool_tenant(ctx), task_id, status))

    @mcp.tool(
        title="Delete project",
        description="Permanently delete one of the caller's projects and all of its tasks.",
        annotations=ToolAnnotations(
            title="Delete project",
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    async def delete_project(project_id: str, ctx: Context) -> dict[str, Any]:
        removed = ws.delete_project(_tool_tenant(ctx), project_id)
        return {"deleted_project": project_id, "deleted_tasks": removed}

    @mcp.tool(
        title="Send report",
        description=(
            "Email a status report to an address outside the workspace. "
            "(Demo: the message is only recorded in an in-memory outbox; nothing is sent.)"
        ),
        annotations=ToolAnnotations(
            title="Send report",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=True,
        ),
    )
    async def send_report(to: str, body: str, ctx: Context) -> dict[str, Any]:
        report = ws.send_report(_tool_tenant(ctx), to, body)
        return {"queued": True, "report_id": report["id"], "to": to}

    # -- resources ----------------------------------------------------------- #

    @mcp.resource(
        "workspace://about",
        name="about",
        title="About this workspace server",
        description="What this demo server is and how tenants are scoped.",
        mime_type="text/markdown",
    )
    def about() -> str:
        return (
            "# Demo workspace server\n\n"
            "Projects and tasks per tenant. Read a project as "
            "`workspace://{tenant}/projects/{project_id}` (your own tenant only).\n"
        )

    @mcp.resource(
        "workspace://{tenant}/projects/{project_id}",
        name="project",
        title="Project with its tasks",
        description="One project of the caller's tenant and its tasks, as JSON.",
        mime_type="application/json",
    )
    async def project_resource(tenant: str, project_id: str, ctx: Context) -> str:
        try:
            caller = caller_tenant(ctx)
        except NoTenant as exc:
            raise ResourceError(str(exc)) from None
        if (
            tenant != caller
            or caller not in ws.data
            or project_id not in ws.data[caller]["projects"]
        ):
            raise ResourceNotFoundError(f"project {project_id!r} not found")
        project = ws.data[caller]["projects"][project_id]
        return json.dumps(
            {**asdict(project), "tasks": [asdict(t) for t in ws.project_tasks(caller, project_id)]},
            ensure_ascii=False,
        )

    # -- prompts ------------------------------------------------------------- #

    @mcp.prompt(
        title="Summarize project",
        description="Ask the model for a status summary of one of the caller's projects.",
    )
    async def summarize_project(project_id: str, ctx: Context) -> list[UserMessage]:
        try:
            tenant = caller_tenant(ctx)
            project = ws.project(tenant, project_id)
        except (NoTenant, ToolError) as exc:
            raise ValueError(str(exc)) from None
        lines = [f"- [{t.status}] {t.id}: {t.title}" for t in ws.project_tasks(tenant, project_id)]
        return [
            UserMessage(
                f"Summarize the status of project {project.name!r} ({project.id}) "
                "for a weekly update.\n"
                "Tasks:\n" + ("\n".join(lines) or "(no tasks)")
            )
        ]

    return mcp, ws


# --------------------------------------------------------------------------- #
# Serving
# --------------------------------------------------------------------------- #


def transport_security_for(
    host: str, extra_allowed_hosts: list[str]
) -> TransportSecuritySettings | None:
    """The SDK's loopback Host/Origin allow-list, plus any extra allowed Host values.

    Returns None for a non-loopback bind without extras (the SDK then does no Host/Origin checks).
    """
    if host in ("127.0.0.1", "localhost", "::1"):
        hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
        origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    elif extra_allowed_hosts:
        hosts, origins = [], []
    else:
        return None
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts + extra_allowed_hosts,
        allowed_origins=origins,
    )


def add_health_route(mcp: MCPServer) -> None:
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

    @mcp.custom_route("/healthz", methods=["GET"])
    async def healthz(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=9101, help="TCP port (0 = pick a free one)")
    parser.add_argument("--transport", choices=["http", "stdio"], default="http")
    parser.add_argument(
        "--issuer",
        help="Bastion's URL: trust only the JWTs it mints (tenant from their claim)",
    )
    parser.add_argument("--audience", help="this server's audience (default: its own /mcp URL)")
    parser.add_argument(
        "--leaky",
        action="store_true",
        default=os.environ.get("WORKSPACE_LEAKY") == "1",
        help="reproduce the cross-tenant search cache leak (also: WORKSPACE_LEAKY=1)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST[:PORT|:*]",
        help="extra Host header value to accept (DNS-rebinding allow-list); repeatable",
    )
    args = parser.parse_args(argv)

    if args.issuer:
        global _VERIFIER
        audience = args.audience or f"http://{args.host}:{args.port}/mcp"
        _VERIFIER = BastionCredential(args.issuer, audience)
    mcp, _ = build_server(leaky=args.leaky)
    if args.transport == "stdio":
        mcp.run("stdio")
        return 0

    add_health_route(mcp)
    app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        json_response=False,
        stateless_http=False,  # handshake-era clients get Mcp-Session-Id sessions
        transport_security=transport_security_for(args.host, args.allowed_host),
        host=args.host,
    )
    label = "workspace server" + (" (LEAKY)" if args.leaky else "")
    run(serve_http(app, args.host, args.port, label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
