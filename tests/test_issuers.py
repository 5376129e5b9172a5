"""Trusted external issuers' keys are background work: fetched by a watcher per issuer and
read by the request path with no I/O. A loopback issuer counts every request it gets; a
settable clock stands in for the rate window and the keep time."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from tests.conftest import until_async

from bastion.background import Background
from bastion.config import Auth, TrustedIssuer
from bastion.errors import IssuerUnavailable, TokenError
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey, generate
from bastion.pipeline.authn import Authenticator
from bastion.pipeline.exchange import Exchange
from bastion.transport.server import HttpServer
from bastion.types import Era
from bastion.upstream.issuers import IssuerDirectory

RESOURCE = "http://127.0.0.1:1/mcp"
OWN_ISSUER = "http://127.0.0.1:1"
WINDOW = 30.0  # min_refetch of the directories below
KEEP = 900.0


@dataclass
class Issuer:
    """A loopback OIDC issuer: discovery and a JWKS of `keys`, counting requests per path."""

    keys: list[SigningKey]
    hits: dict[str, int] = field(default_factory=dict)
    failing: bool = False
    base: str = ""
    padding: int = 0  # bytes of junk in the JWKS (a hostile issuer's huge answer)

    @property
    def jwks_hits(self) -> int:
        return self.hits.get("/jwks", 0)

    def token(self, key: SigningKey | None = None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.base,
            "sub": "alice",
            "aud": RESOURCE,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "client_id": "acme-app",
            "tenant": "acme",
            "scope": "mcp:tools",
            **claims,
        }
        return mint(key or self.keys[-1], body, typ="JWT")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        self.hits[path] = self.hits.get(path, 0) + 1
        body: dict[str, Any]
        if self.failing:
            status, body = 500, {"error": "down"}
        elif path == "/.well-known/openid-configuration":
            status, body = 200, {"issuer": self.base, "jwks_uri": self.base + "/jwks"}
        elif path == "/jwks":
            status, body = 200, {"keys": [k.public_jwk() for k in self.keys]}
            if self.padding:
                body["junk"] = "x" * self.padding
        else:
            status, body = 404, {}
        data = orjson.dumps(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    found = Issuer(keys=[generate("ES256")])
    server = HttpServer(found, max_body=65536)
    port = await server.start("127.0.0.1", 0)
    found.base = f"http://127.0.0.1:{port}"
    try:
        yield found
    finally:
        await server.stop(grace=0.1)


class Clock:
    """Monotonic time that tests move forward by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class _Agent:
    id: str
    tenant: str = "acme"
    require_dpop: bool = False
    environment: str = "dev"

    def usable(self, now: float) -> tuple[bool, str]:
        return True, ""


class _Agents:
    """A registry view holding one agent, the issuer's client `acme-app`."""

    def require_current(self) -> None:
        return None

    async def reread(self) -> None:
        return None

    def agent(self, agent_id: str) -> _Agent | None:
        return _Agent(agent_id) if agent_id == "acme-app" else None

    def revoked(self, jti: str) -> bool:
        return False

    def session_killed(self, session_hash: str) -> bool:
        return False

    def note_use(self, agent_id: str, when: float) -> None:
        return None

    def tenants(self) -> frozenset[str]:
        return frozenset({"acme"})


def _auth(issuer: Issuer) -> Auth:
    trusted = TrustedIssuer(issuer=issuer.base, agent_claim="client_id")
    return Auth(mode="oauth", trusted_issuers=(trusted,))


def _authenticator(issuer: Issuer, directory: IssuerDirectory | None = None) -> Authenticator:
    return Authenticator(_auth(issuer), OWN_ISSUER, _Agents(), None, issuers=directory)


def _directory(issuer: Issuer, clock: Callable[[], float]) -> IssuerDirectory:
    return IssuerDirectory(
        _auth(issuer).trusted_issuers, min_refetch=WINDOW, keep=KEEP, clock=clock
    )


async def _call(authn: Authenticator, token: str) -> Exchange:
    exchange = Exchange(
        message={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        era=Era.MODERN,
        protocol_version="2026-07-28",
        route="echo",
        client="127.0.0.1:1",
    )
    headers = {"authorization": f"Bearer {token}"}
    await authn.authenticate(exchange, headers, "POST", RESOURCE, RESOURCE)
    return exchange


def _refused_for(exchange: Exchange, reason: str) -> bool:
    denial = exchange.denial
    return isinstance(denial, TokenError) and denial.reason == reason


async def _running(directory: IssuerDirectory, issuer: Issuer) -> Background:
    background = Background()
    for name, run in directory.background():
        background.add(name, run)
    await background.start()
    await until_async(lambda: issuer.jwks_hits == 1, "the watcher's first fetch")
    return background


async def test_a_flood_of_unknown_kids_costs_the_issuer_one_fetch_per_window(
    issuer: Issuer,
) -> None:
    clock = Clock()
    directory = _directory(issuer, clock)
    authn = _authenticator(issuer, directory)
    background = await _running(directory, issuer)
    try:
        assert (await _call(authn, issuer.token())).principal is not None
        clock.now += WINDOW + 1  # the first fetch is out of the window: one refetch is allowed

        async def flood() -> list[Exchange]:
            # Each token signed by a key of its own: a kid the issuer never published.
            forged = [issuer.token(generate("ES256")) for _ in range(40)]
            return await asyncio.gather(*(_call(authn, token) for token in forged))

        first = await flood()
        assert all(_refused_for(e, "unknown_kid") for e in first)
        assert issuer.jwks_hits == 2
        second = await flood()  # still within the window opened by that refetch
        assert all(_refused_for(e, "unknown_kid") for e in second)
        assert issuer.jwks_hits == 2
    finally:
        await background.stop()


async def test_a_rotation_at_the_issuer_is_picked_up(issuer: Issuer) -> None:
    clock = Clock()
    directory = _directory(issuer, clock)
    authn = _authenticator(issuer, directory)
    background = await _running(directory, issuer)
    try:
        old = issuer.keys[0]
        assert (await _call(authn, issuer.token(old))).principal is not None
        issuer.keys = [generate("ES256")]  # the issuer rotates and withdraws the old key
        clock.now += WINDOW + 1
        rotated = await _call(authn, issuer.token())  # its unknown kid asks for a refetch
        assert rotated.principal is not None and rotated.principal.agent == "acme-app"
        assert issuer.jwks_hits == 2
        withdrawn = await _call(authn, issuer.token(old))
        assert _refused_for(withdrawn, "unknown_kid")
    finally:
        await background.stop()


async def test_the_request_path_never_fetches_keys_itself(issuer: Issuer) -> None:
    # No watcher runs: the authenticator the pipeline builds (its own directory) must refuse
    # rather than fetch discovery or the JWKS inside the request.
    authn = _authenticator(issuer)
    refused = await _call(authn, issuer.token())
    assert isinstance(refused.denial, IssuerUnavailable) and refused.denial.http_status == 503
    assert "could not be fetched yet" in refused.denial.message
    assert (b"retry-after", b"1") in refused.response_headers
    assert issuer.hits == {}


async def test_an_unknown_kid_with_the_watcher_stopped_fetches_nothing(issuer: Issuer) -> None:
    clock = Clock()
    directory = _directory(issuer, clock)
    authn = _authenticator(issuer, directory)
    background = await _running(directory, issuer)
    await background.stop()
    clock.now += WINDOW + 1
    assert _refused_for(await _call(authn, issuer.token(generate("ES256"))), "unknown_kid")
    assert (await _call(authn, issuer.token())).principal is not None  # the keys it had
    assert sum(issuer.hits.values()) == 2  # discovery and the JWKS, by the watcher, once


async def test_an_unreachable_issuer_keeps_its_keys_for_a_stated_time_then_503(
    issuer: Issuer,
) -> None:
    clock = Clock()
    directory = _directory(issuer, clock)
    authn = _authenticator(issuer, directory)
    background = await _running(directory, issuer)
    try:
        issuer.failing = True
        clock.now += KEEP - 1
        await directory.keys(issuer.base, refresh=True)  # a failed refetch
        assert issuer.jwks_hits == 2
        kept = await _call(authn, issuer.token())
        assert kept.principal is not None  # the last good keys, still within KEEP
        clock.now += 2
        stale = await _call(authn, issuer.token())
        assert isinstance(stale.denial, IssuerUnavailable) and stale.denial.http_status == 503
        assert f"were last fetched {KEEP + 1:.0f} s ago" in stale.denial.message
        assert stale.denial.code == "auth.issuer_unavailable"
        issuer.failing = False
        clock.now += WINDOW
        back = await _call(authn, issuer.token())  # no keys: the watcher is asked again
        assert back.principal is not None
    finally:
        await background.stop()


async def test_a_failing_issuer_is_retried_by_the_watcher(issuer: Issuer) -> None:
    issuer.failing = True
    directory = IssuerDirectory(
        _auth(issuer).trusted_issuers, every=300.0, min_refetch=0.05, clock=time.monotonic
    )
    background = Background()
    for name, run in directory.background():
        background.add(name, run)
    await background.start()
    try:
        await until_async(lambda: directory.fetches >= 1, "a first, failing fetch")
        issuer.failing = False
        await until_async(lambda: issuer.jwks_hits >= 1, "a retry that reaches the JWKS")
        keys = await directory.keys(issuer.base)
        assert keys.get(issuer.keys[0].kid) is not None
    finally:
        await background.stop()


async def test_a_huge_key_set_is_refused_not_held(issuer: Issuer) -> None:
    issuer.padding = 2 << 20  # 2 MiB: a real JWKS is a few KiB
    directory = _directory(issuer, Clock())
    background = await _running(directory, issuer)
    try:
        refused = await _call(_authenticator(issuer, directory), issuer.token())
    finally:
        await background.stop()
    assert isinstance(refused.denial, IssuerUnavailable), refused.denial
