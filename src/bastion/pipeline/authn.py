"""Authentication: an OAuth 2.1 resource server that turns a token into a Principal.

Each request carries a JWT access token, from Bastion's own authorization server or from a
trusted issuer. It is checked for signature (asymmetric algorithms only), issuer, this route's
audience (RFC 8707), lifetime and type (RFC 9068). DPoP-bound tokens (`cnf.jkt`) also need a
fresh proof of possession of the key (RFC 9449). The agent behind the token must be registered
and usable, and the token not revoked — checked on every request, cached or not.

Refusals carry the RFC 6750 / RFC 9728 challenge in `exchange.response_headers`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import secrets
import time
from typing import Any, Protocol

from bastion.config import Auth, TrustedIssuer
from bastion.errors import (
    AuthError,
    InsufficientScope,
    IssuerUnavailable,
    Overloaded,
    StateUnavailable,
    TokenError,
    shown,
)
from bastion.identity import dpop
from bastion.identity.jwt import Expect, unverified_claims, verify
from bastion.identity.keys import KeySet
from bastion.pipeline.exchange import Exchange
from bastion.state.memory import ReplayCache, Replays, TtlCache
from bastion.types import Principal
from bastion.upstream.issuers import IssuerDirectory

DPOP_ALGS = "ES256 ES384 EdDSA RS256 PS256"
_SCOPE_OF = {
    "tools": "mcp:tools",
    "resources": "mcp:resources",
    "prompts": "mcp:prompts",
    "completion": "mcp:prompts",
}


class AgentRecord(Protocol):
    """What authentication needs to know of a registered agent."""

    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def require_dpop(self) -> bool: ...
    @property
    def environment(self) -> str: ...
    def usable(self, now: float) -> tuple[bool, str]: ...


class AgentDirectory(Protocol):
    """The registry as the request path sees it: an in-memory snapshot that the gateway's
    background work keeps current (the request path never reads the registry itself)."""

    def require_current(self) -> None: ...
    async def reread(self) -> None: ...  # after a change made in this process
    def agent(self, agent_id: str) -> AgentRecord | None: ...
    def revoked(self, jti: str) -> bool: ...
    def session_killed(self, session_hash: str) -> bool: ...
    def tenants(self) -> frozenset[str]: ...  # of every registered agent
    def note_use(self, agent_id: str, when: float) -> None: ...


class SigningKeys(Protocol):
    """The embedded issuer's public keys."""

    def keyset(self) -> KeySet: ...
    async def recheck(self) -> bool: ...  # the background looks for a rotation now


class Authenticator:
    """Checks the credentials of each request; no I/O (keys and the registry are snapshots
    kept current in the background)."""

    def __init__(
        self,
        auth: Auth,
        issuer: str,
        agents: AgentDirectory | None,
        keys: SigningKeys | None,
        issuers: IssuerDirectory | None = None,
        replay: Replays | None = None,
        nonce_key: bytes | None = None,
    ) -> None:
        self._auth = auth
        self._issuer = issuer
        self._agents = agents
        self._keys = keys
        # Trusted issuers' keys, fetched by watchers the gateway runs (`issuers.background`).
        self.issuers = issuers or IssuerDirectory(auth.trusted_issuers)
        self._external = {t.issuer: t for t in auth.trusted_issuers if t.agent_claim}
        self._verified: TtlCache[tuple[dict[str, Any], Principal]] = TtlCache(10_000)
        # DPoP proofs' jtis: this process's, or every replica's (Redis) when shared.
        self._replay: Replays = replay if replay is not None else ReplayCache()
        # DPoP nonces derive from this key: shared (the state directory's) so that replicas
        # and a restarted gateway accept each other's, else this process's own.
        self._nonce_key = nonce_key or secrets.token_bytes(32)
        self._anonymous = Principal(tenant=auth.tenant, agent=auth.agent)

    @property
    def enabled(self) -> bool:
        """Whether requests must carry tokens (`auth: oauth`)."""
        return self._auth.mode == "oauth"

    async def authenticate(
        self, exchange: Exchange, headers: dict[str, str], method: str, url: str, resource: str
    ) -> None:
        """Set `exchange.principal`, or `exchange.denial` with the challenge headers."""
        if not self.enabled:
            exchange.principal = self._anonymous
            return
        now = time.time()
        try:
            principal = await self._principal(headers, method, url, resource, now)
            self._require_scope(exchange, principal)
        except AuthError as exc:
            exchange.denial = exc
            exchange.response_headers.extend(self.challenge(exc, resource, headers))
            return
        # The replay cache full or out of reach (shared state down), or keys out of reach.
        except (Overloaded, IssuerUnavailable, StateUnavailable) as exc:
            exchange.denial = exc
            exchange.response_headers.append((b"retry-after", b"1"))
            return
        exchange.principal = principal

    async def _principal(
        self, headers: dict[str, str], method: str, url: str, resource: str, now: float
    ) -> Principal:
        scheme, token = _credentials(headers.get("authorization"))
        assert self._agents is not None  # noqa: S101 - present when auth is oauth
        key = f"{resource}\0{token}"  # the registry view is kept current in the background
        cached = self._verified.get(key, now)
        if cached is None:
            claims = await self._verify(token, resource, now)
            principal = self._build(claims)
            self._verified.put(key, (claims, principal), principal.expires_at or now)
        else:
            claims, principal = cached
        if principal.token_id and self._agents.revoked(principal.token_id):
            raise TokenError("revoked", "the token was revoked")
        agent = self._agents.agent(principal.agent)
        if agent is None:
            raise TokenError("unknown_kid", f"agent {shown(principal.agent)} is not registered")
        ok, reason = agent.usable(now)
        if not ok:
            raise TokenError("suspended", f"agent {shown(principal.agent)} is {reason}")
        if agent.tenant != principal.tenant:
            raise TokenError("wrong_audience", "the token's tenant is not the agent's tenant")
        await self._check_binding(scheme, token, principal, agent, headers, method, url, now)
        # An in-memory note; the gateway's background work writes it to the registry.
        self._agents.note_use(agent.id, now)
        if principal.environment != agent.environment:
            # Where an agent belongs is the registry's word, not a token's: an external
            # issuer's token may carry any `env` claim, or none (environment separation).
            principal = dataclasses.replace(principal, environment=agent.environment)
        return principal

    async def _verify(self, token: str, resource: str, now: float) -> dict[str, Any]:
        found = unverified_claims(token).get("iss")
        issuer = found if isinstance(found, str) else ""
        leeway = self._auth.leeway_seconds
        if issuer == self._issuer:
            assert self._keys is not None  # noqa: S101 - present when auth is oauth
            expect = Expect(
                issuer=issuer,
                audience=resource,
                typ="at+jwt",
                leeway=leeway,
                require=("exp", "iat", "jti"),
            )
            try:
                return verify(token, self._keys.keyset(), expect, now)
            except TokenError as exc:
                if exc.reason != "unknown_kid" or not await self._keys.recheck():
                    raise
                return verify(token, self._keys.keyset(), expect, now)
        trusted = self._external.get(issuer)
        if trusted is None:
            trusted_here = ", ".join(repr(i) for i in (self._issuer, *self._external))
            raise TokenError(
                "wrong_issuer", f"expected iss one of {trusted_here}, found {shown(found)}"
            )
        expect = Expect(issuer=issuer, audience=resource, leeway=leeway)
        # No I/O here: the keys are the watcher's; an unknown kid asks it for a fetch (at
        # most one per issuer and window, however many tokens ask) and waits for it.
        try:
            claims = verify(token, await self.issuers.keys(issuer), expect, now)
        except TokenError as exc:
            if exc.reason != "unknown_kid":
                raise
            claims = verify(token, await self.issuers.keys(issuer, refresh=True), expect, now)
        return _map_external(claims, trusted)

    def _build(self, claims: dict[str, Any]) -> Principal:
        for name in ("tenant", "agent"):
            if not isinstance(claims.get(name), str) or not claims[name]:
                raise TokenError("missing_claim", f"the token has no {name!r} claim")
        chain: list[str] = []
        actor = claims.get("act")
        while isinstance(actor, dict) and isinstance(actor.get("sub"), str):
            chain.append(actor["sub"])
            actor = actor.get("act")
        cnf = claims.get("cnf")
        roles = claims.get("roles")
        return Principal(
            tenant=claims["tenant"],
            agent=claims["agent"],
            user=str(claims["sub"]) if chain or claims.get("user") else None,
            scopes=frozenset(str(claims.get("scope", "")).split()),
            roles=frozenset(r for r in roles if isinstance(r, str))
            if isinstance(roles, list)
            else frozenset(),
            delegation=tuple(chain),
            token_id=str(claims.get("jti")) if claims.get("jti") else None,
            expires_at=float(claims["exp"]),
            key_binding=cnf.get("jkt") if isinstance(cnf, dict) else None,
            environment=claims.get("env") if isinstance(claims.get("env"), str) else None,
        )

    async def _check_binding(
        self,
        scheme: str,
        token: str,
        principal: Principal,
        agent: AgentRecord,
        headers: dict[str, str],
        method: str,
        url: str,
        now: float,
    ) -> None:
        if principal.key_binding is None:
            if scheme == "dpop":
                raise TokenError("wrong_key", "the token is not DPoP-bound; send it as Bearer")
            if agent.require_dpop:
                raise TokenError("wrong_key", f"agent {agent.id!r} must use DPoP-bound tokens")
            return
        if scheme != "dpop":
            raise TokenError("wrong_key", "a DPoP-bound token must be sent with the DPoP scheme")
        proof_header = headers.get("dpop")
        if not proof_header:
            raise TokenError("wrong_key", "a DPoP proof header is required with this token")
        now = time.time()  # anew: verifying the token may have awaited the issuer's watcher
        nonce = self._nonce(now) if self._auth.dpop.nonce else None
        proof = dpop.verify_proof(
            proof_header,
            method=method,
            url=url,
            now=now,
            access_token=token,
            nonce=None,
            max_age=self._auth.dpop.max_age_seconds,
        )
        if nonce is not None and proof.nonce not in (nonce, self._nonce(now - 60)):
            raise TokenError("nonce", "the DPoP proof must carry the server's current nonce")
        if proof.jkt != principal.key_binding:
            raise TokenError(
                "wrong_key", "the DPoP proof is signed by another key than the token's"
            )
        until = proof.iat + self._auth.dpop.max_age_seconds + dpop.LEEWAY
        fresh = await self._replay.first_use(f"{proof.jkt}:{proof.jti}", until, now)
        # Asked after the use, atomically with it: a proof made before the cache (this
        # process's, or a restarted or flushed Redis) began remembering may have been used.
        if proof.iat < self._replay.remembers_since():
            raise TokenError(
                "iat",
                "the DPoP proof was made before this gateway started remembering used proofs "
                "(a restart); make a new one",
            )
        if not fresh:
            raise TokenError("replayed", "this DPoP proof was already used")

    def _nonce(self, now: float) -> str:
        window = str(int(now // 60)).encode()
        digest = hmac.new(self._nonce_key, window, hashlib.sha256).digest()[:18]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def _require_scope(self, exchange: Exchange, principal: Principal) -> None:
        family = exchange.method.split("/", 1)[0]
        needed = _SCOPE_OF.get(family)
        if needed is not None and needed not in principal.scopes:
            raise InsufficientScope(
                f"{shown(exchange.method)} needs the scope {needed!r}", data={"scope": needed}
            )

    def challenge(
        self, exc: AuthError, resource: str, headers: dict[str, str]
    ) -> list[tuple[bytes, bytes]]:
        """The WWW-Authenticate (and DPoP-Nonce) headers for a refusal."""
        path = resource.removeprefix(self._issuer)
        metadata = f"{self._issuer}/.well-known/oauth-protected-resource{path}"
        scopes = " ".join(self._auth.scopes)
        sent_dpop = (headers.get("authorization") or "").lower().startswith("dpop ")
        scheme = "DPoP" if sent_dpop else "Bearer"
        parts = [f'resource_metadata="{metadata}"']
        out: list[tuple[bytes, bytes]] = []
        if isinstance(exc, InsufficientScope):
            needed = (exc.data or {}).get("scope", scopes)
            parts = ['error="insufficient_scope"', f'scope="{needed}"', *parts]
        elif isinstance(exc, TokenError) and exc.reason == "nonce":
            parts = ['error="use_dpop_nonce"', f'error_description="{_quote(exc.message)}"']
            scheme = "DPoP"
        elif isinstance(exc, TokenError) and headers.get("authorization"):
            parts = [
                'error="invalid_token"',
                f'error_description="{_quote(exc.message)}"',
                f'scope="{scopes}"',
                *parts,
            ]
        else:
            parts = [f'scope="{scopes}"', *parts]
        value = f"{scheme} " + ", ".join(parts)
        if scheme == "DPoP":
            value += f', algs="{DPOP_ALGS}"'
        out.insert(0, (b"www-authenticate", value.encode()))
        if self._auth.dpop.nonce:
            out.append((b"dpop-nonce", self._nonce(time.time()).encode()))
        return out


def _credentials(header: str | None) -> tuple[str, str]:
    if not header:
        raise AuthError("this endpoint needs an access token (Authorization: Bearer or DPoP)")
    scheme, _, token = header.partition(" ")
    scheme = scheme.lower()
    token = token.strip()
    if scheme not in ("bearer", "dpop") or not token:
        raise TokenError("malformed", "Authorization must be 'Bearer <token>' or 'DPoP <token>'")
    return scheme, token


def _map_external(claims: dict[str, Any], trusted: TrustedIssuer) -> dict[str, Any]:
    """An external issuer's claims in Bastion's names."""
    agent = claims.get(trusted.agent_claim or "")
    mapped = dict(claims)
    mapped["tenant"] = claims.get(trusted.tenant_claim)
    mapped["agent"] = agent
    mapped["roles"] = claims.get(trusted.roles_claim) or []
    mapped["scope"] = claims.get(trusted.scope_claim) or ""
    mapped["user"] = True
    return mapped


def _quote(text: str) -> str:
    return text.replace("\\", "'").replace('"', "'")
