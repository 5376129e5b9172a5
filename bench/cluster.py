"""What scale-out costs and buys: Bastion replicas on Redis and PostgreSQL behind HAProxy.

One run starts a cluster with deploy/cluster.py (the launcher of `make cluster`: Redis,
PostgreSQL, three replicas, HAProxy, all on loopback) and, beside it, two single gateways with
the same config and upstreams: the embedded default (state in memory, registry and audit in
SQLite) and one with only its hot state in Redis. bench/load.py (aiohttp) drives the calls:
`echo` on `/servers/echo/mcp` (the demo echo server, stdio, one per replica), as the agent
acme-reader. It measures, in interleaved rounds (medians of rounds, ratios within this run):

* **the added p50 of the Redis-backed checks**: sequential legacy-session calls with a new
  DPoP proof each (a session lookup and a replay check per call) on the embedded default, on
  the gateway with its state in Redis, and on one cluster replica (Redis and PostgreSQL),
  each reached directly; ratios and differences to the embedded default;
* **calls/s through the balancer** with one and with three replicas (HAProxy's runtime API
  takes two of them out of rotation for the one-replica rounds), C concurrent workers;
* **the wait of a client whose replica dies**: one client calls in a loop through the
  balancer while the replica serving it is killed with SIGKILL; the longest call around the
  kill and the calls that failed.

On a 2-core machine the three replicas, HAProxy, Redis, PostgreSQL and the load generator
share two cores: throughput with three replicas shows the contention, not the scaling a
deployment with a core per replica gets. The report says so. JSON: bench/results/cluster.json.

    .venv/bin/python bench/cluster.py [--quick] [--rounds R] [--calls N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from deploy import cluster as launcher  # noqa: E402 (after the path it lives on)

from bastion.identity.jwt import mint  # noqa: E402
from bastion.identity.keys import SigningKey, thumbprint  # noqa: E402

RESULTS = BENCH / "results"
AGENT = "acme-reader"
ROUTE = "/servers/echo/mcp"
MODERN = "2026-07-28"


def _kid(pem: Path) -> str:
    key = SigningKey.from_pem(pem.read_bytes(), "unset", "ES256")
    return thumbprint(key.public_jwk())


class Target:
    """A gateway the load generator calls: its base URL, issuer and the agent's key."""

    def __init__(self, name: str, base: str, issuer: str, state_dir: Path, pids: list[int]):
        self.name = name
        self.base = base
        self.issuer = issuer
        self.pem = state_dir / "agents" / f"{AGENT}.pem"
        self.pids = pids

    def phase(self, era: str, scheme: str, calls: int, concurrency: int) -> dict[str, Any]:
        """A bench/load.py phase command for this target."""
        return {
            "cmd": "phase",
            "url": self.base + ROUTE,
            "era": era,
            "calls": calls,
            "concurrency": concurrency,
            "warmup": max(20, concurrency),
            "timeout": 300,
            "pids": {"gateway": self.pids},
            "tool": "echo",
            "auth": {
                "scheme": scheme,
                "token_url": self.issuer + "/oauth/token",
                "issuer": self.issuer,
                "resource": self.issuer + ROUTE,
                "agent": AGENT,
                "kid": _kid(self.pem),
                "pem": str(self.pem),
            },
        }


class Load:
    """bench/load.py as a child process: one JSON command in, one JSON answer out."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "load.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip

    def run(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one command and return its answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return answer

    def close(self) -> None:
        """Ask the generator to quit and wait for it."""
        if self.proc.poll() is None:
            self.run_quiet({"cmd": "quit"})
            self.proc.wait(timeout=30)

    def run_quiet(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()


def _single(cluster: launcher.Cluster, name: str, state: dict[str, Any]) -> tuple[Target, Any]:
    """A single gateway with the cluster's config but its own state_dir, registry and audit
    trail in SQLite, and `state` as its hot state; started and ready."""
    document = yaml.safe_load(cluster.config.read_text())
    port = launcher.free_port()
    base = f"http://127.0.0.1:{port}"
    state_dir = cluster.root / f"{name}-state"
    document.update(state=state, state_dir=str(state_dir))
    document.pop("registry", None)
    document["audit"] = {"store": "sqlite"}
    document["auth"]["public_url"] = base
    path = cluster.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    bastion = str(Path(sys.executable).parent / "bastion")
    log = (cluster.root / "logs" / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [bastion, "serve", "--config", str(path), "--port", str(port), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=cluster.cli_env(), cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not _ready(base):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start; see {cluster.root}/logs/{name}.log")
        time.sleep(0.1)
    return Target(name, base, base, state_dir, [proc.pid]), proc


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _haproxy(cluster: launcher.Cluster, command: str) -> str:
    """One command on HAProxy's runtime API."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(str(cluster.root / "haproxy.sock"))
        conn.sendall(command.encode() + b"\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data.decode()


def _rotation(cluster: launcher.Cluster, replicas: int) -> None:
    """Keep the first `replicas` replicas in HAProxy's rotation, take the others out."""
    for n, process in enumerate(cluster.replicas()):
        verb = "enable" if n < replicas else "disable"
        _haproxy(cluster, f"{verb} server replicas/{process.name}")


def _failover(cluster: launcher.Cluster, lb: Target, seconds: float) -> dict[str, Any]:
    """One client calls in a loop through the balancer; after a short while one replica is
    killed (round-robin: every third call of the client was going to it). The longest call
    around the kill, and the calls that failed."""
    token = _token(lb)
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
        "Authorization": f"Bearer {token}",
    }
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "0"}}  # fmt: skip
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "hi"}, "_meta": meta}}  # fmt: skip
    samples: list[tuple[float, float, bool]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    response = http.post(lb.base + ROUTE, json=body, headers=headers)
                    ok = response.status_code == 200 and "result" in response.json()
                except httpx.HTTPError:
                    ok = False
                samples.append((start, time.monotonic() - start, ok))

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(seconds / 3)  # calls before the kill: the baseline
    victim = cluster.replicas()[len(samples) % 3].name
    killed_at = time.monotonic()
    cluster.kill(victim)
    time.sleep(seconds * 2 / 3)
    stop.set()
    thread.join(60)
    cluster.restart(victim)
    # The calls in flight at the kill or made after it, and those done before it.
    around = [s for s in samples if s[0] + s[1] >= killed_at]
    before = sorted(d for t, d, _ in samples if t + d < killed_at)
    return {
        "victim": victim,
        "calls": len(samples),
        "failed": sum(1 for *_, ok in samples if not ok),
        "longest_wait_ms": max((d for _, d, _ in around), default=float("nan")) * 1e3,
        "p50_before_ms": statistics.median(before) * 1e3 if before else float("nan"),
    }


def _token(target: Target) -> str:
    now = int(time.time())
    key = SigningKey.from_pem(target.pem.read_bytes(), _kid(target.pem), "ES256")
    claims = {"iss": AGENT, "sub": AGENT, "aud": target.issuer, "iat": now, "exp": now + 60,
              "jti": os.urandom(16).hex()}  # fmt: skip
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": mint(key, claims, typ="JWT"),
        "resource": target.issuer + ROUTE,
    }
    response = httpx.post(target.issuer + "/oauth/token", data=form, timeout=10)
    if response.status_code != 200:
        raise RuntimeError(f"the token endpoint answered {response.status_code}: {response.text}")
    return str(response.json()["access_token"])


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Start everything, run the interleaved rounds, stop everything; the results."""
    cluster = launcher.start(root, 3)
    singles: list[Any] = []
    load = Load()
    try:
        embedded, proc = _single(cluster, "embedded", {"store": "memory"})
        singles.append(proc)
        redis_state = {"store": "redis", "url": f"env:{launcher.REDIS_VAR}", "prefix": "bench:"}
        on_redis, proc = _single(cluster, "redis-state", redis_state)
        singles.append(proc)
        lb = Target("balancer", cluster.base, cluster.base, cluster.root / "state",
                    [p.pid for p in cluster.replicas()])  # fmt: skip
        # A replica checks a DPoP proof's htu against the public URL, the balancer's: it is
        # measured through HAProxy, with only replica1 in rotation.
        replica = Target("replica", cluster.base, cluster.base, cluster.root / "state",
                         [cluster.part("replica1").pid])  # fmt: skip
        targets = (embedded, on_redis, replica)
        latency: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        throughput: dict[str, list[dict[str, Any]]] = {"1 replica": [], "3 replicas": []}
        failover: list[dict[str, Any]] = []
        for n in range(args.rounds):
            _rotation(cluster, 1)
            for target in targets if n % 2 == 0 else tuple(reversed(targets)):
                phase = target.phase("legacy", "dpop", args.calls, 1)
                latency[target.name].append(load.run(phase))
            for replicas in (1, 3) if n % 2 == 0 else (3, 1):
                _rotation(cluster, replicas)
                phase = lb.phase("modern", "bearer", args.calls * 2, args.concurrency)
                throughput[f"{replicas} replica{'s' if replicas > 1 else ''}"].append(
                    load.run(phase)
                )
            _rotation(cluster, 3)
            failover.append(_failover(cluster, lb, args.failover_seconds))
            print(f"round {n + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        load.close()
        for proc in singles:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        cluster.stop()
    return {"latency": latency, "throughput": throughput, "failover": failover}


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rounds if r.get("ok")]
    return statistics.median(values) if values else float("nan")


def report(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians of rounds and ratios, as printed and as stored."""
    base = _median(raw["latency"]["embedded"], "p50_ms")
    latency = {
        name: {
            "p50_ms": _median(rounds, "p50_ms"),
            "p99_ms": _median(rounds, "p99_ms"),
            "added_p50_ms": _median(rounds, "p50_ms") - base,
            "p50_ratio": _median(rounds, "p50_ms") / base,
            "errors": sum(r.get("errors", 0) for r in rounds),
        }
        for name, rounds in raw["latency"].items()
    }
    throughput = {
        name: {
            "calls_per_s": _median(rounds, "calls_per_s"),
            "p50_ms": _median(rounds, "p50_ms"),
            "errors": sum(r.get("errors", 0) for r in rounds),
        }
        for name, rounds in raw["throughput"].items()
    }
    one = throughput["1 replica"]["calls_per_s"]
    for row in throughput.values():
        row["ratio_to_1"] = row["calls_per_s"] / one
    waits = [f["longest_wait_ms"] for f in raw["failover"]]
    failover = {
        "longest_wait_ms_median": statistics.median(waits),
        "longest_wait_ms_max": max(waits),
        "failed_calls": [f["failed"] for f in raw["failover"]],
        "p50_before_ms": statistics.median(f["p50_before_ms"] for f in raw["failover"]),
    }
    return {"latency": latency, "throughput": throughput, "failover": failover}


def markdown(summary: dict[str, Any], cores: int) -> str:
    """The report as Markdown tables."""
    lines = [
        "### Redis-backed session and replay checks (legacy session, new DPoP proof per call, "
        "sequential)",
        "",
        "| target | p50 ms | added p50 ms | p50 ratio | p99 ms | errors |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    labels = {"embedded": "embedded default (memory + SQLite)",
              "redis-state": "state in Redis (registry, audit SQLite)",
              "replica": "one cluster replica via HAProxy (Redis + PostgreSQL)"}  # fmt: skip
    for name, row in summary["latency"].items():
        lines.append(
            f"| {labels[name]} | {row['p50_ms']:.2f} | {row['added_p50_ms']:+.2f} | "
            f"{row['p50_ratio']:.2f}× | {row['p99_ms']:.2f} | {row['errors']} |"
        )
    lines += ["", "### Through HAProxy (2026-07-28, Bearer, concurrent workers)", "",
              "| replicas in rotation | calls/s | ratio | p50 ms | errors |",
              "|---|--:|--:|--:|--:|"]  # fmt: skip
    for name, row in summary["throughput"].items():
        lines.append(
            f"| {name} | {row['calls_per_s']:.0f} | {row['ratio_to_1']:.2f}× | "
            f"{row['p50_ms']:.2f} | {row['errors']} |"
        )
    f = summary["failover"]
    lines += [
        "",
        f"### A client's replica dies (kill -9), {len(f['failed_calls'])} rounds",
        "",
        f"Longest call around the kill: median {f['longest_wait_ms_median']:.0f} ms, worst "
        f"{f['longest_wait_ms_max']:.0f} ms (p50 before it: {f['p50_before_ms']:.2f} ms); "
        f"calls that failed per round: {f['failed_calls']}.",
        "",
    ]
    if cores <= 4:
        lines.append(
            f"This machine has {cores} cores for three replicas, HAProxy, Redis, PostgreSQL and "
            "the load generator: the three-replica figure shows their contention (the balancer "
            "and the stores take the cores the replicas would use), not the scaling of a "
            "deployment with a core per replica."
        )
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark; exit 0 when every measured call succeeded, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 200 calls")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--failover-seconds", type=float, default=3.0)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls = 2, 200
    root = Path(tempfile.mkdtemp(prefix="bastion-bench-cluster-"))
    try:
        raw = measure(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = report(raw)
    cores = os.cpu_count() or 1
    print(markdown(summary, cores))
    RESULTS.mkdir(exist_ok=True)
    document = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cores": cores, "python": platform.python_version()},
        "args": vars(args),
        "summary": summary,
        "rounds": raw,
    }
    (RESULTS / "cluster.json").write_text(json.dumps(document, indent=2) + "\n")
    errors = sum(r["errors"] for r in summary["latency"].values())
    errors += sum(r["errors"] for r in summary["throughput"].values())
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
