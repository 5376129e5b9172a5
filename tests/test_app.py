"""The gateway's background work, in process, over real HTTP on loopback:

- the request path does no file and no registry I/O: every such access is counted, with who
  made it (the background work, or the tasks serving requests), while requests flow;
- the watchers pick up a policy edit, a suspension and a key rotation made through second
  handles on the same files, as the CLI makes them;
- a resource URI the route has not seen is learnt by the background as the gateway: no
  upstream receives anything carrying the caller's credential before the caller's decision;
- stopping the gateway leaves none of its tasks behind.

The upstream is a small aiohttp MCP server (2026-07-28) that records the credential of every
request it gets.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
import yaml
from aiohttp import web
from tests.conftest import MODERN, free_port, modern_body, modern_headers, until_async

from bastion import config
from bastion.app import Gateway
from bastion.control.assembly import build_gateway
from bastion.control.registry.agents import AgentStatus
from bastion.control.registry.store import SqliteRegistry
from bastion.errors import RegistryUnavailable
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey
from bastion.pipeline.catalog import INDEX_RETRY_SECONDS
from bastion.state.keystore import FileKeyStore
from bastion.transport.server import HttpServer

# Who is running: set to "background" while the gateway starts its background work, to
# "request" while the HTTP server starts (its connection tasks inherit it), then "client".
ROLE: ContextVar[str] = ContextVar("role", default="setup")
DOC = "rec://doc/1"
STEP = 10.0


@dataclass
class Seen:
    """One request the upstream received: the method, and who its credential speaks for."""

    method: str
    tenant: str | None
    agent: str | None
    kid: str | None


@dataclass
class Recorder:
    """A 2026-07-28 MCP server with one tool and one resource; records every request."""

    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        message = await request.json()
        self.seen.append(_seen(message.get("method"), request.headers.get("Authorization")))
        result = _answer(message.get("method"), message.get("params") or {})
        if result is None:
            error = {"code": -32601, "message": "no such method"}
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "error": error})
        reply = {
            "jsonrpc": "2.0",
            "id": message["id"],
            "result": {**result, "resultType": "complete"},
        }
        return web.json_response(reply)

    def of(self, tenant: str) -> list[Seen]:
        return [s for s in self.seen if s.tenant == tenant]


def _seen(method: str, authorization: str | None) -> Seen:
    if not authorization:
        return Seen(method, None, None, None)
    token = authorization.removeprefix("Bearer ")
    claims = pyjwt.decode(token, options={"verify_signature": False})
    kid = pyjwt.get_unverified_header(token).get("kid")
    return Seen(method, claims.get("tenant"), (claims.get("act") or {}).get("sub"), kid)


def _answer(method: str, params: dict[str, Any]) -> dict[str, Any] | None:
    if method == "server/discover":
        return {"supportedVersions": [MODERN], "capabilities": {"tools": {}, "resources": {}}}
    if method == "tools/list":
        return {"tools": [{"name": "note", "inputSchema": {"type": "object"}}]}
    if method == "tools/call":
        return {"content": [{"type": "text", "text": "noted"}]}
    if method == "resources/list":
        return {"resources": [{"uri": DOC, "name": "doc"}]}
    if method == "resources/templates/list":
        return {"resourceTemplates": []}
    if method == "resources/read":
        return {"contents": [{"uri": params.get("uri"), "text": "hello"}]}
    return None


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    upstream = Recorder()
    app = web.Application()
    app.add_routes([web.post("/mcp", upstream.handle)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    upstream.url = f"http://{host}:{port}/mcp"
    try:
        yield upstream
    finally:
        await runner.cleanup()


def settings_for(tmp: Path, upstream: str, port: int) -> config.Settings:
    policy = tmp / "gateway.cedar"
    policy.write_text('@id("baseline")\npermit (principal, action, resource) when { false };\n')
    document = {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_dir": str(tmp / "state"),
        "auth": {
            "mode": "oauth",
            "agents": [
                {"id": "acme-reader", "tenant": "acme", "owner": "tests", "purpose": "reads"},
                {"id": "globex-reader", "tenant": "globex", "owner": "tests", "purpose": "reads"},
            ],
        },
        "audit": {"enabled": False},
        "admin": {"enabled": False},
        "policy": {
            "files": [str(policy)],
            "reload_seconds": 0.1,
            "catalog_timeout_seconds": 5,
            "grants": [
                {
                    "id": "acme-rec",
                    "tenant": "acme",
                    "server": "rec",
                    "tools": "*",
                    "resources": "*",
                }
            ],
        },
        "upstreams": {"rec": {"transport": "http", "url": upstream, "protocol": "modern"}},
        "virtual_servers": {"default": {"path": "/mcp", "upstreams": ["rec"]}},
    }
    return config.parse(yaml.safe_dump(document), base=tmp)


@dataclass
class Running:
    """A started gateway, its settings, and an HTTP client as the agents."""

    gateway: Gateway
    settings: config.Settings
    http: httpx.AsyncClient

    @property
    def state(self) -> Path:
        return Path(self.settings.state_dir)

    def token(self, agent: str, tenant: str, key: SigningKey | None = None) -> str:
        """An access token as the embedded issuer mints it, signed with its current key."""
        if key is None:
            key = issuer_key(self.state)
        base = self.settings.base_url()
        now = int(time.time())
        claims = {
            "iss": base,
            "aud": base + "/mcp",
            "sub": agent,
            "client_id": agent,
            "agent": agent,
            "tenant": tenant,
            "scope": "mcp:tools mcp:resources mcp:prompts",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        return mint(key, claims, typ="at+jwt")

    async def post(
        self, token: str, method: str, params: dict[str, Any], name: str | None
    ) -> tuple[int, Any]:
        headers = {**modern_headers(method, name), "Authorization": f"Bearer {token}"}
        response = await self.http.post("/mcp", json=modern_body(method, params), headers=headers)
        return response.status_code, response.json()

    async def call(self, token: str) -> tuple[int, Any]:
        return await self.post(
            token, "tools/call", {"name": "rec__note", "arguments": {}}, "rec__note"
        )

    async def read(self, token: str, uri: str) -> tuple[int, Any]:
        return await self.post(token, "resources/read", {"uri": uri}, uri)


def issuer_key(state: Path) -> SigningKey:
    """The embedded issuer's current key, read from the state directory as the CLI reads it."""
    keys = FileKeyStore(state / "keys", "ES256", 3600)
    keys.load()
    return keys.current()


@contextlib.asynccontextmanager
async def running(tmp: Path, recorder: Recorder) -> AsyncIterator[Running]:
    port = free_port()
    settings = settings_for(tmp, recorder.url, port)
    gateway = await build_gateway(settings)
    ROLE.set("background")
    async with asyncio.timeout(30):
        await gateway.start()
    ROLE.set("request")
    server = HttpServer(gateway.front, max_body=65536, keepalive_timeout=5, header_timeout=5)
    try:
        await server.start("127.0.0.1", port)
        ROLE.set("client")
        async with httpx.AsyncClient(base_url=settings.base_url(), timeout=STEP) as http:
            yield Running(gateway, settings, http)
    finally:
        ROLE.set("setup")
        await server.stop(grace=1)
        async with asyncio.timeout(30):
            await gateway.stop()


class Accesses:
    """File and registry accesses under the test's directory, with who made them."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.log: list[tuple[str, str, str]] = []  # (what, role, detail)

    def note(self, what: str, detail: str) -> None:
        self.log.append((what, ROLE.get(), detail))

    def by(self, role: str) -> list[tuple[str, str, str]]:
        return [entry for entry in self.log if entry[1] == role]

    def install(self, monkeypatch: pytest.MonkeyPatch, registry: SqliteRegistry) -> None:
        real_stat, real_open = os.stat, io.open

        def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            if self.root in str(path):
                self.note("stat", str(path))
            return real_stat(path, *args, **kwargs)

        def open_(file: Any, *args: Any, **kwargs: Any) -> Any:
            if self.root in str(file):
                self.note("open", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "stat", stat)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(builtins, "open", open_)
        connection = registry.db  # the SQLite registry's Database: its sqlite3 connection
        monkeypatch.setattr(connection, "_db", _CountingDb(connection._db, self))


class _CountingDb:
    """The registry's SQLite connection, noting every statement and who ran it."""

    def __init__(self, db: Any, accesses: Accesses) -> None:
        self._db = db
        self._accesses = accesses

    def execute(self, sql: str, *args: Any) -> Any:
        self._accesses.note("sqlite", sql.split()[0])
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        self._accesses.note("sqlite", sql.split()[0])
        return self._db.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


# -- the request path reads snapshots only ----------------------------------------------------


async def test_requests_do_no_file_or_registry_io_while_the_watchers_pick_up_changes(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, recorder) as gw:
        registry = gw.gateway.pipeline.agents._registry  # type: ignore[union-attr]
        accesses = Accesses(tmp_path)
        acme = gw.token("acme-reader", "acme")
        globex = gw.token("globex-reader", "globex")
        accesses.install(monkeypatch, registry)
        background_before = len(accesses.by("background"))

        # Many requests, allowed and denied, while the watchers poll beside them.
        sent = 0
        while sent < 40 or len(accesses.by("background")) < background_before + 3:
            status, reply = await gw.call(acme)
            assert status == 200 and reply["result"]["content"][0]["text"] == "noted"
            status, reply = await gw.call(globex)
            assert reply["error"]["data"]["code"] == "policy.denied"
            status, reply = await gw.read(acme, DOC)
            assert reply["result"]["contents"][0]["text"] == "hello"
            sent += 3
        assert accesses.by("request") == []
        assert {what for what, _, _ in accesses.by("background")} >= {"sqlite", "stat"}

        # A policy edit: reloaded by the file watcher.
        policy = Path(gw.settings.policy.files[0])
        freeze = '@id("freeze") @reason("frozen")\nforbid (principal, action, resource);\n'
        policy.write_text(policy.read_text() + freeze)

        async def frozen() -> bool:
            _, reply = await gw.call(acme)
            return "error" in reply and bool(reply["error"]["data"]["policies"] == ["freeze"])

        await until_async(frozen)

        # Key rotations through a second handle on the key files (`bastion keys rotate`).
        cli_keys = FileKeyStore(gw.state / "keys", "ES256", 3600)
        cli_keys.load()
        first = cli_keys.rotate()
        signing = gw.gateway.pipeline.keys
        assert signing is not None

        async def rotated() -> bool:
            return bool(signing.current().kid == first.kid)  # type: ignore[attr-defined]

        await until_async(rotated)  # the key watcher polls every second
        # A token signed with a key newer still is accepted at once: a key the gateway does
        # not know asks the watcher to look now, rather than waiting for its next poll.
        second = cli_keys.rotate()
        status, reply = await gw.read(gw.token("acme-reader", "acme", second), "rec://other")
        assert status == 200 and "resource not found" in reply["error"]["message"]

        # A suspension through a second handle on the registry (`bastion agents suspend`).
        with SqliteRegistry(gw.state / "registry.db") as cli:
            cli.set_status("acme-reader", AgentStatus.SUSPENDED, "incident 12")

        async def refused() -> bool:
            status, reply = await gw.read(acme, DOC)
            return status == 401 and bool(reply["error"]["data"]["reason"] == "suspended")

        await until_async(refused)  # the registry is polled every 0.2 s
        assert accesses.by("request") == []


async def test_a_registry_that_cannot_be_read_fails_closed(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, recorder) as gw:
        view = gw.gateway.pipeline.agents
        acme = gw.token("acme-reader", "acme")
        assert (await gw.call(acme))[0] == 200

        def unreadable() -> int:
            raise RegistryUnavailable("registry: disk I/O error")

        # The registry file breaks, and meanwhile the agent is suspended elsewhere: serving
        # from the last copy would let it in. Once the copy is older than allowed (5 s;
        # 0.5 s here), every request is refused until the registry can be read again.
        monkeypatch.setattr(view, "_stale_after", 0.5)
        monkeypatch.setattr(view._registry, "version", unreadable)  # type: ignore[union-attr]

        async def refused() -> bool:
            status, reply = await gw.call(acme)
            return status == 503 and bool(reply["error"]["data"]["code"] == "registry.unavailable")

        await until_async(refused)
        monkeypatch.undo()
        await until_async(lambda: _allowed(gw, acme))


async def _allowed(gw: Running, token: str) -> bool:
    return (await gw.call(token))[0] == 200


# -- resource URIs are learnt as the gateway ----------------------------------------------


async def test_an_unseen_uri_is_learnt_as_the_gateway_never_with_the_callers_credential(
    tmp_path: Path, recorder: Recorder
) -> None:
    async with running(tmp_path, recorder) as gw:
        listed = [s for s in recorder.seen if s.method.startswith("resources/")]
        assert listed == []  # the route has not seen any URI yet
        # globex may not read rec's resources; its request names a URI the route never saw.
        status, reply = await gw.read(gw.token("globex-reader", "globex"), DOC)
        assert reply["error"]["data"]["code"] == "policy.denied"
        # The route learnt the URI from lists the gateway asked for as itself; globex's
        # credential reached the upstream for nothing, neither a list nor the read.
        assert recorder.of("globex") == []
        catalog = [(s.method, s.agent) for s in recorder.of("bastion")]
        assert ("resources/list", "bastion-catalog") in catalog
        assert ("resources/templates/list", "bastion-catalog") in catalog
        # acme may read it: the read is the only thing sent with acme's credential.
        status, reply = await gw.read(gw.token("acme-reader", "acme"), DOC)
        assert status == 200 and reply["result"]["contents"][0]["text"] == "hello"
        assert [s.method for s in recorder.of("acme")] == ["resources/read"]
        # A URI no upstream lists: not found, and still nothing sent as acme.
        status, reply = await gw.read(gw.token("acme-reader", "acme"), "rec://made-up")
        assert reply["error"]["code"] == -32602
        assert "resource not found" in reply["error"]["message"]
        assert [s.method for s in recorder.of("acme")] == ["resources/read"]
        # Made-up URIs in a row cannot make the gateway list the upstreams for each one:
        # a route's resources are listed again at most once a second.
        before = len([s for s in recorder.seen if s.method == "resources/list"])
        started = time.monotonic()
        for n in range(20):
            _, reply = await gw.read(gw.token("acme-reader", "acme"), f"rec://made-up/{n}")
            assert "resource not found" in reply["error"]["message"]
        elapsed = time.monotonic() - started
        lists = len([s for s in recorder.seen if s.method == "resources/list"]) - before
        assert lists <= 1 + int(elapsed / INDEX_RETRY_SECONDS)


# -- ownership ---------------------------------------------------------------------------------


async def test_stop_cancels_and_awaits_every_background_task(
    tmp_path: Path, recorder: Recorder
) -> None:
    async with running(tmp_path, recorder) as gw:
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert {
            "bastion-registry",
            "bastion-signing keys",
            "bastion-policy files",
            "bastion-catalog",
            "bastion-idle sessions",
        } <= names
        assert gw.gateway.background.names == [
            "registry",
            "signing keys",
            "policy files",
            "catalog",
            "idle sessions",
            "upstream trust",
            "access review reminder",
        ]
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("bastion-")]
    assert left == []
