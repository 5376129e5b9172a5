"""Traces: W3C trace context from the client to every upstream, spans exported over real
OTLP/HTTP to a receiver in the test, the audit record's trace id, per-stage latency metrics.

The gateway runs in process on its own HTTP server; the OTLP receiver and the recording
upstream are small aiohttp apps on loopback; the stdio upstream is a real process."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from tests.conftest import MODERN, modern_body, modern_headers

from bastion import config
from bastion.app import Gateway
from bastion.audit import Query
from bastion.control.assembly import open_audit
from bastion.observe.tracing import incoming, parse_traceparent, parse_tracestate
from bastion.transport.server import HttpServer

SERVER, CLIENT, INTERNAL = 2, 3, 1  # opentelemetry.proto.trace.v1.Span.SpanKind
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
STATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


# -- the W3C parsers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, 1)),
        (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, 0)),
        (f" 00-{TRACE}-{PARENT}-03\t", (TRACE, PARENT, 3)),  # optional whitespace
        (f"00-{TRACE.upper()}-{PARENT}-01", None),  # hex must be lower case
        (f"01-{TRACE}-{PARENT}-01", None),  # only version 00
        (f"ff-{TRACE}-{PARENT}-01", None),
        (f"00-{'0' * 32}-{PARENT}-01", None),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{TRACE[:-1]}-{PARENT}-01", None),
        (f"00-{TRACE}-{PARENT}0-01", None),
        (f"00-{TRACE}-{PARENT}-1", None),
        (f"00-{TRACE}-{PARENT}-01-extra", None),
        (f"00_{TRACE}_{PARENT}_01", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_parse_traceparent(value: Any, expected: tuple[str, str, int] | None) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (STATE, STATE),
        ("rojo=1 , congo=2,,", "rojo=1,congo=2"),
        ("tenant@vendor=x", "tenant@vendor=x"),
        ("Upper=1", None),  # keys are lower case
        ("novalue", None),
        ("k=a,b", None),
        ("k=v\r\nx-injected: 1", None),  # no control characters reach an upstream header
        ("k=" + "v" * 257, None),
        (",".join(f"k{i}=v" for i in range(33)), None),  # at most 32 members
        ("", None),
        (None, None),
    ],
)
def test_parse_tracestate(value: Any, expected: str | None) -> None:
    assert parse_tracestate(value) == expected


def _with_meta(**meta: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": meta}}


OTHER = "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize(
    ("headers", "message", "expected"),
    [
        ({"traceparent": f"00-{TRACE}-{PARENT}-01"}, {}, (TRACE, PARENT, 1, None)),
        (
            {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "a=1"},
            _with_meta(traceparent=f"00-{OTHER}-{PARENT}-00"),
            (TRACE, PARENT, 1, "a=1"),  # the header wins
        ),
        (  # SEP-414: MCP SDKs put the context in params._meta
            {"traceparent": "garbage"},
            _with_meta(traceparent=f"00-{OTHER}-{PARENT}-00", tracestate="b=2"),
            (OTHER, PARENT, 0, "b=2"),
        ),
        ({"tracestate": "a=1"}, {}, None),  # tracestate alone continues nothing
        ({}, {"params": "not an object"}, None),
        ({}, [1, 2], None),
    ],
)
def test_incoming_context(
    headers: dict[str, str], message: Any, expected: tuple[str, str, int, str | None] | None
) -> None:
    assert incoming(headers, message) == expected


@given(st.text(max_size=80))
def test_traceparent_parser_never_raises(value: str) -> None:
    parsed = parse_traceparent(value)
    if parsed is not None:
        trace_id, span_id, flags = parsed
        assert f"00-{trace_id}-{span_id}-{flags:02x}" == value.strip(" \t")


@given(
    st.binary(min_size=16, max_size=16).filter(any),
    st.binary(min_size=8, max_size=8).filter(any),
    st.integers(0, 255),
)
def test_every_valid_traceparent_parses(trace: bytes, span: bytes, flags: int) -> None:
    value = f"00-{trace.hex()}-{span.hex()}-{flags:02x}"
    assert parse_traceparent(value) == (trace.hex(), span.hex(), flags)


# -- peers on loopback ---------------------------------------------------------------------------


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent: str
    name: str
    kind: int
    attributes: dict[str, Any]
    error: bool
    service: str


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value") or "string_value")


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest it is sent."""

    spans: list[Span] = field(default_factory=list)
    url: str = ""

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.headers["Content-Type"] == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(body)
        for resource in export.resource_spans:
            service = {a.key: _value(a.value) for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        Span(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            error=span.status.code == 2,  # STATUS_CODE_ERROR
                            service=str(service.get("service.name")),
                        )
                    )
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    def of_trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


@dataclass
class Recorder:
    """A 2026-07-28 MCP server over HTTP that records what each request carried."""

    seen: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        message = await request.json()
        self.seen.append(({k.lower(): v for k, v in request.headers.items()}, message))
        method = message.get("method")
        if method == "server/discover":
            result: dict[str, Any] = {
                "resultType": "complete",
                "supportedVersions": [MODERN],
                "capabilities": {"tools": {}},
            }
        elif method == "tools/list":
            tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("record", "other")]
            result = {"tools": tools, "resultType": "complete"}
        elif method == "tools/call":
            result = {"content": [{"type": "text", "text": "recorded"}], "resultType": "complete"}
        else:
            error = {"code": -32601, "message": f"no {method}"}
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "error": error})
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})

    def calls(self) -> list[tuple[dict[str, str], dict[str, Any]]]:
        return [(h, m) for h, m in self.seen if m.get("method") == "tools/call"]


@contextlib.asynccontextmanager
async def serving(routes: list[web.RouteDef]) -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    receiver = Collector()
    async with serving([web.post("/v1/traces", receiver.receive)]) as base:
        receiver.url = base + "/v1/traces"
        yield receiver


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    upstream = Recorder()
    async with serving([web.post("/mcp", upstream.handle)]) as base:
        upstream.url = base + "/mcp"
        yield upstream


STDIO_SERVER = """
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    method, params = message.get("method"), message.get("params") or {}
    if method == "server/discover":
        result = {"resultType": "complete", "supportedVersions": ["2026-07-28"],
                  "capabilities": {"tools": {}}}
    elif method == "tools/list":
        result = {"resultType": "complete",
                  "tools": [{"name": "meta", "inputSchema": {"type": "object"}}]}
    elif method == "tools/call":
        text = json.dumps(params.get("_meta") or {})
        result = {"resultType": "complete", "content": [{"type": "text", "text": text}]}
    else:
        reply = {"jsonrpc": "2.0", "id": message["id"],
                 "error": {"code": -32601, "message": "no such method"}}
        print(json.dumps(reply), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
"""


def settings_for(
    tmp: Path, upstream: str, collector: Collector | None = None, **extra: Any
) -> config.Settings:
    script = tmp / "meta_server.py"
    script.write_text(STDIO_SERVER)
    document: dict[str, Any] = {
        "state_dir": str(tmp / "state"),
        "auth": {"mode": "none", "tenant": "acme", "agent": "tracer"},
        "audit": {"enabled": False},
        "policy": {
            "catalog_timeout_seconds": 5,
            "grants": [
                {"id": "record-only", "tenant": "*", "server": "up", "tools": ["record"]},
                {"id": "meta", "tenant": "*", "server": "stdio", "tools": ["meta"]},
            ],
        },
        "upstreams": {
            "up": {"transport": "http", "url": upstream, "protocol": "modern"},
            "stdio": {
                "transport": "stdio",
                "command": [sys.executable, str(script)],
                "protocol": "modern",
            },
        },
        **extra,
    }
    if collector is not None:
        document["telemetry"] = {
            "traces": {"enabled": True, "endpoint": collector.url, "service_name": "bastion-t"}
        }
    return config.parse(json.dumps(document))


@contextlib.asynccontextmanager
async def gateway_at(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """Serve the gateway on loopback; stopping it (on exit) flushes its spans."""
    async with asyncio.timeout(30):
        await gateway.start()
    server = HttpServer(gateway.front, max_body=65536, keepalive_timeout=5, header_timeout=5)
    try:
        port = await server.start("127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield http
    finally:
        await server.stop(grace=1)
        async with asyncio.timeout(30):
            await gateway.stop()


async def call(
    http: httpx.AsyncClient,
    tool: str,
    arguments: dict[str, Any],
    server: str = "up",
    **headers: str,
) -> dict[str, Any]:
    response = await http.post(
        f"/servers/{server}/mcp",
        json=modern_body("tools/call", {"name": tool, "arguments": arguments}),
        headers={**modern_headers("tools/call", tool), **headers},
    )
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


async def until(check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def traceparent_of(headers: dict[str, str]) -> tuple[str, str, int]:
    parsed = parse_traceparent(headers.get("traceparent"))
    assert parsed is not None, headers
    return parsed


# -- end to end ----------------------------------------------------------------------------------


async def test_spans_follow_the_client_trace_to_the_upstream(
    tmp_path: Path, collector: Collector, recorder: Recorder
) -> None:
    secret_argument = "arg-" + secrets.token_hex(8)
    client_token = "tok-" + secrets.token_hex(8)
    denied_trace = secrets.token_hex(16)
    gateway = Gateway(settings_for(tmp_path, recorder.url, collector))
    assert gateway.tracing.enabled
    async with gateway_at(gateway) as http:
        reply = await call(
            http,
            "record",
            {"note": secret_argument},
            traceparent=f"00-{TRACE}-{PARENT}-01",
            tracestate=STATE,
            authorization=f"Bearer {client_token}",
            cookie="session=client-cookie",
        )
        assert reply["result"]["content"][0]["text"] == "recorded"
        denied = await call(
            http, "other", {"note": secret_argument}, traceparent=f"00-{denied_trace}-{PARENT}-01"
        )
        assert denied["error"]["data"]["code"].startswith("policy.")
    await until(lambda: len(collector.of_trace(TRACE)) >= 4)

    # The upstream: the client's trace under a new parent, tracestate passed through, in the
    # headers and in params._meta alike, and nothing else of the client's.
    ((headers, message),) = recorder.calls()
    trace_id, upstream_parent, flags = traceparent_of(headers)
    assert (trace_id, flags) == (TRACE, 1) and upstream_parent != PARENT
    assert headers["tracestate"] == STATE
    meta = message["params"]["_meta"]
    assert meta["traceparent"] == headers["traceparent"] and meta["tracestate"] == STATE
    assert "cookie" not in headers and client_token not in json.dumps(headers)

    # The exported spans: SERVER under the client's span, children under it, and the CLIENT
    # span is the parent the upstream was told about.
    spans = {s.name: s for s in collector.of_trace(TRACE)}
    assert set(spans) == {"mcp tools/call", "authn", "authz", "upstream up"}
    server = spans["mcp tools/call"]
    assert server.kind == SERVER and server.parent == PARENT and not server.error
    assert server.service == "bastion-t"
    for child in ("authn", "authz"):
        assert spans[child].kind == INTERNAL and spans[child].parent == server.span_id
    upstream = spans["upstream up"]
    assert upstream.kind == CLIENT and upstream.parent == server.span_id
    assert upstream.span_id == upstream_parent
    assert upstream.attributes == {"mcp.method.name": "tools/call", "bastion.upstream": "up"}
    assert server.attributes == {
        "mcp.method.name": "tools/call",
        "mcp.protocol.version": MODERN,
        "bastion.route": "server:up",
        "bastion.upstream": "up",
        "gen_ai.tool.name": "record",
        "bastion.tenant": "acme",
        "bastion.agent": "tracer",
        "bastion.decision": "allow",
        "http.response.status_code": 200,
    }

    # The denied call: its SERVER span says so; no upstream call, so no CLIENT span.
    refused = {s.name: s for s in collector.of_trace(denied_trace)}
    assert set(refused) == {"mcp tools/call", "authn", "authz"}
    denial = refused["mcp tools/call"].attributes
    assert denial["bastion.decision"] == "deny" and denial["error.type"].startswith("policy.")
    assert refused["mcp tools/call"].error

    # Never a token, a cookie or an argument value in any span.
    exported = json.dumps([s.attributes for s in collector.spans])
    for leaked in (secret_argument, client_token, "client-cookie"):
        assert leaked not in exported


async def test_malformed_traceparent_starts_a_new_trace(
    tmp_path: Path, collector: Collector, recorder: Recorder
) -> None:
    malformed = f"00-{TRACE.upper()}-{PARENT}-01"
    gateway = Gateway(settings_for(tmp_path, recorder.url, collector))
    async with gateway_at(gateway) as http:
        reply = await call(http, "record", {}, traceparent=malformed, tracestate=STATE)
        assert "result" in reply
    ((headers, message),) = recorder.calls()
    trace_id, parent, _ = traceparent_of(headers)
    assert trace_id not in (TRACE, TRACE.upper())
    assert "tracestate" not in headers  # no valid traceparent, so no state to continue
    assert "tracestate" not in message["params"]["_meta"]
    await until(lambda: len(collector.of_trace(trace_id)) >= 4)
    spans = {s.name: s for s in collector.of_trace(trace_id)}
    assert spans["mcp tools/call"].parent == ""  # a root: the gateway started the trace
    assert spans["upstream up"].span_id == parent


async def test_traces_off_still_propagate_and_audit_and_time_each_stage(
    tmp_path: Path, recorder: Recorder
) -> None:
    settings = settings_for(tmp_path, recorder.url, audit={"durability": "strict"})
    audit = open_audit(settings)
    assert audit is not None
    gateway = Gateway(settings, audit=audit)
    assert not gateway.tracing.enabled
    async with gateway_at(gateway) as http:
        assert "result" in await call(http, "record", {})  # no trace context from the client
        # A stdio upstream gets the context in params._meta (SEP-414).
        echoed = await call(http, "meta", {}, server="stdio", traceparent=f"00-{TRACE}-{PARENT}-01")
        meta = json.loads(echoed["result"]["content"][0]["text"])
        stdio_trace, stdio_parent, stdio_flags = traceparent_of(meta)
        assert (stdio_trace, stdio_flags) == (TRACE, 1) and stdio_parent != PARENT
        assert "tracestate" not in meta

        ((headers, _),) = recorder.calls()
        started, _, flags = traceparent_of(headers)
        assert flags == 0  # started here, and not recorded here: not sampled
        decisions = audit.store.query(Query(phase="decision"))
        traces = {json.loads(e.record)["trace_id"] for e in decisions}
        assert traces == {started, TRACE}

        text = (await http.get("/metrics")).text
    for route in ("/servers/up/mcp", "/servers/stdio/mcp"):
        for stage in ("admission", "authn", "authz", "credentials", "upstream", "total"):
            series = f'bastion_request_seconds_count{{route="{route}",stage="{stage}"}} 1.0'
            assert series in text, series
