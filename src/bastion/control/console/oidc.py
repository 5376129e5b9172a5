"""The console's OpenID Connect login: authorization code with PKCE (S256) at `console.issuer`.

```
GET /console/login/oidc   -> 303 to the issuer's authorization endpoint (state, nonce, PKCE)
GET /console/auth/callback?code&state&iss   the code redeemed at the token endpoint; the ID
                             token verified (signature from jwks_uri, iss, aud, exp, nonce);
                             the role claim read from the userinfo endpoint (else the ID token)
```

The console's roles come from the issuer's `console.role_claim` through `console.roles`; a
person holding none of the mapped values is refused. Every HTTP exchange with the issuer is
bounded in time and size; a failure is an `OidcLoginError` saying what went wrong, never what
the issuer or the browser sent beyond a short prefix (`AuthError`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt
import orjson

from bastion.config import ConsoleSettings
from bastion.control.console.sessions import Person
from bastion.errors import AuthError, WireError, shown
from bastion.wire import Pool

__all__ = ["OidcClient", "OidcLoginError", "pkce_pair"]

_TIMEOUT = 10.0
_MAX_DOCUMENT = 1 << 20
_ID_TOKEN_ALGS = ["RS256", "ES256", "EdDSA", "PS256"]


# An OIDC login that could not be completed: `AuthError`, whose message is safe to show.
OidcLoginError = AuthError


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OidcClient:
    """A relying party of one issuer: discovery (cached), authorize URLs, code redemption."""

    def __init__(self, console: ConsoleSettings, client_secret: str | None) -> None:
        if console.issuer is None or console.client_id is None:
            raise ValueError("console.issuer and console.client_id are required")
        self._console = console
        self.issuer = console.issuer.rstrip("/")
        self.client_id = console.client_id
        self._secret = client_secret
        self._metadata: dict[str, Any] | None = None

    async def authorize_url(self, state: str, challenge: str, nonce: str, redirect_uri: str) -> str:
        """Where to send the browser to log in."""
        endpoint = await self._endpoint("authorization_endpoint")
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": redirect_uri,
                "scope": " ".join(self._console.scopes),
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    async def redeem(self, code: str, verifier: str, nonce: str, redirect_uri: str) -> Person:
        """The person behind an authorization code: ID token checked, roles mapped."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
            "client_id": self.client_id,
        }
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if self._secret is not None:
            form["client_secret"] = self._secret
        token_endpoint = await self._endpoint("token_endpoint")
        status, answer = await self._http("POST", token_endpoint, headers, urlencode(form))
        if status != 200 or not isinstance(answer.get("id_token"), str):
            error = shown(str(answer.get("error", f"HTTP {status}")))
            raise OidcLoginError(f"the issuer refused the authorization code ({error})")
        claims = await self._id_claims(answer["id_token"], nonce)
        access = answer.get("access_token")
        info = await self._userinfo(access) if isinstance(access, str) else {}
        if info and info.get("sub") != claims["sub"]:
            raise OidcLoginError("the userinfo answer is about another subject")
        return self._person({**claims, **info})

    def _person(self, claims: dict[str, Any]) -> Person:
        held = claims.get(self._console.role_claim)
        values = set(held.split() if isinstance(held, str) else held or ())
        roles = frozenset(
            role for role, granted in self._console.roles.items() if values & set(granted)
        )
        subject = str(claims["sub"])
        if not roles:
            raise OidcLoginError(
                f"{shown(subject)} holds no console role (claim {self._console.role_claim!r})"
            )
        name = str(claims.get("name") or claims.get("email") or subject)
        return Person(f"{self.issuer}#{subject}", name[:100], roles, "oidc")

    async def _id_claims(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims once signature, issuer, audience, expiry and nonce hold."""
        try:
            header = jwt.get_unverified_header(id_token)
            keys = jwt.PyJWKSet.from_dict(await self._json(await self._endpoint("jwks_uri")))
            key = next(k for k in keys.keys if k.key_id == header.get("kid"))
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key=key,
                algorithms=_ID_TOKEN_ALGS,
                audience=self.client_id,
                issuer=self.issuer,
                leeway=30,
                options={"require": ["iss", "sub", "aud", "exp", "iat"]},
            )
        except (jwt.PyJWTError, StopIteration, ValueError) as exc:
            raise OidcLoginError(f"the ID token does not verify: {shown(str(exc))}") from None
        if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise OidcLoginError("the ID token's nonce is not this login's")
        return claims

    async def _userinfo(self, access_token: str) -> dict[str, Any]:
        metadata = await self._discover()
        endpoint = metadata.get("userinfo_endpoint")
        if not isinstance(endpoint, str):
            return {}
        headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json"}
        status, body = await self._http("GET", endpoint, headers, "")
        if status != 200:
            raise OidcLoginError(f"the userinfo endpoint answered HTTP {status}")
        return body

    async def _endpoint(self, name: str) -> str:
        value = (await self._discover()).get(name)
        if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
            raise OidcLoginError(f"the issuer's discovery document has no {name}")
        return value

    async def _discover(self) -> dict[str, Any]:
        if self._metadata is None:
            found = await self._json(f"{self.issuer}/.well-known/openid-configuration")
            if found.get("issuer") != self.issuer:
                raise OidcLoginError("the discovery document names another issuer")
            self._metadata = found
        return self._metadata

    async def _json(self, url: str) -> dict[str, Any]:
        status, body = await self._http("GET", url, {"Accept": "application/json"}, "")
        if status != 200:
            raise OidcLoginError(f"{shown(url)} answered HTTP {status}")
        return body

    async def _http(
        self, method: str, url: str, headers: dict[str, str], body: str
    ) -> tuple[int, dict[str, Any]]:
        """One bounded request to the issuer; the status and the JSON object it answered."""
        pool = Pool(url, 1, _TIMEOUT, _TIMEOUT)
        try:
            async with asyncio.timeout(_TIMEOUT * 2):
                response = await pool.request(method, headers, body.encode())
                async with response:
                    raw = await response.read(_MAX_DOCUMENT)
        except (TimeoutError, OSError, WireError) as exc:
            raise OidcLoginError(f"the issuer cannot be reached: {exc}") from None
        finally:
            pool.close()
        try:
            found = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            raise OidcLoginError(f"{shown(url)} did not answer JSON") from None
        if not isinstance(found, dict):
            raise OidcLoginError(f"{shown(url)} did not answer a JSON object")
        return response.status, found
