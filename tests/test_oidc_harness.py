"""The external OIDC provider the identity tests trust: tokens from a real flow, checked with PyJWT.

The provider is tests/node/oidc_provider.mjs (node-oidc-provider 9.x); tests/oidc.py starts it and
drives the authorization-code + PKCE flow. Every wait is bounded: the provider's start by a 20 s
deadline, each HTTP request by 10 s, each flow by 12 steps.
"""

from __future__ import annotations

import http.server
import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from tests import oidc
from tests.oidc import (
    ACCESS_TOKEN_TTL,
    CLIENT_ID,
    EXCHANGE_CLIENT_ID,
    EXCHANGED_TOKEN_TTL,
    ISSUED_TOKEN_TYPE,
    SUBJECT_TOKEN_TYPE,
    TOKEN_EXCHANGE_GRANT,
    USERS,
    OIDCFlowError,
    Provider,
    TokenExchangeError,
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


# -- RFC 8693 token exchange -----------------------------------------------------------------------


class SubjectIssuer:
    """A stand-in for Bastion as the issuer of subject tokens: keys made here, their public JWKS
    served at http://127.0.0.1:P/.well-known/jwks.json by a loopback HTTP server in a thread."""

    def __init__(self, port: int = 0) -> None:
        self.keys: dict[str, tuple[str, Any]] = {}  # kid -> (alg, private key)
        self.fetches = 0
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path != "/.well-known/jwks.json":
                    self.send_error(404)
                    return
                issuer.fetches += 1
                body = json.dumps(issuer.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_key(self, alg: str = "ES256", kid: str | None = None) -> str:
        private: Any
        if alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif alg == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        elif alg == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise ValueError(alg)
        kid = kid or f"{alg.lower()}-{secrets.token_hex(4)}"
        self.keys[kid] = (alg, private)
        return kid

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, (alg, private) in self.keys.items():
            public = private.public_key()
            if alg == "ES256":
                as_dict = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
            elif alg == "EdDSA":
                as_dict = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
            else:
                as_dict = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
            keys.append({**as_dict, "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": keys}

    def mint(
        self,
        audience: str,
        *,
        kid: str | None = None,
        iss: str | None = None,
        lifetime: int = 60,
        iat_offset: int = 0,
        drop: tuple[str, ...] = (),
        sign_with: Any = None,
        **claims: Any,
    ) -> str:
        """A subject token as Bastion mints one; `claims` override or add, `drop` removes."""
        kid = kid or next(iter(self.keys))
        alg, private = self.keys[kid] if kid in self.keys else ("ES256", None)
        now = int(time.time()) + iat_offset
        payload: dict[str, Any] = {
            "iss": self.url if iss is None else iss,
            "aud": audience,
            "sub": "alice",
            "act": {"sub": "agent:planner", "act": {"sub": "agent:root"}},
            "tenant": "acme",
            "iat": now,
            "exp": now + lifetime,
            "jti": secrets.token_hex(8),
            **claims,
        }
        for name in drop:
            payload.pop(name, None)
        key: Any = sign_with if sign_with is not None else private
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def exchange_env(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SubjectIssuer, Provider]]:
    """A subject issuer with ES256, EdDSA and RS256 keys and a provider that trusts it."""
    issuer = SubjectIssuer()
    for alg in ("ES256", "EdDSA", "RS256"):
        issuer.add_key(alg)
    provider = start_provider(tmp_path_factory.mktemp("oidc-exchange"), trust_issuer=issuer.url)
    try:
        yield issuer, provider
    finally:
        provider.stop()
        issuer.close()


def kid_for(issuer: SubjectIssuer, alg: str) -> str:
    return next(kid for kid, (key_alg, _) in issuer.keys.items() if key_alg == alg)


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
def test_exchange_issues_a_token_for_the_audience(
    exchange_env: tuple[SubjectIssuer, Provider], alg: str
) -> None:
    issuer, provider = exchange_env
    subject = issuer.mint(provider.token_endpoint, kid=kid_for(issuer, alg))
    body = provider.exchange(subject, RESOURCE, resource=RESOURCE, scope="mcp:read tools:call")
    assert body["issued_token_type"] == ISSUED_TOKEN_TYPE
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == EXCHANGED_TOKEN_TTL == 120
    assert body["scope"] == "mcp:read tools:call"
    assert "refresh_token" not in body

    token = body["access_token"]
    header = jwt.get_unverified_header(token)
    assert (header["typ"], header["alg"]) == ("at+jwt", "RS256")
    _, jwks = discovered_jwks(provider.issuer)
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}
    claims = verify(token, provider.issuer, jwks, RESOURCE)
    assert claims["iss"] == provider.issuer
    assert claims["aud"] == RESOURCE
    assert claims["sub"] == "alice"
    assert claims["act"] == {"sub": "agent:planner", "act": {"sub": "agent:root"}}
    assert claims["tenant"] == "acme"
    assert claims["client_id"] == EXCHANGE_CLIENT_ID
    assert claims["scope"] == "mcp:read tools:call"
    assert claims["exp"] - claims["iat"] == 120
    assert abs(claims["iat"] - time.time()) < 10
    assert claims["jti"]
    # The harness's own verifier agrees, and the token is for this audience only.
    assert provider.verify_access_token(token, RESOURCE)["sub"] == "alice"
    with pytest.raises(jwt.InvalidAudienceError):
        verify(token, provider.issuer, jwks, "http://127.0.0.1:9998/mcp")


def test_exchange_accepts_the_issuer_as_audience_post_auth_and_no_act(
    exchange_env: tuple[SubjectIssuer, Provider],
) -> None:
    issuer, provider = exchange_env
    assert provider.exchange_client is not None
    client_id, secret = provider.exchange_client
    subject = issuer.mint(provider.issuer, drop=("act",), sub="bob", tenant="globex")
    resp = httpx.post(
        provider.token_endpoint,
        data={
            "grant_type": TOKEN_EXCHANGE_GRANT,
            "subject_token": subject,
            "subject_token_type": SUBJECT_TOKEN_TYPE,
            "resource": RESOURCE,
            "client_id": client_id,
            "client_secret": secret,
        },
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "scope" not in body
    claims = provider.verify_access_token(body["access_token"], RESOURCE)
    assert (claims["sub"], claims["tenant"]) == ("bob", "globex")
    assert "act" not in claims and "scope" not in claims
    meta, _ = discovered_jwks(provider.issuer)
    assert TOKEN_EXCHANGE_GRANT in meta["grant_types_supported"]


def refusal(provider: Provider, subject: str, audience: str | None = RESOURCE, **kw: Any) -> Any:
    with pytest.raises(TokenExchangeError) as info:
        provider.exchange(subject, audience, **kw)
    return info.value


def test_exchange_refuses_a_wrong_client_secret(
    exchange_env: tuple[SubjectIssuer, Provider],
) -> None:
    issuer, provider = exchange_env
    subject = issuer.mint(provider.token_endpoint)
    err = refusal(provider, subject, client=(EXCHANGE_CLIENT_ID, "not-the-secret-at-all"))
    assert (err.status, err.error) == (401, "invalid_client")
    err = refusal(provider, subject, client=("nobody", "not-the-secret-at-all"))
    assert (err.status, err.error) == (401, "invalid_client")


def test_exchange_refuses_a_subject_signed_by_another_key(
    exchange_env: tuple[SubjectIssuer, Provider],
) -> None:
    issuer, provider = exchange_env
    stranger = ec.generate_private_key(ec.SECP256R1())
    # The kid of a trusted key, the signature of another one.
    forged = issuer.mint(provider.token_endpoint, kid=kid_for(issuer, "ES256"), sign_with=stranger)
    err = refusal(provider, forged)
    assert (err.status, err.error) == (400, "invalid_grant")
    assert "signature does not verify" in err.description
    # A kid the issuer does not publish (the provider fetches the JWKS again, finds none).
    fetches = issuer.fetches
    unknown = issuer.mint(provider.token_endpoint, kid="es256-unknown", sign_with=stranger)
    err = refusal(provider, unknown)
    assert (err.status, err.error) == (400, "invalid_grant")
    assert "no key of trusted issuer" in err.description
    assert issuer.fetches == fetches + 1


def test_exchange_refuses_a_subject_of_another_issuer(
    exchange_env: tuple[SubjectIssuer, Provider],
) -> None:
    _, provider = exchange_env
    other = SubjectIssuer()
    try:
        other.add_key("ES256")
        err = refusal(provider, other.mint(provider.token_endpoint))
        assert (err.status, err.error) == (400, "invalid_grant")
        assert "is not a trusted issuer" in err.description
        assert other.fetches == 0
    finally:
        other.close()


@pytest.mark.parametrize(
    ("mint_kw", "fragment"),
    [
        ({"iat_offset": -120}, "expired"),
        ({"lifetime": 300}, "at most 60 s"),
        ({"iat_offset": 30, "lifetime": 30}, "in the future"),
        ({"drop": ("tenant",)}, '"tenant"'),
        ({"drop": ("sub",)}, '"sub"'),
        ({"tenant": ""}, "tenant must be a non-empty string"),
        ({"act": "agent:planner"}, "act must be an object"),
        ({"aud": "http://127.0.0.1:9999/mcp"}, "is neither this provider's issuer"),
        ({"iss": "http://127.0.0.1:1"}, "is not a trusted issuer"),
    ],
)
def test_exchange_refuses_a_bad_subject_token(
    exchange_env: tuple[SubjectIssuer, Provider], mint_kw: dict[str, Any], fragment: str
) -> None:
    issuer, provider = exchange_env
    kw = dict(mint_kw)
    audience = kw.pop("aud", provider.token_endpoint)
    err = refusal(provider, issuer.mint(audience, **kw))
    assert (err.status, err.error) == (400, "invalid_grant")
    assert fragment in err.description


def test_exchange_refuses_unsigned_and_mac_subject_tokens(
    exchange_env: tuple[SubjectIssuer, Provider],
) -> None:
    issuer, provider = exchange_env
    claims = jwt.decode(issuer.mint(provider.token_endpoint), options={"verify_signature": False})
    unsigned = jwt.encode(claims, "", algorithm="none")
    hs256 = jwt.encode(claims, "x" * 32, algorithm="HS256")
    for token in (unsigned, hs256, "not-a-jwt"):
        err = refusal(provider, token)
        assert (err.status, err.error) == (400, "invalid_grant"), token


@pytest.mark.parametrize(
    "audience",
    [
        "https://example.com/mcp",
        "http://localhost:9999/mcp",
        "http://127.0.0.1/mcp",
        "http://user:pw@127.0.0.1:9999/mcp",
    ],
)
def test_exchange_refuses_a_target_off_loopback(
    exchange_env: tuple[SubjectIssuer, Provider], audience: str
) -> None:
    issuer, provider = exchange_env
    err = refusal(provider, issuer.mint(provider.token_endpoint), audience)
    assert (err.status, err.error) == (400, "invalid_target")


def test_exchange_refuses_malformed_requests(exchange_env: tuple[SubjectIssuer, Provider]) -> None:
    issuer, provider = exchange_env
    subject = issuer.mint(provider.token_endpoint)
    err = refusal(provider, subject, None)
    assert (err.status, err.error) == (400, "invalid_request")
    err = refusal(provider, subject, resource="http://127.0.0.1:9998/mcp")
    assert (err.status, err.error) == (400, "invalid_target")
    err = refusal(
        provider, subject, extra={"subject_token_type": "urn:ietf:params:oauth:token-type:id_token"}
    )
    assert (err.status, err.error) == (400, "invalid_request")
    err = refusal(provider, subject, extra={"actor_token": subject})
    assert (err.status, err.error) == (400, "invalid_request")
    # The public test client may not use the grant.
    resp = httpx.post(
        provider.token_endpoint,
        data={
            "grant_type": TOKEN_EXCHANGE_GRANT,
            "subject_token": subject,
            "subject_token_type": SUBJECT_TOKEN_TYPE,
            "audience": RESOURCE,
            "client_id": CLIENT_ID,
        },
        timeout=10,
    )
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request", resp.text


def test_exchange_fetches_keys_lazily_caches_them_and_follows_a_new_kid(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client secret starting with "-" (1 in 64 of token_urlsafe's) must reach the provider too.
    urlsafe = secrets.token_urlsafe
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n=None: "-" + urlsafe(n))
    # The issuer is not up when the provider starts (as Bastion may start after it).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = start_provider(
        tmp_path, access_token_alg="ES256", trust_issuer=f"http://127.0.0.1:{port}"
    )
    issuer: SubjectIssuer | None = None
    try:
        assert provider.trust_issuers == (f"http://127.0.0.1:{port}",)
        assert provider.exchange_client is not None
        assert provider.exchange_client[1].startswith("-")
        claims = {
            "iss": f"http://127.0.0.1:{port}",
            "aud": provider.token_endpoint,
            "sub": "carol",
            "tenant": "acme",
            "exp": int(time.time()) + 60,
        }
        early = jwt.encode(
            claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "k"}
        )
        err = refusal(provider, early)
        assert (err.status, err.error) == (400, "invalid_grant")
        assert "cannot get the keys of trusted issuer" in err.description

        issuer = SubjectIssuer(port)
        issuer.add_key("ES256")
        body = provider.exchange(issuer.mint(provider.token_endpoint, sub="carol"), RESOURCE)
        assert jwt.get_unverified_header(body["access_token"])["alg"] == "ES256"
        assert provider.verify_access_token(body["access_token"], RESOURCE)["sub"] == "carol"
        provider.exchange(issuer.mint(provider.token_endpoint), RESOURCE)
        assert issuer.fetches == 1  # cached

        issuer.keys.clear()
        issuer.add_key("EdDSA")  # a rotated key with a new kid: fetched again
        provider.exchange(issuer.mint(provider.token_endpoint), RESOURCE)
        assert issuer.fetches == 2
    finally:
        provider.stop()
        if issuer is not None:
            issuer.close()
