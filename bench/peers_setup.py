"""The targets of bench/peers.py: what each one is, and how it is installed and started.

Every target serves the same echo tool of one shared upstream (examples/echo_server.py) on a
free 127.0.0.1 port, as a child of the run's `Fleet` (its own process group, stopped at the
end, on error and on Ctrl-C):

* `direct`: the echo server itself; `bare`: bench/bare_hop.py (uvicorn + aiohttp);
* `haproxy`: Debian's `haproxy` in HTTP mode, keep-alive both sides, config generated here;
* `none`, `full`, `normal`, `dpop`: four `bastion serve` processes, one per set-up, each with
  its own generated config and state directory (so CPU and RSS are each set-up's own);
* `cf-stateless`, `cf-stateful`: ContextForge (PyPI `mcp-contextforge-gateway`) with
  `USE_STATEFUL_SESSIONS` false / true, each with its own secrets and SQLite database, the
  echo server registered through its `/gateways` and `/servers` API;
* `fastmcp`: bench/fastmcp_proxy.py, FastMCP's `create_proxy`.

ContextForge and FastMCP live in their own virtual environments under `.bench-venvs/`
(gitignored), made on first use with a Python ≥ 3.12 (pyenv's, on this machine image) and the
pinned release; a stamp file records what was installed, so later runs reuse them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from run import (
    BENCH,
    POLICY_CEDAR,
    POLICY_YAML,
    ROOT,
    Child,
    Fleet,
    SetupError,
    _agent_kids,
    _serve,
    free_port,
    wait_ready,
)

VENVS: Path = ROOT / ".bench-venvs"
CONTEXTFORGE = "mcp-contextforge-gateway==1.1.0"
FASTMCP = "fastmcp==4.2.3"
CF_ADMIN = "admin@example.com"
INSTALL_TIMEOUT_S = 1200
# ContextForge migrates its database on first start; two of them start beside everything else.
SLOW_START_S = 240

# The four Bastion set-ups: (auth block, audit line, the agent and its scheme, if any).
# The default trail survives kill -9 of the gateway (a write-ahead, no fsync per call);
# `survives: power` fsyncs each (group) commit.
AUDIT_DEFAULT = "audit: {durability: strict}\n"
AUDIT_POWER = "audit: {durability: strict, survives: power}\n"
BASTION_SETUPS: dict[str, tuple[str, str, tuple[str, str] | None]] = {
    "none": ("auth: {mode: none, tenant: bench}\n", "audit: {enabled: false}\n", None),
    "full": ("oauth", AUDIT_DEFAULT, ("bench-bearer", "bearer")),
    "power": ("oauth", AUDIT_POWER, ("bench-bearer", "bearer")),
    "dpop": ("oauth", AUDIT_DEFAULT, ("bench-dpop", "dpop")),
}


@dataclass
class Target:
    """One started target: where the load generator sends the echo call, and how."""

    key: str
    url: str
    child: Child
    ready_url: str
    ready_within_s: float = 60.0
    tool: str = "echo"
    headers: dict[str, str] = field(default_factory=dict)
    auth: dict[str, Any] | None = None  # load.py's OAuth client spec (Bastion oauth/dpop)
    config: str | None = None  # the generated config, kept in the JSON
    version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what later set-up steps need


# -- virtual environments for the Python peers -----------------------------------------------


def find_python(minimum: tuple[int, int] = (3, 12)) -> Path:
    """A Python ≥ `minimum`: $BENCH_PEERS_PYTHON, then pyenv's versions, then PATH."""
    named = os.environ.get("BENCH_PEERS_PYTHON")
    if named:
        return Path(named)
    roots = [Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"]
    found: list[tuple[tuple[int, ...], Path]] = []
    for root in roots:
        for entry in root.glob("3.*") if root.is_dir() else ():
            match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", entry.name)
            python = entry / "bin" / "python3"
            if match and python.exists():
                found.append((tuple(int(g) for g in match.groups()), python))
    # The oldest release that is new enough: the one these peers are most surely built for.
    for version, python in sorted(found):
        if version[:2] >= minimum:
            return python
    for name in (f"python{minimum[0]}.{minimum[1]}", "python3.13"):
        on_path = shutil.which(name)
        if on_path:
            return Path(on_path)
    raise SetupError(
        f"no Python ≥ {minimum[0]}.{minimum[1]} found (pyenv versions, PATH); "
        "set BENCH_PEERS_PYTHON or skip the Python peers (--skip contextforge,fastmcp)"
    )


def ensure_venv(name: str, requirement: str, install: bool) -> Path:
    """The python of `.bench-venvs/<name>` with `requirement` installed (made when missing)."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == requirement:
        return python
    if not install:
        raise SetupError(f"{venv} lacks {requirement} and --no-install was given")
    base = find_python()
    print(f"peers: installing {requirement} into {venv} ({base})", file=sys.stderr, flush=True)
    VENVS.mkdir(exist_ok=True)
    log = VENVS / f"{name}-install.log"
    steps = [
        [str(base), "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        + [requirement],
    ]
    with log.open("wb") as out:
        for argv in steps:
            try:
                done = subprocess.run(
                    argv, stdout=out, stderr=out, timeout=INSTALL_TIMEOUT_S, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise SetupError(f"installing {requirement}: {exc} (log: {log})") from exc
            if done.returncode != 0:
                raise SetupError(f"installing {requirement} failed (log: {log})")
    stamp.write_text(requirement + "\n")
    return python


# -- the anchors: echo, HAProxy, the bare hop -----------------------------------------------


def start_echo(fleet: Fleet) -> Target:
    """The shared upstream, ready before anything that lists its tools starts."""
    port = free_port()
    child = fleet.start(
        "echo", [sys.executable, str(ROOT / "examples" / "echo_server.py"), "--port", str(port)]
    )
    base = f"http://127.0.0.1:{port}"
    target = Target("direct", f"{base}/mcp", child, f"{base}/healthz")
    wait_ready(child, target.ready_url, time.monotonic() + 60)
    return target


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
    )
    if found is None:
        raise SetupError(
            "haproxy not found: install Debian's package (make bench-peers does) "
            "or skip it (--skip haproxy)"
        )
    return found


def start_haproxy(fleet: Fleet, workdir: Path, echo: Target) -> Target:
    """HAProxy in HTTP mode in front of the echo server, connections kept alive both ways."""
    binary = haproxy_binary()
    port = free_port()
    echo_hostport = echo.url.removeprefix("http://").removesuffix("/mcp")
    config = (
        "# Generated by bench/peers.py: HTTP mode, no logging, keep-alive on both sides.\n"
        "global\n"
        "    maxconn 4096\n"
        "defaults\n"
        "    mode http\n"
        "    timeout connect 5s\n"
        "    timeout client 30s\n"
        "    timeout server 30s\n"
        "    timeout http-keep-alive 30s\n"
        "frontend bench\n"
        f"    bind 127.0.0.1:{port}\n"
        "    default_backend echo\n"
        "backend echo\n"
        "    http-reuse always\n"
        f"    server echo {echo_hostport}\n"
    )
    path = workdir / "haproxy.cfg"
    path.write_text(config)
    check = subprocess.run(
        [binary, "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise SetupError(f"haproxy refused its config:\n{check.stderr[-800:]}")
    version = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30)
    child = fleet.start("haproxy", [binary, "-db", "-f", str(path)])
    base = f"http://127.0.0.1:{port}"
    return Target(
        "haproxy",
        f"{base}/mcp",
        child,
        f"{base}/healthz",
        config=config,
        version=(version.stdout.splitlines() or ["?"])[0],
    )


def start_bare(fleet: Fleet, echo: Target) -> Target:
    port = free_port()
    argv = [sys.executable, str(BENCH / "bare_hop.py"), "--upstream", echo.url]
    child = fleet.start("bare", [*argv, "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    return Target("bare", f"{base}/mcp", child, f"{base}/healthz")


# -- Bastion, four set-ups --------------------------------------------------------------------


def start_bastion(fleet: Fleet, workdir: Path, key: str, echo: Target) -> Target:
    """`bastion serve` with the set-up's generated config; its agent's kid is read later."""
    auth, audit, agent = BASTION_SETUPS[key]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if auth == "oauth":
        assert agent is not None
        dpop = ", require_dpop: true" if agent[1] == "dpop" else ""
        auth = (
            "auth:\n  mode: oauth\n  agents:\n"
            f"    - {{id: {agent[0]}, tenant: bench, owner: bench, purpose: bench{dpop}}}\n"
        )
    config_text = (
        f"# Generated by bench/peers.py: Bastion set-up {key!r}\n"
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"state_dir: {json.dumps(str(workdir / f'state-{key}'))}\n"
        + auth
        + audit
        + POLICY_YAML
        + f"upstreams:\n  echo: {{transport: http, url: {json.dumps(echo.url)}}}\n"
    )
    (workdir / "bench.cedar").write_text(POLICY_CEDAR)
    config = workdir / f"bastion-{key}.yaml"
    config.write_text(config_text)
    child = _serve(fleet, f"bastion-{key}", config, port)
    target = Target(key, f"{base}/servers/echo/mcp", child, f"{base}/readyz", config=config_text)
    target.extra = {"config": config, "base": base, "agent": agent, "state": workdir}
    return target


def finish_bastion(target: Target) -> None:
    """After readiness: the load generator's OAuth client spec for the set-up's agent."""
    agent = target.extra["agent"]
    if agent is None:
        return
    agent_id, scheme = agent
    kids = _agent_kids(target.extra["config"])
    if agent_id not in kids:
        raise SetupError(f"bastion-{target.key}: agent {agent_id} not registered: {sorted(kids)}")
    base = target.extra["base"]
    target.auth = {
        "scheme": scheme,
        "token_url": f"{base}/oauth/token",
        "issuer": base,
        "resource": target.url,
        "agent": agent_id,
        "kid": kids[agent_id],
        "pem": str(target.extra["state"] / f"state-{target.key}" / "agents" / f"{agent_id}.pem"),
    }


# -- ContextForge -----------------------------------------------------------------------------


def _peer_env(extra: dict[str, str]) -> dict[str, str]:
    """A small environment: nothing of the project's venv leaks into a peer's."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")
    return {k: os.environ[k] for k in keep if k in os.environ} | extra


def _read_env_file(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            found[key.strip()] = value.strip()
    return found


def start_contextforge(
    fleet: Fleet, workdir: Path, python: Path, key: str, stateful: bool
) -> Target:
    """ContextForge with fresh secrets and its own SQLite database, in its own folder."""
    home = workdir / key
    home.mkdir()
    secrets_file = home / ".env.secrets"
    done = subprocess.run(
        [str(python), "-m", "mcpgateway.scripts.init_secrets"]
        + ["--output", str(secrets_file), "--force"],
        cwd=home,
        env=_peer_env({}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise SetupError(f"{key}: init_secrets failed:\n{done.stderr[-800:]}")
    port = free_port()
    env = _peer_env(
        _read_env_file(secrets_file)
        | {
            "DATABASE_URL": f"sqlite:///{home / 'mcp.db'}",
            "PLATFORM_ADMIN_EMAIL": CF_ADMIN,
            "RATE_LIMITING_ENABLED": "false",
            "SSRF_ALLOW_LOCALHOST": "true",
            "USE_STATEFUL_SESSIONS": "true" if stateful else "false",
            "MCPGATEWAY_UI_ENABLED": "false",
            "LOG_LEVEL": "WARNING",
        }
    )
    gateway = python.parent / "mcpgateway"
    argv = [str(gateway), "--host", "127.0.0.1", "--port", str(port)]
    child = fleet.start(
        key, [*argv, "--no-access-log", "--log-level", "warning"], cwd=home, env=env
    )
    base = f"http://127.0.0.1:{port}"
    target = Target(key, "", child, f"{base}/health", ready_within_s=SLOW_START_S)
    target.extra = {"base": base, "env": env, "python": python, "home": home}
    return target


def _cf_api(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - a loopback URL this run built
        base + path,
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300]
        raise SetupError(f"ContextForge {method} {path}: HTTP {exc.code}: {detail!r}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SetupError(f"ContextForge {method} {path}: {exc}") from exc


def finish_contextforge(target: Target, echo: Target) -> None:
    """After readiness: an admin JWT, the echo server as a gateway, a virtual server of it."""
    base, env, python = target.extra["base"], target.extra["env"], target.extra["python"]
    done = subprocess.run(
        [str(python), "-m", "mcpgateway.utils.create_jwt_token", "--username", CF_ADMIN]
        + ["--exp", "600", "--secret", env["JWT_SECRET_KEY"]],
        cwd=target.extra["home"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    tokens = [w for w in done.stdout.split() if w.count(".") == 2 and w.startswith("ey")]
    if done.returncode != 0 or not tokens:
        raise SetupError(f"{target.key}: create_jwt_token failed:\n{done.stderr[-800:]}")
    token = tokens[-1]
    gateway = _cf_api(
        base,
        token,
        "POST",
        "/gateways",
        {"name": "echo", "url": echo.url, "transport": "STREAMABLEHTTP"},
    )
    listed = _cf_api(base, token, "GET", "/tools")
    if isinstance(listed, dict):  # a paginated answer
        listed = listed.get("items", listed.get("data", []))
    tools: list[dict[str, Any]] = listed if isinstance(listed, list) else []
    mine = [
        t
        for t in tools
        if t.get("gatewayId") == gateway.get("id") and t.get("originalName") == "echo"
    ]
    if not mine:
        raise SetupError(f"{target.key}: the echo tool was not imported: {str(listed)[:300]}")
    server = _cf_api(
        base,
        token,
        "POST",
        "/servers",
        {"server": {"name": "bench-echo", "associated_tools": [mine[0]["id"]]}},
    )
    target.url = f"{base}/servers/{server['id']}/mcp"
    target.tool = mine[0]["name"]
    target.headers = {"Authorization": f"Bearer {token}"}
    target.version = CONTEXTFORGE


# -- FastMCP ----------------------------------------------------------------------------------


def start_fastmcp(fleet: Fleet, python: Path, echo: Target) -> Target:
    port = free_port()
    argv = [str(python), str(BENCH / "fastmcp_proxy.py"), "--upstream", echo.url]
    child = fleet.start("fastmcp", [*argv, "--port", str(port)], env=_peer_env({}))
    base = f"http://127.0.0.1:{port}"
    return Target(
        "fastmcp",
        f"{base}/mcp",
        child,
        f"{base}/healthz",
        ready_within_s=SLOW_START_S,
        version=FASTMCP,
    )
