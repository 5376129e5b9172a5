"""Bastion at several git revisions in one interleaved run, as ratios to the bare hop.

A change that should cost nothing (a restructuring) is checked here: on a shared machine
absolute times move 2x from run to run, so two `make bench` runs at two revisions cannot be
compared; ratios measured in the same run, round by round, can.

One run starts, as its own process tree: the echo server (examples/echo_server.py), the bare
hop (bench/bare_hop.py), the load generator (bench/load.py) — all from this checkout — and one
`bastion serve` per revision and scenario, each running that revision's code
(`PYTHONPATH=<tree>/src` with this venv's Python). A revision's `src/` is exported with
`git archive` into the run's temp dir (the checkout's branch, HEAD, index and worktrees are not
touched); `WORKTREE` names this checkout's own, uncommitted `src/`.

Scenarios: `none` (`auth: {mode: none}`, audit off) and `oauth` (`auth: oauth`, a Bearer
token from the gateway's own token endpoint once per phase, the audit trail as `--audit`
says: by default strict with synchronous FULL). Each round measures, in both eras unless
`--era` narrows it, one sequential phase per target — direct, bare hop, every gateway — in an
order rotated per round. Each round yields paired ratios: added p50 ÷ the bare hop's
(target p50 − direct p50 over bare p50 − direct p50), CPU per call ÷ the bare hop's, and each
revision's added p50 and CPU per call ÷ the first revision's. The report gives medians over
rounds with the min–max spread (Markdown on stdout, JSON in bench/results/compare.json).

    .venv/bin/python bench/compare.py 7bafbf0 94e61dd [--rounds 7] [--calls 400]
        [--warmup 100] [--era modern|legacy|both] [--scenario none|oauth|both]
        [--audit strict|strict-normal|relaxed|off|revision-default]

Exit status: 0 when every call succeeded, 1 when any failed, 2 when the setup failed (a
revision that would not start: its log tail is printed), 130 on interruption.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from run import (
    AGENTS,
    POLICY_CEDAR,
    POLICY_YAML,
    Child,
    Fleet,
    Load,
    SetupError,
    free_port,
    loadavg,
    ratio,
    times,
    wait_ready,
)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
WORKTREE = "WORKTREE"
ERAS = {"modern": "2026-07-28", "legacy": "2025-11-25"}
SCENARIOS = ("none", "oauth")
AUDIT_YAML = {
    "strict": "audit: {durability: strict, synchronous: FULL}\n",
    "strict-normal": "audit: {durability: strict, synchronous: NORMAL}\n",
    "relaxed": "audit: {durability: relaxed}\n",
    "off": "audit: {enabled: false}\n",
    "revision-default": "",  # each revision's own default
}
GIT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Tree:
    """One revision's source: `label` names it in the report, `src` goes on PYTHONPATH."""

    label: str
    rev: str
    sha: str | None  # None: the uncommitted working tree
    subject: str
    src: Path


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    revs: tuple[str, ...]
    rounds: int
    calls: int
    warmup: int
    eras: tuple[str, ...]
    scenarios: tuple[str, ...]
    audit: str
    phase_timeout: float


# -- revisions ---------------------------------------------------------------------------------


def _git(*args: str, binary: bool = False) -> Any:
    """Run a read-only git command in this checkout; its stdout, or SetupError."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"git {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip()[:300]
        raise SetupError(f"git {' '.join(args)} failed: {error}")
    return done.stdout if binary else done.stdout.decode().strip()


def export_tree(rev: str, workdir: Path, label: str) -> Tree:
    """`rev`'s src/ exported into workdir (git archive), or this checkout's for WORKTREE."""
    if rev == WORKTREE:
        head = _git("rev-parse", "--short", "HEAD")
        subject = f"this checkout's working tree (HEAD {head} + uncommitted changes)"
        return Tree(label, rev, None, subject, ROOT / "src")
    sha = _git("rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}")
    subject = _git("log", "-1", "--format=%h %s", sha)
    dest = workdir / f"rev-{label.replace('#', '-')}"
    dest.mkdir()
    archive = _git("archive", "--format=tar", sha, "src", binary=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return Tree(label, rev, sha, subject, dest / "src")


def _labels(revs: tuple[str, ...]) -> list[str]:
    """Report labels: the revision as given, `#2`, `#3` on repeats (an A/A run is allowed)."""
    seen: dict[str, int] = {}
    labels = []
    for rev in revs:
        seen[rev] = seen.get(rev, 0) + 1
        labels.append(rev if seen[rev] == 1 else f"{rev}#{seen[rev]}")
    return labels


# -- processes ---------------------------------------------------------------------------------


def _tree_env(tree: Tree) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree.src)}


def check_import(tree: Tree) -> None:
    """Fail unless `import bastion` under the tree's env loads the tree's own code.

    Guards against a venv whose editable install would win over PYTHONPATH (a meta-path
    finder): the run would then measure one revision under several names.
    """
    probe = "import bastion, sys; sys.stdout.write(bastion.__file__)"
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=tree.src.parent,
            env=_tree_env(tree),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"{tree.label}: import bastion: {exc}") from exc
    if done.returncode != 0:
        raise SetupError(f"{tree.label}: import bastion failed:\n{done.stderr[-1500:]}")
    if not Path(done.stdout).resolve().is_relative_to(tree.src.resolve()):
        raise SetupError(f"{tree.label}: import bastion loads {done.stdout}, not {tree.src}")


def _bastion(*args: str) -> list[str]:
    # `python -m bastion.cli`, not the venv's `bastion` script: the same interpreter either
    # way, and PYTHONPATH (ahead of the editable install's path) picks the revision's code.
    # Run it with the gateway's own directory as cwd: -m puts the cwd first on sys.path.
    return [sys.executable, "-m", "bastion.cli", *args]


def _config(plan: Plan, scenario: str, port: int, state: Path, echo_url: str) -> str:
    upstreams = (
        POLICY_YAML + f"upstreams:\n  echo: {{transport: http, url: {json.dumps(echo_url)}}}\n"
    )
    head = (
        "# Generated by bench/compare.py\n"
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"state_dir: {json.dumps(str(state))}\n"
    )
    if scenario == "none":
        return head + "auth: {mode: none, tenant: bench}\n" + AUDIT_YAML["off"] + upstreams
    agent = AGENTS["oauth"]
    return (
        head
        + AUDIT_YAML[plan.audit]
        + "auth:\n  mode: oauth\n  agents:\n"
        + f"    - {{id: {agent}, tenant: bench, owner: bench, purpose: Bearer-token calls}}\n"
        + upstreams
    )


def _agent_spec(tree: Tree, config: Path, state: Path, base: str) -> dict[str, Any]:
    """The seeded agent as bench/load.py's `auth` member wants it (kid from the revision)."""
    argv = _bastion("agents", "list", "--json", "--config", str(config))
    try:
        done = subprocess.run(
            argv,
            cwd=config.parent,
            env=_tree_env(tree),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"{tree.label}: bastion agents list: {exc}") from exc
    if done.returncode != 0:
        raise SetupError(f"{tree.label}: bastion agents list failed:\n{done.stderr[-1500:]}")
    agent = AGENTS["oauth"]
    try:
        kids = {a["id"]: str(a["jwks"]["keys"][0]["kid"]) for a in json.loads(done.stdout)}
        kid = kids[agent]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise SetupError(f"{tree.label}: agents list: no kid for {agent}") from exc
    return {
        "scheme": "bearer",
        "token_url": base + "/oauth/token",
        "issuer": base,
        "resource": base + "/servers/echo/mcp",
        "agent": agent,
        "kid": kid,
        "pem": str(state / "agents" / f"{agent}.pem"),
    }


@dataclass
class Target:
    """Something a phase measures: its URL, its process, and how to authenticate."""

    name: str
    url: str
    child: Child
    tree: Tree | None = None
    scenario: str | None = None
    auth: dict[str, Any] | None = None


def start_all(
    plan: Plan, trees: list[Tree], fleet: Fleet, workdir: Path
) -> tuple[list[Target], dict[str, str]]:
    """Echo, bare hop and one gateway per revision and scenario, each ready (or SetupError)."""
    py = sys.executable
    echo_port, bare_port = free_port(), free_port()
    echo_url = f"http://127.0.0.1:{echo_port}/mcp"
    echo = fleet.start(
        "echo", [py, str(ROOT / "examples/echo_server.py"), "--port", str(echo_port)]
    )
    bare_argv = [py, str(BENCH / "bare_hop.py"), "--upstream", echo_url, "--port", str(bare_port)]
    bare = fleet.start("bare", bare_argv)
    # Each gateway lists the echo server's tools when it starts: echo must be up first.
    wait_ready(echo, f"http://127.0.0.1:{echo_port}/healthz", time.monotonic() + 60)
    targets = [
        Target("direct", echo_url, echo),
        Target("bare", f"http://127.0.0.1:{bare_port}/mcp", bare),
    ]
    ready = [(bare, f"http://127.0.0.1:{bare_port}/healthz")]
    configs: dict[str, str] = {}
    for tree in trees:
        for scenario in plan.scenarios:
            name = f"{tree.label}/{scenario}"
            home = workdir / f"gw-{tree.label.replace('#', '-')}-{scenario}"
            home.mkdir()
            (home / "bench.cedar").write_text(POLICY_CEDAR)
            port = free_port()
            config = home / "bastion.yaml"
            config.write_text(_config(plan, scenario, port, home / "state", echo_url))
            configs[name] = config.read_text()
            argv = _bastion("serve", "--config", str(config), "--port", str(port))
            child = fleet.start(
                f"gw-{tree.label}-{scenario}".replace("#", "-"),
                [*argv, "--log-level", "warning"],
                cwd=home,
                env=_tree_env(tree),
            )
            base = f"http://127.0.0.1:{port}"
            targets.append(Target(name, base + "/servers/echo/mcp", child, tree, scenario))
            ready.append((child, base + "/readyz"))
    deadline = time.monotonic() + 90
    for child, url in ready:
        wait_ready(child, url, deadline)
    for target in targets:
        if target.scenario == "oauth" and target.tree is not None:
            home = workdir / f"gw-{target.tree.label.replace('#', '-')}-oauth"
            base = target.url.removesuffix("/servers/echo/mcp")
            target.auth = _agent_spec(target.tree, home / "bastion.yaml", home / "state", base)
    return targets, configs


# -- measurement -------------------------------------------------------------------------------


def measure(plan: Plan, load: Load, targets: list[Target], rounds: list[dict[str, Any]]) -> None:
    """`plan.rounds` rounds; each runs every target once per era, in a rotated order."""
    echo_pid = targets[0].child.pid
    for number in range(plan.rounds):
        shift = number % len(targets)
        order = targets[shift:] + targets[:shift]
        this: dict[str, Any] = {"loadavg": loadavg()}
        for era in plan.eras:
            for target in order:
                command = {
                    "cmd": "phase",
                    "url": target.url,
                    "era": era,
                    "calls": plan.calls,
                    "concurrency": 1,
                    "warmup": plan.warmup,
                    "timeout": plan.phase_timeout,
                    "pids": {"target": target.child.pid, "echo": echo_pid},
                    "auth": target.auth,
                }
                result = load.ask(command, 2 * plan.phase_timeout + 60)
                this.setdefault(era, {})[target.name] = result
                print(
                    f"  round {number + 1}/{plan.rounds} {era:6} {target.name:24} "
                    f"{_progress(result)}",
                    file=sys.stderr,
                    flush=True,
                )
        rounds.append(this)


def _progress(result: dict[str, Any]) -> str:
    if "fatal" in result:
        return f"FAILED: {result['fatal']}"
    cpu = (result.get("cpu_ms_per_call") or {}).get("target")
    text = f"p50 {result['p50_ms']:.3f} ms  cpu {cpu or math.nan:.3f} ms/call"
    if result["errors"] or result["timed_out"]:
        text += f"  errors {result['errors']} {result['error_samples'][:1]}"
    return text


def _p50(phase: dict[str, Any]) -> float | None:
    return None if "fatal" in phase else phase.get("p50_ms")


def _cpu(phase: dict[str, Any]) -> float | None:
    return None if "fatal" in phase else (phase.get("cpu_ms_per_call") or {}).get("target")


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def round_values(phases: dict[str, dict[str, Any]], gateway: str, first: str) -> dict[str, Any]:
    """One round's paired values for one gateway: ms figures and its ratios."""
    direct = _p50(phases["direct"])
    added = _sub(_p50(phases[gateway]), direct)
    bare_added = _sub(_p50(phases["bare"]), direct)
    first_added = _sub(_p50(phases[first]), direct)
    cpu, bare_cpu, first_cpu = _cpu(phases[gateway]), _cpu(phases["bare"]), _cpu(phases[first])
    return {
        "added_p50_ms": added,
        "cpu_ms_per_call": cpu,
        "added_p50_x_bare": ratio(added, bare_added),
        "cpu_x_bare": ratio(cpu, bare_cpu),
        "added_p50_x_first": ratio(added, first_added),
        "cpu_x_first": ratio(cpu, first_cpu),
    }


def spread(values: list[float | None]) -> dict[str, Any]:
    """Median, min and max of the values present, and how many rounds had one."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(present),
        "min": min(present),
        "max": max(present),
        "n": len(present),
    }


def summarize(plan: Plan, trees: list[Tree], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per era and scenario: each revision's per-round values and their spreads."""
    summary: dict[str, Any] = {}
    for era in plan.eras:
        anchors = {
            "direct_p50_ms": spread([_p50(r[era]["direct"]) for r in rounds]),
            "bare_added_p50_ms": spread(
                [_sub(_p50(r[era]["bare"]), _p50(r[era]["direct"])) for r in rounds]
            ),
            "bare_cpu_ms_per_call": spread([_cpu(r[era]["bare"]) for r in rounds]),
        }
        block: dict[str, Any] = {"anchors": anchors}
        for scenario in plan.scenarios:
            first = f"{trees[0].label}/{scenario}"
            for tree in trees:
                name = f"{tree.label}/{scenario}"
                per_round = [round_values(r[era], name, first) for r in rounds]
                keys = per_round[0].keys() if per_round else ()
                block[name] = {
                    "rounds": per_round,
                    **{key: spread([v[key] for v in per_round]) for key in keys},
                }
        summary[era] = block
    return summary


# -- report ------------------------------------------------------------------------------------


def _cell(stats: dict[str, Any], fmt: Any = times) -> str:
    if stats["median"] is None:
        return "–"
    return f"{fmt(stats['median'])} ({fmt(stats['min'])}–{fmt(stats['max'])})"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{(value - 1) * 100:+.0f}%"


def render(plan: Plan, trees: list[Tree], report: dict[str, Any]) -> str:
    meta = report["meta"]
    eras = " / ".join(ERAS[e] for e in plan.eras)
    out = [
        f"# Bastion at {len(trees)} revisions — echo `tools/call`, sequential, "
        f"{plan.rounds} interleaved rounds",
        "",
        f"{plan.calls} calls per phase after {plan.warmup} warm-up · eras {eras} · "
        f"oauth audit: {plan.audit} · load avg before {meta['loadavg_before']}, "
        f"after {meta['loadavg_after']}",
        "",
        *[f"- `{t.label}`: {t.subject}" for t in trees],
        "",
        "Each cell: median over rounds (min–max); every ratio is paired within one round.",
    ]
    first = trees[0].label
    for era in plan.eras:
        block = report["summary"][era]
        out += [
            "",
            f"## {ERAS[era]} era",
            "",
            "| revision | scenario | added p50 ÷ bare hop's | CPU/call ÷ bare hop's "
            f"| added p50 ÷ `{first}`'s | CPU/call ÷ `{first}`'s | added p50 ms | CPU ms/call |",
            "|---|---|--:|--:|--:|--:|--:|--:|",
        ]
        for scenario in plan.scenarios:
            for tree in trees:
                row = block[f"{tree.label}/{scenario}"]
                out.append(
                    f"| `{tree.label}` | {scenario} | {_cell(row['added_p50_x_bare'])} "
                    f"| {_cell(row['cpu_x_bare'])} | {_cell(row['added_p50_x_first'])} "
                    f"| {_cell(row['cpu_x_first'])} | {_cell(row['added_p50_ms'], _ms)} "
                    f"| {_cell(row['cpu_ms_per_call'], _ms)} |"
                )
        anchors = block["anchors"]
        out += [
            "",
            f"Anchors: direct p50 {_cell(anchors['direct_p50_ms'], _ms)} ms · bare hop added "
            f"p50 {_cell(anchors['bare_added_p50_ms'], _ms)} ms · bare hop CPU "
            f"{_cell(anchors['bare_cpu_ms_per_call'], _ms)} ms/call",
        ]
    if len(trees) > 1:
        out += ["", f"Change against `{first}` (medians of the paired ratios):", ""]
        for era in plan.eras:
            for scenario in plan.scenarios:
                for tree in trees[1:]:
                    row = report["summary"][era][f"{tree.label}/{scenario}"]
                    out.append(
                        f"- {ERAS[era]}, {scenario}, `{tree.label}`: added p50 "
                        f"{_pct(row['added_p50_x_first']['median'])}, CPU per call "
                        f"{_pct(row['cpu_x_first']['median'])}"
                    )
    status = "OK" if report["ok"] else f"FAILED: {report['failure']}"
    out += ["", f"Result: {status} · {meta['duration_s']:.0f} s · JSON: {report['json']}"]
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(
        description="Bastion at several git revisions, interleaved, as ratios to the bare hop."
    )
    parser.add_argument(
        "revs",
        nargs="+",
        help=f"git revisions (the first is the baseline); {WORKTREE} = this "
        "checkout's uncommitted tree",
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--calls", type=int, default=400, help="calls per phase (default 400)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up calls (default 100)")
    parser.add_argument("--era", choices=("modern", "legacy", "both"), default="both")
    parser.add_argument("--scenario", choices=("none", "oauth", "both"), default="both")
    parser.add_argument(
        "--audit",
        choices=tuple(AUDIT_YAML),
        default="strict",
        help="the oauth gateways' audit trail (default strict: synchronous FULL, the product "
        "default up to issue 17); the none gateways always run with audit off",
    )
    parser.add_argument("--phase-timeout", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--output", type=Path, default=RESULTS / "compare.json")
    args = parser.parse_args(argv)
    for name in ("rounds", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    plan = Plan(
        revs=tuple(args.revs),
        rounds=args.rounds,
        calls=args.calls,
        warmup=max(0, args.warmup),
        eras=("modern", "legacy") if args.era == "both" else (args.era,),
        scenarios=SCENARIOS if args.scenario == "both" else (args.scenario,),
        audit=args.audit,
        phase_timeout=args.phase_timeout,
    )
    return args, plan


def _on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "plan": plan.__dict__,
        "loadavg_before": loadavg(),
    }
    rounds: list[dict[str, Any]] = []
    trees: list[Tree] = []
    configs: dict[str, str] = {}
    failure: str | None = None
    code = 0
    with tempfile.TemporaryDirectory(prefix="bastion-compare-") as tmp:
        workdir = Path(tmp)
        fleet = Fleet(workdir)
        try:
            labels = _labels(plan.revs)
            trees = [export_tree(r, workdir, lbl) for r, lbl in zip(plan.revs, labels, strict=True)]
            for tree in trees:
                check_import(tree)
                print(f"compare: {tree.label}: {tree.subject}", file=sys.stderr, flush=True)
            targets, configs = start_all(plan, trees, fleet, workdir)
            # bench/load.py imports bastion's JOSE helpers: give it a committed revision's
            # code when there is one, so an uncommitted tree mid-edit cannot break the client.
            harness = next((t for t in trees if t.sha is not None), None)
            env = _tree_env(harness) if harness is not None else None
            load = Load(
                fleet.start("load", [sys.executable, str(BENCH / "load.py")], pipes=True, env=env)
            )
            load.ask({"cmd": "ping"}, 30)
            print("compare: all processes ready", file=sys.stderr, flush=True)
            measure(plan, load, targets, rounds)
        except SetupError as exc:
            failure, code = str(exc), 2
        except KeyboardInterrupt:
            failure, code = "interrupted", 130
        finally:
            fleet.stop_all()
    if code == 130 or not rounds:
        print(f"compare: {failure}", file=sys.stderr)
        return code or 2
    errors = sum(
        phase.get("errors", 0) + phase.get("warmup_errors", 0) + ("fatal" in phase)
        for r in rounds
        for era in plan.eras
        for phase in r[era].values()
    )
    if failure is None and errors:
        failure, code = f"{errors} failed call(s) or phase(s)", 1
    meta["loadavg_after"] = loadavg()
    meta["duration_s"] = time.monotonic() - started
    meta["revisions"] = [
        {"label": t.label, "rev": t.rev, "sha": t.sha, "subject": t.subject} for t in trees
    ]
    output: Path = args.output
    report = {
        "ok": failure is None,
        "failure": failure,
        "meta": meta,
        "configs": configs,
        "summary": summarize(plan, trees, rounds),
        "rounds": rounds,
        "json": str(output.relative_to(ROOT) if output.is_relative_to(ROOT) else output),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(render(plan, trees, report))
    return code


if __name__ == "__main__":
    sys.exit(main())
