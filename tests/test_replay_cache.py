"""Replay caches fail closed: a live id is never forgotten to make room.

Before, a full cache (100,000 ids) dropped its oldest entry, live or not, so under load (or
a flood of the attacker's own proofs) a captured DPoP proof or client assertion could be
replayed within its lifetime. Now a full cache refuses new ids with 503 and keeps every
live one until the moment its token or proof would be refused anyway.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from unittest import mock

import pytest
import yaml

from bastion.config import parse
from bastion.control.assembly import Identity, open_identity
from bastion.control.tokens.service import JWT_BEARER
from bastion.errors import OAuthError, Overloaded, TokenError
from bastion.identity.dpop import make_proof
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey, generate
from bastion.pipeline.authn import Authenticator
from bastion.pipeline.exchange import Exchange
from bastion.state.memory import SKEW_LEEWAY, ReplayCache
from bastion.types import Era

RESOURCE = "http://127.0.0.1:8080/servers/echo/mcp"
AGENT = {"id": "bot", "tenant": "acme", "owner": "tests", "purpose": "replays"}


async def test_a_live_id_outlives_a_full_cache() -> None:
    cache = ReplayCache(max_entries=3)
    for key in ("a", "b", "c"):
        assert await cache.first_use(key, expires_at=200.0, now=100.0)
    with pytest.raises(Overloaded, match="3 unexpired ids"):
        await cache.first_use("d", expires_at=200.0, now=100.0)
    assert not await cache.first_use("a", expires_at=200.0, now=150.0)  # still known when full
    with pytest.raises(Overloaded):  # at their expiry instant they still count
        await cache.first_use("d", expires_at=300.0, now=200.0)
    assert await cache.first_use("d", expires_at=300.0, now=200.5)  # a, b and c have expired
    assert len(cache) == 1


async def test_more_ids_than_the_old_bound_are_all_remembered() -> None:
    cache = ReplayCache()
    first = "jkt:" + uuid.uuid4().hex
    assert await cache.first_use(first, expires_at=1e10, now=0.0)
    for n in range(150_000):  # the old cache forgot `first` after 100,000
        await cache.first_use(f"jkt:{n}", expires_at=1e10, now=0.0)
    assert not await cache.first_use(first, expires_at=1e10, now=0.0)


def test_a_process_cache_remembers_since_its_start_less_the_skew_leeway() -> None:
    with mock.patch("bastion.state.memory.time.time", return_value=1000.0):
        cache = ReplayCache()
    assert cache.remembers_since() == 1000.0 - SKEW_LEEWAY


@pytest.fixture
def identity(tmp_path: Path) -> Identity:
    config = {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "state_dir": str(tmp_path / "state"),
        "auth": {"mode": "oauth", "agents": [AGENT]},
        "upstreams": {"echo": {"transport": "http", "url": "http://127.0.0.1:9/mcp"}},
    }
    return open_identity(parse(yaml.safe_dump(config)))


def _form(identity: Identity) -> dict[str, str]:
    now = int(time.time())
    claims = {
        "iss": AGENT["id"],
        "sub": AGENT["id"],
        "aud": identity.service.issuer,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
    }
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": mint(identity.agent_key(AGENT["id"]), claims, typ="JWT"),
        "resource": RESOURCE,
    }


async def test_the_token_endpoint_refuses_with_503_when_its_cache_is_full(
    identity: Identity,
) -> None:
    identity.service.replay = ReplayCache(max_entries=1)
    used = _form(identity)
    assert "access_token" in await identity.service.token(used, None)
    with pytest.raises(OAuthError) as busy:
        await identity.service.token(_form(identity), None)
    assert (busy.value.status, busy.value.error) == (503, "temporarily_unavailable")
    with pytest.raises(OAuthError, match="already used"):  # the used one is still known
        await identity.service.token(used, None)


async def test_the_resource_server_refuses_with_503_when_its_cache_is_full(
    identity: Identity,
) -> None:
    holder = generate("ES256")
    token = await _dpop_token(identity, holder)
    settings = identity.service.settings
    authn = Authenticator(
        settings.auth,
        identity.service.issuer,
        identity.view,
        identity.keys,
        replay=ReplayCache(max_entries=1),
    )

    async def call(proof: str) -> Exchange:
        return await _authenticate(authn, token, proof)

    def proof() -> str:
        return make_proof(holder, "POST", RESOURCE, time.time(), access_token=token)

    first = proof()
    assert (await call(first)).principal is not None
    busy = await call(proof())
    assert isinstance(busy.denial, Overloaded) and busy.denial.http_status == 503
    assert (b"retry-after", b"1") in busy.response_headers
    replayed = await call(first)
    assert isinstance(replayed.denial, TokenError) and replayed.denial.reason == "replayed"


def _authenticator(identity: Identity, started: float | None = None) -> Authenticator:
    settings = identity.service.settings
    with mock.patch("bastion.state.memory.time.time", return_value=started or time.time()):
        return Authenticator(settings.auth, identity.service.issuer, identity.view, identity.keys)


async def _dpop_token(identity: Identity, holder: SigningKey) -> str:
    token_url = identity.service.token_endpoint
    proof = make_proof(holder, "POST", token_url, time.time())
    answer = await identity.service.token(_form(identity), proof)
    return str(answer["access_token"])


async def _authenticate(authn: Authenticator, token: str, proof: str) -> Exchange:
    exchange = Exchange(
        message={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        era=Era.MODERN,
        protocol_version="2026-07-28",
        route="echo",
        client="127.0.0.1:1",
    )
    headers = {"authorization": f"DPoP {token}", "dpop": proof}
    await authn.authenticate(exchange, headers, "POST", RESOURCE, RESOURCE)
    return exchange


async def test_a_proof_is_remembered_for_as_long_as_it_is_accepted(identity: Identity) -> None:
    # max_age 60 s + 5 s leeway: a proof made 62 s ago is still accepted for ~3 s, so it must
    # still be remembered; kept only until iat + max_age (without the leeway) it would be
    # forgotten already and this replay would pass.
    holder = generate("ES256")
    token = await _dpop_token(identity, holder)
    authn = _authenticator(identity, started=time.time() - 600)
    old = make_proof(holder, "POST", RESOURCE, time.time() - 62, access_token=token)
    assert (await _authenticate(authn, token, old)).principal is not None
    replayed = await _authenticate(authn, token, old)
    assert isinstance(replayed.denial, TokenError) and replayed.denial.reason == "replayed"


async def test_what_was_made_before_the_process_started_is_refused(identity: Identity) -> None:
    # The replay caches start empty at a restart, so a proof or an assertion made before it
    # (beyond the 5 s skew leeway) could have been used already: refused, not remembered.
    holder = generate("ES256")
    token = await _dpop_token(identity, holder)
    authn = _authenticator(identity)
    before = make_proof(holder, "POST", RESOURCE, time.time() - 20, access_token=token)
    refused = await _authenticate(authn, token, before)
    assert isinstance(refused.denial, TokenError) and refused.denial.reason == "iat"
    assert "before this gateway started" in refused.denial.message
    fresh = make_proof(holder, "POST", RESOURCE, time.time(), access_token=token)
    assert (await _authenticate(authn, token, fresh)).principal is not None
    with mock.patch("bastion.state.memory.time.time", return_value=time.time() + 20):
        identity.service.replay = ReplayCache()  # as if it had started just now, 20 s later
    with pytest.raises(OAuthError, match="before this server started"):
        await identity.service.token(_form(identity), None)
    identity.service.replay = identity.service.proof_replay = ReplayCache()  # started now
    stale = make_proof(holder, "POST", identity.service.token_endpoint, time.time() - 10)
    with pytest.raises(OAuthError, match="DPoP proof refused: it was made before"):
        await identity.service.token(_form(identity), stale)
