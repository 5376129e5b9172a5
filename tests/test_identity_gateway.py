"""Identity through a real gateway: the embedded authorization server, the resource server's
checks with a table of hostile tokens and proofs, delegation from a real OIDC provider,
session binding, revocation, and the credentials upstreams receive."""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jwt as pyjwt
import pytest
import yaml
from tests import oidc
from tests.conftest import (
    ALLOW_ALL,
    EXAMPLES,
    FIXTURES,
    GatewayProcess,
    free_port,
    legacy_session,
    modern_body,
    modern_headers,
    start_gateway,
    until,
    wait_lists_complete,
)

from bastion.identity.dpop import make_proof
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey, generate
from bastion.state.keystore import FileKeyStore

oidc_provider = oidc.oidc_provider
BASTION = [sys.executable, "-m", "bastion.cli"]
SPIFFE_KEY = generate("ES256")  # the example.org trust domain's signing key, made per run
KEYED_SECRET = "k-" + uuid.uuid4().hex
SEEDS = [
    {"id": "acme-reader", "tenant": "acme", "owner": "tests", "purpose": "reads acme"},
    {"id": "globex-reader", "tenant": "globex", "owner": "tests", "purpose": "reads globex"},
    {
        "id": "acme-bot",
        "tenant": "acme",
        "owner": "tests",
        "purpose": "DPoP only",
        "require_dpop": True,
    },
    {
        "id": "narrow",
        "tenant": "acme",
        "owner": "tests",
        "purpose": "tools only",
        "scopes": ["mcp:tools"],
    },
    {"id": "doomed", "tenant": "acme", "owner": "tests", "purpose": "gets offboarded"},
    {"id": "pausable", "tenant": "acme", "owner": "tests", "purpose": "gets suspended"},
    # The OIDC provider's client: its users' tokens name it in `client_id`.
    {"id": "bastion-tests", "tenant": "acme", "owner": "tests", "purpose": "acme users' app"},
]


@pytest.fixture(scope="module")
def idgw(
    tmp_path_factory: pytest.TempPathFactory, oidc_provider: oidc.Provider
) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("identity")
    port, wp, rp, kp, xp = free_port(), free_port(), free_port(), free_port(), free_port()
    py = sys.executable
    # The upstream `exchanged` gets its credential by RFC 8693 at its own authorization
    # server, which trusts subject tokens signed by this gateway.
    exchange_as = oidc.start_provider(tmp, trust_issuer=f"http://127.0.0.1:{port}")
    client_id, client_secret = exchange_as.exchange_client
    (tmp / "spiffe-bundle.json").write_text(json.dumps({"keys": [SPIFFE_KEY.public_jwk()]}))
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_dir": str(tmp / "state"),
        "auth": {
            "mode": "oauth",
            # Users' tokens from this issuer are also accepted directly on MCP routes when the
            # client they were issued to is a registered agent (agent_claim: client_id).
            "trusted_issuers": [{"issuer": oidc_provider.issuer, "agent_claim": "client_id"}],
            "agents": SEEDS,
            "spiffe": [{"domain": "example.org", "bundle": str(tmp / "spiffe-bundle.json")}],
            "dpop": {"nonce": True},
        },
        "policy": ALLOW_ALL,
        "upstreams": {
            "workspace": {
                "transport": "http",
                "url": f"http://127.0.0.1:{wp}/mcp",
                "launch": [
                    py,
                    str(EXAMPLES / "workspace_server.py"),
                    "--port",
                    str(wp),
                    "--issuer",
                    "{bastion}",
                ],
            },
            "recorder": {
                "transport": "http",
                "url": f"http://127.0.0.1:{rp}/mcp",
                "launch": [py, str(FIXTURES / "bad_http_upstream.py"), "--port", str(rp)],
                # It answers with the credential it received, which these tests read: the
                # inspection stage would redact it (tests/test_malicious_upstream.py).
                "inspect": {"secrets": "off"},
            },
            "keyed": {
                "transport": "http",
                "url": f"http://127.0.0.1:{kp}/mcp",
                "launch": [py, str(FIXTURES / "bad_http_upstream.py"), "--port", str(kp)],
                "inspect": {"secrets": "off"},  # it echoes its credential (see recorder)
                "credentials": {
                    "mode": "secret",
                    "secret": "env:KEYED_UPSTREAM_TOKEN",
                    "header": "X-Api-Key",
                    "scheme": "",
                },
            },
            "exchanged": {
                "transport": "http",
                "url": f"http://127.0.0.1:{xp}/mcp",
                "launch": [py, str(FIXTURES / "bad_http_upstream.py"), "--port", str(xp)],
                "inspect": {"secrets": "off"},  # it echoes its credential (see recorder)
                "credentials": {
                    "mode": "token_exchange",
                    "token_endpoint": exchange_as.token_endpoint,
                    "client_id": client_id,
                    "client_secret": "env:EXCHANGE_CLIENT_SECRET",
                },
            },
            "echo": {
                "transport": "stdio",
                "command": [py, str(EXAMPLES / "echo_server.py"), "--transport", "stdio"],
            },
        },
        "virtual_servers": {"default": {"path": "/mcp", "upstreams": ["workspace", "echo"]}},
    }
    env = {"KEYED_UPSTREAM_TOKEN": KEYED_SECRET, "EXCHANGE_CLIENT_SECRET": client_secret}
    gw = start_gateway(tmp, yaml.safe_dump(config), port, env=env)
    gw.exchange_as = exchange_as  # type: ignore[attr-defined]
    try:  # the lists these tests read need every upstream started (cold on a busy machine)
        reader = {"Authorization": f"Bearer {gw.token('acme-reader')}"}
        wait_lists_complete(gw, ("/mcp",), reader)
    except BaseException:
        gw.stop()
        exchange_as.stop()
        raise
    yield gw
    gw.stop()
    exchange_as.stop()


# -- helpers ----------------------------------------------------------------------------------


def signing_key(gw: GatewayProcess) -> SigningKey:
    store = FileKeyStore(gw.config_path.parent / "state" / "keys", "ES256", 3600)
    store.load()
    return store.current()


def forge(
    gw: GatewayProcess, key: SigningKey | None = None, typ: str = "at+jwt", **claims: Any
) -> str:
    """A token as Bastion would mint it for acme-reader at /mcp, with `claims` changed."""
    now = int(time.time())
    body = {
        "iss": gw.base,
        "sub": "acme-reader",
        "aud": gw.url("/mcp"),
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "client_id": "acme-reader",
        "agent": "acme-reader",
        "tenant": "acme",
        "scope": "mcp:tools mcp:resources mcp:prompts",
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return mint(key or signing_key(gw), body, typ=typ)


def call(
    gw: GatewayProcess,
    token: str | None,
    path: str = "/mcp",
    method: str = "tools/list",
    params: dict[str, Any] | None = None,
    scheme: str = "Bearer",
    proof: str | None = None,
    name: str | None = None,
) -> httpx.Response:
    headers = modern_headers(method, name)
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    if proof is not None:
        headers["DPoP"] = proof
    return httpx.post(gw.url(path), json=modern_body(method, params), headers=headers, timeout=20)


T = TypeVar("T")


def eventually(probe: Callable[[], T], done: Callable[[T], bool]) -> T:
    """Call until `done` holds of the answer, for at most 5 s: a registry change made by
    another process (the CLI) is in force once the gateway's watcher read it (0.2 s)."""
    seen: list[T] = []

    def check() -> bool:
        seen[:] = [probe()]
        return done(seen[0])

    with contextlib.suppress(AssertionError):  # the caller asserts on the last answer
        until(check, "the registry change in force", 5.0)
    return seen[0]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- metadata and challenges -----------------------------------------------------------------


def test_protected_resource_and_server_metadata(idgw: GatewayProcess) -> None:
    prm = httpx.get(idgw.url("/.well-known/oauth-protected-resource/mcp")).json()
    assert prm["resource"] == idgw.url("/mcp")
    assert prm["authorization_servers"] == [idgw.base]
    assert "mcp:tools" in prm["scopes_supported"]
    root = httpx.get(idgw.url("/.well-known/oauth-protected-resource")).json()
    assert root["resource"] == idgw.url("/mcp")
    single = httpx.get(idgw.url("/.well-known/oauth-protected-resource/servers/workspace/mcp"))
    assert single.json()["resource"] == idgw.url("/servers/workspace/mcp")
    meta = httpx.get(idgw.url("/.well-known/oauth-authorization-server")).json()
    assert meta["issuer"] == idgw.base and meta["token_endpoint"] == idgw.url("/oauth/token")
    assert meta["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    jwks = httpx.get(meta["jwks_uri"]).json()
    assert signing_key(idgw).kid in [k["kid"] for k in jwks["keys"]]
    assert all("d" not in k for k in jwks["keys"])


def test_no_token_is_401_with_the_challenge(idgw: GatewayProcess) -> None:
    response = call(idgw, None)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{idgw.base}/.well-known/oauth-protected-resource/mcp"' in challenge
    assert 'scope="mcp:tools mcp:resources mcp:prompts"' in challenge
    assert "error=" not in challenge


def test_cli_token_reaches_the_tools(idgw: GatewayProcess) -> None:
    token = idgw.token("acme-reader")
    claims = pyjwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == idgw.url("/mcp") and claims["tenant"] == "acme"
    assert claims["exp"] - claims["iat"] == 300 and "cnf" not in claims
    assert pyjwt.get_unverified_header(token)["typ"] == "at+jwt"
    response = call(idgw, token)
    assert response.status_code == 200, response.text
    names = [t["name"] for t in response.json()["result"]["tools"]]
    assert "workspace__list_projects" in names and "echo__echo" in names


# -- hostile tokens ----------------------------------------------------------------------------


def _alg_none(gw: GatewayProcess) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "at+jwt"}).encode())
    payload = b64(
        json.dumps(
            {
                "iss": gw.base,
                "aud": gw.url("/mcp"),
                "agent": "acme-reader",
                "tenant": "acme",
                "exp": int(time.time()) + 300,
            }
        ).encode()
    )
    return f"{header}.{payload}."


def _hs256_with_public_key(gw: GatewayProcess) -> str:
    pem = (
        signing_key(gw)
        .private.public_key()
        .public_bytes(
            encoding=__import__(
                "cryptography.hazmat.primitives.serialization", fromlist=["x"]
            ).Encoding.PEM,
            format=__import__(
                "cryptography.hazmat.primitives.serialization", fromlist=["x"]
            ).PublicFormat.SubjectPublicKeyInfo,
        )
    )
    header = {"alg": "HS256", "typ": "at+jwt", "kid": signing_key(gw).kid}
    import hashlib
    import hmac

    now = int(time.time())
    payload = {
        "iss": gw.base,
        "aud": gw.url("/mcp"),
        "agent": "acme-reader",
        "tenant": "acme",
        "iat": now,
        "exp": now + 300,
        "jti": "x",
    }
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def _tampered(gw: GatewayProcess) -> str:
    head, payload, sig = forge(gw).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["tenant"] = "globex"
    return f"{head}.{b64(json.dumps(claims).encode())}.{sig}"


def _with_header(gw: GatewayProcess, **header: Any) -> str:
    key = signing_key(gw)
    now = int(time.time())
    claims = {
        "iss": gw.base,
        "aud": gw.url("/mcp"),
        "agent": "acme-reader",
        "tenant": "acme",
        "iat": now,
        "exp": now + 300,
        "jti": "y",
        "scope": "mcp:tools",
    }
    return pyjwt.encode(claims, key.private_pem(), algorithm="ES256", headers=header)


HOSTILE = {
    "expired": (lambda gw: forge(gw, exp=int(time.time()) - 120), "expired"),
    "not yet valid": (lambda gw: forge(gw, nbf=int(time.time()) + 600), "not_yet_valid"),
    "wrong iss": (lambda gw: forge(gw, iss="http://127.0.0.1:1"), "wrong_issuer"),
    "wrong aud": (lambda gw: forge(gw, aud="http://elsewhere.example/mcp"), "wrong_audience"),
    "another route's aud": (
        lambda gw: forge(gw, aud=gw.url("/servers/echo/mcp")),
        "wrong_audience",
    ),
    "alg none": (_alg_none, "alg_not_allowed"),
    "HS256 with the public key": (_hs256_with_public_key, "alg_not_allowed"),
    "unknown kid": (lambda gw: forge(gw, key=generate("ES256")), "unknown_kid"),
    "kid injection": (lambda gw: _with_header(gw, kid="../../../etc/passwd' OR 1=1"), "malformed"),
    "tampered payload": (_tampered, "bad_signature"),
    "oversized header": (lambda gw: _with_header(gw, pad="x" * 9000), "too_large"),
    "wrong typ": (lambda gw: forge(gw, typ="JWT"), "wrong_typ"),
    "unregistered agent": (lambda gw: forge(gw, agent="ghost", sub="ghost"), "unknown_kid"),
    "tenant not the agent's": (lambda gw: forge(gw, tenant="globex"), "wrong_audience"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_tokens_are_refused(idgw: GatewayProcess, case: str) -> None:
    make, reason = HOSTILE[case]
    response = call(idgw, make(idgw))
    assert response.status_code == 401, response.text
    assert response.json()["error"]["data"]["reason"] == reason
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_the_forging_helper_is_sound(idgw: GatewayProcess) -> None:
    """The hostile table only means something if an unmodified forgery is accepted."""
    assert call(idgw, forge(idgw)).status_code == 200


def test_insufficient_scope_is_403_with_step_up(idgw: GatewayProcess) -> None:
    token = idgw.token("narrow")
    assert call(idgw, token).status_code == 200
    response = call(idgw, token, method="resources/list")
    assert response.status_code == 403
    challenge = response.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="mcp:resources"' in challenge


# -- DPoP ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, Path]:
    key = generate("ES256")
    path = tmp_path_factory.mktemp("dpop") / "holder.pem"
    path.write_bytes(key.private_pem())
    return key, path


def test_dpop_bound_token(idgw: GatewayProcess, holder: tuple[SigningKey, Path]) -> None:
    key, path = holder
    token = idgw.token("acme-bot", "--dpop-key", str(path))
    claims = pyjwt.decode(token, options={"verify_signature": False})
    assert claims["cnf"]["jkt"]
    url = idgw.url("/mcp")
    # The server demands its nonce (RFC 9449 §8): the first proof, without one, learns it.
    first = call(
        idgw,
        token,
        scheme="DPoP",
        proof=make_proof(key, "POST", url, time.time(), access_token=token),
    )
    assert first.status_code == 401
    assert 'error="use_dpop_nonce"' in first.headers["www-authenticate"]
    nonce = first.headers["dpop-nonce"]

    def proof(
        signer: SigningKey = key,
        method: str = "POST",
        at: str = url,
        when: float = 0.0,
        bind: str | None = token,
        with_nonce: str | None = nonce,
    ) -> str:
        return make_proof(
            signer, method, at, when or time.time(), access_token=bind, nonce=with_nonce
        )

    good = proof()
    assert call(idgw, token, scheme="DPoP", proof=good).status_code == 200
    replayed = call(idgw, token, scheme="DPoP", proof=good)
    assert replayed.status_code == 401 and replayed.json()["error"]["data"]["reason"] == "replayed"
    stolen = call(idgw, token)  # the token alone, as a Bearer token
    assert stolen.status_code == 401 and stolen.json()["error"]["data"]["reason"] == "wrong_key"
    cases = {
        "htu": proof(at=idgw.url("/servers/echo/mcp")),
        "htm": proof(method="GET"),
        "wrong_key": proof(signer=generate("ES256")),
        "ath": proof(bind=None),
        "iat": proof(when=time.time() - 3600),
        "nonce": proof(with_nonce="made-up"),
    }
    for reason, bad in cases.items():
        response = call(idgw, token, scheme="DPoP", proof=bad)
        assert response.status_code == 401, reason
        assert response.json()["error"]["data"]["reason"] == reason
        assert response.headers["www-authenticate"].startswith("DPoP ")


def test_agent_that_must_use_dpop_gets_no_bearer_token(idgw: GatewayProcess) -> None:
    run = idgw.cli("token", "--agent", "acme-bot")
    assert run.returncode == 1 and "DPoP" in run.stderr


# -- the token endpoint --------------------------------------------------------------------------


def _assertion(gw: GatewayProcess, agent: str, **extra: Any) -> str:
    key = SigningKey.from_pem(
        (gw.config_path.parent / "state" / "agents" / f"{agent}.pem").read_bytes(),
        _kid(gw, agent),
        "ES256",
    )
    now = int(time.time())
    claims = {
        "iss": agent,
        "sub": agent,
        "aud": gw.base,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
        **extra,
    }
    return mint(key, claims, typ="JWT")


def _kid(gw: GatewayProcess, agent: str) -> str:
    show = gw.cli("agents", "show", agent, "--json")
    return str(json.loads(show.stdout)["jwks"]["keys"][0]["kid"])


def test_client_credentials_with_private_key_jwt(idgw: GatewayProcess) -> None:
    assertion = _assertion(idgw, "acme-reader")
    form = {
        "grant_type": "client_credentials",
        "client_assertion": assertion,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "resource": idgw.url("/servers/workspace/mcp"),
    }
    response = httpx.post(idgw.url("/oauth/token"), data=form)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300
    assert call(idgw, body["access_token"], path="/servers/workspace/mcp").status_code == 200
    assert call(idgw, body["access_token"], path="/mcp").status_code == 401  # audience-bound
    replay = httpx.post(idgw.url("/oauth/token"), data=form)
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"
    assert "already used" in replay.json()["error_description"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"grant_type": "password"}, "unsupported_grant_type"),
        ({"client_assertion_type": None}, "invalid_client"),
        ({"resource": "http://elsewhere.example/mcp"}, "invalid_target"),
        ({"scope": "mcp:admin"}, "invalid_scope"),
    ],
)
def test_token_endpoint_refusals(idgw: GatewayProcess, change: dict[str, Any], error: str) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_assertion": _assertion(idgw, "acme-reader"),
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "resource": idgw.url("/mcp"),
        **change,
    }
    response = httpx.post(idgw.url("/oauth/token"), data={k: v for k, v in form.items() if v})
    assert response.status_code in (400, 401)
    assert response.json()["error"] == error


def test_assertion_signed_by_another_key(idgw: GatewayProcess) -> None:
    now = int(time.time())
    forged = mint(
        generate("ES256"),
        {
            "iss": "acme-reader",
            "sub": "acme-reader",
            "aud": idgw.base,
            "iat": now,
            "exp": now + 60,
            "jti": "z",
        },
        typ="JWT",
    )
    form = {
        "grant_type": "client_credentials",
        "client_assertion": forged,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "resource": idgw.url("/mcp"),
    }
    response = httpx.post(idgw.url("/oauth/token"), data=form)
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"


# -- delegation (RFC 8693) with a real OIDC provider ----------------------------------------------


def _exchange(gw: GatewayProcess, user_token: str, agent: str) -> httpx.Response:
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": user_token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "actor_token": _assertion(gw, agent),
        "actor_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "resource": gw.url("/mcp"),
    }
    return httpx.post(gw.url("/oauth/token"), data=form)


def test_on_behalf_of_a_user(idgw: GatewayProcess, oidc_provider: oidc.Provider) -> None:
    alice = oidc_provider.user_token("alice", idgw.url("/mcp"))
    response = _exchange(idgw, alice, "acme-reader")
    assert response.status_code == 200, response.text
    assert response.json()["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    token = response.json()["access_token"]
    claims = pyjwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["act"] == {"sub": "acme-reader"}
    assert claims["tenant"] == "acme" and claims["roles"] == ["member"]
    listed = call(
        idgw,
        token,
        method="tools/call",
        params={"name": "workspace__list_projects", "arguments": {}},
        name="workspace__list_projects",
    )
    assert listed.status_code == 200 and "acme-p1" in listed.text


def test_exchange_refused_across_tenants(
    idgw: GatewayProcess, oidc_provider: oidc.Provider
) -> None:
    bob = oidc_provider.user_token("bob", idgw.url("/mcp"))
    response = _exchange(idgw, bob, "acme-reader")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert "not for the user's tenant 'globex'" in response.json()["error_description"]


def test_external_issuer_tokens_on_mcp_routes(
    idgw: GatewayProcess, oidc_provider: oidc.Provider
) -> None:
    """A trusted issuer's user token is accepted directly when the app it was issued to is a
    registered agent of the user's tenant; the principal is the user acting through it."""
    alice = oidc_provider.user_token("alice", idgw.url("/mcp"), scope="openid mcp:read")
    discovered = call(idgw, alice, method="server/discover")
    assert discovered.status_code == 200, discovered.text
    # Its scopes are the issuer's (mcp:read), not Bastion's: tools stay out of reach.
    listed = call(idgw, alice)
    assert listed.status_code == 403 and listed.json()["error"]["data"]["scope"] == "mcp:tools"
    run = idgw.cli("audit", "query", "--agent", "bastion-tests", "--json", "--limit", "50")
    users = {json.loads(line)["record"].get("user") for line in run.stdout.splitlines() if line}
    assert "alice" in users
    bob = oidc_provider.user_token("bob", idgw.url("/mcp"))  # tenant globex, app of acme
    refused = call(idgw, bob, method="server/discover")
    assert refused.status_code == 401
    assert refused.json()["error"]["data"]["reason"] == "wrong_audience"
    elsewhere = oidc_provider.user_token("alice", idgw.url("/servers/echo/mcp"))
    # the route's audience still applies
    assert call(idgw, elsewhere, method="server/discover").status_code == 401


# -- sessions, revocation, offboarding ----------------------------------------------------------


def _legacy(gw: GatewayProcess, token: str, path: str = "/mcp") -> dict[str, str]:
    with httpx.Client(timeout=20) as client:
        return legacy_session(client, gw.url(path), "2025-11-25", token)


def _list(gw: GatewayProcess, headers: dict[str, str]) -> int:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    return httpx.post(gw.url("/mcp"), json=body, headers=headers, timeout=20).status_code


def test_session_belongs_to_its_principal(idgw: GatewayProcess) -> None:
    session = _legacy(idgw, idgw.token("acme-reader"))
    assert _list(idgw, session) == 200
    hijack = {**session, "Authorization": f"Bearer {idgw.token('globex-reader')}"}
    assert _list(idgw, hijack) == 404  # exactly as for an unknown session
    assert _list(idgw, session) == 200  # the owner keeps it
    assert "presented by another principal" in idgw.log()


def test_suspend_and_resume(idgw: GatewayProcess) -> None:
    token = idgw.token("pausable")
    assert call(idgw, token).status_code == 200
    assert idgw.cli("agents", "suspend", "pausable", "--reason", "incident 42").returncode == 0
    refused = eventually(lambda: call(idgw, token), lambda r: r.status_code != 200)
    assert refused.status_code == 401 and refused.json()["error"]["data"]["reason"] == "suspended"
    assert idgw.cli("token", "--agent", "pausable").returncode == 1
    assert idgw.cli("agents", "resume", "pausable").returncode == 0
    assert eventually(lambda: call(idgw, token), lambda r: r.status_code == 200).status_code == 200


def test_revoke_a_token(idgw: GatewayProcess) -> None:
    token = idgw.token("acme-reader")
    assert call(idgw, token).status_code == 200
    jti = pyjwt.decode(token, options={"verify_signature": False})["jti"]
    assert idgw.cli("tokens", "revoke", jti, "--reason", "leaked").returncode == 0
    refused = eventually(lambda: call(idgw, token), lambda r: r.status_code != 200)
    assert refused.status_code == 401 and refused.json()["error"]["data"]["reason"] == "revoked"


def test_kill_a_session(idgw: GatewayProcess) -> None:
    session = _legacy(idgw, idgw.token("acme-reader"))
    assert _list(idgw, session) == 200
    assert idgw.cli("sessions", "kill", session["Mcp-Session-Id"]).returncode == 0
    assert eventually(lambda: _list(idgw, session), lambda status: status != 200) == 404


def test_offboarding_ends_everything(idgw: GatewayProcess) -> None:
    token = idgw.token("doomed")
    session = _legacy(idgw, token)
    assert _list(idgw, session) == 200
    assert idgw.cli("agents", "offboard", "doomed", "--reason", "project ended").returncode == 0
    assert eventually(lambda: _list(idgw, session), lambda status: status != 200) in (401, 404)
    assert call(idgw, token).status_code == 401
    fresh = idgw.cli("token", "--agent", "doomed")
    assert fresh.returncode == 1 and "offboarded" in fresh.stderr


# -- what upstreams receive ------------------------------------------------------------------------


def test_upstream_gets_a_minted_credential_never_the_clients(idgw: GatewayProcess) -> None:
    token = idgw.token("acme-reader", "--resource", idgw.url("/servers/recorder/mcp"))
    headers = {
        **modern_headers("tools/call", "headers"),
        "Authorization": f"Bearer {token}",
        "Cookie": "session=client-cookie",
        "X-Forwarded-For": "10.9.8.7",
    }
    body = modern_body("tools/call", {"name": "headers", "arguments": {}})
    response = httpx.post(idgw.url("/servers/recorder/mcp"), json=body, headers=headers, timeout=20)
    assert response.status_code == 200, response.text
    seen = json.loads(response.json()["result"]["content"][0]["text"])
    assert all(token not in value for value in seen.values())
    assert "cookie" not in seen and "dpop" not in seen and "x-forwarded-for" not in seen
    scheme, minted = seen["authorization"].split(" ", 1)
    assert scheme == "Bearer" and minted != token
    jwks = httpx.get(idgw.url("/.well-known/jwks.json")).json()
    key = pyjwt.PyJWK(
        next(k for k in jwks["keys"] if k["kid"] == pyjwt.get_unverified_header(minted)["kid"])
    )
    recorder_url = yaml.safe_load(idgw.config_path.read_text())["upstreams"]["recorder"]["url"]
    claims = pyjwt.decode(
        minted, key.key, algorithms=["ES256"], audience=recorder_url, issuer=idgw.base
    )
    assert claims["tenant"] == "acme" and claims["act"] == {"sub": "acme-reader"}
    assert claims["sub"] == "acme-reader" and claims["scope"] == "headers"
    assert claims["exp"] - claims["iat"] <= 60


def test_demo_takes_the_tenant_from_the_minted_credential(idgw: GatewayProcess) -> None:
    for agent, own, other in (
        ("acme-reader", "acme-p1", "globex"),
        ("globex-reader", "globex-p1", "acme"),
    ):
        response = call(
            idgw,
            idgw.token(agent),
            method="tools/call",
            params={"name": "workspace__list_projects", "arguments": {}},
            name="workspace__list_projects",
        )
        text = response.json()["result"]["content"][0]["text"]
        assert own in text and f"{other}-p" not in text


def test_secret_credential_from_a_reference(idgw: GatewayProcess) -> None:
    token = idgw.token("acme-reader", "--resource", idgw.url("/servers/keyed/mcp"))
    response = call(
        idgw,
        token,
        path="/servers/keyed/mcp",
        method="tools/call",
        params={"name": "headers", "arguments": {}},
        name="headers",
    )
    seen = json.loads(response.json()["result"]["content"][0]["text"])
    assert seen["x-api-key"] == KEYED_SECRET
    assert "authorization" not in seen
    assert KEYED_SECRET not in idgw.config_path.read_text()  # only the reference is written


def test_key_rotation(idgw: GatewayProcess) -> None:
    before = idgw.token("acme-reader")
    old_kid = pyjwt.get_unverified_header(before)["kid"]
    rotated = idgw.cli("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    after = idgw.token("acme-reader")
    new_kid = pyjwt.get_unverified_header(after)["kid"]
    assert new_kid != old_kid

    def kids() -> list[str]:
        return [k["kid"] for k in httpx.get(idgw.url("/.well-known/jwks.json")).json()["keys"]]

    # The gateway's key watcher picks up a rotation made by another process within a second;
    # the old key verifies until its tokens expire.
    until(lambda: new_kid in kids(), "the rotated key in the gateway's JWKS")
    assert old_kid in kids()
    assert call(idgw, before).status_code == 200
    assert call(idgw, after).status_code == 200


def test_jwt_svid_as_the_agent_assertion(idgw: GatewayProcess) -> None:
    spiffe_id = "spiffe://example.org/ns/agents/sa/indexer"
    added = idgw.cli(
        "agents",
        "add",
        "svid-agent",
        "--tenant",
        "acme",
        "--owner",
        "platform",
        "--purpose",
        "workload identity",
        "--spiffe-id",
        spiffe_id,
    )
    assert added.returncode == 0, added.stderr
    now = int(time.time())
    svid = mint(
        SPIFFE_KEY,
        {"sub": spiffe_id, "aud": idgw.base, "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex},
        typ="JWT",
    )
    form = {
        "grant_type": "client_credentials",
        "client_assertion": svid,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe",
        "resource": idgw.url("/mcp"),
    }
    response = httpx.post(idgw.url("/oauth/token"), data=form)
    assert response.status_code == 200, response.text
    claims = pyjwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["agent"] == "svid-agent" and claims["tenant"] == "acme"
    foreign = mint(
        generate("ES256"),
        {"sub": spiffe_id, "aud": idgw.base, "iat": now, "exp": now + 60, "jti": "f"},
        typ="JWT",
    )
    refused = httpx.post(idgw.url("/oauth/token"), data={**form, "client_assertion": foreign})
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
    other_domain = mint(
        SPIFFE_KEY,
        {
            "sub": "spiffe://evil.example/x",
            "aud": idgw.base,
            "iat": now,
            "exp": now + 60,
            "jti": "g",
        },
        typ="JWT",
    )
    refused = httpx.post(idgw.url("/oauth/token"), data={**form, "client_assertion": other_domain})
    assert refused.status_code == 401 and "not trusted" in refused.json()["error_description"]


def test_token_exchange_credential(idgw: GatewayProcess) -> None:
    """The upstream's own authorization server exchanges Bastion's statement of the caller
    for a token meant for that upstream; the client's token never leaves the gateway."""
    exchange_as: oidc.Provider = idgw.exchange_as  # type: ignore[attr-defined]
    token = idgw.token("acme-reader", "--resource", idgw.url("/servers/exchanged/mcp"))
    for _ in range(2):  # the second call reuses the cached exchanged token
        response = call(
            idgw,
            token,
            path="/servers/exchanged/mcp",
            method="tools/call",
            params={"name": "headers", "arguments": {}},
            name="headers",
        )
        assert response.status_code == 200, response.text
    seen = json.loads(response.json()["result"]["content"][0]["text"])
    scheme, issued = seen["authorization"].split(" ", 1)
    assert scheme == "Bearer" and issued != token
    upstream_url = yaml.safe_load(idgw.config_path.read_text())["upstreams"]["exchanged"]["url"]
    claims = exchange_as.verify_access_token(issued, upstream_url)
    assert claims["iss"] == exchange_as.issuer and claims["client_id"] == "bastion-gateway"
    assert claims["sub"] == "acme-reader" and claims["tenant"] == "acme"
    assert claims["act"] == {"sub": "acme-reader"}


def test_refused_authentication_is_audited(idgw: GatewayProcess) -> None:
    assert call(idgw, forge(idgw, exp=int(time.time()) - 120)).status_code == 401
    run = idgw.cli("audit", "query", "--phase", "authn", "--json", "--limit", "1000")
    assert run.returncode == 0, run.stderr
    refused = [json.loads(line)["record"] for line in run.stdout.splitlines() if line.strip()]
    assert any(
        r.get("detail", {}).get("error") == "expired" and r["decision"] == "deny" for r in refused
    )
    assert idgw.cli("audit", "verify").returncode == 0


async def test_dpop_nonces_are_shared_through_the_state_directory(tmp_path: Path) -> None:
    # Replicas sharing a state directory, and a gateway after a restart, accept each other's
    # DPoP nonces: they derive them from one generated key, kept 0600. Another directory has
    # another key, so its nonces differ.
    from bastion.config import parse
    from bastion.control.assembly import NONCE_KEY_FILE, build_gateway
    from bastion.errors import AuthError

    def settings(state: Path) -> Any:
        return parse(
            yaml.safe_dump(
                {
                    "listen": {"host": "127.0.0.1", "port": 8080},
                    "state_dir": str(state),
                    "auth": {"mode": "oauth", "dpop": {"nonce": True}},
                    "audit": {"enabled": False},
                    "admin": {"enabled": False},
                }
            )
        )

    gateways = [
        await build_gateway(settings(tmp_path / state)) for state in ("one", "one", "other")
    ]
    resource = "http://127.0.0.1:8080/mcp"
    for _ in range(2):  # a nonce window may turn over between two reads: read again
        window = int(time.time() // 60)
        nonces = [
            dict(gw.pipeline.authn.challenge(AuthError("no token"), resource, {}))[b"dpop-nonce"]
            for gw in gateways
        ]
        if window == int(time.time() // 60):
            break
    for gw in gateways:
        await gw.stop()
    assert nonces[0] == nonces[1] != nonces[2]
    assert (tmp_path / "one" / NONCE_KEY_FILE).stat().st_mode & 0o777 == 0o600
