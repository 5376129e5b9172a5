"""The first hour with Bastion, through a real gateway: what a newcomer runs into.

- `bastion token` mints for the gateway that runs (started with `--port`, as `PORT=… make run`
  does, elsewhere than the config says), for any route (`--resource` as a path or a full URL);
- client assertions whose `aud` is the issuer with a trailing slash (the Python SDK 1.x) are
  accepted, and nothing else that is not the issuer or the token endpoint;
- a denial on `/servers/<name>/mcp` names the tool as that route calls it;
- refusals never echo more than a short prefix of what the client sent (a 100 kB tool name
  used to come back twice), and the token endpoint answers an oversized body with 413;
- the order of a decision's reasons is stable.
"""

from __future__ import annotations

import json
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
import yaml
from tests.conftest import (
    EXAMPLES,
    FIXTURES,
    GatewayProcess,
    free_port,
    legacy_session,
    modern_body,
    modern_headers,
    start_gateway,
)

from bastion.config import parse
from bastion.control.assembly import open_identity
from bastion.control.tokens.endpoints import oauth_endpoints
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey
from bastion.state.keystore import FileKeyStore

BASTION = [sys.executable, "-m", "bastion.cli"]
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
HUGE = "x" * 100_000
SEEDS = [
    {"id": "acme-reader", "tenant": "acme", "owner": "tests", "purpose": "reads"},
    {"id": "globex-reader", "tenant": "globex", "owner": "tests", "purpose": "echoes"},
]


def _config(tmp: Path, port: int, listen_port: int) -> dict[str, Any]:
    py = sys.executable
    return {
        # The file names another port than the one the gateway is started on (`--port`).
        "listen": {"host": "127.0.0.1", "port": listen_port},
        "state_dir": str(tmp / "state"),
        "auth": {"mode": "oauth", "agents": SEEDS},
        "policy": {
            "catalog_timeout_seconds": 5,
            "grants": [
                {
                    "id": "everything",
                    "tenant": "*",
                    "server": "everything",
                    "tools": "*",
                    "prompts": "*",
                    "resources": "*",
                },
                {"id": "globex-echo", "tenant": "globex", "server": "echo", "tools": "*"},
            ],
        },
        "upstreams": {
            "everything": {
                "transport": "http",
                "url": f"http://127.0.0.1:{port}/mcp",
                "launch": [py, str(FIXTURES / "everything_server.py"), "--port", str(port)],
            },
            "echo": {
                "transport": "stdio",
                "command": [py, str(EXAMPLES / "echo_server.py"), "--transport", "stdio"],
            },
        },
        "virtual_servers": {"default": {"path": "/mcp", "upstreams": ["everything", "echo"]}},
    }


@pytest.fixture(scope="module")
def fh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("first-hour")
    port = free_port()
    config = _config(tmp, free_port(), listen_port=free_port())
    gateway = start_gateway(tmp, yaml.safe_dump(config), port)
    yield gateway
    gateway.stop()


# -- helpers ------------------------------------------------------------------------------------


def audience(token: str) -> Any:
    return pyjwt.decode(token, options={"verify_signature": False})["aud"]


def modern(
    gw: GatewayProcess, token: str, path: str, method: str, params: dict[str, Any]
) -> httpx.Response:
    name = params.get("name") or params.get("uri")
    headers = {**modern_headers(method, name), "Authorization": f"Bearer {token}"}
    body = modern_body(method, params)
    return httpx.post(gw.url(path), json=body, headers=headers, timeout=30)


def legacy(gw: GatewayProcess, token: str, path: str) -> dict[str, str]:
    """Open a 2025-11-25 session: its requests mirror nothing in headers, so a name can be as
    long as the body allows."""
    with httpx.Client(timeout=30) as client:
        return legacy_session(client, gw.url(path), "2025-11-25", token)


def assertion(gw: GatewayProcess, agent: str, aud: Any) -> str:
    show = gw.cli("agents", "show", agent, "--json")
    kid = json.loads(show.stdout)["jwks"]["keys"][0]["kid"]
    pem = (gw.config_path.parent / "state" / "agents" / f"{agent}.pem").read_bytes()
    now = int(time.time())
    claims = {"iss": agent, "sub": agent, "aud": aud, "iat": now, "exp": now + 60}
    claims["jti"] = uuid.uuid4().hex
    return mint(SigningKey.from_pem(pem, kid, "ES256"), claims, typ="JWT")


def token_request(gw: GatewayProcess, client_assertion: str) -> httpx.Response:
    form = {
        "grant_type": "client_credentials",
        "client_assertion": client_assertion,
        "client_assertion_type": JWT_BEARER,
        "resource": gw.url("/mcp"),
    }
    return httpx.post(gw.url("/oauth/token"), data=form, timeout=30)


def signing_key(gw: GatewayProcess) -> SigningKey:
    store = FileKeyStore(gw.config_path.parent / "state" / "keys", "ES256", 3600)
    store.load()
    return store.current()


# -- bastion token finds the running gateway ------------------------------------------------------


def test_bastion_token_finds_the_running_gateway(fh: GatewayProcess) -> None:
    configured = yaml.safe_load(fh.config_path.read_text())["listen"]["port"]
    assert configured != fh.port  # started with --port, as `PORT=9000 make run` does
    token = fh.token("acme-reader")  # no --url: gateway.json says where it runs
    assert audience(token) == fh.url("/mcp")
    assert modern(fh, token, "/mcp", "tools/list", {}).status_code == 200


@pytest.mark.parametrize("how", ["path", "full URL"])
def test_bastion_token_for_another_route(fh: GatewayProcess, how: str) -> None:
    route = "/servers/everything/mcp"
    token = fh.token("acme-reader", "--resource", route if how == "path" else fh.url(route))
    assert audience(token) == fh.url(route)
    response = modern(fh, token, route, "tools/list", {})
    assert response.status_code == 200, response.text
    assert modern(fh, token, "/mcp", "tools/list", {}).status_code == 401  # audience-bound


def test_gateway_json_is_written_at_start_and_removed_at_stop(tmp_path: Path) -> None:
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "state_dir": str(tmp_path / "state"),
        "auth": {"mode": "none", "tenant": "acme", "agent": "dev"},
        "audit": {"enabled": False},
        "admin": {"enabled": False},
        "upstreams": {
            "echo": {
                "transport": "stdio",
                "command": [
                    sys.executable,
                    str(EXAMPLES / "echo_server.py"),
                    "--transport",
                    "stdio",
                ],
            }
        },
    }
    gateway = start_gateway(tmp_path, yaml.safe_dump(config), port)
    path = tmp_path / "state" / "gateway.json"
    try:
        document = json.loads(path.read_text())
        assert document == {
            "url": gateway.base,
            "port": port,
            "routes": ["/servers/echo/mcp"],
            "pid": gateway.proc.pid,
        }
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # nothing secret in it
    finally:
        gateway.stop()
    assert gateway.proc.returncode == 0
    assert not path.exists()


# -- client assertion audiences (RFC 7523 §3) -----------------------------------------------------

AUDIENCES: list[Any] = [
    pytest.param(lambda gw: gw.base, True, id="issuer"),
    pytest.param(lambda gw: gw.base + "/", True, id="issuer-with-slash (Python SDK 1.x)"),
    pytest.param(lambda gw: gw.url("/oauth/token"), True, id="token-endpoint"),
    pytest.param(lambda gw: ["http://elsewhere.example", gw.base + "/"], True, id="list"),
    pytest.param(lambda gw: gw.base.upper().replace("HTTP", "http") + "/", True, id="host-case"),
    pytest.param(lambda gw: gw.base + "//", False, id="two-slashes"),
    pytest.param(lambda gw: gw.url("/mcp"), False, id="a-route"),
    pytest.param(lambda gw: gw.url("/oauth/token/"), False, id="token-endpoint-slash"),
    pytest.param(lambda gw: gw.base + "/?x=1", False, id="query"),
    pytest.param(lambda gw: gw.base + "/#f", False, id="fragment"),
    pytest.param(lambda gw: gw.base.replace("http:", "https:"), False, id="scheme"),
    pytest.param(lambda gw: f"http://127.0.0.1:{gw.port + 1}", False, id="port"),
    pytest.param(lambda gw: gw.base.replace("127.0.0.1", "localhost"), False, id="host"),
    pytest.param(lambda gw: "http://evil.example/", False, id="elsewhere"),
    pytest.param(lambda gw: 5, False, id="number"),
]


@pytest.mark.parametrize(("aud", "accepted"), AUDIENCES)
def test_client_assertion_audiences(
    fh: GatewayProcess, aud: Callable[[GatewayProcess], Any], accepted: bool
) -> None:
    response = token_request(fh, assertion(fh, "acme-reader", aud(fh)))
    if accepted:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 401
    body = response.json()
    assert body["error"] == "invalid_client"
    assert f"expected aud {fh.base!r}" in body["error_description"]
    assert "found " in body["error_description"]


# -- messages a person can act on -----------------------------------------------------------------


def test_a_denial_names_the_tool_as_the_route_calls_it(fh: GatewayProcess) -> None:
    single = fh.token("acme-reader", "--resource", "/servers/echo/mcp")
    params = {"name": "echo", "arguments": {"text": "hi"}}
    error = modern(fh, single, "/servers/echo/mcp", "tools/call", params).json()["error"]
    assert "to call tool 'echo' (default deny)" in error["message"], error
    assert "echo__" not in json.dumps(error)  # the route's name, in message and data alike
    multiplexed = fh.token("acme-reader")
    params = {"name": "echo__echo", "arguments": {"text": "hi"}}
    error = modern(fh, multiplexed, "/mcp", "tools/call", params).json()["error"]
    assert "to call tool 'echo__echo' (default deny)" in error["message"], error


def _forged(gw: GatewayProcess, **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": gw.base,
        "sub": "acme-reader",
        "aud": gw.url("/mcp"),
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "agent": "acme-reader",
        "tenant": "acme",
        "scope": "mcp:tools",
        **claims,
    }
    return mint(signing_key(gw), body, typ="at+jwt")


def test_an_expired_token_says_when(fh: GatewayProcess) -> None:
    expired = int(time.time()) - 3600
    response = modern(fh, _forged(fh, exp=expired), "/mcp", "tools/list", {})
    assert response.status_code == 401
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expired))
    message = response.json()["error"]["message"]
    assert message.startswith(f"token expired at {when} ("), message
    assert message.endswith(" s ago)")
    assert f"token expired at {when}" in response.headers["www-authenticate"]


def test_a_wrong_issuer_names_the_expected_and_the_found(fh: GatewayProcess) -> None:
    found = "https://issuer.example/" + "y" * 3000
    response = modern(fh, _forged(fh, iss=found), "/mcp", "tools/list", {})
    assert response.status_code == 401
    message = response.json()["error"]["message"]
    assert message.startswith(f"expected iss one of {fh.base!r}, found 'https://issuer.example/y")
    assert "(3023 characters)" in message and "y" * 100 not in message


# -- bounded reflection ---------------------------------------------------------------------------

# (route, how to send it): a name, URI, method or id of 100 kB in each place a refusal used to
# quote it whole. The legacy era is used where a 2026-07-28 request would have to mirror the
# name in a header (the header limit refuses those with 431 before anything else).
Send = Callable[[GatewayProcess], httpx.Response]


def _legacy_call(path: str, message: dict[str, Any]) -> Send:
    def send(gw: GatewayProcess) -> httpx.Response:
        session = legacy(gw, gw.token("acme-reader", "--resource", path), path)
        return httpx.post(gw.url(path), json=message, headers=session, timeout=30)

    return send


def _call(method: str, params: dict[str, Any], id_: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


def _modern_call(path: str, method: str, params: dict[str, Any], **headers: str) -> Send:
    def send(gw: GatewayProcess) -> httpx.Response:
        token = gw.token("acme-reader", "--resource", path)
        sent = {**modern_headers(method, "a"), "Authorization": f"Bearer {token}", **headers}
        body = modern_body(method, params)
        return httpx.post(gw.url(path), json=body, headers=sent, timeout=30)

    return send


def _token_form(**form: str | list[str]) -> Send:
    def send(gw: GatewayProcess) -> httpx.Response:
        return httpx.post(gw.url("/oauth/token"), data=form, timeout=30)

    return send


REFLECTIONS: list[Any] = [
    pytest.param(
        _legacy_call("/mcp", _call("tools/call", {"name": HUGE})), id="tool-unknown-server"
    ),
    pytest.param(
        _legacy_call("/mcp", _call("tools/call", {"name": "echo__" + HUGE})), id="tool-unknown"
    ),
    pytest.param(
        _legacy_call("/servers/echo/mcp", _call("tools/call", {"name": HUGE})),
        id="tool-unknown-single-route",
    ),
    pytest.param(
        _legacy_call("/mcp", _call("resources/read", {"uri": "file:///" + HUGE})),
        id="resource-unknown",
    ),
    pytest.param(
        _legacy_call(
            "/mcp",
            _call("completion/complete", {"ref": {"type": "ref/resource", "uri": HUGE}}),
        ),
        id="completion-resource-unknown",
    ),
    pytest.param(_legacy_call("/mcp", _call("tools/" + HUGE, {})), id="method"),
    pytest.param(_legacy_call("/mcp", {**_call("ping", {}), HUGE: 1}), id="member"),
    pytest.param(
        _legacy_call("/mcp", {"jsonrpc": "2.0", "id": HUGE, "result": {}}), id="response-id"
    ),
    pytest.param(
        _modern_call("/mcp", "tools/call", {"name": "echo__" + HUGE}), id="mcp-name-mismatch"
    ),
    pytest.param(
        _modern_call("/mcp", HUGE, {}, **{"Mcp-Method": "tools/list"}), id="mcp-method-mismatch"
    ),
    pytest.param(
        _modern_call("/mcp", "tools/list", {}, **{"MCP-Protocol-Version": "9" * 4000}),
        id="protocol-version",
    ),
    pytest.param(_token_form(grant_type="x" * 50_000), id="token-grant-type"),
    pytest.param(
        _token_form(grant_type="client_credentials", **{"y" * 20_000: ["1", "2"]}),
        id="token-param-twice",
    ),
]


@pytest.mark.parametrize("send", REFLECTIONS)
def test_refusals_echo_at_most_a_short_prefix(fh: GatewayProcess, send: Send) -> None:
    response = send(fh)
    assert 400 <= response.status_code < 500 or response.status_code == 200, response.status_code
    assert len(response.content) < 2048, response.text[:300]
    assert "x" * 65 not in response.text and "9" * 65 not in response.text
    assert "y" * 65 not in response.text
    assert "error" in response.json()


# -- the token endpoint's size limit --------------------------------------------------------------


def _oversized_form() -> bytes:
    return b"grant_type=client_credentials&client_assertion=" + b"a" * 100_000


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_oversized_token_request_is_413(fh: GatewayProcess, framing: str) -> None:
    body = _oversized_form()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    content: Any = body if framing == "content-length" else iter([body[:50_000], body[50_000:]])
    response = httpx.post(fh.url("/oauth/token"), content=content, headers=headers, timeout=30)
    sent = response.request.headers
    assert ("content-length" in sent) == (framing == "content-length")
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "invalid_request"
    assert "at most 65536 bytes" in response.json()["error_description"]
    assert response.headers["cache-control"] == "no-store"


async def test_the_token_endpoint_takes_the_smaller_of_the_two_limits(tmp_path: Path) -> None:
    """With `limits.max_body_bytes` under the endpoint's own 64 KiB, the server cuts a chunked
    body just past it: the endpoint must refuse it, never parse the cut form."""
    config = {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "state_dir": str(tmp_path / "state"),
        "limits": {"max_body_bytes": 2048},
        "auth": {"mode": "oauth", "agents": SEEDS},
        "upstreams": {"echo": {"transport": "http", "url": "http://127.0.0.1:9/mcp"}},
    }
    endpoint = oauth_endpoints(open_identity(parse(yaml.safe_dump(config))).service)["/oauth/token"]
    body = b"grant_type=client_credentials&resource=" + b"r" * 2010  # 2049 bytes: 1 over
    events = iter([{"type": "http.request", "body": body, "more_body": False}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(events)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/oauth/token",
        "headers": [(b"content-type", b"application/x-www-form-urlencoded")],
    }
    await endpoint(scope, receive, send)
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"] == "invalid_request"


# -- the order of reasons -------------------------------------------------------------------------


def test_the_order_of_reasons_is_stable(tmp_path: Path) -> None:
    from tests.conftest import demo_listings
    from tests.test_policy import _authorizer, _settings, call

    cedar = (EXAMPLES / "policies" / "workspace.cedar").read_text()
    forbids = "".join(
        f'\n@id("stop-{c}") @reason("reason {c}")\nforbid (principal, action, resource);\n'
        for c in "qwerty"
    )
    listings = demo_listings()
    seen = set()
    for attempt in range(4):  # fresh engines, and several calls on each
        authz = _authorizer(_settings(tmp_path / str(attempt), cedar + forbids), listings)
        for _ in range(5):
            decision = call(authz, "acme-reader", "workspace__get_task", task_id="acme-t1").decision
            assert decision is not None and not decision.allowed
            seen.add((decision.policies, decision.reasons))
    assert len(seen) == 1
    policies, reasons = seen.pop()
    assert list(policies) == sorted(policies) and len(policies) == 6
    assert reasons == tuple(f"reason {c}" for c in sorted("qwerty"))
