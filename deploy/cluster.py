"""A local Bastion cluster: Redis, PostgreSQL, replicas of `bastion serve` and HAProxy in front.

`make cluster` runs `up` in the foreground (Ctrl-C stops it); `make cluster-down` runs `down`;
the tests (tests/cluster.py) and bench/cluster.py call `start()` and `Cluster.stop()`. Every
process runs on 127.0.0.1 on a free port, with its files in one directory (`.cluster/`):

    state.json      every process's pid, port, role and command line (`down` reads it)
    cluster.env     the generated secrets (mode 0600): Redis URL, PostgreSQL DSNs, admin token
    bastion.yaml    the replicas' shared configuration (secrets only as env: references)
    haproxy.cfg     deploy/haproxy.cfg with this cluster's ports
    state/          the replicas' shared state_dir (signing keys, agent keys)
    logs/           one log per process

    python deploy/cluster.py up [--replicas N] [--dir .cluster]
    python deploy/cluster.py down|status [--dir .cluster]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Cluster",
    "Process",
    "balanced",
    "banner",
    "down",
    "free_port",
    "haproxy_stat",
    "main",
    "render_config",
    "render_haproxy",
    "start",
    "status",
]

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLES = ROOT / "examples"
DEFAULT_DIR = ROOT / ".cluster"
PG_GLOB = "/usr/lib/postgresql/*/bin/initdb"
PG_USER = "bastion"
PG_TEMP = "bastion-cluster-pg-"  # a data directory's temporary home, when it cannot be ours
DEADLINE = 60.0
# The environment variables the replicas' bastion.yaml names (env: references).
REDIS_VAR = "BASTION_REDIS_URL"
REGISTRY_VAR = "BASTION_REGISTRY_DSN"
AUDIT_VAR = "BASTION_AUDIT_DSN"
ADMIN_VAR = "BASTION_ADMIN_TOKEN"
AGENTS = ("acme-reader", "acme-admin", "globex-reader")
# The quickstart's grants (examples/quickstart.yaml): the cluster serves the same demo.
_QUICKSTART: dict[str, Any] = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    """One process of the cluster as state.json records it."""

    role: str  # redis | postgres | upstream | replica | haproxy
    name: str
    pid: int
    port: int
    argv: list[str]  # how it was started (and is started again by `restart`)
    started: int  # its start time in clock ticks since boot (/proc/<pid>/stat field 22)
    log: str


@dataclass
class Cluster:
    """A running cluster: where it lives, its processes, and the secrets its clients need."""

    root: Path
    lb_port: int
    processes: list[Process] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    _children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _pg_bin: Path | None = None
    _pg_data: Path | None = None
    # The `up` process that holds the terminal, when there is one: `down` asks it to stop
    # the cluster (in order, and so that it exits 0) before stopping what is left itself.
    launcher: Process | None = None

    @property
    def base(self) -> str:
        """The load balancer's base URL."""
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def config(self) -> Path:
        """The replicas' shared configuration file."""
        return self.root / "bastion.yaml"

    def url(self, path: str = "/mcp") -> str:
        """A URL through the load balancer."""
        return self.base + path

    def part(self, name: str) -> Process:
        """The process named `name` (replica1, redis, postgres, haproxy, …)."""
        for process in self.processes:
            if process.name == name:
                return process
        raise KeyError(name)

    def replicas(self) -> list[Process]:
        """The Bastion replicas, in order."""
        return [p for p in self.processes if p.role == "replica"]

    def cli_env(self) -> dict[str, str]:
        """The environment a `bastion` command needs to open this cluster's stores."""
        return {**os.environ, **self.env}

    def kill(self, name: str) -> None:
        """SIGKILL one process (as if it crashed) and wait until it is gone."""
        self._signal(self.part(name), signal.SIGKILL)

    def stop_part(self, name: str) -> None:
        """Stop one process cleanly (PostgreSQL: fast shutdown) and wait until it is gone."""
        process = self.part(name)
        self._signal(process, signal.SIGINT if process.role == "postgres" else signal.SIGTERM)

    def restart(self, name: str) -> None:
        """Start a stopped process again with its recorded command line; wait until ready."""
        process = self.part(name)
        if _alive(process):
            raise RuntimeError(f"{name} (pid {process.pid}) is still running")
        if process.role == "postgres":
            if self._pg_bin is None or self._pg_data is None:
                raise RuntimeError("this cluster did not start PostgreSQL")
            _pg_start(self._pg_bin, self._pg_data, process.port, Path(process.log))
            process.pid = _postmaster_pid(self._pg_data)
        else:
            proc = _spawn(process.argv, Path(process.log), self.cli_env())
            self._children[name] = proc
            process.pid = proc.pid
        process.started = _start_time(process.pid)
        _wait_ready(process, self._children.get(name))
        self.save()

    def save(self) -> None:
        """Write state.json."""
        document = {
            "url": self.url(),
            "base": self.base,
            "config": str(self.config),
            "pg_bin": str(self._pg_bin or ""),
            "pg_data": str(self._pg_data or ""),
            "processes": [asdict(p) for p in self.processes],
            "launcher": asdict(self.launcher) if self.launcher else None,
        }
        path = self.root / "state.json"
        path.write_text(json.dumps(document, indent=2) + "\n")

    def stop(self) -> list[str]:
        """Stop every process this cluster started, the balancer first; what was stopped."""
        stopped = []
        for process in reversed(self.processes):
            if _alive(process):
                with contextlib.suppress(OSError, TimeoutError):
                    self.stop_part(process.name)
                    stopped.append(process.name)
        for proc in self._children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        home = self._pg_data.parent if self._pg_data is not None else None
        if (
            home is not None
            and home.name.startswith(PG_TEMP)
            and not any(map(_alive, self.processes))
        ):
            shutil.rmtree(home, ignore_errors=True)  # the data dir `_pg_home` put outside
        (self.root / "state.json").unlink(missing_ok=True)
        return stopped

    def _signal(self, process: Process, signum: signal.Signals) -> None:
        if not _alive(process):
            return
        os.kill(process.pid, signum)
        child = self._children.get(process.name)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if child is not None:
                if child.poll() is not None:
                    return
            elif not _alive(process):
                return
            time.sleep(0.02)
        if signum != signal.SIGKILL:
            self._signal(process, signal.SIGKILL)
            return
        raise TimeoutError(f"{process.name} (pid {process.pid}) did not exit")


def _start_time(pid: int) -> int:
    """When `pid` started (clock ticks since boot); -1 when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[-1].split()[19])


def _alive(process: Process) -> bool:
    """Whether `process.pid` still is the process we started: a pid reused by another program
    has another start time (and its command line may differ too: Redis and PostgreSQL rewrite
    theirs), and a zombie no longer runs."""
    try:
        stat = Path(f"/proc/{process.pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] != "Z" and int(fields[19]) == process.started


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # A session of its own: Ctrl-C in the terminal reaches the launcher only, which then
        # stops the parts in order (the balancer before the replicas before the stores).
        return subprocess.Popen(  # noqa: S603
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=ROOT, start_new_session=True,
        )  # fmt: skip


def _until(check: Callable[[], bool], what: str, seconds: float = DEADLINE) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.05)


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait_ready(process: Process, child: subprocess.Popen[bytes] | None) -> None:
    """Wait until the process answers: /readyz for a replica, its port for the others."""

    def ready() -> bool:
        if child is not None and child.poll() is not None:
            tail = Path(process.log).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{process.name} exited ({child.returncode}):\n{tail}")
        if process.role == "replica":
            return _answers_http(f"http://127.0.0.1:{process.port}/readyz")
        return _listens(process.port)

    _until(ready, f"{process.name} on port {process.port}")


# --- the stores -----------------------------------------------------------------------------


def _start_redis(cluster: Cluster, password: str) -> None:
    program = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    home = cluster.root / "redis"
    home.mkdir()
    conf = home / "redis.conf"
    # Persistence off: the hot state is rebuilt by clients (sessions re-initialize, proofs are
    # made anew); nothing in Redis is the only copy of a record.
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nprotected-mode yes\nrequirepass {password}\n"
        f'dir {home}\nsave ""\nappendonly no\n'
    )
    conf.chmod(0o600)
    _launch(cluster, "redis", "redis", port, [program, str(conf)])
    cluster.env[REDIS_VAR] = f"redis://:{password}@127.0.0.1:{port}/0"


def _pg_bindir() -> Path:
    found = sorted(glob.glob(PG_GLOB), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    if not found:
        raise RuntimeError(f"PostgreSQL is not installed (no {PG_GLOB}); run `make postgres`")
    return Path(found[-1]).parent


def _as_postgres(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program; as root, as the `postgres` user (PostgreSQL refuses root)."""
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603


def _pg_home(cluster: Cluster) -> Path:
    """Where the data directory goes: in the cluster directory when the `postgres` user can
    reach it, else in a temporary directory (a home directory is often private to its user)."""
    home = cluster.root / "pg"
    home.mkdir()
    if os.geteuid() != 0:
        return home
    user = pwd.getpwnam("postgres")
    os.chown(home, user.pw_uid, user.pw_gid)
    if _as_postgres(["test", "-w", str(home)]).returncode != 0:
        home.rmdir()
        home = Path(tempfile.mkdtemp(prefix=PG_TEMP))
        os.chown(home, user.pw_uid, user.pw_gid)
    return home


def _pg_start(bindir: Path, data: Path, port: int, log: Path) -> None:
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories= "
        "-c max_connections=100"
    )
    ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(log)]
    result = _as_postgres([*ctl, "-o", options, "start"])
    if result.returncode != 0:
        raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{log.read_text()[-2000:]}")


def _postmaster_pid(data: Path) -> int:
    return int((data / "postmaster.pid").read_text().split("\n", 1)[0])


def _start_postgres(cluster: Cluster, password: str) -> None:
    bindir = _pg_bindir()
    home = _pg_home(cluster)
    pwfile = home / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    data = home / "data"
    init = [
        str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}",
        "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions",
    ]  # fmt: skip
    result = _as_postgres(init)
    pwfile.unlink()
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed: {result.stderr}")
    port = free_port()
    log = cluster.root / "logs" / "postgres.log"
    log.touch()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(log, user.pw_uid, user.pw_gid)
    _pg_start(bindir, data, port, log)
    cluster._pg_bin, cluster._pg_data = bindir, data
    pid = _postmaster_pid(data)
    argv = [str(bindir / "postgres"), "-D", str(data)]
    process = Process("postgres", "postgres", pid, port, argv, _start_time(pid), str(log))
    cluster.processes.append(process)
    dsn = f"postgresql://{PG_USER}:{password}@127.0.0.1:{port}"
    for database in ("registry", "audit"):
        _psql(bindir, f"{dsn}/postgres", f"CREATE DATABASE {database}")
    cluster.env[REGISTRY_VAR] = f"{dsn}/registry"
    cluster.env[AUDIT_VAR] = f"{dsn}/audit"


def _psql(bindir: Path, dsn: str, sql: str) -> None:
    psql = bindir / "psql"
    result = subprocess.run(  # noqa: S603
        [str(psql), dsn, "-v", "ON_ERROR_STOP=1", "-qc", sql],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"psql failed: {result.stderr}")


# --- Bastion, its upstream, the balancer ----------------------------------------------------


def _launch(cluster: Cluster, role: str, name: str, port: int, argv: list[str]) -> Process:
    log = cluster.root / "logs" / f"{name}.log"
    proc = _spawn(argv, log, cluster.cli_env())
    cluster._children[name] = proc
    # The start time is what `down` compares later, so that a pid reused by another program
    # after ours exited is never signalled.
    process = Process(role, name, proc.pid, port, argv, _start_time(proc.pid), str(log))
    cluster.processes.append(process)
    cluster.save()
    return process


def render_config(cluster: Cluster, workspace: str, overrides: dict[str, Any]) -> str:
    """The replicas' configuration: the quickstart's agents, upstreams and grants, the shared
    stores (as env: references) and the balancer's URL as the public URL; `overrides` merged
    in (mappings key by key, lists appended)."""
    document: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 8080},  # each replica gets --port
        "environment": "demo",
        "state_dir": str(cluster.root / "state"),
        "state": {"store": "redis", "url": f"env:{REDIS_VAR}"},
        "registry": {"store": "postgres", "dsn": f"env:{REGISTRY_VAR}"},
        "audit": {"store": "postgres", "dsn": f"env:{AUDIT_VAR}"},
        "admin": {"token": f"env:{ADMIN_VAR}"},
        "security": {"trusted_proxies": ["127.0.0.1"]},
        "auth": {
            "mode": "oauth",
            "public_url": cluster.base,
            "agents": [
                {
                    "id": agent,
                    "environment": "demo",
                    "tenant": agent.split("-", 1)[0],
                    "owner": "demo",
                    "purpose": "cluster demo",
                }
                for agent in AGENTS
            ],
        },  # fmt: skip
        "upstreams": {
            "workspace": {
                "transport": "http",
                "environment": "demo",
                "url": workspace,
                "credentials": {"mode": "mint"},
                "trusted": True,
                "tenant_arguments": {
                    "project_id": "{tenant}-p*",
                    "task_id": "{tenant}-t*",
                    "uri": "workspace://{tenant}/*",
                },
                "labels": {"send_report": ["egress"]},
                "inspect": {"tenants": "block", "labels": ["private"]},
            },
            "echo": {
                "transport": "stdio",
                "environment": "demo",
                "command": [
                    sys.executable,
                    str(EXAMPLES / "echo_server.py"),
                    "--transport",
                    "stdio",
                ],
                "inspect": {"labels": ["untrusted"]},
            },  # fmt: skip
        },
        "policy": {
            "files": [str(EXAMPLES / "policies" / "workspace.cedar")],
            "grants": _QUICKSTART["policy"]["grants"],
        },
        "virtual_servers": {"default": {"path": "/mcp", "upstreams": ["workspace", "echo"]}},
    }
    text = str(yaml.safe_dump(_merge(document, overrides), sort_keys=False))
    return (
        "# Generated by deploy/cluster.py; secrets are in cluster.env (env: references).\n" + text
    )


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[key] = _merge(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            merged[key] = old + value
        else:
            merged[key] = value
    return merged


def _start_workspace(cluster: Cluster) -> str:
    port = free_port()
    argv = [
        sys.executable, str(EXAMPLES / "workspace_server.py"), "--port", str(port),
        "--issuer", cluster.base,
    ]  # fmt: skip
    _wait_ready(_launch(cluster, "upstream", "workspace", port, argv), None)
    return f"http://127.0.0.1:{port}/mcp"


def _start_replicas(cluster: Cluster, count: int) -> None:
    bastion = str(Path(sys.executable).parent / "bastion")
    started = []
    for n in range(1, count + 1):
        port = free_port()
        argv = [bastion, "serve", "--config", str(cluster.config), "--port", str(port)]
        started.append(_launch(cluster, "replica", f"replica{n}", port, argv))
        if n == 1:
            # The first one alone: it generates the signing keys and seeds the agents into the
            # shared state_dir and registry, which the others then find.
            _wait_ready(started[0], cluster._children["replica1"])
    for process in started[1:]:
        _wait_ready(process, cluster._children[process.name])


def render_haproxy(cluster: Cluster, lb_port: int) -> str:
    """deploy/haproxy.cfg with this cluster's bind port, stats socket and replicas."""
    text = (DEPLOY / "haproxy.cfg").read_text()
    text = re.sub(r"(?m)^(\s*bind )\S+", rf"\g<1>127.0.0.1:{lb_port}", text)
    text = re.sub(r"(?m)^(\s*stats socket )\S+", rf"\g<1>{cluster.root / 'haproxy.sock'}", text)
    servers = "".join(f"    server {p.name} 127.0.0.1:{p.port}\n" for p in cluster.replicas())
    text = re.sub(r"(?m)^\s*server \S+ \S+.*\n", "", text).rstrip("\n") + "\n" + servers
    return text


def haproxy_stat(cluster: Cluster) -> dict[str, str]:
    """Each replica's status as the balancer sees it (UP, DOWN, …), from its runtime API."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(2)
        conn.connect(str(cluster.root / "haproxy.sock"))
        conn.sendall(b"show stat\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    rows = [line.split(",") for line in data.decode().splitlines() if line and line[0] != "#"]
    return {row[1]: row[17] for row in rows if row[0] == "replicas" and row[1] != "BACKEND"}


def balanced(cluster: Cluster) -> bool:
    """Whether the balancer sees every live replica UP (and every dead one not UP)."""
    try:
        seen = haproxy_stat(cluster)
    except OSError:
        return False
    return all((seen.get(p.name) == "UP") == _alive(p) for p in cluster.replicas())


def _start_haproxy(cluster: Cluster) -> None:
    program = shutil.which("haproxy") or "/usr/sbin/haproxy"
    cfg = cluster.root / "haproxy.cfg"
    cfg.write_text(render_haproxy(cluster, cluster.lb_port))
    # -db: stay in the foreground, so that the pid we record is HAProxy's own.
    _launch(cluster, "haproxy", "haproxy", cluster.lb_port, [program, "-db", "-f", str(cfg)])
    _until(lambda: balanced(cluster), "HAProxy to see every replica UP")


def start(
    root: Path = DEFAULT_DIR,
    replicas: int = 3,
    overrides: dict[str, Any] | None = None,
    upstreams: dict[str, list[str]] | None = None,
) -> Cluster:
    """Start a cluster in `root` (emptied first) and wait until every part answers.

    `overrides` is merged into bastion.yaml (more upstreams, grants, virtual servers);
    `upstreams` maps a name to the argv of an HTTP MCP server the launcher runs once for all
    replicas, `{port}` replaced by a free port; a string `{upstream:NAME}` in `overrides`
    becomes its URL, http://127.0.0.1:PORT/mcp."""
    if (root / "state.json").exists() and any(_alive(p) for p in _recorded(root)):
        raise RuntimeError(f"a cluster is already running in {root}; stop it first (down)")
    shutil.rmtree(root, ignore_errors=True)
    (root / "logs").mkdir(parents=True)
    (root / "state").mkdir()
    cluster = Cluster(root, free_port())
    cluster.env[ADMIN_VAR] = secrets.token_urlsafe(32)
    try:
        _start_redis(cluster, secrets.token_urlsafe(24))
        _start_postgres(cluster, secrets.token_urlsafe(24))
        urls = {"workspace": _start_workspace(cluster)}
        for name, argv in (upstreams or {}).items():
            port = free_port()
            filled = [part.replace("{port}", str(port)) for part in argv]
            _wait_ready(_launch(cluster, "upstream", name, port, filled), None)
            urls[name] = f"http://127.0.0.1:{port}/mcp"
        filled_overrides = _fill(overrides or {}, urls)
        _write_secrets(cluster)
        cluster.config.write_text(render_config(cluster, urls["workspace"], filled_overrides))
        _start_replicas(cluster, replicas)
        _start_haproxy(cluster)
    except BaseException:
        cluster.stop()
        raise
    cluster.save()
    return cluster


def _fill(value: Any, urls: dict[str, str]) -> Any:
    """`value` with every string `{upstream:NAME}` replaced by that upstream's URL."""
    if isinstance(value, dict):
        return {key: _fill(item, urls) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, urls) for item in value]
    if isinstance(value, str) and value.startswith("{upstream:"):
        return urls[value[len("{upstream:") : -1]]
    return value


def _write_secrets(cluster: Cluster) -> None:
    path = cluster.root / "cluster.env"
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("".join(f"{key}={value}\n" for key, value in cluster.env.items()))


# --- down and status, from state.json -------------------------------------------------------


def _recorded(root: Path) -> list[Process]:
    try:
        document = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return []
    return [Process(**p) for p in document.get("processes", [])]


def down(root: Path = DEFAULT_DIR) -> list[str]:
    """Stop the processes state.json records, each only while its pid still runs the command
    line recorded; the names stopped."""
    processes = [p for p in _recorded(root) if _alive(p)]
    try:
        document = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        document = {}
    recorded = document.get("launcher")
    if recorded and _alive(owner := Process(**recorded)):
        os.kill(owner.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            _until(lambda: not _alive(owner), f"the launcher (pid {owner.pid}) to stop")
    left = [p for p in processes if _alive(p)]
    stopped = [p.name for p in processes if p not in left]
    data = Path(document["pg_data"]) if document.get("pg_data") else None
    return stopped + Cluster(root, 0, left, _pg_data=data).stop()


def status(root: Path = DEFAULT_DIR) -> list[tuple[Process, bool]]:
    """Each recorded process and whether it still runs."""
    return [(p, _alive(p)) for p in _recorded(root)]


def banner(cluster: Cluster) -> str:
    """What `make cluster` prints: where to connect and how to get a token."""
    rel = os.path.relpath(cluster.root, Path.cwd())
    env = f"set -a; . {rel}/cluster.env; set +a"
    lines = [
        "",
        f"Bastion cluster is ready: load balancer {cluster.url()}",
        *(f"  {p.role:<9} {p.name:<10} pid {p.pid:<8} port {p.port}" for p in cluster.processes),
        f"Processes, ports and pids: {rel}/state.json; secrets (mode 0600): {rel}/cluster.env",
        f"Every request needs an access token. Demo agents: {', '.join(AGENTS)}. Get one with:",
        f"  {env}; .venv/bin/bastion token --config {rel}/bastion.yaml --agent acme-reader",
        f'and send it as "Authorization: Bearer <token>" to {cluster.url()}.',
        f'Admin API: curl -H "Authorization: Bearer $BASTION_ADMIN_TOKEN" {cluster.base}/admin/'
        "agents (after the `set -a` line above)",
        f"Audit trail of all replicas: {env}; .venv/bin/bastion audit verify --config "
        f"{rel}/bastion.yaml",
        "Ctrl-C (or `make cluster-down` from another terminal) stops exactly these processes.",
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def _interrupts_as_exit() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """`up` (foreground until Ctrl-C), `down` or `status`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args(argv)
    root = args.dir.resolve()
    if args.command == "down":
        stopped = down(root)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    if args.command == "status":
        rows = status(root)
        for process, alive in rows:
            state = "running" if alive else "gone"
            print(f"{process.role:<9} {process.name:<10} pid {process.pid:<8} "
                  f"port {process.port:<6} {state}")  # fmt: skip
        return 0 if rows and all(alive for _, alive in rows) else 1
    with _interrupts_as_exit():
        try:
            cluster = start(root, args.replicas)
        except KeyboardInterrupt:
            return 130
        me = os.getpid()
        cluster.launcher = Process("launcher", "launcher", me, 0, sys.argv, _start_time(me), "")
        cluster.save()
        print(banner(cluster), flush=True)
        try:
            while all(_alive(p) or p.role != "haproxy" for p in cluster.processes):
                time.sleep(1)
            print("HAProxy exited; stopping the cluster", file=sys.stderr)
            return_code = 1
        except KeyboardInterrupt:
            return_code = 0
        print(f"stopped: {', '.join(cluster.stop())}")
        return return_code


if __name__ == "__main__":
    sys.exit(main())
