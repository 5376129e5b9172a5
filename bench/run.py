"""Bastion's latency benchmark: an echo tool call direct, through a bare hop, through Bastion.

One run starts, as its own process tree:

* the demo echo MCP server (examples/echo_server.py) on a free loopback port;
* bench/bare_hop.py, a pass-through proxy with no MCP logic, in front of it;
* `bastion serve` with a generated config whose one upstream is the echo server;
* bench/load.py, the load generator (aiohttp, pooled), driven over stdin/stdout.

For each protocol era (2026-07-28 stateless, and/or 2025-11-25 with a session), each target
and each mode (sequential calls; N concurrent workers) it measures latency percentiles,
calls/s, the CPU time the target process and the echo server spent per call (from
/proc/PID/stat), and reads every process's peak RSS (VmHWM). The whole measurement repeats
--repeats times; the report gives medians across repeats, as a Markdown table on stdout and
as JSON in bench/results/latest.json. Exit status: 0 when every call succeeded, 1 when any
failed, 2 when the setup failed, 130 on interruption.

    .venv/bin/python bench/run.py [--quick] [--era modern|legacy|both] [--repeats R]
                                  [--calls N] [--concurrent-calls N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import math
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

TARGETS = ("direct", "bare", "bastion")
LABELS = {"direct": "direct", "bare": "bare hop", "bastion": "bastion"}
MODES = ("sequential", "concurrent")
ERAS = {"modern": "2026-07-28, stateless", "legacy": "2025-11-25, Mcp-Session-Id"}

# Project targets for the gateway's overhead (reported, not enforced).
TARGET_ADDED_P50_MS = 0.3
TARGET_CPU_MS_PER_CALL = 0.3

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


class SetupError(Exception):
    """A child would not start or the load generator broke: no measurement possible."""


# -- child processes --------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark itself dies (PR_SET_PDEATHSIG)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[Any]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in text[-lines:])


@dataclass
class Fleet:
    """Every process this run started; stop_all() ends them, newest first."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, pipes: bool = False) -> Child:
        log = self.workdir / f"{name}.log"
        handle = log.open("wb")
        try:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else handle,
                stderr=handle,
                text=pipes,
                bufsize=1 if pipes else -1,
                start_new_session=True,  # a terminal Ctrl-C reaches run.py only; it stops these
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads in this process
            )
        finally:
            handle.close()
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop_all(self, grace: float = 8.0) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                if child.proc.stdin is not None:
                    # The load generator: ask it to quit; mid-phase it cannot read, so end it.
                    try:
                        child.proc.stdin.write('{"cmd": "quit"}\n')
                        child.proc.stdin.close()
                        child.proc.wait(timeout=1)
                    except (OSError, ValueError, subprocess.TimeoutExpired):
                        _signal_group(child.proc, signal.SIGTERM)
                else:
                    _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait(timeout=5)
            for stream in (child.proc.stdout, child.proc.stdin):
                if stream is not None:
                    try:
                        stream.close()
                    except (OSError, ValueError):
                        pass
        self.children.clear()


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    # Each child leads its own session (start_new_session), so its group id is its pid.
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(child: Child, url: str, deadline: float) -> None:
    """Poll a health URL until it answers 200; fail early if the process exits."""
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise SetupError(
                f"{child.name} exited with code {child.proc.returncode} before it was ready:\n"
                f"{child.tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise SetupError(f"{child.name} not ready at {url} in time:\n{child.tail()}")


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS in KiB from /proc/PID/status ({} once the process is gone)."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# -- the load generator -----------------------------------------------------------------------


class Load:
    """bench/load.py, one JSON command and one JSON reply per line."""

    def __init__(self, child: Child) -> None:
        self.child = child

    def ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        stdin, stdout = self.child.proc.stdin, self.child.proc.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(json.dumps(command) + "\n")
            stdin.flush()
        except OSError as exc:
            raise SetupError(f"load generator is gone: {exc}\n{self.child.tail()}") from exc
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            _signal_group(self.child.proc, signal.SIGKILL)
            raise SetupError(f"load generator gave no answer within {timeout:g} s")
        line = stdout.readline()
        if not line:
            raise SetupError(f"load generator exited:\n{self.child.tail()}")
        reply: dict[str, Any] = json.loads(line)
        return reply


# -- measurement ------------------------------------------------------------------------------


@dataclass
class Plan:
    eras: tuple[str, ...]
    calls: int
    concurrent_calls: int
    concurrency: int
    repeats: int
    warmup: int
    phase_timeout: float


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(
        description="Echo tool-call latency: direct vs one bare Python hop vs Bastion.",
    )
    parser.add_argument("--calls", type=int, help="sequential calls per phase (default 2000)")
    parser.add_argument(
        "--concurrent-calls", type=int, help="calls in the concurrent phase (default 4000)"
    )
    parser.add_argument("--concurrency", type=int, help="concurrent workers (default 32)")
    parser.add_argument("--repeats", type=int, help="whole-measurement repeats (default 3)")
    parser.add_argument(
        "--era", choices=("modern", "legacy", "both"), help="protocol era(s) (default both)"
    )
    parser.add_argument("--warmup", type=int, help="warm-up calls per phase (default 200)")
    parser.add_argument(
        "--phase-timeout",
        type=float,
        default=120.0,
        help="hard limit in seconds for a phase's warm-up and again for its measured calls",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small numbers for a smoke run (< 30 s)"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "latest.json", help="where the JSON goes"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    plan = Plan(
        eras=("modern", "legacy") if (args.era or "both") == "both" else (args.era,),
        calls=args.calls if args.calls is not None else (200 if quick else 2000),
        concurrent_calls=args.concurrent_calls
        if args.concurrent_calls is not None
        else (400 if quick else 4000),
        concurrency=args.concurrency if args.concurrency is not None else 32,
        repeats=args.repeats if args.repeats is not None else (1 if quick else 3),
        warmup=args.warmup if args.warmup is not None else (50 if quick else 200),
        phase_timeout=args.phase_timeout,
    )
    for name in ("calls", "concurrent_calls", "concurrency", "repeats"):
        if getattr(plan, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args, plan


def bastion_command() -> list[str]:
    script = Path(sys.executable).parent / "bastion"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "bastion.cli"]


def start_targets(fleet: Fleet, workdir: Path) -> dict[str, Any]:
    """Start echo, bare hop and Bastion; return their URLs and processes once all are ready."""
    py = sys.executable
    echo_port, bare_port, bastion_port = free_port(), free_port(), free_port()
    echo_url = f"http://127.0.0.1:{echo_port}/mcp"
    config = workdir / "bastion.yaml"
    config.write_text(
        "# Generated by bench/run.py\n"
        f"listen: {{host: 127.0.0.1, port: {bastion_port}}}\n"
        "auth: {mode: none, tenant: bench}\n"
        "upstreams:\n"
        f"  echo: {{transport: http, url: {json.dumps(echo_url)}}}\n"
    )
    echo = fleet.start(
        "echo", [py, str(ROOT / "examples" / "echo_server.py"), "--port", str(echo_port)]
    )
    bare = fleet.start(
        "bare",
        [py, str(BENCH / "bare_hop.py"), "--upstream", echo_url, "--port", str(bare_port)],
    )
    bastion = fleet.start(
        "bastion",
        [
            *bastion_command(),
            "serve",
            "--config",
            str(config),
            "--port",
            str(bastion_port),
            "--log-level",
            "warning",
        ],
    )
    deadline = time.monotonic() + 60
    wait_ready(echo, f"http://127.0.0.1:{echo_port}/healthz", deadline)
    wait_ready(bare, f"http://127.0.0.1:{bare_port}/healthz", deadline)
    wait_ready(bastion, f"http://127.0.0.1:{bastion_port}/readyz", deadline)
    return {
        "procs": {"echo": echo, "bare": bare, "bastion": bastion},
        "urls": {
            "direct": echo_url,
            "bare": f"http://127.0.0.1:{bare_port}/mcp",
            "bastion": f"http://127.0.0.1:{bastion_port}/servers/echo/mcp",
        },
        "config": config.read_text(),
    }


def measure(
    plan: Plan, load: Load, setup: dict[str, Any], runs: list[dict[str, Any]], log: TextIO
) -> None:
    """Run every phase `plan.repeats` times; each finished repeat is appended to `runs`."""
    procs: dict[str, Child] = setup["procs"]
    echo_pid = procs["echo"].pid
    target_pid = {"direct": echo_pid, "bare": procs["bare"].pid, "bastion": procs["bastion"].pid}
    for repeat in range(plan.repeats):
        # Rotate the targets' order each repeat so slow drift on a shared machine spreads out.
        order = TARGETS[repeat % 3 :] + TARGETS[: repeat % 3]
        run: dict[str, Any] = {}
        for era in plan.eras:
            for target in order:
                for mode in MODES:
                    sequential = mode == "sequential"
                    command = {
                        "cmd": "phase",
                        "url": setup["urls"][target],
                        "era": era,
                        "calls": plan.calls if sequential else plan.concurrent_calls,
                        "concurrency": 1 if sequential else plan.concurrency,
                        "warmup": plan.warmup,
                        "timeout": plan.phase_timeout,
                        "pids": {"target": target_pid[target], "echo": echo_pid},
                    }
                    result = load.ask(command, 2 * plan.phase_timeout + 60)
                    run.setdefault(era, {}).setdefault(target, {})[mode] = result
                    print(
                        f"  repeat {repeat + 1}/{plan.repeats} {era:6} {LABELS[target]:8} "
                        f"{mode:10} {_progress(result)}",
                        file=log,
                        flush=True,
                    )
        run["rss_kib"] = {name: proc_status(child.pid) for name, child in procs.items()}
        runs.append(run)


def _progress(result: dict[str, Any]) -> str:
    if "fatal" in result:
        return f"FAILED: {result['fatal']}"
    text = (
        f"p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms  "
        f"{result['calls_per_s']:.0f}/s  errors {result['errors']}"
    )
    if result["errors"] or result["timed_out"]:
        text += f"  {'TIMED OUT ' if result['timed_out'] else ''}{result['error_samples'][:1]}"
    return text


# -- summary ----------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def summarize(plan: Plan, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians across repeats per era/target/mode, and per-repeat paired comparisons."""
    summary: dict[str, Any] = {}
    for era in plan.eras:
        table: dict[str, Any] = {}
        for target in TARGETS:
            for mode in MODES:
                phases = [run[era][target][mode] for run in runs]
                good = [p for p in phases if "fatal" not in p]

                def med(key: str, sub: str | None = None, _good: list[Any] = good) -> Any:
                    if sub is None:
                        return _median([p.get(key) for p in _good])
                    return _median([(p.get(key) or {}).get(sub) for p in _good])

                table.setdefault(target, {})[mode] = {
                    "p50_ms": med("p50_ms"),
                    "p90_ms": med("p90_ms"),
                    "p99_ms": med("p99_ms"),
                    "mean_ms": med("mean_ms"),
                    "calls_per_s": med("calls_per_s"),
                    "target_cpu_ms_per_call": med("cpu_ms_per_call", "target"),
                    "echo_cpu_ms_per_call": med("cpu_ms_per_call", "echo"),
                    "client_cpu_ms_per_call": med("client_cpu_ms_per_call"),
                    "errors": sum(p.get("errors", 0) for p in good),
                    "warmup_errors": sum(p.get("warmup_errors", 0) for p in good),
                    "failed_phases": len(phases)
                    - len(good)
                    + sum(1 for p in good if p.get("timed_out")),
                }
        comparisons: dict[str, Any] = {}
        for mode in MODES:

            def paired(fn: Any, _era: str = era, _mode: str = mode) -> float | None:
                return _paired(runs, _era, _mode, fn)

            comparisons[mode] = {
                "bastion_vs_direct_p50": paired(lambda d, b, g: g["p50_ms"] / d["p50_ms"]),
                "bare_vs_direct_p50": paired(lambda d, b, g: b["p50_ms"] / d["p50_ms"]),
                "bastion_vs_direct_p99": paired(lambda d, b, g: g["p99_ms"] / d["p99_ms"]),
                "bare_vs_direct_p99": paired(lambda d, b, g: b["p99_ms"] / d["p99_ms"]),
                "bastion_vs_direct_throughput": paired(
                    lambda d, b, g: g["calls_per_s"] / d["calls_per_s"]
                ),
                "bare_vs_direct_throughput": paired(
                    lambda d, b, g: b["calls_per_s"] / d["calls_per_s"]
                ),
                "bastion_added_p50_ms": paired(lambda d, b, g: g["p50_ms"] - d["p50_ms"]),
                "bare_added_p50_ms": paired(lambda d, b, g: b["p50_ms"] - d["p50_ms"]),
                "bastion_over_bare_p50_ms": paired(lambda d, b, g: g["p50_ms"] - b["p50_ms"]),
                "bastion_added_p99_ms": paired(lambda d, b, g: g["p99_ms"] - d["p99_ms"]),
                "bare_added_p99_ms": paired(lambda d, b, g: b["p99_ms"] - d["p99_ms"]),
                "bastion_cpu_ms_per_call": table["bastion"][mode]["target_cpu_ms_per_call"],
                "bare_cpu_ms_per_call": table["bare"][mode]["target_cpu_ms_per_call"],
                "bastion_over_bare_cpu_ms_per_call": paired(
                    lambda d, b, g: g["cpu_ms_per_call"]["target"] - b["cpu_ms_per_call"]["target"]
                ),
            }
        summary[era] = {"targets": table, "comparisons": comparisons}
    return summary


def _paired(runs: list[dict[str, Any]], era: str, mode: str, fn: Any) -> float | None:
    """Median over repeats of fn(direct, bare, bastion), each repeat's phases compared."""
    values = []
    for run in runs:
        d, b, g = (run[era][t][mode] for t in TARGETS)
        if any("fatal" in p for p in (d, b, g)):
            continue
        try:
            values.append(fn(d, b, g))
        except (TypeError, ZeroDivisionError):
            continue
    return _median(values)


# -- Markdown ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 3, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}{suffix}"


def _verdict(value: float | None, limit: float) -> str:
    return "–" if value is None else ("met" if value <= limit else "MISSED")


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def render(plan: Plan, report: dict[str, Any]) -> str:
    out = []
    reps = plan.repeats
    out.append(
        f"# Bastion benchmark — echo `tools/call`, medians of {reps} repeat{'s' * (reps > 1)}"
    )
    out.append("")
    out.append(
        f"sequential: {plan.calls} calls, one at a time · concurrent: {plan.concurrent_calls} "
        f"calls over {plan.concurrency} workers · warm-up {plan.warmup} calls per phase · "
        f"load avg before {report['meta']['loadavg_before']}"
    )
    concurrent_label = f"{plan.concurrency}-concurrent"
    for era in plan.eras:
        block = report["summary"][era]
        out.append("")
        out.append(f"## {era} ({ERAS[era]})")
        out.append("")
        out.append(
            "| target | mode | p50 ms | p99 ms | calls/s | target CPU ms/call "
            "| echo CPU ms/call | errors |"
        )
        out.append("|---|---|--:|--:|--:|--:|--:|--:|")
        for target in TARGETS:
            for mode in MODES:
                row = block["targets"][target][mode]
                errors = str(row["errors"])
                if row["warmup_errors"]:
                    errors += f" (+{row['warmup_errors']} in warm-up)"
                if row["failed_phases"]:
                    errors += f" ({row['failed_phases']} phase(s) failed)"
                out.append(
                    f"| {LABELS[target]} | {mode if mode == 'sequential' else concurrent_label} "
                    f"| {_f(row['p50_ms'])} | {_f(row['p99_ms'])} | {_f(row['calls_per_s'], 0)} "
                    f"| {_f(row['target_cpu_ms_per_call'])} "
                    f"| {_f(row['echo_cpu_ms_per_call'])} | {errors} |"
                )
        out.append("")
        out.append(f"| {era}: compared with direct | sequential | {concurrent_label} |")
        out.append("|---|--:|--:|")
        cmp = block["comparisons"]
        rows = [
            ("bastion p50 ÷ direct p50", "bastion_vs_direct_p50", "x"),
            ("bare hop p50 ÷ direct p50", "bare_vs_direct_p50", "x"),
            ("bastion p99 ÷ direct p99", "bastion_vs_direct_p99", "x"),
            ("bastion calls/s ÷ direct", "bastion_vs_direct_throughput", "x"),
            ("bare hop calls/s ÷ direct", "bare_vs_direct_throughput", "x"),
            ("**bastion added p50 ms** (target ≤ 0.3)", "bastion_added_p50_ms", "ms"),
            ("bare hop added p50 ms", "bare_added_p50_ms", "ms"),
            ("bastion − bare hop p50 ms", "bastion_over_bare_p50_ms", "ms"),
            ("**bastion CPU ms/call** (target ≤ 0.3)", "bastion_cpu_ms_per_call", "cpu"),
            ("bare hop CPU ms/call", "bare_cpu_ms_per_call", "cpu"),
            ("bastion − bare hop CPU ms/call", "bastion_over_bare_cpu_ms_per_call", "ms"),
        ]
        for label, key, kind in rows:
            cells = []
            for mode in MODES:
                value = cmp[mode][key]
                if kind == "x":
                    cells.append(_f(value, 2, "×"))
                elif kind == "ms":
                    cells.append(_signed(value))
                else:
                    cells.append(_f(value))
            out.append(f"| {label} | {cells[0]} | {cells[1]} |")
    out.append("")
    out.append("| process | peak RSS (VmHWM) MiB |")
    out.append("|---|--:|")
    for name, status in report["peak_rss_kib"].items():
        out.append(f"| {name} | {_f(status.get('VmHWM', 0) / 1024, 1)} |")
    out.append("")
    lines = []
    for era in plan.eras:
        seq = report["summary"][era]["comparisons"]["sequential"]
        added, cpu = seq["bastion_added_p50_ms"], seq["bastion_cpu_ms_per_call"]
        verdict_p50 = _verdict(added, TARGET_ADDED_P50_MS)
        verdict_cpu = _verdict(cpu, TARGET_CPU_MS_PER_CALL)
        lines.append(
            f"{era}: added p50 {_signed(added)} ms ({verdict_p50}), "
            f"CPU {_f(cpu)} ms/call ({verdict_cpu})"
        )
    out.append("Targets (sequential, ≤ 0.3 ms each): " + "; ".join(lines))
    status = "OK" if report["ok"] else f"FAILED: {report['failure']}"
    out.append(f"Result: {status} · {report['meta']['duration_s']:.0f} s · JSON: {report['json']}")
    return "\n".join(out)


# -- main -------------------------------------------------------------------------------------


def _on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    # Explicit handlers: a shell's background job inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "plan": plan.__dict__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": loadavg(),
        "git_commit": _git_commit(),
    }
    print(
        f"bench: eras {','.join(plan.eras)}, {plan.repeats} repeat(s), "
        f"{plan.calls} sequential + {plan.concurrent_calls}@{plan.concurrency} calls per phase",
        file=sys.stderr,
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    failure: str | None = None
    code = 0
    peak: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        fleet = Fleet(Path(tmp))
        setup: dict[str, Any] = {}
        try:
            setup = start_targets(fleet, Path(tmp))
            load = Load(fleet.start("load", [sys.executable, str(BENCH / "load.py")], pipes=True))
            load.ask({"cmd": "ping"}, 30)
            print("bench: all processes ready", file=sys.stderr, flush=True)
            measure(plan, load, setup, runs, sys.stderr)
            peak = {child.name: proc_status(child.pid) for child in fleet.children}
        except SetupError as exc:
            failure, code = str(exc), 2
        except KeyboardInterrupt:
            failure, code = "interrupted", 130
        finally:
            if not peak:
                peak = {child.name: proc_status(child.pid) for child in fleet.children}
            fleet.stop_all()
    if code == 130 or (code == 2 and not runs):
        print(f"bench: {failure}", file=sys.stderr)
        return code
    summary = summarize(plan, runs)
    errors = sum(
        row["errors"] + row["warmup_errors"] + row["failed_phases"]
        for era in summary.values()
        for modes in era["targets"].values()
        for row in modes.values()
    )
    if failure is None and errors:
        failure, code = f"{errors} failed call(s) or phase(s)", 1
    meta["loadavg_after"] = loadavg()
    meta["duration_s"] = time.monotonic() - started
    output: Path = args.output
    report = {
        "ok": failure is None,
        "failure": failure,
        "meta": meta,
        "bastion_config": setup.get("config"),
        "summary": summary,
        "peak_rss_kib": peak,
        "runs": runs,
        "json": str(output.relative_to(ROOT) if output.is_relative_to(ROOT) else output),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(render(plan, report))
    return code


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
