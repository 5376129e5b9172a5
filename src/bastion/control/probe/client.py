"""The probe's HTTP side: the gateway's OAuth metadata, access tokens from its token endpoint
(private_key_jwt client assertions), and MCP requests on a route, as 2026-07-28 calls or raw
bytes.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from bastion.control.probe.types import Observation
from bastion.control.tokens.service import JWT_BEARER
from bastion.errors import InputError
from bastion.identity.dpop import make_proof
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey
from bastion.methods import TOOLS_LIST

if TYPE_CHECKING:
    from bastion.control.probe.identities import Identity

__all__ = ["ACCEPT", "LEGACY", "MODERN", "REVOKE_S", "Gateway"]

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
REVOKE_S = 3.0  # a revocation must be in force by then (the README promises ~250 ms)
ACCEPT = "application/json, text/event-stream"


class Gateway:
    """The running gateway at `url` as the probe talks to it; requests go to `main` (the
    attacked route) unless told otherwise."""

    def __init__(self, url: str, main: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.main = main
        self.http = httpx.Client(timeout=timeout)
        self.resources: dict[str, str] = {}  # route path -> its RFC 9728 resource
        self.issuer = ""
        self.token_endpoint = ""
        self.token_url = ""

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()

    def discover(self, routes: Iterable[str]) -> None:
        """Read the issuer, the token endpoint and each route's resource from the gateway's
        RFC 8414 and RFC 9728 metadata."""
        try:
            meta = self.http.get(self.url + "/.well-known/oauth-authorization-server").json()
            for path in routes:
                prm = self.http.get(
                    self.url + "/.well-known/oauth-protected-resource" + path
                ).json()
                self.resources[path] = str(prm["resource"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"no Bastion gateway with OAuth answers at {self.url}: {exc}") from exc
        self.issuer = str(meta["issuer"])
        self.token_endpoint = str(meta["token_endpoint"])
        self.token_url = self.url + urlsplit(self.token_endpoint).path

    # -- tokens -----------------------------------------------------------------------------

    def token(self, who: Identity, route: str, proof_key: SigningKey | None = None) -> str:
        """A fresh access token for `who` on `route` from the gateway's token endpoint."""
        response = self.token_request(who, route, proof_key)
        if response.status_code != 200:
            raise InputError(
                f"the token endpoint refused {who.agent!r}: HTTP {response.status_code}"
            )
        return str(response.json()["access_token"])

    def token_request(
        self,
        who: Identity,
        route: str,
        proof_key: SigningKey | None = None,
        assertion: str | None = None,
    ) -> httpx.Response:
        """One client-credentials request for `who` (with `assertion` when given, else a fresh
        one, and DPoP-bound to `proof_key` when given); the raw answer."""
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion or self.assertion(who),
            "resource": self.resources[route],
        }
        headers = {}
        if proof_key is not None:
            headers["DPoP"] = make_proof(proof_key, "POST", self.token_endpoint, time.time())
        try:
            return self.http.post(self.token_url, data=form, headers=headers)
        except httpx.HTTPError as exc:
            raise InputError(f"the token endpoint at {self.token_url} failed: {exc}") from exc

    def assertion(self, who: Identity) -> str:
        """A private_key_jwt client assertion of `who`."""
        now = int(time.time())
        claims = {
            "iss": who.agent,
            "sub": who.agent,
            "aud": self.issuer,
            "iat": now,
            "exp": now + 60,
            "jti": uuid.uuid4().hex,
        }
        return mint(who.key, claims, typ="JWT")

    def bearer(self, who: Identity, route: str | None = None) -> str:
        """A cached token of `who` for `route` (the main one by default)."""
        route = route or self.main
        if route not in who.tokens:
            who.tokens[route] = self.token(who, route)
        return who.tokens[route]

    def until_refused(self, token: str) -> Observation:
        """Present `token` until it is refused (at most `REVOKE_S`); the last answer."""
        deadline = time.monotonic() + REVOKE_S
        while True:
            seen = self.call(None, TOOLS_LIST, {}, authorization="Bearer " + token)
            if seen.status == 401 or time.monotonic() > deadline:
                return seen
            time.sleep(0.05)

    # -- requests ---------------------------------------------------------------------------

    def call(
        self,
        who: Identity | None,
        method: str,
        params: dict[str, Any],
        *,
        headers: dict[str, str] | None = None,
        authorization: str | None = None,
        capabilities: dict[str, Any] | None = None,
    ) -> Observation:
        """One 2026-07-28 request on the main route; `headers` override the mirrored ones."""
        meta = {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": capabilities or {},
            "io.modelcontextprotocol/clientInfo": {"name": "bastion-probe", "version": "1"},
        }
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}}
        sent = {"Mcp-Method": method, "MCP-Protocol-Version": MODERN}
        name = params.get("uri") if method.startswith("resources/") else params.get("name")
        if isinstance(name, str):
            sent["Mcp-Name"] = _header_value(name)
        if authorization is not None:
            sent["Authorization"] = authorization
        elif who is not None:
            sent["Authorization"] = "Bearer " + self.bearer(who)
        return self.post(json.dumps(body).encode(), {**sent, **(headers or {})})

    def post(self, body: bytes, headers: dict[str, str], path: str | None = None) -> Observation:
        """POST raw bytes to a route; what came back."""
        sent = {"Content-Type": "application/json", "Accept": ACCEPT, **headers}
        try:
            response = self.http.post(self.url + (path or self.main), content=body, headers=sent)
        except httpx.HTTPError as exc:
            return Observation(None, note=f"no answer: {type(exc).__name__}")
        return Observation(response.status_code, _json(response))


def _header_value(name: str) -> str:
    """A name as the Mcp-Name header carries it: plain when it survives as is, else base64."""
    if name.isascii() and name.isprintable() and name == name.strip():
        return name
    return "=?base64?" + base64.b64encode(name.encode()).decode() + "?="


def _json(response: httpx.Response) -> Any:
    kind = response.headers.get("content-type", "")
    text = response.text
    if kind.startswith("text/event-stream"):
        data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        for item in reversed(data):
            try:
                found = json.loads(item)
            except ValueError:
                continue
            if isinstance(found, dict) and ("result" in found or "error" in found):
                return found
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
