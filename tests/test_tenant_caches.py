"""Nothing the gateway keeps is shared across tenants: one test per cache.

- the route's resource URI index: a tenant's read is routed only by its own listings (then by
  the gateway's); and a URI belongs to the upstream that first listed it on the route, so
  another upstream listing it (a claim) is refused, left out of the list and alerted;
- pooled stateless channels and legacy upstream sessions: one per (upstream, tenant), shown by
  which tenant the upstream session was opened for;
- stdio processes: one per (upstream, tenant), shown by the `{tenant}` the process was given;
- the credentials cache: a tenant never gets a credential minted for another.

The index tests drive the real `Pipeline` in process over stub upstream channels; the channel
and process tests run real upstream processes on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from tests.conftest import free_port, until, until_async
from tests.test_pipeline import Key, Log, RecordingAudit

from bastion import config
from bastion.audit.record import digest
from bastion.pipeline import route as route_module
from bastion.pipeline.chain import Pipeline
from bastion.pipeline.credentials import Credentials
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.route import Route, UriTemplate
from bastion.types import JSON, META_VERSION, MODERN_VERSION, Era, Principal, Target
from bastion.upstream.base import Answer
from bastion.upstream.pool import Upstreams

# -- the resource URI index, in process ----------------------------------------------------------


class ResourceChannel:
    """A 2026-07-28 upstream whose resources and templates depend on the tenant it is asked
    for (the `X-Bastion-Tenant` header under `auth: none`); a read answers with its name."""

    era = Era.MODERN

    def __init__(self, name: str) -> None:
        self.name = name
        self.resources: dict[str, list[str]] = {}  # tenant → URIs
        self.templates: dict[str, list[str]] = {}  # tenant → URI templates
        self.reads: list[tuple[str, str]] = []  # (tenant, uri)

    async def open(self, headers: Mapping[str, str]) -> JSON | None:
        return None

    async def call(self, message: JSON, headers: Mapping[str, str]) -> Answer:
        tenant = headers.get("X-Bastion-Tenant", "")
        method = message.get("method")
        params = message.get("params") or {}
        body: JSON
        if method == "resources/list":
            body = {"resources": [{"uri": u, "name": u} for u in self.resources.get(tenant, [])]}
        elif method == "resources/templates/list":
            listed = self.templates.get(tenant, [])
            body = {"resourceTemplates": [{"uriTemplate": t, "name": t} for t in listed]}
        elif method == "resources/read":
            self.reads.append((tenant, params["uri"]))
            body = {"contents": [{"uri": params["uri"], "text": f"from {self.name}"}]}
        else:  # tools/list, prompts/list: none
            body = {"tools": [], "prompts": []}
        return Answer({"jsonrpc": "2.0", "id": message.get("id"), "result": body})

    async def send(self, message: JSON, headers: Mapping[str, str]) -> None:
        return None

    async def listen(self, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        if False:  # pragma: no cover - nothing unsolicited
            yield {}

    async def close(self, headers: Mapping[str, str] | None = None) -> None:
        return None


class StubUpstreams(Upstreams):
    """The pool with one stub channel per upstream."""

    def __init__(self, settings: config.Settings) -> None:
        super().__init__(settings)
        self.channels = {name: ResourceChannel(name) for name in settings.upstreams}

    async def stateless_channel(self, name: str, tenant: str) -> Any:
        return self.channels[name]

    async def session_channel(self, name: str, hello: JSON, tenant: str) -> Any:
        return self.channels[name]


def _index_settings(tmp: Path) -> config.Settings:
    text = f"""
listen: {{host: 127.0.0.1, port: {free_port()}}}
state_dir: {tmp / "state"}
auth: {{mode: none, tenant: acme, agent: acme-agent}}
upstreams:
  alpha: {{transport: http, url: "http://127.0.0.1:{free_port()}/mcp"}}
  beta: {{transport: http, url: "http://127.0.0.1:{free_port()}/mcp"}}
policy:
  grants:
    - {{id: acme-alpha, tenant: acme, server: alpha, resources: "*"}}
    - {{id: acme-beta, tenant: acme, server: beta, resources: "*"}}
    - {{id: globex-alpha, tenant: globex, server: alpha, resources: "*"}}
    - {{id: globex-beta, tenant: globex, server: beta, resources: "*"}}
"""
    return config.parse(text, base=tmp)


class Gateway:
    """A pipeline over the stub channels, and how to send it one message as a tenant."""

    def __init__(self, tmp: Path) -> None:
        self.log = Log()
        settings = _index_settings(tmp)
        self.audit = RecordingAudit(self.log)
        self.upstreams = StubUpstreams(settings)
        self.pipeline = Pipeline(
            settings,
            self.upstreams,
            keys=Key(),  # type: ignore[arg-type]
            audit=self.audit,  # type: ignore[arg-type]
        )
        asyncio.run(self.pipeline.start())
        self.route = Route("default", "/mcp", ("alpha", "beta"), multiplex=True)
        self.alpha = self.upstreams.channels["alpha"]
        self.beta = self.upstreams.channels["beta"]

    def send(self, tenant: str, method: str, params: JSON) -> JSON:
        # `auth: none` serves one configured principal; the test is each tenant in turn.
        self.pipeline.authn._anonymous = Principal(tenant=tenant, agent=f"{tenant}-agent")
        message = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": method,
            "params": {**params, "_meta": {META_VERSION: MODERN_VERSION}},
        }
        exchange = Exchange(message, Era.MODERN, MODERN_VERSION, "default", "127.0.0.1:4000")
        exchange.headers = {"mcp-protocol-version": MODERN_VERSION}
        exchange.url = "http://127.0.0.1:8080/mcp"

        async def run() -> JSON:
            # The catalog's background jobs, as the gateway runs them (the route's index is
            # learnt there, as the gateway).
            jobs = asyncio.create_task(self.pipeline.authz.jobs.run())
            await until_async(lambda: self.pipeline.authz.jobs.running, "the jobs to run")
            try:
                answer = await self.pipeline.handle(exchange, self.route)
                assert answer is not None and answer.rest is None
                await self.pipeline.finish(exchange, self.route, answer.first)
                return answer.first
            finally:
                jobs.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await jobs

        return asyncio.run(run())

    def read(self, tenant: str, uri: str) -> JSON:
        return self.send(tenant, "resources/read", {"uri": uri})

    def alerts(self) -> list[dict[str, Any]]:
        return [r.detail for r in self.audit.records if r.phase == "alert"]


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    return Gateway(tmp_path)


def test_a_tenants_listing_never_routes_another_tenants_read(gateway: Gateway) -> None:
    """acme's listing teaches the route where `memo://acme/plan` lives; globex asking for
    the same URI is not routed by it (before: one index for all, last writer wins)."""
    gateway.alpha.resources["acme"] = ["memo://acme/plan"]
    gateway.beta.resources["bastion"] = ["memo://public"]  # what beta lists to the gateway
    listed = gateway.send("acme", "resources/list", {})
    assert [r["uri"] for r in listed["result"]["resources"]] == ["memo://acme/plan"]
    assert gateway.read("acme", "memo://acme/plan")["result"]["contents"][0]["text"] == (
        "from alpha"
    )
    reply = gateway.read("globex", "memo://acme/plan")
    assert reply["error"]["message"] == "resource not found: 'memo://acme/plan'"
    assert ("globex", "memo://acme/plan") not in gateway.alpha.reads
    # What an upstream lists to the gateway itself (learnt on globex's miss above, in the
    # background, as the gateway) routes every tenant: the gateway's own view.
    assert gateway.read("globex", "memo://public")["result"]["contents"][0]["text"] == ("from beta")
    assert gateway.beta.reads == [("globex", "memo://public")]


def test_an_upstream_claiming_anothers_uri_is_refused_and_alerted(gateway: Gateway) -> None:
    """beta lists alpha's URI and a template of the same shape as alpha's (and a wider one
    covering it): reads still go to alpha, beta's claimed items are not in the list, and one
    alert names beta (before: beta's listing won, and answered the reads meant for alpha)."""
    gateway.alpha.resources["acme"] = ["memo://a/secret"]
    gateway.alpha.templates["acme"] = ["memo://a/{id}"]
    gateway.beta.resources["acme"] = ["memo://a/secret", "memo://b/own"]
    gateway.beta.templates["acme"] = ["memo://a/{name}", "memo://{+rest}"]
    for _ in range(2):  # one alert per claimed item, however often it is listed
        resources = gateway.send("acme", "resources/list", {})["result"]["resources"]
        templates = gateway.send("acme", "resources/templates/list", {})["result"]
    for uri in ("memo://a/secret", "memo://a/other"):
        assert gateway.read("acme", uri)["result"]["contents"][0]["text"] == "from alpha"
    assert gateway.read("acme", "memo://b/own")["result"]["contents"][0]["text"] == "from beta"
    assert ("acme", "memo://a/secret") not in gateway.beta.reads
    assert [r["uri"] for r in resources] == ["memo://a/secret", "memo://b/own"]
    assert [t["uriTemplate"] for t in templates["resourceTemplates"]] == [
        "memo://a/{id}",
        "memo://{+rest}",
    ]
    alerts = gateway.alerts()
    assert [(a["rule"], a["upstream"], a["owner"], a["kind"]) for a in alerts] == [
        ("uri_claim", "beta", "alpha", "uri"),
        ("uri_claim", "beta", "alpha", "template"),
    ]
    assert alerts[0]["item_digest"] == digest("memo://a/secret")
    assert not any(a["suspend"] for a in alerts)


def test_the_first_lister_is_the_routes_order_not_the_fastest_answer(gateway: Gateway) -> None:
    """Both upstreams list the same new URI in one merged listing: the route's first upstream
    owns it, whichever page arrived first."""
    gateway.alpha.resources["globex"] = ["memo://both"]
    gateway.beta.resources["globex"] = ["memo://both"]
    slow = gateway.alpha.call

    async def slower(message: JSON, headers: Mapping[str, str]) -> Answer:
        await asyncio.sleep(0)  # beta's page comes back first
        return await slow(message, headers)

    gateway.alpha.call = slower  # type: ignore[method-assign]
    gateway.send("globex", "resources/list", {})
    assert gateway.read("globex", "memo://both")["result"]["contents"][0]["text"] == "from alpha"
    assert gateway.alerts()[0]["upstream"] == "beta"


# -- pooled channels and legacy sessions, against a real upstream ------------------------------

# A 2025-era upstream that remembers which tenant opened each session, and tells every call
# which tenant opened the session it arrived in and which tenant the call itself is for.
_LEGACY_UPSTREAM = """
import json, secrets, sys
import uvicorn

OPENED = {}

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body"):
            break
    if scope["method"] != "POST":
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    message = json.loads(body)
    tenant = headers.get("x-bastion-tenant", "")
    extra = []
    if "id" not in message:
        status, answer = 202, None
    elif message["method"] == "initialize":
        sid = secrets.token_hex(8)
        OPENED[sid] = tenant
        extra = [(b"mcp-session-id", sid.encode())]
        status, answer = 200, {"protocolVersion": "2025-11-25", "capabilities": {},
                               "serverInfo": {"name": "legacy", "version": "1"}}
    else:
        sid = headers.get("mcp-session-id", "")
        status, answer = 200, {"opened_for": OPENED.get(sid), "asked_for": tenant}
    payload = b"" if answer is None else json.dumps(
        {"jsonrpc": "2.0", "id": message["id"], "result": answer}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *extra]})
    await send({"type": "http.response.body", "body": payload})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""

# A stdio upstream answering every request with the tenant it was started for.
_STDIO_UPSTREAM = """
import json, os, sys
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    if message.get("method") == "initialize":
        result = {"protocolVersion": "2025-11-25", "capabilities": {},
                  "serverInfo": {"name": "stdio", "version": "1"}}
    else:
        result = {"started_for": os.environ["STARTED_FOR"], "pid": os.getpid()}
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
"""


@pytest.fixture
def legacy_port(tmp_path: Path) -> Iterator[int]:
    script = tmp_path / "legacy_upstream.py"
    script.write_text(_LEGACY_UPSTREAM)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port)])  # noqa: S603
    try:
        until(lambda: _accepts(port), "the legacy upstream to listen", 20.0)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
async def pool(tmp_path: Path, legacy_port: int) -> AsyncIterator[Upstreams]:
    script = tmp_path / "stdio_upstream.py"
    script.write_text(_STDIO_UPSTREAM)
    text = f"""
listen: {{host: 127.0.0.1, port: {free_port()}}}
auth: {{mode: none, tenant: acme, agent: test-agent}}
upstreams:
  legacy: {{transport: http, url: "http://127.0.0.1:{legacy_port}/mcp", protocol: legacy}}
  local:
    transport: stdio
    command: [{json.dumps(sys.executable)}, {json.dumps(str(script))}]
    env: {{STARTED_FOR: "{{tenant}}"}}
"""
    upstreams = Upstreams(config.parse(text, base=tmp_path))
    yield upstreams
    await upstreams.close()


def _call(n: int) -> JSON:
    return {"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": "whoami"}}


async def _as(channel: Any, tenant: str, n: int = 1) -> JSON:
    answer = await channel.call(_call(n), {"X-Bastion-Tenant": tenant})
    await answer.close()
    result: JSON = answer.first["result"]
    return result


async def test_pooled_legacy_sessions_are_never_shared_across_tenants(pool: Upstreams) -> None:
    """A 2026-07-28 client of a 2025-era upstream rides a pooled upstream session: globex's
    call must arrive in a session opened for globex, never in acme's."""
    acme = await pool.stateless_channel("legacy", "acme")
    globex = await pool.stateless_channel("legacy", "globex")
    assert await _as(acme, "acme") == {"opened_for": "acme", "asked_for": "acme"}
    assert await _as(globex, "globex", 2) == {"opened_for": "globex", "asked_for": "globex"}
    assert await _as(await pool.stateless_channel("legacy", "acme"), "acme", 3) == {
        "opened_for": "acme",
        "asked_for": "acme",
    }


async def test_legacy_client_sessions_each_get_their_own_upstream_session(
    pool: Upstreams,
) -> None:
    hello = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}}
    acme = await pool.session_channel("legacy", hello, "acme")
    globex = await pool.session_channel("legacy", hello, "globex")
    assert await _as(acme, "acme") == {"opened_for": "acme", "asked_for": "acme"}
    assert await _as(globex, "globex") == {"opened_for": "globex", "asked_for": "globex"}
    await acme.close({})
    await globex.close({})


async def test_stdio_processes_are_one_per_tenant(pool: Upstreams) -> None:
    """Each tenant's calls reach a process started for that tenant (`{tenant}` in its env)."""
    acme = await _as(await pool.stateless_channel("local", "acme"), "acme")
    globex = await _as(await pool.stateless_channel("local", "globex"), "globex")
    hello = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}}
    session = await _as(await pool.session_channel("local", hello, "globex"), "globex", 2)
    assert acme["started_for"] == "acme" and globex["started_for"] == "globex"
    assert acme["pid"] != globex["pid"]
    assert session == globex  # a globex session shares globex's process, not acme's


# -- the credentials cache --------------------------------------------------------------------


def test_cached_credentials_are_never_handed_to_another_tenant(tmp_path: Path) -> None:
    """Two tenants' agents with the same id (an external issuer may name them alike) call the
    same upstream for the same tool: each gets a token minted for its own tenant, and the
    cache still serves each its own."""
    text = f"""
listen: {{host: 127.0.0.1, port: {free_port()}}}
auth: {{mode: oauth}}
upstreams:
  svc: {{transport: http, url: "http://127.0.0.1:{free_port()}/mcp", credentials: {{mode: mint}}}}
"""
    credentials = Credentials(config.parse(text, base=tmp_path), Key())

    def tenant_of(tenant: str) -> str:
        principal = Principal(tenant=tenant, agent="reporter")
        headers = asyncio.run(credentials.headers(principal, "svc", "search"))
        token = headers["Authorization"].removeprefix("Bearer ")
        claims = pyjwt.decode(token, options={"verify_signature": False})
        return str(claims["tenant"])

    assert [tenant_of(t) for t in ("acme", "globex", "acme", "globex")] == [
        "acme",
        "globex",
        "acme",
        "globex",
    ]


# -- bounds on what upstreams make the gateway remember ------------------------------------------


def test_an_upstream_listing_without_end_grows_no_index_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hostile upstream lists ever more URIs: it owns at most its quota on the route (and
    never takes another's), and a tenant's view keeps only the newest it was shown."""
    monkeypatch.setattr(route_module, "OWNED_URIS", 50)
    monkeypatch.setattr(route_module, "VIEW_URIS", 20)
    route = Route("default", "/mcp", ("alpha", "beta"), multiplex=True)
    route.learn_resources("alpha", [{"uri": "memo://a"}], "acme")
    flood = [{"uri": f"memo://x/{i}"} for i in range(1000)]
    assert [
        c.value for c in route.learn_resources("beta", [*flood, {"uri": "memo://a"}], "acme")
    ] == ["memo://a"]
    index = route.index
    assert len(index._owners) == 51 and len(index._views["acme"].uris) == 20
    assert route.resolve_uri("memo://x/49", "acme") == Target("beta", "memo://x/49")
    assert route.resolve_uri("memo://x/50", "acme") is None  # beyond beta's quota
    assert route.resolve_uri("memo://a", "acme") is None  # forgotten by the view, still alpha's
    route.learn_resources("alpha", [{"uri": "memo://a"}], "acme")
    assert route.resolve_uri("memo://a", "acme") == Target("alpha", "memo://a")


def test_a_hostile_template_matches_in_linear_time() -> None:
    """Templates are matched without backtracking: a template of many wide expressions
    against a long URI that almost matches answers at once (a regex would not return)."""
    template = UriTemplate.parse("a{+b}b{+c}c{+d}d{+e}e")
    started = time.perf_counter()
    assert not template.matches("a" + "b" * 8000)
    assert time.perf_counter() - started < 1.0
    assert template.matches("a1b2c3d4e")
    assert UriTemplate.parse("m://{x}/y").matches("m://q/y")
    assert not UriTemplate.parse("m://{x}/y").matches("m://q/r/y")
