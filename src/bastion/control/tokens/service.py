"""The embedded authorization server: tokens for registered agents, and on-behalf-of tokens.

- `client_credentials` with `private_key_jwt` (RFC 7523): the agent signs an assertion with
  its registered key; no shared client secrets. A JWT-SVID from a trusted SPIFFE trust
  domain is accepted in its place.
- RFC 8693 token exchange: a user's token from a trusted issuer (subject) plus the agent's
  assertion (actor) become a token whose `sub` is the user and whose `act` names the agent;
  refused when the agent is not registered for the user's tenant.

Tokens are RFC 9068 JWTs (`typ: at+jwt`), bound to one audience (RFC 8707 `resource`), short
(5 minutes by default), and bound to a DPoP key (`cnf.jkt`) when a proof is presented.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bastion.config import Settings, TrustedIssuer
from bastion.control.registry.agents import Agent
from bastion.control.registry.view import RegistryView
from bastion.errors import (
    IssuerUnavailable,
    OAuthError,
    Overloaded,
    StateUnavailable,
    TokenError,
    shown,
)
from bastion.identity import dpop
from bastion.identity.jwt import Expect, mint, unverified_claims, verify
from bastion.identity.keys import KeySet
from bastion.state.keystore import FileKeyStore
from bastion.state.memory import ReplayCache, Replays
from bastion.upstream.issuers import IssuerDirectory

# Protocol identifiers (RFC 7523, RFC 8693), not secrets.
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
TOKEN_TYPE_ID = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105

_ASSERTION_LEEWAY = 5.0  # seconds of clock skew allowed on client assertions and SVIDs
# How long a token request naming an unknown agent waits for the registry view to catch up.
_UNKNOWN_AGENT_WAIT = 1.0


@dataclass
class TokenService:
    """Issues access tokens; every input is checked, every refusal says why.

    Reads only snapshots kept current in the background of the gateway: the registry view
    (agents, revocations; re-read every `view.POLL_SECONDS`), the signing keys (the key
    store's watcher) and the trusted issuers' keys (`issuers`, fetched by their watchers).
    No file, database or network I/O happens while a token is issued."""

    settings: Settings
    agents: RegistryView
    keys: FileKeyStore
    issuers: IssuerDirectory
    spiffe: Mapping[str, KeySet]
    resources: frozenset[str]
    # Client assertions' and DPoP proofs' jtis, apart: their lifetimes differ, and the cache
    # drops expired ids from its oldest end only. This process's, or every replica's (Redis).
    # What was made before a cache began remembering (its process started, or a shared store
    # restarted) may have been used already, so it is refused.
    replay: Replays = field(default_factory=ReplayCache)
    proof_replay: Replays = field(default_factory=ReplayCache)

    @property
    def issuer(self) -> str:
        """This authorization server's issuer identifier."""
        return self.settings.base_url()

    @property
    def token_endpoint(self) -> str:
        """Where tokens are requested."""
        return self.issuer + "/oauth/token"

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 authorization server metadata."""
        algs = ["ES256", "EdDSA", "RS256", "PS256"]
        return {
            "issuer": self.issuer,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.issuer + "/.well-known/jwks.json",
            "grant_types_supported": ["client_credentials", TOKEN_EXCHANGE],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": algs,
            "dpop_signing_alg_values_supported": algs,
            "scopes_supported": list(self.settings.auth.scopes),
            # Agents get tokens without a browser; the endpoint exists because MCP client
            # SDKs require it in the metadata, and it refuses every response type.
            "authorization_endpoint": self.issuer + "/oauth/authorize",
            "response_types_supported": [],
        }

    async def token(
        self, form: Mapping[str, str], dpop_proof: str | None, now: float | None = None
    ) -> dict[str, Any]:
        """Answer a token request (form fields already decoded)."""
        now = time.time() if now is None else now
        grant = form.get("grant_type")
        if grant == "client_credentials":
            agent = await self._client(form, now)
            return await self._issue(agent, None, form, dpop_proof, now)
        if grant == TOKEN_EXCHANGE:
            return await self._exchange(form, dpop_proof, now)
        raise OAuthError("unsupported_grant_type", f"grant_type {shown(grant)} is not supported")

    # -- who is the agent -------------------------------------------------------------------

    async def _client(self, form: Mapping[str, str], now: float) -> Agent:
        assertion = form.get("client_assertion")
        kind = form.get("client_assertion_type")
        if not assertion or kind not in (JWT_BEARER, JWT_SPIFFE):
            raise OAuthError(
                "invalid_client",
                "authenticate with private_key_jwt: client_assertion_type "
                f"{JWT_BEARER!r} and a signed client_assertion",
                401,
            )
        await self._seen(assertion)
        agent = await self.authenticate_agent(assertion, now)
        if form.get("client_id") not in (None, agent.id):
            raise OAuthError("invalid_client", "client_id does not match the assertion", 401)
        return agent

    async def _seen(self, assertion: str) -> None:
        """An assertion naming an agent the registry view does not hold (one registered a
        moment ago by another process) asks the view's watcher for a round and waits for it,
        briefly; the watcher coalesces such asks, so a flood of made-up names costs one cheap
        version check per round. Nothing is read here."""
        try:
            claims = unverified_claims(assertion)
        except TokenError:
            return  # refused, with the reason, by authenticate_agent
        subject = str(claims.get("sub", ""))
        if subject.startswith("spiffe://"):
            known = self.agents.agent_by_spiffe_id(subject) is not None
        else:
            issuer = claims.get("iss")
            known = not isinstance(issuer, str) or self.agents.agent(issuer) is not None
        if not known:
            await self.agents.watch.ask(_UNKNOWN_AGENT_WAIT)

    async def authenticate_agent(self, assertion: str, now: float) -> Agent:
        """The registered, usable agent that signed this assertion (or its JWT-SVID)."""
        try:
            claims = unverified_claims(assertion)
            subject = str(claims.get("sub", ""))
            if subject.startswith("spiffe://"):
                return await self._svid_agent(assertion, subject, now)
            issuer = claims.get("iss")
            agent = self.agents.agent(issuer) if isinstance(issuer, str) else None
            if agent is None:
                raise TokenError(
                    "unknown_kid",
                    f"expected iss naming a registered agent, found {shown(issuer)}",
                )
            keys = KeySet.from_jwks(agent.jwks)
            expect = Expect(
                issuer=agent.id,
                audience=None,
                leeway=_ASSERTION_LEEWAY,
                require=("exp", "iat", "jti", "sub"),
            )
            verified = verify(assertion, keys, expect, now)
            if verified.get("sub") != agent.id:
                raise TokenError("wrong_issuer", "the assertion's sub must equal its iss")
            await self._check_assertion(verified, now, f"agent:{agent.id}")
        except TokenError as exc:
            raise OAuthError(
                "invalid_client", f"client assertion refused: {exc.message}", 401
            ) from exc
        return self._usable(agent, now)

    async def _svid_agent(self, svid: str, spiffe_id: str, now: float) -> Agent:
        domain = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        keys = self.spiffe.get(domain)
        if keys is None:
            raise TokenError("wrong_issuer", f"SPIFFE trust domain {shown(domain)} is not trusted")
        # The trust domain's keys vouch for the SVID; its `iss`, if any, is informational.
        expect = Expect(
            issuer=None, audience=None, leeway=_ASSERTION_LEEWAY, require=("exp", "sub")
        )
        verified = verify(svid, keys, expect, now)
        agent = self.agents.agent_by_spiffe_id(spiffe_id)
        if agent is None:
            raise TokenError("unknown_kid", f"no agent is registered for {spiffe_id}")
        await self._check_assertion(verified, now, f"svid:{spiffe_id}")
        return agent

    async def _check_assertion(self, claims: dict[str, Any], now: float, who: str) -> None:
        if not self.assertion_audience_ok(claims.get("aud")):
            raise TokenError(
                "wrong_audience",
                f"expected aud {self.issuer!r} (or the token endpoint "
                f"{self.token_endpoint!r}), found {shown(claims.get('aud'))}",
            )
        exp = float(claims["exp"])
        issued = float(claims.get("iat", now))
        limit = self.settings.auth.assertion_max_lifetime_seconds
        if exp - issued > limit:
            raise TokenError("expired", f"assertions may live at most {limit} s")
        jti = claims.get("jti")
        fresh = jti is None or await self._first_use(self.replay, f"{who}:{jti}", exp + 60, now)
        if issued < self.replay.remembers_since():
            raise TokenError(
                "iat",
                "the assertion was made before this server started remembering used ones "
                "(a restart); make a new one",
            )
        if not fresh:
            raise TokenError("replayed", "this assertion was already used")

    def assertion_audience_ok(self, aud: Any) -> bool:
        """Whether a client assertion's `aud` names this server (RFC 7523 §3): its issuer
        identifier or its token endpoint URL, compared as normalized URLs (scheme and host
        case, default port) with a trailing slash allowed after the issuer — the Python MCP
        SDK 1.x sends the issuer with one. Nothing else: no other path, host, port or scheme."""
        issuer = _normal_url(self.issuer)
        endpoint = _normal_url(self.token_endpoint)
        for value in aud if isinstance(aud, list) else [aud]:
            found = _normal_url(value) if isinstance(value, str) else None
            if found is not None and found in (issuer, endpoint, f"{issuer}/"):
                return True
        return False

    def _usable(self, agent: Agent, now: float) -> Agent:
        ok, reason = agent.usable(now)
        if not ok:
            raise OAuthError(
                "invalid_client", f"agent {agent.id!r} cannot get tokens: {reason}", 401
            )
        return agent

    # -- delegation -------------------------------------------------------------------------

    async def _exchange(
        self, form: Mapping[str, str], dpop_proof: str | None, now: float
    ) -> dict[str, Any]:
        subject_token = form.get("subject_token")
        if not subject_token or form.get("subject_token_type") not in (
            TOKEN_TYPE_ACCESS,
            TOKEN_TYPE_JWT,
            TOKEN_TYPE_ID,
        ):
            raise OAuthError(
                "invalid_request", "subject_token and a JWT subject_token_type are required"
            )
        actor = form.get("actor_token")
        if not actor or form.get("actor_token_type") != TOKEN_TYPE_JWT:
            raise OAuthError(
                "invalid_request",
                f"actor_token (the agent's signed assertion, type {TOKEN_TYPE_JWT}) is required",
            )
        await self._seen(actor)
        agent = await self.authenticate_agent(actor, now)
        user = await self._subject(subject_token, now)
        tenant = user.get("__tenant")
        if tenant != agent.tenant:
            raise OAuthError(
                "invalid_grant",
                f"agent {agent.id!r} is registered for tenant {agent.tenant!r}, "
                f"not for the user's tenant {shown(tenant)}",
            )
        return await self._issue(agent, user, form, dpop_proof, now)

    async def _subject(self, token: str, now: float) -> dict[str, Any]:
        try:
            found = unverified_claims(token).get("iss")
        except TokenError as exc:
            raise OAuthError("invalid_grant", f"subject_token refused: {exc.message}") from exc
        trusted = next((t for t in self.settings.auth.trusted_issuers if t.issuer == found), None)
        if trusted is None:
            raise OAuthError("invalid_grant", f"subject_token issuer {shown(found)} is not trusted")
        try:
            claims = await self._verify_external(token, trusted, now)
        except TokenError as exc:
            raise OAuthError("invalid_grant", f"subject_token refused: {exc.message}") from exc
        tenant = claims.get(trusted.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise OAuthError(
                "invalid_grant", f"subject_token has no {trusted.tenant_claim!r} claim"
            )
        claims["__tenant"] = tenant
        claims["__roles"] = claims.get(trusted.roles_claim) or []
        claims["__scope"] = str(claims.get(trusted.scope_claim) or "")
        return claims

    async def _verify_external(
        self, token: str, trusted: TrustedIssuer, now: float
    ) -> dict[str, Any]:
        expect = Expect(
            issuer=trusted.issuer, audience=None, leeway=self.settings.auth.leeway_seconds
        )
        try:
            claims = verify(token, await self._issuer_keys(trusted, False), expect, now)
        except TokenError as exc:
            if exc.reason != "unknown_kid":
                raise
            claims = verify(token, await self._issuer_keys(trusted, True), expect, now)
        audiences = claims.get("aud")
        audiences = set(audiences if isinstance(audiences, list) else [audiences])
        wanted = {trusted.audience} if trusted.audience else {self.issuer, *self.resources}
        if not audiences & wanted:
            raise TokenError("wrong_audience", "the token is not meant for this gateway")
        return claims

    async def _issuer_keys(self, trusted: TrustedIssuer, refresh: bool) -> KeySet:
        """The issuer's keys from its watcher (an unknown kid asks it for a bounded fetch);
        an issuer out of reach is the server's trouble, not the client's (RFC 6749 5.2)."""
        try:
            return await self.issuers.keys(trusted.issuer, refresh)
        except IssuerUnavailable as exc:
            raise OAuthError("temporarily_unavailable", exc.message, 503) from exc

    # -- the token --------------------------------------------------------------------------

    async def _issue(
        self,
        agent: Agent,
        user: dict[str, Any] | None,
        form: Mapping[str, str],
        dpop_proof: str | None,
        now: float,
    ) -> dict[str, Any]:
        resource = self._resource(agent, form.get("resource"))
        scope = self._scope(agent, form.get("scope"), user)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": agent.id,
            "aud": resource,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + self.settings.auth.token_lifetime_seconds,
            "jti": uuid.uuid4().hex,
            "client_id": agent.id,
            "agent": agent.id,
            "tenant": agent.tenant,
            "scope": scope,
            "env": agent.environment,
        }
        if user is not None:
            claims["sub"] = str(user.get("sub"))
            actor: dict[str, Any] = {"sub": agent.id}
            if isinstance(user.get("act"), dict):
                actor["act"] = user["act"]  # multi-hop: the earlier actors nest inside
            claims["act"] = actor
            claims["roles"] = [r for r in user.get("__roles", []) if isinstance(r, str)]
        jkt = await self._dpop(agent, dpop_proof, now)
        if jkt is not None:
            claims["cnf"] = {"jkt": jkt}
        token = mint(self.keys.current(), claims, typ="at+jwt")
        body: dict[str, Any] = {
            "access_token": token,
            "token_type": "DPoP" if jkt else "Bearer",
            "expires_in": self.settings.auth.token_lifetime_seconds,
            "scope": scope,
        }
        if user is not None:
            body["issued_token_type"] = TOKEN_TYPE_ACCESS
        self.agents.note_use(agent.id, now)  # written by the gateway's UsageRecorder
        return body

    def _resource(self, agent: Agent, requested: str | None) -> str:
        allowed = set(agent.audiences) & self.resources if agent.audiences else set(self.resources)
        if requested is None:
            if len(allowed) == 1:
                return allowed.pop()
            raise OAuthError("invalid_target", "name the MCP endpoint in `resource` (RFC 8707)")
        if requested not in self.resources:
            raise OAuthError("invalid_target", f"resource {shown(requested)} is not served here")
        if requested not in allowed:
            raise OAuthError("invalid_target", f"agent {agent.id!r} may not use {shown(requested)}")
        return requested

    def _scope(self, agent: Agent, requested: str | None, user: dict[str, Any] | None) -> str:
        granted = set(agent.scopes) if agent.scopes else set(self.settings.auth.scopes)
        if user is not None:
            user_scopes = {s for s in user.get("__scope", "").split() if s.startswith("mcp:")}
            if user_scopes:
                granted &= user_scopes  # delegation narrows, never widens
        if requested:
            # RFC 6749 §3.3: issue the part of the request the agent holds (the response says
            # which); refuse only when it holds none of it.
            narrowed = set(requested.split()) & granted
            if not narrowed:
                raise OAuthError(
                    "invalid_scope", f"none of the scopes {shown(requested)} is granted"
                )
            granted = narrowed
        return " ".join(sorted(granted))

    async def _dpop(self, agent: Agent, proof: str | None, now: float) -> str | None:
        if proof is None:
            if agent.require_dpop:
                raise OAuthError(
                    "invalid_dpop_proof", f"agent {agent.id!r} must present a DPoP proof"
                )
            return None
        now = time.time()  # anew: a token exchange may have awaited the subject's issuer
        try:
            checked = dpop.verify_proof(
                proof,
                method="POST",
                url=self.token_endpoint,
                now=now,
                max_age=self.settings.auth.dpop.max_age_seconds,
            )
        except TokenError as exc:
            raise OAuthError("invalid_dpop_proof", f"DPoP proof refused: {exc.message}") from exc
        until = checked.iat + self.settings.auth.dpop.max_age_seconds + dpop.LEEWAY
        key = f"dpop:{checked.jkt}:{checked.jti}"
        fresh = await self._first_use(self.proof_replay, key, until, now)
        if checked.iat < self.proof_replay.remembers_since():
            raise OAuthError(
                "invalid_dpop_proof",
                "DPoP proof refused: it was made before this server started remembering used "
                "ones (a restart); make a new one",
            )
        if not fresh:
            raise OAuthError("invalid_dpop_proof", "this DPoP proof was already used")
        return checked.jkt

    async def _first_use(self, cache: Replays, key: str, until: float, now: float) -> bool:
        try:
            return await cache.first_use(key, until, now)
        # Full of live ids, or the shared store out of reach: refuse rather than guess.
        except (Overloaded, StateUnavailable) as exc:
            raise OAuthError("temporarily_unavailable", exc.message, 503) from exc


def _normal_url(url: str) -> str | None:
    """An http(s) URL with its scheme and host lowercased and a default port dropped (RFC 3986
    §6.2.3), for comparing audiences; None when it is not such a URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("http", "https") or not host or parts.username or parts.password:
        return None
    if parts.fragment:
        return None
    host = f"[{host}]" if ":" in host else host
    if port is not None and port != (443 if scheme == "https" else 80):
        host = f"{host}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{host}{parts.path}{query}"
