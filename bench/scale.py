"""How Bastion's cost grows with the work: memory and added latency against four sizes.

For each dimension it starts its own gateway (and the echo server and the bare hop beside
it), grows the work step by step, and at each size reads the gateway's memory (VmRSS, VmHWM)
and measures an echo call through it, paired in the same round against the echo server
direct and the bare hop (`bench/bare_hop.py`), so the added p50 is a ratio in one run:

* **sessions** (1, 1,000, 10,000 live legacy sessions): `auth: none`; the sessions are
  opened (initialize + notifications/initialized, 32 at a time, loopback) and left open;
  the calls are legacy-era calls on one more session;
* **agents** (10, 1,000, 100,000 registered agents, ten per tenant): `auth: oauth`; the extra
  agents go into the registry file with `SqliteRegistry.add` while the gateway runs (its
  view reloads); calls carry a Bearer token of a seeded agent, to the echo server twice:
  as `echo` (plain) and as `echo-guarded`, whose `tenant_arguments` turn on the tenant guard
  over the answers (it looks for every known tenant's objects, so its cost may follow the
  number of tenants);
* **tools** (virtual servers of 20 upstreams × 1, 10 and 100 tools): `auth: none`; one
  fixture process (`bench/tools_fixture.py`) answers for every upstream; `tools/list` on
  each virtual server (p50, gateway CPU per list) and an echo call of one tool through it;
* **answers** (1 KiB, 64 KiB, 1 MiB echo answers): `auth: none` with the inspection stage on
  (the default) beside the same gateway with it off (`raw`), so inspection's cost per KiB
  shows.

Each dimension reports slopes per unit of work — µs of added p50, µs of CPU and KiB of RSS
per session, per agent, per tool, per KiB — between consecutive sizes, and flags one that
grows faster than linear (the last step's slope well above the first's, beyond noise) or a
per-call cost that follows the size of an index. Markdown on stdout, JSON in
bench/results/scale.json. Exit status: 0, 1 (a call failed), 2 (setup failed), 130.

    .venv/bin/python bench/scale.py [--only sessions,agents,tools,answers] [--quick]
                                    [--rounds R] [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from load import LEGACY, Phase, _runner, cpu_ms_between, cpu_sample, percentile
from run import (
    BENCH,
    POLICY_CEDAR,
    ROOT,
    Child,
    Fleet,
    SetupError,
    _agent_kids,
    _git_commit,
    _on_signal,
    _serve,
    free_port,
    loadavg,
    proc_status,
    ratio,
    wait_ready,
)

from bastion.control.registry.agents import Agent, AgentStatus
from bastion.control.registry.store import SqliteRegistry
from bastion.identity.keys import generate

RESULTS = BENCH / "results" / "scale.json"
DIMENSIONS = ("sessions", "agents", "tools", "answers")
SESSIONS = (1, 1_000, 10_000)
AGENT_COUNTS = (10, 1_000, 100_000)
AGENTS_PER_TENANT = 10
TOOLS_PER_UPSTREAM = (1, 10, 100)
UPSTREAMS = 20
ANSWER_KIB = (1, 64, 1024)
# A step is superlinear when its slope exceeds the first step's by this factor and the
# growth it adds is above the noise floor of the measurement (below).
SUPERLINEAR_FACTOR = 2.0
NOISE = {"added_p50_ms": 0.05, "cpu_ms_per_call": 0.03, "rss_kib": 4096.0}
ACCEPT = "application/json, text/event-stream"


@dataclass(frozen=True)
class Target:
    """One thing an echo call is sent to: its URL, the pid whose CPU counts, its auth."""

    name: str
    url: str
    pid: int
    auth: dict[str, Any] | None = None
    tool: str = "echo"


# -- measuring ---------------------------------------------------------------------------------


class Bench:
    """Runs phases in this process (bench/load.py's Phase, on uvloop) and pairs them."""

    def __init__(self, rounds: int, calls: int, warmup: int) -> None:
        self.runner = _runner().__enter__()
        self.rounds, self.calls, self.warmup = rounds, calls, warmup
        self.failures: list[str] = []

    def close(self) -> None:
        self.runner.__exit__(None, None, None)

    def phase(self, target: Target, era: str, calls: int, answer_bytes: int = 0) -> dict:
        cmd = {
            "url": target.url,
            "era": era,
            "calls": calls,
            "concurrency": 1,
            "warmup": self.warmup,
            "timeout": 120,
            "pids": {"target": target.pid},
            "auth": target.auth,
            "tool": target.tool,
            "answer_bytes": answer_bytes,
        }
        result: dict[str, Any] = self.runner.run(Phase(cmd).run())
        if "fatal" in result or result["errors"]:
            problem = result.get("fatal") or result["error_samples"][:1]
            self.failures.append(f"{target.name}: {problem}")
        return result

    def paired(
        self, targets: list[Target], era: str, *, calls: int | None = None, answer_bytes: int = 0
    ) -> dict[str, dict[str, float | None]]:
        """Rounds of one sequential phase per target (order rotated per round); per target
        the medians of p50, CPU per call, added p50 (− direct) and its ratio to the bare
        hop's, each compared within its round."""
        rows: list[dict[str, dict[str, Any]]] = []
        for r in range(self.rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            rows.append(
                {t.name: self.phase(t, era, calls or self.calls, answer_bytes) for t in order}
            )
        out: dict[str, dict[str, float | None]] = {}
        for t in targets:
            out[t.name] = _summary(rows, t.name)
        return out

    def lists(self, target: Target, calls: int, expect: int) -> dict[str, float | None]:
        """`tools/list` on a virtual server, sequential, modern era: p50 and CPU per list."""
        return self.runner.run(_lists(target, calls, self.warmup // 10 + 5, expect))


def _summary(rows: list[dict[str, dict[str, Any]]], name: str) -> dict[str, float | None]:
    def med(fn: Callable[[dict[str, dict[str, Any]]], float | None]) -> float | None:
        values = []
        for row in rows:
            try:
                value = fn(row)
            except (KeyError, TypeError):
                continue
            if value is not None and not math.isnan(value):
                values.append(value)
        return statistics.median(values) if values else None

    def cpu(row: dict[str, dict[str, Any]], who: str) -> float | None:
        value: float | None = row[who]["cpu_ms_per_call"]["target"]
        return value

    return {
        "p50_ms": med(lambda row: row[name]["p50_ms"]),
        "cpu_ms_per_call": med(lambda row: cpu(row, name)),
        "added_p50_ms": med(lambda row: row[name]["p50_ms"] - row["direct"]["p50_ms"]),
        "added_p50_x_bare": med(
            lambda row: ratio(
                row[name]["p50_ms"] - row["direct"]["p50_ms"],
                row["bare"]["p50_ms"] - row["direct"]["p50_ms"],
            )
        ),
        "cpu_x_bare": med(lambda row: ratio(cpu(row, name), cpu(row, "bare"))),
    }


async def _lists(target: Target, calls: int, warmup: int, expect: int) -> dict[str, Any]:
    headers = {
        "Content-Type": "application/json",
        "Accept": ACCEPT,
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/list",
    }
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    latencies: list[int] = []
    errors: list[str] = []
    async with aiohttp.ClientSession() as session:

        async def one(i: int, record: bool) -> None:
            body = {"jsonrpc": "2.0", "id": i, "method": "tools/list", "params": {"_meta": meta}}
            start = time.perf_counter_ns()
            async with session.post(target.url, data=orjson.dumps(body), headers=headers) as r:
                data = await r.read()
            elapsed = time.perf_counter_ns() - start
            try:
                found = len(orjson.loads(data)["result"]["tools"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                found = -1
            if r.status != 200 or found != expect:
                errors.append(f"HTTP {r.status}, {found} tools (expected {expect}): {data[:120]!r}")
            elif record:
                latencies.append(elapsed)

        for i in range(warmup):
            await one(i, False)
        before = cpu_sample(target.pid)
        for i in range(calls):
            await one(i, True)
        after = cpu_sample(target.pid)
    spent, _ = cpu_ms_between(before, after)
    ordered = sorted(ns / 1e6 for ns in latencies)
    return {
        "p50_ms": percentile(ordered, 0.5),
        "p99_ms": percentile(ordered, 0.99),
        "cpu_ms_per_list": None if spent is None else spent / calls,
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def memory(child: Child) -> dict[str, int]:
    """The gateway's VmRSS and VmHWM in KiB."""
    return proc_status(child.pid)


# -- slopes ------------------------------------------------------------------------------------


def slopes(points: list[dict[str, Any]], x: str, ys: dict[str, float]) -> dict[str, Any]:
    """Per y: the slope of each step between consecutive sizes (y units per unit of x), the
    overall slope, and whether it grows faster than linear (the last step's slope above
    SUPERLINEAR_FACTOR × the first's, adding more than the noise floor)."""
    out: dict[str, Any] = {}
    for y, scale in ys.items():
        steps = []
        for a, b in zip(points, points[1:], strict=False):
            if a.get(y) is None or b.get(y) is None:
                steps.append(None)
                continue
            steps.append((b[y] - a[y]) * scale / (b[x] - a[x]))
        first, last = points[0].get(y), points[-1].get(y)
        overall = (
            None
            if first is None or last is None
            else (last - first) * scale / (points[-1][x] - points[0][x])
        )
        superlinear = False
        if len(steps) >= 2 and None not in steps[:1] + steps[-1:]:
            s0, s1 = steps[0], steps[-1]
            rise = points[-1][y] - points[-2][y]
            floor = NOISE.get(y.replace("_raw", "").replace("_guarded", ""), 0.0)
            # The first step must itself rise above the noise floor, or its slope says nothing
            # (RSS hardly moves over the first thousand sessions or agents: allocator slack).
            first_rise = points[1][y] - points[0][y]
            superlinear = bool(s1 > SUPERLINEAR_FACTOR * s0 and rise > floor and first_rise > floor)
        out[y] = {"steps": steps, "overall": overall, "superlinear": superlinear}
    return out


# -- set-ups -----------------------------------------------------------------------------------


def _policy(servers: list[str]) -> str:
    grants = "".join(
        f'    - {{id: g-{s}, tenant: "*", server: {s}, tools: "*"}}\n' for s in servers
    )
    return "policy:\n  grants:\n" + grants + "  files: [bench.cedar]\n"


def _base(fleet: Fleet) -> tuple[Child, Child, str, str]:
    """Echo server and bare hop, ready: (echo, bare, echo URL, bare URL)."""
    echo_port = free_port()
    echo_url = f"http://127.0.0.1:{echo_port}/mcp"
    echo = fleet.start(
        "echo",
        [sys.executable, str(ROOT / "examples" / "echo_server.py"), "--port", str(echo_port)],
    )
    wait_ready(echo, f"http://127.0.0.1:{echo_port}/healthz", time.monotonic() + 60)
    bare, bare_url = _bare(fleet, echo_url)
    return echo, bare, echo_url, bare_url


def _bare(fleet: Fleet, upstream: str) -> tuple[Child, str]:
    """A bare hop in front of `upstream`, ready: (process, URL)."""
    port = free_port()
    bare = fleet.start(
        "bare",
        [sys.executable, str(BENCH / "bare_hop.py"), "--upstream", upstream, "--port", str(port)],
    )
    wait_ready(bare, f"http://127.0.0.1:{port}/healthz", time.monotonic() + 60)
    return bare, f"http://127.0.0.1:{port}/mcp"


def _gateway(
    fleet: Fleet, workdir: Path, name: str, body: str, path: str = "/servers/echo/mcp"
) -> tuple[Child, str, int]:
    """A `bastion serve` of config `body` (listen and state_dir added), ready."""
    port = free_port()
    config = workdir / f"{name}.yaml"
    (workdir / "bench.cedar").write_text(POLICY_CEDAR)
    config.write_text(
        f"# Generated by bench/scale.py\nlisten: {{host: 127.0.0.1, port: {port}}}\n"
        f"state_dir: {json.dumps(str(workdir / ('state-' + name)))}\n" + body
    )
    child = _serve(fleet, name, config, port)
    wait_ready(child, f"http://127.0.0.1:{port}/readyz", time.monotonic() + 120)
    return child, f"http://127.0.0.1:{port}{path}", port


def _echo_upstream(url: str, name: str = "echo", extra: str = "") -> str:
    return f"  {name}: {{transport: http, url: {json.dumps(url)}{extra}}}\n"


# -- the dimensions ----------------------------------------------------------------------------


async def _open_sessions(url: str, count: int, concurrency: int = 32) -> int:
    """Open `count` legacy sessions (initialize + initialized) and leave them open."""
    hello = orjson.dumps(
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": LEGACY,
                "capabilities": {},
                "clientInfo": {"name": "bastion-scale", "version": "0.1.0"},
            },
        }
    )
    note = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
    base = {"Content-Type": "application/json", "Accept": ACCEPT}
    opened = 0
    left = count
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal opened, left
            while left > 0:
                left -= 1
                async with session.post(url, data=hello, headers=base) as r:
                    await r.read()
                    sid = r.headers.get("Mcp-Session-Id")
                if r.status != 200 or sid is None:
                    raise SetupError(f"initialize: HTTP {r.status}, session id {sid is not None}")
                headers = {**base, "Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY}
                async with session.post(url, data=note, headers=headers) as r:
                    await r.read()
                opened += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return opened


def sessions(bench: Bench, fleet: Fleet, workdir: Path, log: Any) -> dict[str, Any]:
    """RSS and added p50 with 1, 1,000 and 10,000 live legacy sessions."""
    echo, bare, echo_url, bare_url = _base(fleet)
    top = max(SESSIONS) + 100
    body = (
        "auth: {mode: none, tenant: bench}\naudit: {enabled: false}\n"
        f"limits: {{max_sessions: {top}, max_sessions_per_agent: {top}, "
        f"max_sessions_per_tenant: {top}}}\n" + _policy(["echo"]) + "upstreams:\n"
    ) + _echo_upstream(echo_url)
    gw, url, _ = _gateway(fleet, workdir, "sessions", body)
    targets = [
        Target("direct", echo_url, echo.pid),
        Target("bare", bare_url, bare.pid),
        Target("bastion", url, gw.pid),
    ]
    points, live = [], 0
    for size in SESSIONS:
        # The measuring phase opens (and closes) one session of its own: size − 1 stay open.
        started = time.monotonic()
        live += bench.runner.run(_open_sessions(url, size - 1 - live))
        opened_s = time.monotonic() - started
        mem = memory(gw)
        result = bench.paired(targets, "legacy")["bastion"]
        point = {"size": size, "open_s": opened_s, **mem, **result}
        points.append(point | {"rss_kib": mem.get("VmRSS")})
        print(f"  sessions {size:>6}: {_line(point)}", file=log, flush=True)
    return _dimension("sessions", "session", points)


def _filler_agents(registry: SqliteRegistry, start: int, stop: int, jwks: dict) -> float:
    """Register agents start..stop-1 (ten per tenant); return the seconds it took."""
    began = time.monotonic()
    now = time.time()
    for i in range(start, stop):
        registry.add(
            Agent(
                id=f"scale-{i:06d}",
                display_name=f"scale {i}",
                owner="bench",
                tenant=f"ten{i // AGENTS_PER_TENANT:05d}",
                purpose="scale benchmark filler",
                environment="dev",
                jwks=jwks,
                spiffe_id=None,
                audiences=(),
                scopes=(),
                require_dpop=False,
                expires_at=None,
                status=AgentStatus.ACTIVE,
                created_at=now,
            )
        )
    return time.monotonic() - began


def agents(bench: Bench, fleet: Fleet, workdir: Path, log: Any) -> dict[str, Any]:
    """RSS and added p50 with 10, 1,000 and 100,000 registered agents (auth: oauth)."""
    echo, bare, echo_url, bare_url = _base(fleet)
    body = (
        "audit: {enabled: false}\nauth:\n  mode: oauth\n  agents:\n"
        "    - {id: bench-bearer, tenant: bench, owner: bench, purpose: scale calls}\n"
        + _policy(["echo", "echo-guarded"])
        + "upstreams:\n"
        + _echo_upstream(echo_url)
        + _echo_upstream(echo_url, "echo-guarded", ', tenant_arguments: {project: "{tenant}-p*"}')
    )
    gw, url, port = _gateway(fleet, workdir, "agents", body)
    base = f"http://127.0.0.1:{port}"
    config = workdir / "agents.yaml"
    kid = _agent_kids(config)["bench-bearer"]
    pem = str(workdir / "state-agents" / "agents" / "bench-bearer.pem")

    def auth(resource: str) -> dict[str, Any]:
        return {
            "scheme": "bearer",
            "token_url": base + "/oauth/token",
            "issuer": base,
            "resource": resource,
            "agent": "bench-bearer",
            "kid": kid,
            "pem": pem,
        }

    guarded = f"{base}/servers/echo-guarded/mcp"
    targets = [
        Target("direct", echo_url, echo.pid),
        Target("bare", bare_url, bare.pid),
        Target("oauth", url, gw.pid, auth(url)),
        Target("guarded", guarded, gw.pid, auth(guarded)),
    ]
    jwks = {"keys": [generate("ES256").public_jwk()]}
    registry = SqliteRegistry(workdir / "state-agents" / "registry.db")
    points, have = [], 1
    try:
        for size in AGENT_COUNTS:
            added_s = _filler_agents(registry, have - 1, size - 1, jwks)
            have = size
            _settle(bench, targets[2])
            mem = memory(gw)
            result = bench.paired(targets, "modern")
            point = {"size": size, "register_s": added_s, **mem, "rss_kib": mem.get("VmRSS")}
            point |= result["oauth"]
            point |= {f"{k}_guarded": v for k, v in result["guarded"].items()}
            points.append(point)
            print(f"  agents {size:>7}: {_line(point)} · guarded {_line(point, '_guarded')}",
                  file=log, flush=True)  # fmt: skip
    finally:
        registry.close()
    extra = {f"{k}_guarded": s for k, s in NOISE_Y.items() if k != "rss_kib"}
    return _dimension("agents", "agent", points, extra)


def _settle(bench: Bench, target: Target) -> None:
    """One short unmeasured phase: its token request makes the gateway read the registry
    (the token endpoint refreshes the view itself), so the measured phases see every agent."""
    bench.phase(target, "modern", 20)


def tools(bench: Bench, fleet: Fleet, workdir: Path, log: Any) -> dict[str, Any]:
    """tools/list and an echo call on virtual servers of 20 upstreams × 1, 10, 100 tools."""
    port = free_port()
    fixture = fleet.start(
        "tools-fixture", [sys.executable, str(BENCH / "tools_fixture.py"), "--port", str(port)]
    )
    wait_ready(fixture, f"http://127.0.0.1:{port}/healthz", time.monotonic() + 60)
    # Here the echo call's upstream is the fixture's first tool: direct and the bare hop too.
    direct_url = f"http://127.0.0.1:{port}/u0/n1/mcp"
    bare, bare_url = _bare(fleet, direct_url)
    ups, servers = [], []
    for n in TOOLS_PER_UPSTREAM:
        names = [f"n{n}u{k}" for k in range(UPSTREAMS)]
        ups += [
            f"  {name}: {{transport: http, protocol: legacy, "
            f"url: http://127.0.0.1:{port}/u{k}/n{n}/mcp}}\n"
            for k, name in enumerate(names)
        ]
        servers.append(f"  vs{n}: {{path: /vs{n}, upstreams: [{', '.join(names)}]}}\n")
    all_names = [f"n{n}u{k}" for n in TOOLS_PER_UPSTREAM for k in range(UPSTREAMS)]
    body = (
        "auth: {mode: none, tenant: bench}\naudit: {enabled: false}\n"
        + _policy(all_names)
        + "upstreams:\n"
        + "".join(ups)
        + "virtual_servers:\n"
        + "".join(servers)
    )
    gw, _, gw_port = _gateway(fleet, workdir, "tools", body, "/")
    base = f"http://127.0.0.1:{gw_port}"
    direct = Target("direct", direct_url, fixture.pid, tool="s0_tool_000")
    bare_target = Target("bare", bare_url, bare.pid, tool="s0_tool_000")
    points = []
    for n in TOOLS_PER_UPSTREAM:
        total = n * UPSTREAMS
        vs = Target("vs", f"{base}/vs{n}", gw.pid, tool=f"n{n}u0__s0_tool_000")
        listed = bench.lists(vs, max(10, bench.calls // max(1, total // 10)), total)
        if listed["errors"]:
            bench.failures.append(f"tools/list vs{n}: {listed['error_samples'][:1]}")
        calls = bench.paired([direct, bare_target, vs], "modern")["vs"]
        mem = memory(gw)
        point = {"size": total, **mem, "rss_kib": mem.get("VmRSS"), **calls}
        point |= {
            "list_p50_ms": listed["p50_ms"],
            "list_p99_ms": listed["p99_ms"],
            "list_cpu_ms": listed["cpu_ms_per_list"],
        }
        points.append(point)
        print(
            f"  tools {total:>5}: tools/list p50 {_f(point['list_p50_ms'])} ms, CPU "
            f"{_f(point['list_cpu_ms'])} ms · echo {_line(point)} {listed['error_samples'][:1]}",
            file=log,
            flush=True,
        )
    extra = {"list_p50_ms": 1000.0, "list_cpu_ms": 1000.0}
    return _dimension("tools", "tool", points, extra)


def answers(bench: Bench, fleet: Fleet, workdir: Path, log: Any) -> dict[str, Any]:
    """Added p50 and CPU with 1 KiB, 64 KiB and 1 MiB answers, inspection on and off."""
    echo, bare, echo_url, bare_url = _base(fleet)
    common = "auth: {mode: none, tenant: bench}\naudit: {enabled: false}\n"
    tail = _policy(["echo"]) + "upstreams:\n" + _echo_upstream(echo_url)
    gw, url, _ = _gateway(fleet, workdir, "answers", common + tail)
    raw, raw_url, _ = _gateway(
        fleet, workdir, "answers-raw", common + "inspection: {enabled: false}\n" + tail
    )
    targets = [
        Target("direct", echo_url, echo.pid),
        Target("bare", bare_url, bare.pid),
        Target("bastion", url, gw.pid),
        Target("raw", raw_url, raw.pid),
    ]
    points = []
    for kib in ANSWER_KIB:
        calls = max(50, bench.calls // max(1, kib // 8))
        result = bench.paired(targets, "modern", calls=calls, answer_bytes=kib * 1024)
        mem = memory(gw)
        point = {"size": kib, "calls": calls, **mem, "rss_kib": mem.get("VmRSS")}
        point |= result["bastion"]
        point |= {f"{k}_raw": v for k, v in result["raw"].items()}
        point["bare_p50_ms"] = result["bare"]["p50_ms"]
        points.append(point)
        print(f"  answers {kib:>5} KiB: {_line(point)} · raw {_line(point, '_raw')}",
              file=log, flush=True)  # fmt: skip
    extra = {f"{k}_raw": s for k, s in NOISE_Y.items() if k != "rss_kib"}
    dim = _dimension("answers", "KiB", points, extra)
    # Inspection's own cost per KiB: (inspection on − off), CPU and added p50.
    dim["inspection_us_per_kib"] = {
        "cpu": _diff_slope(points, "cpu_ms_per_call"),
        "added_p50": _diff_slope(points, "added_p50_ms"),
    }
    return dim


def _diff_slope(points: list[dict[str, Any]], y: str) -> float | None:
    a, b = points[0], points[-1]
    try:
        da = a[y] - a[f"{y}_raw"]
        db = b[y] - b[f"{y}_raw"]
    except TypeError:
        return None
    return (db - da) * 1000.0 / (b["size"] - a["size"])


# µs (or KiB) per unit of work: the scale factor from each y's unit.
NOISE_Y = {"added_p50_ms": 1000.0, "cpu_ms_per_call": 1000.0, "rss_kib": 1.0}


def _dimension(
    name: str, unit: str, points: list[dict[str, Any]], extra: dict[str, float] | None = None
) -> dict[str, Any]:
    ys = dict(NOISE_Y) | (extra or {})
    found = slopes(points, "size", ys)
    return {
        "dimension": name,
        "unit": unit,
        "points": points,
        "slopes": found,
        "superlinear": sorted(y for y, s in found.items() if s["superlinear"]),
    }


# -- report ------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _line(point: dict[str, Any], suffix: str = "") -> str:
    return (
        f"added p50 {_f(point.get('added_p50_ms' + suffix))} ms "
        f"({_f(point.get('added_p50_x_bare' + suffix), 2)}× bare), CPU "
        f"{_f(point.get('cpu_ms_per_call' + suffix))} ms/call "
        f"({_f(point.get('cpu_x_bare' + suffix), 2)}× bare), RSS "
        f"{_f((point.get('VmRSS') or 0) / 1024, 1)} MiB"
    )


def render(report: dict[str, Any]) -> str:
    out = [
        "# Bastion scale benchmark — how cost grows with the work",
        "",
        f"{report['meta']['rounds']} rounds × {report['meta']['calls']} sequential calls per "
        f"target and size, paired within each round; load avg before "
        f"{report['meta']['loadavg_before']}",
    ]
    for dim in report["dimensions"].values():
        unit = dim["unit"]
        suffixes = [""]
        if dim["dimension"] == "agents":
            suffixes.append("_guarded")
        if dim["dimension"] == "answers":
            suffixes.append("_raw")
        out += ["", f"## {dim['dimension']} (per {unit})", ""]
        head = (
            "| size | VmRSS MiB | VmHWM MiB | variant | added p50 ms | ÷ bare "
            "| CPU ms/call | ÷ bare |"
        )
        extra = dim["dimension"] == "tools"
        if extra:
            head += " tools/list p50 ms | tools/list CPU ms |"
        out += [head, "|--:|--:|--:|---|--:|--:|--:|--:|" + ("--:|--:|" if extra else "")]
        for p in dim["points"]:
            for sfx in suffixes:
                label = {"": "default", "_guarded": "tenant guard on", "_raw": "inspection off"}
                row = (
                    f"| {p['size']:,} | {_f((p.get('VmRSS') or 0) / 1024, 1)} "
                    f"| {_f((p.get('VmHWM') or 0) / 1024, 1)} | {label[sfx]} "
                    f"| {_f(p.get('added_p50_ms' + sfx))} "
                    f"| {_f(p.get('added_p50_x_bare' + sfx), 2)}× "
                    f"| {_f(p.get('cpu_ms_per_call' + sfx))} "
                    f"| {_f(p.get('cpu_x_bare' + sfx), 2)}× |"
                )
                if extra:
                    row += f" {_f(p.get('list_p50_ms'))} | {_f(p.get('list_cpu_ms'))} |"
                out.append(row)
        out += ["", f"Slopes per {unit} (each step between sizes; overall):", ""]
        for y, s in dim["slopes"].items():
            what = "KiB RSS" if y == "rss_kib" else "µs"
            steps = " → ".join(_f(v, 4) for v in s["steps"])
            flag = " **SUPERLINEAR**" if s["superlinear"] else ""
            out.append(f"- {y}: {steps} {what}/{unit}; overall {_f(s['overall'], 4)}{flag}")
        if dim["dimension"] == "answers":
            ins = dim["inspection_us_per_kib"]
            out.append(
                f"- inspection (on − off): CPU {_f(ins['cpu'], 2)} µs/KiB, added p50 "
                f"{_f(ins['added_p50'], 2)} µs/KiB"
            )
    flagged = [
        f"{d['dimension']}: {', '.join(d['superlinear'])}"
        for d in report["dimensions"].values()
        if d["superlinear"]
    ]
    out += ["", "Superlinear: " + ("; ".join(flagged) if flagged else "none")]
    status = "OK" if report["ok"] else f"FAILED: {report['failure']}"
    out.append(f"Result: {status} · {report['meta']['duration_s']:.0f} s · JSON: {report['json']}")
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------

RUNS: dict[str, Callable[[Bench, Fleet, Path, Any], dict[str, Any]]] = {
    "sessions": sessions,
    "agents": agents,
    "tools": tools,
    "answers": answers,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="How Bastion's cost grows with the work.")
    parser.add_argument("--only", default=",".join(DIMENSIONS), help="comma list of dimensions")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds per size (5)")
    parser.add_argument("--calls", type=int, default=800, help="sequential calls per phase")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up calls per phase")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 200 calls")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(DIMENSIONS)
    if unknown:
        parser.error(f"--only: unknown dimension(s) {sorted(unknown)}; expected {DIMENSIONS}")
    if args.quick:
        args.rounds, args.calls, args.warmup = 2, 200, 30
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    started = time.monotonic()
    meta = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "calls": args.calls,
        "loadavg_before": loadavg(),
        "git_commit": _git_commit(),
    }
    bench = Bench(args.rounds, args.calls, args.warmup)
    dims: dict[str, Any] = {}
    failure, code = None, 0
    try:
        for name in [d for d in DIMENSIONS if d in args.only.split(",")]:
            print(f"scale: {name}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix=f"bastion-scale-{name}-") as tmp:
                fleet = Fleet(Path(tmp))
                try:
                    dims[name] = RUNS[name](bench, fleet, Path(tmp), sys.stderr)
                finally:
                    fleet.stop_all()
    except SetupError as exc:
        failure, code = str(exc), 2
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        print("scale: interrupted", file=sys.stderr)
        return 130
    finally:
        bench.close()
    if failure is None and bench.failures:
        failure, code = f"{len(bench.failures)} failed phase(s): {bench.failures[:3]}", 1
    meta["loadavg_after"] = loadavg()
    meta["duration_s"] = time.monotonic() - started
    output: Path = args.output
    report = {
        "ok": failure is None,
        "failure": failure,
        "meta": meta,
        "dimensions": dims,
        "json": str(output.relative_to(ROOT) if output.is_relative_to(ROOT) else output),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    return code


if __name__ == "__main__":
    sys.exit(main())
