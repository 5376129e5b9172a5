"""The credentials stage: what each upstream gets for a message, decided before the upstream
stage sends it, and handed to that stage as one callable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

import jwt
import pytest

from bastion import config
from bastion.identity.keys import SigningKey, generate
from bastion.pipeline.credentials import Credentials
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.upstream import Caller
from bastion.types import JSON, MODERN_VERSION, Era, Principal
from bastion.upstream.base import Answer, Channel
from bastion.upstream.pool import Upstreams

ALICE = Principal(tenant="acme", agent="alice-bot", user="alice")


class Keys:
    """The one key the gateway signs with, generated for the test."""

    def __init__(self) -> None:
        self.key = generate()

    def current(self) -> SigningKey:
        return self.key


@pytest.fixture
def credentials(tmp_path: Path) -> Credentials:
    text = """
listen: {host: 127.0.0.1, port: 8080}
upstreams:
  echo:
    transport: http
    url: http://127.0.0.1:9/mcp
"""
    return Credentials(config.parse(text, base=tmp_path), Keys())


def request(method: str, params: JSON | None = None) -> JSON:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}


def exchange_for(message: JSON) -> Exchange:
    return Exchange(message, Era.MODERN, MODERN_VERSION, "echo", "127.0.0.1", ALICE)


def claims_of(headers: Mapping[str, str]) -> dict[str, Any]:
    scheme, _, token = headers["Authorization"].partition(" ")
    assert scheme == "Bearer"
    return dict(jwt.decode(token, options={"verify_signature": False}))


@pytest.mark.parametrize(
    ("message", "scope"),
    [
        (request("tools/call", {"name": "echo", "arguments": {}}), "echo"),
        (request("prompts/get", {"name": "greet"}), "prompts/get:greet"),
        (request("resources/read", {"uri": "file:///a"}), "resources/read"),
        (request("tools/list"), "tools/list"),
        (request("initialize"), "initialize"),
    ],
)
async def test_minted_credential_is_scoped_to_what_the_message_does(
    credentials: Credentials, message: JSON, scope: str
) -> None:
    headers, jti = await credentials.for_message(exchange_for(message), "echo", message)
    claims = claims_of(headers)
    assert claims["scope"] == scope
    assert claims["jti"] == jti
    assert claims["sub"] == "alice" and claims["tenant"] == "acme"


class RecordingChannel:
    """A modern upstream that answers every call and records what it was sent."""

    era = Era.MODERN

    def __init__(self, effects: list[str]) -> None:
        self.inflight: dict[Any, Any] = {}
        self.effects = effects
        self.headers: list[Mapping[str, str]] = []

    async def open(self, headers: Mapping[str, str]) -> JSON | None:
        return None

    async def call(self, message: JSON, headers: Mapping[str, str]) -> Answer:
        self.effects.append(f"send {message['method']}")
        self.headers.append(headers)
        return Answer({"jsonrpc": "2.0", "id": message["id"], "result": {"content": []}})

    async def send(self, message: JSON, headers: Mapping[str, str]) -> None:
        raise AssertionError("not used")

    async def listen(self, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        raise AssertionError("not used")
        yield {}

    async def close(self, headers: Mapping[str, str] | None = None) -> None:
        return None


class OneChannel:
    """The pool, reduced to the one channel the test records."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def stateless_channel(self, name: str, tenant: str) -> Channel:
        return self.channel


async def test_upstream_stage_asks_the_credentials_stage_before_each_send(
    credentials: Credentials,
) -> None:
    effects: list[str] = []
    channel = RecordingChannel(effects)
    issued: list[str | None] = []

    async def credential_for(
        exchange: Exchange, upstream: str, message: JSON
    ) -> tuple[dict[str, str], str | None]:
        effects.append(f"credential {upstream} {message['method']}")
        headers, jti = await credentials.for_message(exchange, upstream, message)
        issued.append(jti)
        return headers, jti

    caller = Caller(cast(Upstreams, OneChannel(channel)), credential_for)
    message = request("tools/call", {"name": "echo", "arguments": {}})
    exchange = exchange_for(message)
    reply = await caller.call_once(exchange, "echo", message)
    assert reply == {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}
    assert effects == ["credential echo tools/call", "send tools/call"]
    assert exchange.credential_id == issued[0] is not None
    assert claims_of(channel.headers[0])["jti"] == exchange.credential_id
