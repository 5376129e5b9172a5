"""Traces: W3C Trace Context on every request, OpenTelemetry spans when `telemetry.traces` is on.

Propagation is always on and needs no exporter. A request's context comes from its
`traceparent`/`tracestate` headers, else from `params._meta` (where MCP SDKs put it, SEP-414);
a missing or malformed one starts a new trace, never an error. Every upstream call carries the
same trace id under a new span id, as a `traceparent` header (HTTP) and in `params._meta`
(every transport), with `tracestate` passed through. Nothing else of the client's is forwarded.

With traces on, each MCP request is one SERVER span (`mcp <method>`) with children for authn,
authz and each upstream call (a CLIENT span, whose id is the one the upstream receives).
Spans carry names, decisions and codes, never tokens or argument values. A BatchSpanProcessor
(bounded queue, its own thread) exports them over OTLP/HTTP, off the hot path. The tracer
provider belongs to one gateway, never to the process. With traces off no span object exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace as otel

from bastion.asgi import Message, Send
from bastion.config import Traces
from bastion.errors import BastionError
from bastion.ids import random_hex
from bastion.observe.metrics import method_label

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_STATE_MEMBER = re.compile(
    r"[a-z0-9][a-z0-9_*/-]{0,255}(@[a-z][a-z0-9_*/-]{0,13})?"
    r"=[\x21-\x2b\x2d-\x3c\x3e-\x7e]([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,254}[\x21-\x2b\x2d-\x3c\x3e-\x7e])?"
)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_MAX_STATE_CHARS = 512
_MAX_STATE_MEMBERS = 32
_EXPORT_TIMEOUT_S = 5.0  # one export, and the final flush when the gateway stops

Attributes = dict[str, str | int | bool]


class Described(Protocol):
    """What a request's SERVER span says about it when it ends (the exchange)."""

    def span_attributes(self) -> Attributes:
        """Names, decision and error code of the request: never tokens or argument values."""
        ...


# -- W3C Trace Context -----------------------------------------------------------------------


def parse_traceparent(value: Any) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags) of a version-00 `traceparent`, or None if malformed."""
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, int(flags, 16)


def parse_tracestate(value: Any) -> str | None:
    """A `tracestate` fit to pass on (list members re-joined), or None if absent or invalid:
    a vendor that cannot parse it must not propagate it."""
    if not isinstance(value, str) or len(value) > _MAX_STATE_CHARS:
        return None
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m]
    if not members or len(members) > _MAX_STATE_MEMBERS:
        return None
    if not all(_STATE_MEMBER.fullmatch(m) for m in members):
        return None
    return ",".join(members)


def incoming(headers: Mapping[str, str], message: Any) -> tuple[str, str, int, str | None] | None:
    """The caller's context: (trace id, parent id, flags, tracestate) from the HTTP headers,
    else from `params._meta`; None when neither carries a valid `traceparent`."""
    parent = parse_traceparent(headers.get(TRACEPARENT))
    state: Any = headers.get(TRACESTATE)
    if parent is None and isinstance(message, dict):
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(meta, dict):
            parent = parse_traceparent(meta.get(TRACEPARENT))
            state = meta.get(TRACESTATE)
    if parent is None:
        return None
    return (*parent, parse_tracestate(state))


def new_id(size: int) -> str:
    """A random, non-zero trace id (16 bytes) or span id (8 bytes), in lower-case hex."""
    while True:
        value = random_hex(size)
        if value.strip("0"):
            return value


# -- one request --------------------------------------------------------------------------------


class RequestTrace:
    """One request's trace: its id, the time spent in each stage and, when recording, spans."""

    __slots__ = (
        "trace_id",
        "stages",
        "_flags",
        "_state",
        "_tracer",
        "_span",
        "_parent",
        "_subject",
        "_status",
        "_error",
    )

    def __init__(
        self,
        trace_id: str,
        flags: int,
        state: str | None,
        tracer: otel.Tracer | None = None,
        span: otel.Span | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.stages: dict[str, float] = {}  # seconds per stage, summed over repeated calls
        self._flags = flags
        self._state = state
        self._tracer = tracer if span is not None else None
        self._span = span
        self._parent = otel.set_span_in_context(span) if span is not None else None
        self._subject: Described | None = None
        self._status = 0
        self._error: tuple[str, str] | None = None  # (JSON-RPC code, error.type)

    def bind(self, subject: Described) -> None:
        """Name what the SERVER span describes when it ends (the request's exchange)."""
        self._subject = subject

    def stage(self, name: str, *, span: bool = True) -> Stage:
        """Time a stage, and span it when recording unless `span` is False:
        `with trace.stage("authn"): ...`."""
        return Stage(self, name, span)

    def call(self, upstream: str, message: Mapping[str, Any]) -> UpstreamCall:
        """Begin one upstream call: the context it carries, and its CLIENT span."""
        return UpstreamCall(self, upstream, message)

    def watch(self, send: Send) -> Send:
        """`send`, noting the HTTP status for the SERVER span (unchanged when not recording)."""
        if self._span is None:
            return send

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._status = int(message["status"])
            await send(message)

        return watched

    def answered(self, reply: Mapping[str, Any] | None) -> None:
        """Note the JSON-RPC error of the final answer, if it is one."""
        error = reply.get("error") if reply is not None else None
        if self._span is not None and isinstance(error, dict):
            code = str(error.get("code"))
            self._error = (code, code)

    def failed(self, exc: BastionError) -> None:
        """Note an error that ended the request before it had an answer."""
        if self._span is not None:
            self._error = (str(exc.rpc_code), exc.code)

    def end(self) -> None:
        """End the SERVER span with what is known about the request (once)."""
        span, self._span = self._span, None
        if span is None:
            return
        attributes = self._subject.span_attributes() if self._subject is not None else {}
        if self._status:
            attributes["http.response.status_code"] = self._status
        if self._error is not None:
            attributes["rpc.response.status_code"], attributes["error.type"] = self._error
        elif self._status >= 500:
            attributes.setdefault("error.type", str(self._status))
        span.set_attributes(attributes)
        if "error.type" in attributes:
            span.set_status(otel.StatusCode.ERROR)
        span.end()

    def _child(self, name: str, kind: otel.SpanKind, attributes: Attributes) -> otel.Span | None:
        if self._tracer is None:
            return None
        return self._tracer.start_span(name, self._parent, kind, attributes)


def stage(
    trace: RequestTrace | None, name: str, *, span: bool = True
) -> AbstractContextManager[object]:
    """`trace.stage(name)`, or nothing for an exchange without a trace (the gateway's own)."""
    return trace.stage(name, span=span) if trace is not None else contextlib.nullcontext()


class Stage:
    """A timed stage of one request; a span too when the request is recording."""

    __slots__ = ("_trace", "_name", "_span", "_started")

    def __init__(self, trace: RequestTrace, name: str, span: bool = True) -> None:
        self._trace = trace
        self._name = name
        self._span = trace._child(name, otel.SpanKind.INTERNAL, {}) if span else None
        self._started = 0.0

    def __enter__(self) -> Stage:
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stages = self._trace.stages
        stages[self._name] = stages.get(self._name, 0.0) + time.perf_counter() - self._started
        span = self._span
        if span is not None:
            if exc is not None:
                _fail(span, exc)
            span.end()


class UpstreamCall:
    """One call to an upstream: the trace context it carries and, when recording, its span."""

    __slots__ = ("headers", "message", "_trace", "_span", "_started", "_done")

    def __init__(self, trace: RequestTrace, upstream: str, message: Mapping[str, Any]) -> None:
        self._trace = trace
        method = method_label(str(message.get("method", "")))
        span = trace._child(
            f"upstream {upstream}",
            otel.SpanKind.CLIENT,
            {"mcp.method.name": method, "bastion.upstream": upstream},
        )
        if span is not None:
            context = span.get_span_context()
            span_id, flags = f"{context.span_id:016x}", int(context.trace_flags)
        else:
            span_id, flags = new_id(8), trace._flags
        self._span = span
        carried = {TRACEPARENT: f"00-{trace.trace_id}-{span_id}-{flags:02x}"}
        if trace._state is not None:
            carried[TRACESTATE] = trace._state
        self.headers = carried
        self.message = _with_meta(message, carried)
        self._started = time.perf_counter()
        self._done = False

    def finish(
        self, reply: Mapping[str, Any] | None = None, exc: BaseException | None = None
    ) -> None:
        """The call ended (answered, failed or abandoned): add its time, end its span (once)."""
        if self._done:
            return
        self._done = True
        stages = self._trace.stages
        stages["upstream"] = stages.get("upstream", 0.0) + time.perf_counter() - self._started
        span = self._span
        if span is None:
            return
        error = reply.get("error") if reply is not None else None
        if exc is not None:
            _fail(span, exc)
        elif isinstance(error, dict):
            span.set_attribute("rpc.response.status_code", str(error.get("code")))
            span.set_status(otel.StatusCode.ERROR)
        span.end()


def _with_meta(message: Mapping[str, Any], carried: Mapping[str, str]) -> dict[str, Any]:
    """The message with the trace context in `params._meta`, replacing any the client put."""
    params = message.get("params")
    params = dict(params) if isinstance(params, dict) else {}
    meta = params.get("_meta")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta.pop(TRACESTATE, None)
    meta.update(carried)
    params["_meta"] = meta
    return {**message, "params": params}


def _fail(span: otel.Span, exc: BaseException) -> None:
    # The code, never the message: messages may quote what the client sent.
    kind = exc.code if isinstance(exc, BastionError) else type(exc).__name__
    span.set_attribute("error.type", kind)
    span.set_status(otel.StatusCode.ERROR)


# -- the gateway's tracer ----------------------------------------------------------------------


class Tracing:
    """The gateway's tracing: starts each request's trace; exports spans when enabled."""

    def __init__(self, settings: Traces | None = None) -> None:
        self._provider = _provider(settings) if settings is not None and settings.enabled else None
        self._tracer = self._provider.get_tracer("bastion") if self._provider else None

    @property
    def enabled(self) -> bool:
        """Whether spans are recorded and exported."""
        return self._tracer is not None

    def begin(self, headers: Mapping[str, str], message: Any, method: str | None) -> RequestTrace:
        """The trace of one arriving message: continued from the caller's context or new.
        `method` names an MCP request (a SERVER span when enabled); None for anything else."""
        parent = incoming(headers, message)
        if self._tracer is None or method is None:
            if parent is None:
                return RequestTrace(new_id(16), 0, None)
            return RequestTrace(parent[0], parent[2], parent[3])
        context = None
        if parent is not None:
            trace_id, span_id, flags, state = parent
            remote = otel.SpanContext(
                int(trace_id, 16),
                int(span_id, 16),
                is_remote=True,
                trace_flags=otel.TraceFlags(flags),
                trace_state=otel.TraceState.from_header([state]) if state else None,
            )
            context = otel.set_span_in_context(otel.NonRecordingSpan(remote))
        label = method_label(method)
        span = self._tracer.start_span(
            f"mcp {label}", context, otel.SpanKind.SERVER, {"mcp.method.name": label}
        )
        own = span.get_span_context()
        state = parent[3] if parent is not None else None
        return RequestTrace(f"{own.trace_id:032x}", int(own.trace_flags), state, self._tracer, span)

    async def close(self) -> None:
        """Export what is queued and stop the exporter (when the gateway stops)."""
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is not None:
            # Blocking (joins the export thread): off the event loop.
            await asyncio.to_thread(provider.shutdown)


def _provider(settings: Traces) -> TracerProvider:
    """A tracer provider of this gateway's own, exporting in batches over OTLP/HTTP."""
    # Imported here: the SDK and the exporter cost ~100 ms to import, paid only when enabled.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        resource=Resource.create({SERVICE_NAME: settings.service_name}),
        shutdown_on_exit=False,  # Gateway.stop shuts it down; no process-wide atexit hook
    )
    exporter = OTLPSpanExporter(
        endpoint=settings.endpoint,
        headers=dict(settings.headers) or None,
        timeout=_EXPORT_TIMEOUT_S,
    )
    # The processor's queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE, 2048 by default): when the
    # collector falls behind, spans are dropped rather than memory growing.
    provider.add_span_processor(
        BatchSpanProcessor(exporter, export_timeout_millis=_EXPORT_TIMEOUT_S * 1000)
    )
    return provider
