"""The token endpoint reads snapshots only: the registry view (agents, revocations), the
signing keys and the trusted issuers' keys, all kept current in the background. No registry
read, key-file read or issuer fetch happens while a token is issued."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from tests.conftest import free_port, until_async

from bastion.background import Background
from bastion.config import parse
from bastion.control.assembly import Identity, open_identity
from bastion.control.registry.agents import AgentStatus
from bastion.control.registry.store import SqliteRegistry
from bastion.control.tokens.service import JWT_BEARER, TOKEN_EXCHANGE, TOKEN_TYPE_JWT
from bastion.errors import OAuthError
from bastion.identity.jwt import mint
from bastion.identity.keys import generate
from bastion.state.keystore import FileKeyStore

RESOURCE = "http://127.0.0.1:8080/servers/echo/mcp"
AGENT = {"id": "bot", "tenant": "acme", "owner": "tests", "purpose": "gets tokens"}


def _identity(tmp_path: Path, **auth: Any) -> Identity:
    config = {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "state_dir": str(tmp_path / "state"),
        "auth": {"mode": "oauth", "agents": [AGENT], **auth},
        "upstreams": {"echo": {"transport": "http", "url": "http://127.0.0.1:9/mcp"}},
    }
    return open_identity(parse(yaml.safe_dump(config)))


@pytest.fixture
def identity(tmp_path: Path) -> Identity:
    return _identity(tmp_path)


def assertion(identity: Identity) -> str:
    now = int(time.time())
    claims = {
        "iss": AGENT["id"],
        "sub": AGENT["id"],
        "aud": identity.service.issuer,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
    }
    return mint(identity.agent_key(AGENT["id"]), claims, typ="JWT")


def client_credentials(identity: Identity) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion(identity),
        "resource": RESOURCE,
    }


async def test_issuing_a_token_reads_neither_the_registry_nor_the_key_files(
    identity: Identity,
) -> None:
    form = client_credentials(identity)  # reads the agent's key file: the test's, not Bastion's
    forbidden = mock.Mock(side_effect=AssertionError("the registry was read while issuing"))
    with (
        mock.patch.object(SqliteRegistry, "get", forbidden),
        mock.patch.object(SqliteRegistry, "version", forbidden),
        mock.patch.object(SqliteRegistry, "snapshot", forbidden),
        mock.patch.object(FileKeyStore, "refresh", forbidden),
    ):
        answer = await identity.service.token(form, None)
    assert answer["token_type"] == "Bearer" and answer["access_token"]
    assert forbidden.call_count == 0


async def test_a_suspension_by_another_process_is_honoured_within_the_views_poll(
    identity: Identity,
) -> None:
    background = Background()
    background.add(identity.view.watch.name, identity.view.watch.run)
    await background.start()
    try:
        assert (await identity.service.token(client_credentials(identity), None))["access_token"]
        # Another process's registry: a connection of its own to the same file.
        SqliteRegistry(identity.registry.path).set_status(
            AGENT["id"], AgentStatus.SUSPENDED, "tests"
        )

        async def refused() -> str | None:
            try:
                await identity.service.token(client_credentials(identity), None)
            except OAuthError as exc:
                return exc.message
            return None

        message = await until_async(refused, "the suspension in force", seconds=5.0)
        assert f"agent {AGENT['id']!r} cannot get tokens: suspended" in message
    finally:
        await background.stop()


async def test_an_exchange_with_an_issuer_out_of_reach_is_503_and_fetches_nothing(
    tmp_path: Path,
) -> None:
    # The issuer's watcher does not run: the endpoint must not fetch its keys itself.
    issuer = f"http://127.0.0.1:{free_port()}"
    identity = _identity(tmp_path, trusted_issuers=[{"issuer": issuer}])
    now = int(time.time())
    subject = mint(
        generate("ES256"),
        {
            "iss": issuer,
            "sub": "alice",
            "aud": identity.service.issuer,
            "iat": now,
            "exp": now + 60,
            "tenant": "acme",
        },
        typ="JWT",
    )
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": TOKEN_TYPE_JWT,
        "actor_token": assertion(identity),
        "actor_token_type": TOKEN_TYPE_JWT,
        "resource": RESOURCE,
    }
    with mock.patch("bastion.upstream.issuers.Pool") as pool:
        with pytest.raises(OAuthError) as refused:
            await identity.service.token(form, None)
    assert pool.call_count == 0
    assert refused.value.status == 503 and refused.value.error == "temporarily_unavailable"
    assert "could not be fetched yet" in refused.value.message
