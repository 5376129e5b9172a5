"""Bastion beside its peers: the same echo call through every target, as ratios in one run.

Targets (bench/peers_setup.py starts them): direct, HAProxy (HTTP mode, the C floor), the bare
Python hop, Bastion in four set-ups — `auth: none` with audit off; OAuth Bearer + Cedar +
minted credential + the audit trail at its default level (surviving kill -9, no fsync per
call: the default deployment); the same with `survives: power` (fsync); the same with DPoP —
ContextForge 1.1.0 stateless and stateful, and FastMCP's proxy. All on 127.0.0.1, all
children of this process, all stopped at the end.

Each repeat runs every target in both eras (2026-07-28 stateless, 2025-11-25 with a session),
sequential calls then 32 concurrent workers, in an order rotated per repeat, so every
comparison is made within one repeat (same minute, same machine load) and the report gives
the median over repeats of those paired ratios: added p50 (target p50 − direct p50) ÷ the
bare hop's, CPU per call ÷ the bare hop's, 32-client calls/s ÷ the bare hop's, and peak RSS.
A peer that cannot speak an era (its probe call fails) is `n/a` in that era.

    .venv/bin/python bench/peers.py [--quick] [--repeats R] [--era modern|legacy|both]
                                    [--skip haproxy,contextforge,fastmcp,...] [--no-install]

Markdown on stdout, progress on stderr, JSON in bench/results/peers.json. Exit status: 0 when
every call succeeded, 1 when any failed, 2 when the setup failed, 130 on interruption.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peers_report
from peers_report import SLOW  # the Python peers: fewer calls per phase
from peers_setup import (
    BASTION_SETUPS,
    CONTEXTFORGE,
    FASTMCP,
    Target,
    ensure_venv,
    finish_bastion,
    finish_contextforge,
    start_bare,
    start_bastion,
    start_contextforge,
    start_echo,
    start_fastmcp,
    start_haproxy,
)
from run import (
    BENCH,
    ROOT,
    Fleet,
    Load,
    SetupError,
    _git_commit,
    _on_signal,
    _progress,
    group_pids,
    loadavg,
    wait_ready,
)

RESULTS = BENCH / "results"
MODES = ("sequential", "concurrent")
ERAS = ("modern", "legacy")
ORDER = (
    "direct",
    "haproxy",
    "bare",
    "none",
    "full",
    "power",
    "dpop",
    "cf-stateless",
    "cf-stateful",
    "fastmcp",
)
REQUIRED = ("direct", "bare", "full")  # every ratio needs these
GROUPS = {"contextforge": ("cf-stateless", "cf-stateful"), "bastion": ("none", "power", "dpop")}
PROBE_CALLS = 3


@dataclass
class PeerPlan:
    """What one run measures."""

    eras: tuple[str, ...]
    targets: tuple[str, ...]
    repeats: int
    calls: int
    concurrent_calls: int
    peer_calls: int
    peer_concurrent_calls: int
    concurrency: int
    warmup: int
    peer_warmup: int
    phase_timeout: float
    install: bool

    def counts(self, target: str, mode: str) -> tuple[int, int, int]:
        """(calls, concurrency, warm-up) of one phase."""
        slow = target in SLOW
        if mode == "sequential":
            return (
                (self.peer_calls if slow else self.calls),
                1,
                (self.peer_warmup if slow else self.warmup),
            )
        calls = self.peer_concurrent_calls if slow else self.concurrent_calls
        return calls, self.concurrency, self.peer_warmup if slow else self.warmup


def _skip_choice(value: str) -> tuple[str, ...]:
    names: list[str] = []
    for name in filter(None, value.split(",")):
        if name in GROUPS:
            names.extend(GROUPS[name])
        elif name in ORDER and name not in REQUIRED:
            names.append(name)
        else:
            allowed = sorted({*GROUPS, *ORDER} - set(REQUIRED))
            raise argparse.ArgumentTypeError(
                f"cannot skip {name!r}: expected a comma list of {', '.join(allowed)}"
            )
    return tuple(names)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, PeerPlan]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="1 repeat, small phases: a smoke run (~2 min)")
    add("--repeats", type=int, help="whole-measurement repeats (default 3)")
    add("--era", choices=("modern", "legacy", "both"), default="both")
    add("--calls", type=int, help="sequential calls per phase, fast targets (default 1000)")
    add("--concurrent-calls", type=int, help="concurrent-phase calls, fast targets (2000)")
    add("--peer-calls", type=int, help="sequential calls per phase, Python peers (default 100)")
    add("--peer-concurrent-calls", type=int, help="concurrent-phase calls, Python peers (200)")
    add("--concurrency", type=int, default=32, help="concurrent workers (default 32)")
    add("--warmup", type=int, help="warm-up calls per phase, fast targets (default 200)")
    add("--peer-warmup", type=int, help="warm-up calls per phase, Python peers (default 20)")
    add("--phase-timeout", type=float, default=180.0, help="hard limit per phase part, s")
    add("--skip", type=_skip_choice, default=(), help="targets or groups to leave out")
    add("--no-install", action="store_true", help="fail rather than make .bench-venvs/*")
    add("--output", type=Path, default=RESULTS / "peers.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: int | None, default: int, small: int) -> int:
        return value if value is not None else (small if quick else default)

    plan = PeerPlan(
        eras=ERAS if args.era == "both" else (args.era,),
        targets=tuple(t for t in ORDER if t not in args.skip),
        repeats=pick(args.repeats, 3, 1),
        calls=pick(args.calls, 1000, 200),
        concurrent_calls=pick(args.concurrent_calls, 2000, 400),
        peer_calls=pick(args.peer_calls, 100, 30),
        peer_concurrent_calls=pick(args.peer_concurrent_calls, 200, 64),
        concurrency=args.concurrency,
        warmup=pick(args.warmup, 200, 50),
        peer_warmup=pick(args.peer_warmup, 20, 5),
        phase_timeout=args.phase_timeout,
        install=not args.no_install,
    )
    for name in ("repeats", "calls", "concurrent_calls", "peer_calls", "concurrency"):
        if getattr(plan, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args, plan


# -- setup ------------------------------------------------------------------------------------


def start_all(plan: PeerPlan, fleet: Fleet, workdir: Path) -> dict[str, Target]:
    """Start every planned target, wait until all are ready, then finish their set-up."""
    wanted = set(plan.targets)
    pythons = {}
    if wanted & set(GROUPS["contextforge"]):
        pythons["contextforge"] = ensure_venv("contextforge", CONTEXTFORGE, plan.install)
    if "fastmcp" in wanted:
        pythons["fastmcp"] = ensure_venv("fastmcp", FASTMCP, plan.install)
    echo = start_echo(fleet)
    targets: dict[str, Target] = {"direct": echo}
    for key in plan.targets:
        if key == "haproxy":
            targets[key] = start_haproxy(fleet, workdir, echo)
        elif key == "bare":
            targets[key] = start_bare(fleet, echo)
        elif key in BASTION_SETUPS:
            targets[key] = start_bastion(fleet, workdir, key, echo)
        elif key in GROUPS["contextforge"]:
            stateful = key == "cf-stateful"
            python = pythons["contextforge"]
            targets[key] = start_contextforge(fleet, workdir, python, key, stateful)
        elif key == "fastmcp":
            targets[key] = start_fastmcp(fleet, pythons["fastmcp"], echo)
    started = time.monotonic()
    for target in targets.values():
        wait_ready(target.child, target.ready_url, started + target.ready_within_s)
    for key, target in targets.items():
        if key in BASTION_SETUPS:
            finish_bastion(target)
        elif key in GROUPS["contextforge"]:
            finish_contextforge(target, echo)
    return targets


# -- measurement ------------------------------------------------------------------------------


def _command(plan: PeerPlan, target: Target, echo_pid: int, era: str, mode: str) -> dict[str, Any]:
    calls, concurrency, warmup = plan.counts(target.key, mode)
    return {
        "cmd": "phase",
        "url": target.url,
        "era": era,
        "calls": calls,
        "concurrency": concurrency,
        "warmup": warmup,
        "timeout": plan.phase_timeout,
        "pids": {"target": group_pids(target.child.pid) or [target.child.pid], "echo": echo_pid},
        "auth": target.auth,
        "tool": target.tool,
        "headers": target.headers,
    }


def probe(plan: PeerPlan, load: Load, targets: dict[str, Target]) -> dict[str, dict[str, str]]:
    """One short phase per target and era: a Python peer that fails it is n/a in that era."""
    unavailable: dict[str, dict[str, str]] = {}
    echo_pid = targets["direct"].child.pid
    for key, target in targets.items():
        for era in plan.eras:
            command = _command(plan, target, echo_pid, era, "sequential")
            command |= {"calls": PROBE_CALLS, "warmup": 1}
            result = load.ask(command, 2 * plan.phase_timeout + 60)
            problem = result.get("fatal") or (
                result["error_samples"][0] if result.get("errors") else None
            )
            if problem is None:
                continue
            if key not in SLOW:
                raise SetupError(f"{key} fails a {era} echo call: {problem}")
            unavailable.setdefault(key, {})[era] = str(problem)[:300]
            print(f"peers: {key} n/a in the {era} era: {problem}", file=sys.stderr, flush=True)
    return unavailable


def measure(
    plan: PeerPlan,
    load: Load,
    targets: dict[str, Target],
    unavailable: dict[str, dict[str, str]],
    runs: list[dict[str, Any]],
) -> None:
    """Every available (target, era, mode) phase, `plan.repeats` times, targets rotated."""
    keys = list(targets)
    echo_pid = targets["direct"].child.pid
    for repeat in range(plan.repeats):
        shift = repeat % len(keys)
        order = keys[shift:] + keys[:shift]
        run: dict[str, Any] = {}
        for era in plan.eras:
            for key in order:
                if era in unavailable.get(key, {}):
                    continue
                for mode in MODES:
                    command = _command(plan, targets[key], echo_pid, era, mode)
                    result = load.ask(command, 2 * plan.phase_timeout + 60)
                    run.setdefault(era, {}).setdefault(key, {})[mode] = result
                    print(
                        f"  repeat {repeat + 1}/{plan.repeats} {era:6} {key:12} {mode:10} "
                        f"{_progress(result)}",
                        file=sys.stderr,
                        flush=True,
                    )
        runs.append(run)


def memory(targets: dict[str, Target]) -> dict[str, dict[str, Any]]:
    """Peak RSS of each target's serving process, and its helper processes' PSS now."""
    found: dict[str, dict[str, Any]] = {}
    for key, target in targets.items():
        leader = target.child.pid
        helpers = [pid for pid in group_pids(leader) if pid != leader]
        found[key] = {
            "vmhwm_kib": _status_kib(leader, "VmHWM"),
            "vmrss_kib": _status_kib(leader, "VmRSS"),
            "helpers": len(helpers),
            "helpers_pss_kib": sum(_pss_kib(pid) or 0 for pid in helpers),
        }
    return found


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _pss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- main -------------------------------------------------------------------------------------


def _run(plan: PeerPlan, workdir: Path, state: dict[str, Any]) -> None:
    """Set up, probe and measure, filling `state` as it goes (the caller reports it)."""
    fleet = Fleet(workdir)
    began = time.monotonic()
    try:
        targets = start_all(plan, fleet, workdir)
        state["targets"] = targets
        load = Load(fleet.start("load", [sys.executable, str(BENCH / "load.py")], pipes=True))
        load.ask({"cmd": "ping"}, 30)
        print(
            f"peers: all targets ready after {time.monotonic() - began:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        state["unavailable"] = probe(plan, load, targets)
        measure(plan, load, targets, state["unavailable"], state["runs"])
        state["memory"] = memory(targets)
    finally:
        if "targets" in state and "memory" not in state:
            state["memory"] = memory(state["targets"])
        fleet.stop_all()


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "plan": asdict(plan),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": loadavg(),
        "git_commit": _git_commit(),
    }
    print(
        f"peers: targets {','.join(plan.targets)}; eras {','.join(plan.eras)}; "
        f"{plan.repeats} repeat(s)",
        file=sys.stderr,
        flush=True,
    )
    state: dict[str, Any] = {"runs": [], "unavailable": {}}
    failure, code = None, 0
    with tempfile.TemporaryDirectory(prefix="bastion-peers-") as tmp:
        try:
            _run(plan, Path(tmp), state)
        except SetupError as exc:
            failure, code = str(exc), 2
        except KeyboardInterrupt:
            failure, code = "interrupted", 130
    if code == 130 or (code == 2 and not state["runs"]):
        print(f"peers: {failure}", file=sys.stderr)
        return code
    meta["loadavg_after"] = loadavg()
    meta["duration_s"] = time.monotonic() - started
    report = peers_report.build(plan, state, meta, failure)
    if report["failure"] and code == 0:
        code = 1
    output: Path = args.output
    report["json"] = str(output.relative_to(ROOT) if output.is_relative_to(ROOT) else output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(peers_report.render(plan, report))
    return code


if __name__ == "__main__":
    sys.exit(main())
