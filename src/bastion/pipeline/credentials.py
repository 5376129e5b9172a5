"""Upstream credentials: what each upstream gets instead of the client's token.

Nothing from the client's request headers is forwarded (no Authorization, no cookies): the
upstream's headers are built here from the principal and the upstream's `credentials`:

- `mint`: a JWT signed with Bastion's key for this principal, this upstream's audience and
  this tool, living at most 60 s, cached per (principal, upstream, scope) while valid;
- `token_exchange`: RFC 8693 at the upstream's authorization server, with a JWT Bastion signs
  as the subject token, cached per principal and audience;
- `secret`: a header value read from a secret reference when the gateway starts;
- `none`: nothing.

Under `auth: none` (loopback only) every call also carries the tenant in `X-Bastion-Tenant`;
`mint` then sends nothing else (there are no keys to sign with), `secret` still sends its header.

The credentials stage is `Credentials.for_message`: the upstream stage is handed it as a plain
callable and asks it once per message it sends, before sending.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from bastion.config import Credential, HttpUpstream, Settings
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey
from bastion.methods import PROMPTS_GET, TOOLS_CALL
from bastion.state.memory import TtlCache
from bastion.types import JSON, Principal
from bastion.upstream.oauth import exchange_token

if TYPE_CHECKING:
    from bastion.pipeline.exchange import Exchange

TENANT_HEADER = "X-Bastion-Tenant"
_REUSE_MARGIN = 10.0  # a cached credential is reused only while it has this long to live

Issued = tuple[dict[str, str], str | None]  # headers, and the id of what was minted


class CurrentKey(Protocol):
    """Where the key to sign with comes from."""

    def current(self) -> SigningKey: ...


class Credentials:
    """Builds (and caches) the headers an upstream call carries."""

    def __init__(
        self,
        settings: Settings,
        keys: CurrentKey | None,
        secrets: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._secrets = dict(secrets or {})
        self._issuer = settings.base_url()
        self._cache: TtlCache[Issued] = TtlCache(50_000)
        self._plans: dict[str, tuple[Credential, str]] = {}
        for name, upstream in settings.upstreams.items():
            audience = upstream.credentials.audience or (
                upstream.url
                if isinstance(upstream, HttpUpstream)
                else f"urn:bastion:upstream:{name}"
            )
            self._plans[name] = (upstream.credentials, audience)

    async def for_message(self, exchange: Exchange, upstream: str, message: JSON) -> Issued:
        """The credential `upstream` gets for one message the exchange sends it: headers, and
        the id of what was minted (None when nothing was). Runs before each upstream send."""
        return await self.issue(exchange.principal, upstream, scope_of(message))

    async def headers(
        self, principal: Principal | None, upstream: str, scope: str
    ) -> dict[str, str]:
        """The credential headers for one call of `principal` to `upstream` for `scope`."""
        return (await self.issue(principal, upstream, scope))[0]

    async def issue(self, principal: Principal | None, upstream: str, scope: str) -> Issued:
        """The credential headers, and the id (`jti`) of the token Bastion minted for them
        (for token exchange, of the subject token it signed); None when it minted nothing."""
        if principal is None:
            return {}, None
        credential, audience = self._plans[upstream]
        if self._settings.auth.mode == "none":
            # No keys to sign with; a configured secret still goes (token_exchange is refused
            # at load under auth: none).
            headers = {TENANT_HEADER: principal.tenant}
            if credential.mode == "secret":
                headers.update(self._secret(upstream, credential))
            return headers, None
        if credential.mode == "mint":
            return self._minted(principal, upstream, scope, credential, audience)
        if credential.mode == "token_exchange":
            return await self._exchanged(principal, upstream, credential, audience)
        if credential.mode == "secret":
            return self._secret(upstream, credential), None
        return {}, None

    def _secret(self, upstream: str, credential: Credential) -> dict[str, str]:
        prefix = f"{credential.scheme} " if credential.scheme else ""
        return {credential.header: prefix + self._secrets[upstream]}

    async def _exchanged(
        self, principal: Principal, upstream: str, credential: Credential, audience: str
    ) -> Issued:
        """RFC 8693 at the upstream's authorization server: Bastion's statement of who calls
        (a JWT it signs, audience the token endpoint) for a token meant for the upstream;
        cached per principal and audience until shortly before it expires."""
        now = time.time()
        key = f"{principal.agent}\0{principal.binding_key()}\0{upstream}\0exchange"
        cached = self._cache.get(key, now + _REUSE_MARGIN)
        if cached is not None:
            return cached
        assert self._keys is not None and credential.token_endpoint is not None  # noqa: S101
        jti = uuid.uuid4().hex
        subject = mint(
            self._keys.current(),
            {
                "iss": self._issuer,
                "aud": credential.token_endpoint,
                "sub": principal.user or principal.agent,
                "act": _actor_chain(principal),
                "tenant": principal.tenant,
                "iat": int(now),
                "exp": int(now) + 60,
                "jti": jti,
            },
            typ="JWT",
        )
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": subject,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": audience,
            "resource": audience,
        }
        secret = self._secrets.get(f"{upstream}#client_secret", "")
        token, expires_in = await exchange_token(
            credential.token_endpoint, form, credential.client_id or "", secret, upstream
        )
        issued = {credential.header: f"{credential.scheme} {token}".strip()}, jti
        self._cache.put(key, issued, now + max(0.0, expires_in))
        return issued

    def _minted(
        self, principal: Principal, upstream: str, scope: str, credential: Credential, audience: str
    ) -> Issued:
        now = time.time()
        key = f"{principal.agent}\0{principal.binding_key()}\0{upstream}\0{scope}"
        cached = self._cache.get(key, now + _REUSE_MARGIN)
        if cached is not None:
            return cached
        assert self._keys is not None  # noqa: S101 - present when auth is oauth
        expires = int(now) + credential.lifetime_seconds
        claims: dict[str, object] = {
            "iss": self._issuer,
            "aud": audience,
            "sub": principal.user or principal.agent,
            "act": _actor_chain(principal),
            "tenant": principal.tenant,
            "scope": scope,
            "iat": int(now),
            "exp": expires,
            "jti": uuid.uuid4().hex,
        }
        token = mint(self._keys.current(), claims, typ="JWT")
        issued = {credential.header: f"{credential.scheme} {token}".strip()}, str(claims["jti"])
        self._cache.put(key, issued, expires)
        return issued

    def forget_agent(self, agent: str) -> int:
        """Drop an agent's cached credentials (offboarding); say how many."""
        return self._cache.drop_where(lambda key: key.split("\0", 1)[0] == agent)


def scope_of(message: JSON) -> str:
    """What a credential for this message may do: call the tool it names, get the prompt it
    names (`prompts/get:<name>`), else the method."""
    method = str(message.get("method", ""))
    params = message.get("params") or {}
    if method == TOOLS_CALL:
        return str(params.get("name", ""))
    if method == PROMPTS_GET:
        return f"{PROMPTS_GET}:{params.get('name', '')}"
    return method


def _actor_chain(principal: Principal) -> dict[str, object]:
    """`act` for the upstream: the agent acting now, with earlier actors nested inside."""
    chain = list(principal.delegation) or [principal.agent]
    actor: dict[str, object] = {}
    for sub in reversed(chain):
        actor = {"sub": sub, "act": actor} if actor else {"sub": sub}
    return actor
