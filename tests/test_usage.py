"""Agents' last-use times: noted on the request path without a registry write, written by the
gateway's recorder in batches, every few seconds and at shutdown."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.config import parse
from bastion.control.assembly import Identity, open_identity
from bastion.control.registry.store import SqliteRegistry
from bastion.control.registry.usage import UsageRecorder
from bastion.control.registry.view import RegistryView
from bastion.control.tokens.service import JWT_BEARER
from bastion.identity.jwt import mint
from bastion.pipeline.authn import Authenticator
from bastion.pipeline.exchange import Exchange

RESOURCE = "http://127.0.0.1:8080/servers/echo/mcp"
AGENT = {"id": "bot", "tenant": "acme", "owner": "tests", "purpose": "gets used"}


class CountingRegistry:
    """The identity's registry, counting every call that can write last-use times."""

    def __init__(self, inner: SqliteRegistry) -> None:
        self.inner = inner
        self.writes = 0

    def touch(self, agent_id: str, when: float) -> None:
        self.writes += 1
        self.inner.touch(agent_id, when)

    def flush_touches(self, *, wait: bool = False) -> int:
        self.writes += 1
        return self.inner.flush_touches(wait=wait)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def identity(tmp_path: Path) -> Identity:
    config = {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "state_dir": str(tmp_path / "state"),
        "auth": {"mode": "oauth", "agents": [AGENT]},
        "upstreams": {"echo": {"transport": "http", "url": "http://127.0.0.1:9/mcp"}},
    }
    return open_identity(parse(yaml.safe_dump(config)))


def stored_last_use(identity: Identity) -> float | None:
    """Read from the file with a connection of its own, as `bastion agents show` would."""
    with sqlite3.connect(identity.registry.path) as db:
        row = db.execute("SELECT last_used_at FROM agents WHERE id = ?", (AGENT["id"],))
        value = row.fetchone()[0]
    return None if value is None else float(value)


async def access_token(identity: Identity) -> str:
    now = int(time.time())
    claims = {
        "iss": AGENT["id"],
        "sub": AGENT["id"],
        "aud": identity.service.issuer,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
    }
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": mint(identity.agent_key(AGENT["id"]), claims, typ="JWT"),
        "resource": RESOURCE,
    }
    return str((await identity.service.token(form, None))["access_token"])


async def authenticate(authn: Authenticator, token: str) -> Exchange:
    exchange = Exchange(
        message={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        era="modern",
        protocol_version="2026-07-28",
        route="echo",
        client="127.0.0.1:1",
    )
    headers = {"authorization": f"Bearer {token}"}
    await authn.authenticate(exchange, headers, "POST", RESOURCE, RESOURCE)
    return exchange


async def test_the_token_endpoint_notes_a_use(identity: Identity) -> None:
    before = time.time()
    await access_token(identity)
    uses = identity.view.take_uses()
    assert set(uses) == {AGENT["id"]} and uses[AGENT["id"]] >= before


async def test_the_request_path_notes_without_writing_and_the_recorder_writes(
    identity: Identity,
) -> None:
    token = await access_token(identity)
    identity.view.take_uses()  # the token endpoint's note: this test is about requests
    counting = CountingRegistry(identity.registry)
    view = RegistryView(counting)  # type: ignore[arg-type]
    settings = identity.service.settings
    authn = Authenticator(settings.auth, identity.service.issuer, view, identity.keys)
    called = time.time()
    for _ in range(20):
        assert (await authenticate(authn, token)).principal is not None
    assert counting.writes == 0 and stored_last_use(identity) is None
    recorder = UsageRecorder(view, counting)  # type: ignore[arg-type]
    assert await recorder.flush() == 1  # twenty requests, one agent, one row written
    assert counting.writes == 2  # one touch, one flush: a batch
    stored = stored_last_use(identity)
    assert stored is not None and stored >= called


async def test_a_refused_request_notes_nothing(identity: Identity) -> None:
    authn = Authenticator(
        identity.service.settings.auth, identity.service.issuer, identity.view, identity.keys
    )
    refused = await authenticate(authn, "not-a-token")
    assert refused.denial is not None and identity.view.take_uses() == {}


async def test_the_recorder_writes_every_interval_and_at_stop(identity: Identity) -> None:
    recorder = UsageRecorder(identity.view, identity.registry, interval=0.05)
    await recorder.start()
    try:
        identity.view.note_use(AGENT["id"], 1_900_000_000.0)
        deadline = time.monotonic() + 10
        while stored_last_use(identity) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # polling the file, not waiting for the recorder
        assert stored_last_use(identity) == 1_900_000_000.0
        identity.view.note_use(AGENT["id"], 1_900_000_001.0)
    finally:
        await recorder.stop()
    assert stored_last_use(identity) == 1_900_000_001.0  # written by stop at the latest


async def test_stop_writes_what_is_left(identity: Identity) -> None:
    recorder = UsageRecorder(identity.view, identity.registry, interval=3600)
    await recorder.start()
    identity.view.note_use(AGENT["id"], 1_900_000_002.0)
    await recorder.stop()
    assert stored_last_use(identity) == 1_900_000_002.0
