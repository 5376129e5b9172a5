"""The external OIDC provider the identity tests trust: tokens from a real flow, checked with PyJWT.

The provider is tests/node/oidc_provider.mjs (node-oidc-provider 9.x); tests/oidc.py starts it and
drives the authorization-code + PKCE flow. Every wait is bounded: the provider's start by a 20 s
deadline, each HTTP request by 10 s, each flow by 12 steps.
"""

from __future__ import annotations

import subprocess
from typing import Any

import httpx
import jwt
import pytest
from tests import oidc
from tests.oidc import (
    ACCESS_TOKEN_TTL,
    CLIENT_ID,
    USERS,
    OIDCFlowError,
    Provider,
    start_provider,
)

# The session fixture: one provider for every test of the session that asks for it.
oidc_provider = oidc.oidc_provider

RESOURCE = "http://127.0.0.1:9999/mcp"

pytestmark = pytest.mark.node


def discovered_jwks(issuer: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The discovery document and the JWKS it points at, fetched as a relying party would."""
    meta = httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=10).json()
    jwks = httpx.get(meta["jwks_uri"], timeout=10).json()
    return meta, jwks


def verify(token: str, issuer: str, jwks: dict[str, Any], audience: str) -> dict[str, Any]:
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        key=key,
        algorithms=[header["alg"]],
        audience=audience,
        issuer=issuer,
        options={"require": ["iss", "sub", "aud", "exp", "iat"]},
    )
    return claims


def test_discovery_names_the_endpoints(oidc_provider: Provider) -> None:
    meta, jwks = discovered_jwks(oidc_provider.issuer)
    issuer = oidc_provider.issuer
    assert issuer.startswith("http://127.0.0.1:")
    assert meta["issuer"] == issuer
    assert meta["jwks_uri"] == f"{issuer}/jwks"
    assert meta["token_endpoint"] == f"{issuer}/token"
    assert meta["authorization_endpoint"] == f"{issuer}/auth"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert {k["alg"] for k in jwks["keys"]} == {"RS256", "ES256"}
    assert all("d" not in k for k in jwks["keys"]), "private key material published"


def test_alice_token_is_a_verifiable_jwt_for_the_resource(oidc_provider: Provider) -> None:
    token = oidc_provider.user_token("alice", RESOURCE)
    _, jwks = discovered_jwks(oidc_provider.issuer)

    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "RS256"

    claims = verify(token, oidc_provider.issuer, jwks, RESOURCE)
    assert claims["iss"] == oidc_provider.issuer
    aud = claims["aud"]
    assert RESOURCE in (aud if isinstance(aud, list) else [aud])
    assert claims["sub"] == "alice"
    assert claims["tenant"] == "acme"
    assert claims["roles"] == ["member"]
    assert claims["exp"] - claims["iat"] == ACCESS_TOKEN_TTL == 300
    assert claims["client_id"] == CLIENT_ID
    assert "scope" not in claims  # only OIDC scopes requested: none for the resource
    assert claims["jti"]


def test_bob_and_carol_carry_their_own_tenant_and_roles(oidc_provider: Provider) -> None:
    _, jwks = discovered_jwks(oidc_provider.issuer)
    issuer = oidc_provider.issuer
    for user in ("bob", "carol"):
        claims = verify(oidc_provider.user_token(user, RESOURCE), issuer, jwks, RESOURCE)
        assert claims["sub"] == user
        assert claims["tenant"] == USERS[user]["tenant"]
        assert claims["roles"] == USERS[user]["roles"]
    bob = verify(oidc_provider.user_token("bob", RESOURCE), issuer, jwks, RESOURCE)
    assert bob["tenant"] == "globex"


def test_resource_scopes_are_granted_and_unknown_ones_dropped(oidc_provider: Provider) -> None:
    body = oidc_provider.token_response("alice", RESOURCE, "openid mcp:read mcp:write bogus")
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "mcp:read mcp:write"
    claims = oidc_provider.verify_access_token(body["access_token"], RESOURCE)
    assert claims["scope"] == "mcp:read mcp:write"
    id_token = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert id_token["aud"] == CLIENT_ID and id_token["sub"] == "alice"


def test_a_token_for_one_resource_fails_at_another(oidc_provider: Provider) -> None:
    token = oidc_provider.user_token("alice", RESOURCE)
    _, jwks = discovered_jwks(oidc_provider.issuer)
    with pytest.raises(jwt.InvalidAudienceError):
        verify(token, oidc_provider.issuer, jwks, "http://127.0.0.1:9998/mcp")


def test_wrong_password_unknown_user_and_foreign_resource_are_refused(
    oidc_provider: Provider,
) -> None:
    with pytest.raises(OIDCFlowError, match="access_denied"):
        oidc_provider.user_token("alice", RESOURCE, password="wrong")
    with pytest.raises(OIDCFlowError, match="access_denied"):
        oidc_provider.user_token("mallory", RESOURCE)
    with pytest.raises(OIDCFlowError, match="invalid_target"):
        oidc_provider.user_token("alice", "https://example.com/mcp")


def test_es256_provider_starts_issues_and_stops(tmp_path: Any) -> None:
    provider = start_provider(tmp_path, access_token_alg="ES256")
    try:
        token = provider.user_token("carol", RESOURCE)
        assert jwt.get_unverified_header(token)["alg"] == "ES256"
        _, jwks = discovered_jwks(provider.issuer)
        claims = verify(token, provider.issuer, jwks, RESOURCE)
        assert (claims["sub"], claims["tenant"], claims["roles"]) == ("carol", "acme", ["admin"])
    finally:
        provider.stop()
    assert provider.proc.returncode == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(provider.discovery_url, timeout=2)


def test_provider_exits_when_its_stdin_closes(tmp_path: Any) -> None:
    provider = start_provider(tmp_path)
    try:
        assert provider.proc.stdin is not None
        provider.proc.stdin.close()
        assert provider.proc.wait(timeout=5) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the provider outlived its closed stdin")
    finally:
        provider.stop()
