"""Environments: an agent reaches only upstreams of its own environment, and a `prod` gateway
refuses demo parts and `auth: none`.

- through the real gateway, a `dev` agent calling a `prod` upstream is denied by the built-in
  `environment-separation` forbid, with its reason, in the client's error and the audit trail;
  the same agent may call its `dev` upstream, and an agent the config's exception names may
  cross; lists hide what the caller may not reach;
- `bastion policy explain` shows the built-in forbid and both environments;
- a prod config with a demo upstream, demo agent or `auth: none` is refused by `check-config`
  and `serve`, naming each offender by key path;
- the agent's environment is the registry's, never the token's `env` claim.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.conftest import (
    EXAMPLES,
    GatewayProcess,
    free_port,
    modern_body,
    modern_headers,
    start_gateway,
    until,
    wait_lists_complete,
)

from bastion import config
from bastion.config import Auth
from bastion.errors import ConfigError
from bastion.identity.jwt import mint
from bastion.identity.keys import KeySet, generate
from bastion.pipeline.authn import Authenticator
from bastion.pipeline.exchange import Exchange
from bastion.policy.source import SEPARATION_ID
from bastion.types import Era

BASTION = [sys.executable, "-m", "bastion.cli"]
STEP = 20.0
ECHO = ["{python}", str(EXAMPLES / "echo_server.py"), "--transport", "stdio"]


def environments_config(port: int, state: Path) -> dict[str, Any]:
    """A dev gateway with a dev and a prod upstream (the echo demo over stdio), three agents
    of acme that the grant lets use everything, and one exception: ops-bot may reach prod."""
    agent = {"tenant": "acme", "owner": "tests", "purpose": "environment tests"}
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_dir": str(state),
        "environment": "dev",
        "auth": {
            "mode": "oauth",
            "agents": [
                {"id": "dev-bot", "environment": "dev", **agent},
                {"id": "ops-bot", "environment": "dev", **agent},
                {"id": "prod-bot", "environment": "prod", **agent},
            ],
        },
        "upstreams": {
            "devecho": {"transport": "stdio", "command": ECHO},  # the gateway's: dev
            "prodecho": {"transport": "stdio", "command": ECHO, "environment": "prod"},
        },
        "virtual_servers": {
            "dev": {"path": "/mcp", "upstreams": ["devecho"]},
            "prod": {"path": "/prod", "upstreams": ["prodecho"], "environment": "prod"},
        },
        "policy": {
            "catalog_timeout_seconds": 10,
            "grants": [
                {"id": "acme-all", "tenant": "acme", "server": "*", "tools": "*"},
            ],
            "cross_environment": [
                {
                    "from": "dev",
                    "to": "prod",
                    "tenant": "acme",
                    "agents": ["ops-bot"],
                    "servers": ["prodecho"],
                    "reason": "ops-bot checks prod after each release",
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def envgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("environments")
    port = free_port()
    gw = start_gateway(tmp, yaml.safe_dump(environments_config(port, tmp / "state")), port)
    try:
        for path, agent in (("/mcp", "dev-bot"), ("/prod", "prod-bot")):
            token = gw.token(agent, "--resource", path)
            wait_lists_complete(gw, (path,), {"Authorization": f"Bearer {token}"})
    except BaseException:
        gw.stop()
        raise
    yield gw
    gw.stop()


def post(gw: GatewayProcess, agent: str, path: str, method: str, **params: Any) -> Any:
    name = params.get("name")
    headers = {
        **modern_headers(method, name),
        "Authorization": f"Bearer {gw.token(agent, '--resource', path)}",
    }
    response = httpx.post(
        gw.url(path), headers=headers, json=modern_body(method, params), timeout=STEP
    )
    assert response.status_code == 200, response.text
    return response.json()


def call(gw: GatewayProcess, agent: str, path: str, tool: str) -> Any:
    return post(gw, agent, path, "tools/call", name=tool, arguments={"text": "hello"})


# Attack first: each row is (agent, route, tool, allowed, why).
CALLS = [
    ("dev-bot", "/prod", "prodecho__echo", False, "a dev agent reaches into prod"),
    ("prod-bot", "/mcp", "devecho__echo", False, "a prod agent reaches into dev"),
    ("dev-bot", "/mcp", "devecho__echo", True, "its own environment"),
    ("prod-bot", "/prod", "prodecho__echo", True, "its own environment"),
    ("ops-bot", "/prod", "prodecho__echo", True, "named by policy.cross_environment"),
]


@pytest.mark.parametrize(("agent", "path", "tool", "allowed", "why"), CALLS)
def test_an_agent_reaches_only_its_own_environment(
    envgw: GatewayProcess, agent: str, path: str, tool: str, allowed: bool, why: str
) -> None:
    answer = call(envgw, agent, path, tool)
    if allowed:
        assert "result" in answer and not answer["result"].get("isError"), (why, answer)
        return
    error = answer["error"]
    assert error["data"]["code"] == "policy.denied", (why, answer)
    assert error["data"]["policies"] == [SEPARATION_ID], (why, answer)
    assert "an agent reaches only upstreams of its own environment" in error["message"]


def test_the_denial_is_in_the_audit_trail(envgw: GatewayProcess) -> None:
    call(envgw, "dev-bot", "/prod", "prodecho__echo")

    def denied() -> Any:
        run = envgw.cli(
            "audit",
            "query",
            "--agent",
            "dev-bot",
            "--decision",
            "deny",
            "--phase",
            "decision",
            "--json",
        )
        assert run.returncode == 0, run.stderr
        records = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
        return records or None

    records = until(denied, "the denial record")
    assert SEPARATION_ID in json.dumps(records[-1])


def test_lists_hide_what_the_agent_may_not_reach(envgw: GatewayProcess) -> None:
    mine = post(envgw, "prod-bot", "/prod", "tools/list")["result"]["tools"]
    assert [t["name"] for t in mine] == ["prodecho__echo"]
    theirs = post(envgw, "dev-bot", "/prod", "tools/list")["result"]["tools"]
    assert theirs == []


def test_explain_shows_the_built_in_forbid(envgw: GatewayProcess) -> None:
    denied = envgw.cli("policy", "explain", "--agent", "dev-bot", "--tool", "prodecho__echo")
    assert denied.returncode == 1, denied.stdout + denied.stderr
    out = denied.stdout
    assert out.startswith("DENY: environment separation")
    assert f"{SEPARATION_ID} (built-in):" in out
    assert "forbid(principal, action, resource)" in out
    assert "ops-bot checks prod after each release" in out  # the exception, with its reason
    assert "agent 'dev-bot' in dev, upstream 'prodecho' in prod" in out
    crossing = envgw.cli("policy", "explain", "--agent", "ops-bot", "--tool", "prodecho__echo")
    assert crossing.returncode == 0, crossing.stdout + crossing.stderr
    assert crossing.stdout.startswith("ALLOW")
    # --environment asks as if the agent were elsewhere: a prod agent may call prod.
    as_prod = envgw.cli(
        "policy",
        "explain",
        "--agent",
        "dev-bot",
        "--tool",
        "prodecho__echo",
        "--environment",
        "prod",
    )
    assert as_prod.returncode == 0, as_prod.stdout + as_prod.stderr


# -- the prod guard ------------------------------------------------------------------------

PROD_BASE = """
environment: prod
upstreams:
  shop: {transport: http, url: "http://127.0.0.1:9/mcp"}
"""

# (what is added to a prod config, the key path the refusal names)
PROD_REFUSALS = [
    ("auth: {mode: none}\n", "auth.mode"),
    (
        "upstreams:\n  demo-shop: {transport: http, url: 'http://127.0.0.1:9/mcp', "
        "environment: demo}\n",
        "upstreams.demo-shop.environment",
    ),
    (
        "upstreams:\n  demo-echo: {transport: stdio, command: [echo], environment: demo}\n",
        "upstreams.demo-echo.environment",
    ),
    (
        "auth:\n  agents:\n    - {id: demo-bot, tenant: acme, owner: o, purpose: p, "
        "environment: demo}\n",
        "auth.agents.0.environment",
    ),
    (
        "policy:\n  cross_environment:\n    - {from: demo, to: prod, tenant: acme, reason: r}\n",
        "policy.cross_environment.0.from",
    ),
]


def prod_config(extra: str) -> str:
    base = yaml.safe_load(PROD_BASE)
    for key, value in yaml.safe_load(extra).items():
        if key == "upstreams":
            base["upstreams"].update(value)
        else:
            base[key] = value
    return str(yaml.safe_dump(base))


@pytest.mark.parametrize(("extra", "key"), PROD_REFUSALS)
def test_a_prod_config_refuses_demo_parts_and_auth_none(extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config.parse(prod_config(extra))
    assert any(problem.startswith(f"{key} (line ") for problem in refused.value.problems), (
        refused.value.problems
    )
    # The same parts in a demo gateway are fine: the refusal is prod's.
    demo = prod_config(extra).replace("environment: prod", "environment: demo")
    config.parse(demo)


def test_check_config_and_serve_name_every_offender(tmp_path: Path) -> None:
    copied = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    copied["environment"] = "prod"  # the quickstart copied into production
    copied["policy"]["files"] = []
    file = tmp_path / "prod.yaml"
    file.write_text(yaml.safe_dump(copied))
    wanted = [
        "upstreams.workspace.environment",
        "upstreams.echo.environment",
        "auth.agents.0.environment",
        "auth.agents.1.environment",
        "auth.agents.2.environment",
    ]
    for command in (["check-config", str(file)], ["serve", "--config", str(file)]):
        run = subprocess.run(
            [*BASTION, *command], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert run.returncode == 1, (command, run.stdout, run.stderr)
        assert "5 problem(s) in the configuration" in run.stderr
        for key in wanted:
            assert f"  {key} (line " in run.stderr, (key, run.stderr)
        assert "a prod gateway refuses demo" in run.stderr
    assert not (tmp_path / ".state").exists()  # serve stopped before anything was created


def test_the_quickstart_is_a_demo_gateway() -> None:
    settings = config.load(EXAMPLES / "quickstart.yaml")
    assert settings.environment == "demo"
    assert {settings.environment_of(name) for name in settings.upstreams} == {"demo"}
    assert {agent.environment for agent in settings.auth.agents} == {"demo"}


# -- config: environments agree, and the old key ----------------------------------------------

UPSTREAMS = """
upstreams:
  a: {transport: http, url: "http://127.0.0.1:9/mcp"}
  b: {transport: http, url: "http://127.0.0.1:9/mcp", environment: staging}
"""

CONFIG_PROBLEMS = [
    (
        "virtual_servers:\n  mixed: {path: /mcp, upstreams: [a, b]}\n",
        "virtual_servers.mixed.upstreams",
        "upstreams of different environments: 'a' (dev), 'b' (staging)",
    ),
    (
        "virtual_servers:\n  v: {path: /mcp, upstreams: [a], environment: prod}\n",
        "virtual_servers.v.environment",
        "'prod', but its upstreams 'a' (dev) are not",
    ),
    (
        "policy:\n  cross_environment:\n"
        "    - {from: dev, to: prod, tenant: acme, servers: [b], reason: r}\n",
        "policy.cross_environment.0.servers",
        "'b' is in 'staging', not in 'prod'",
    ),
    (
        "policy:\n  cross_environment:\n    - {from: dev, to: dev, tenant: acme, reason: r}\n",
        "policy.cross_environment.0",
        "from and to are both 'dev'",
    ),
    (
        "policy: {environment: production}\n",
        "policy.environment",
        "expected one of dev, staging, prod, demo, found 'production'",
    ),
    (
        "environment: prod\npolicy: {environment: dev}\n",
        "policy.environment",
        "'dev' disagrees with the top-level environment 'prod'",
    ),
    ("environment: production\n", "environment", "Input should be"),
]


@pytest.mark.parametrize(("extra", "key", "message"), CONFIG_PROBLEMS)
def test_environment_config_problems_are_named(extra: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config.parse(UPSTREAMS + extra)
    found = [p for p in refused.value.problems if p.startswith(f"{key} (line ")]
    assert found and message in found[0], refused.value.problems


def test_defaults_keep_old_configs_working() -> None:
    plain = config.parse(UPSTREAMS.replace(", environment: staging", ""))
    assert plain.environment == "dev" and plain.environment_of("a") == "dev"
    old = config.parse("policy: {environment: demo}\n" + UPSTREAMS)  # the old key, still read
    assert old.environment == "demo" and old.environment_of("a") == "demo"
    assert old.environment_of("b") == "staging"


# -- the agent's environment is the registry's -------------------------------------------------


class _Keys:
    def __init__(self, keyset: KeySet) -> None:
        self._keyset = keyset

    def keyset(self) -> KeySet:
        return self._keyset

    async def recheck(self) -> bool:
        return False


class _Agent:
    id = "dev-bot"
    tenant = "acme"
    require_dpop = False
    environment = "dev"

    def usable(self, now: float) -> tuple[bool, str]:
        return True, ""


class _Agents:
    def require_current(self) -> None:
        return None

    async def reread(self) -> None:
        return None

    def agent(self, agent_id: str) -> _Agent | None:
        return _Agent() if agent_id == "dev-bot" else None

    def revoked(self, jti: str) -> bool:
        return False

    def session_killed(self, session_hash: str) -> bool:
        return False

    def note_use(self, agent_id: str, when: float) -> None:
        return None

    def tenants(self) -> frozenset[str]:
        return frozenset({"acme"})


@pytest.mark.parametrize("claimed", ["prod", None])
async def test_the_environment_comes_from_the_registry_not_the_token(
    claimed: str | None,
) -> None:
    issuer, resource = "http://127.0.0.1:1", "http://127.0.0.1:1/mcp"
    key = generate("ES256")
    keyset = KeySet.from_jwks({"keys": [key.public_jwk()]})
    authn = Authenticator(Auth(mode="oauth"), issuer, _Agents(), _Keys(keyset))
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": "dev-bot",
        "aud": resource,
        "iat": now,
        "exp": now + 60,
        "jti": "j1",
        "agent": "dev-bot",
        "tenant": "acme",
        "scope": "mcp:tools",
    }
    if claimed is not None:
        claims["env"] = claimed  # what a token says, which the registry overrules
    token = mint(key, claims)
    exchange = Exchange(modern_body("tools/list"), Era.MODERN, "2026-07-28", "/mcp", "127.0.0.1:1")
    await authn.authenticate(
        exchange, {"authorization": f"Bearer {token}"}, "POST", resource, resource
    )
    assert exchange.denial is None, exchange.denial
    assert exchange.principal is not None and exchange.principal.environment == "dev"
