"""`subscriptions/listen` through the real pipeline, in process, over the recording upstream of
tests/test_pipeline.py: a resource URI the route has not seen is learnt as the gateway, in
the background, never with a credential made for the caller; one that stays unknown refuses
the listen with a message naming it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pytest
from tests.test_pipeline import CLIENT_TOKEN, InProcess

from bastion.background import Background
from bastion.config import RESERVED_TENANT
from bastion.methods import SUBSCRIPTIONS_ACKNOWLEDGED, SUBSCRIPTIONS_LISTEN
from bastion.pipeline.chain import CATALOG_PRINCIPAL
from bastion.pipeline.exchange import Exchange
from bastion.types import JSON, META_CAPABILITIES, META_VERSION, MODERN_VERSION, Era
from bastion.upstream.base import Answer

CALLER = "tenant header acme"  # what the recording upstream logs for the caller's credential
GATEWAY = f"tenant header {RESERVED_TENANT}"  # and for the catalog principal's
KNOWN = "workspace://projects/p1"


@pytest.fixture
def path(tmp_path: Path) -> InProcess:
    inprocess = InProcess(tmp_path)
    channel = inprocess.upstreams.channels["workspace"]
    answer = channel.call

    async def call(message: JSON, headers: Mapping[str, str]) -> Answer:
        if message.get("method") != "resources/list":
            return await answer(message, headers)
        await answer(message, headers)  # logged with its credential
        result = {"resources": [{"uri": KNOWN, "name": "p1"}]}
        return Answer({"jsonrpc": "2.0", "id": message.get("id"), "result": result})

    channel.call = call  # type: ignore[method-assign]
    return inprocess


def _wire_learning(path: InProcess) -> None:
    """What the pipeline does for an unseen URI of a read: background catalog work."""
    pipeline = path.pipeline

    async def learn(route: object) -> None:
        await pipeline.authz.resources.learn(
            route,  # type: ignore[arg-type]
            CATALOG_PRINCIPAL,
            pipeline.dispatcher.refresh_index,
        )

    pipeline.dispatcher.streams.learn = learn


async def _listen(path: InProcess, uri: str) -> JSON:
    background = Background()
    for name, run in path.pipeline.authz.background():
        background.add(name, run)
    await background.start()
    meta = {META_VERSION: MODERN_VERSION, META_CAPABILITIES: {}}
    params = {"notifications": {"resourceSubscriptions": [uri]}, "_meta": meta}
    message = {"jsonrpc": "2.0", "id": 9, "method": SUBSCRIPTIONS_LISTEN, "params": params}
    exchange = Exchange(message, Era.MODERN, MODERN_VERSION, "default", "127.0.0.1:4000")
    exchange.headers = {"authorization": CLIENT_TOKEN, "mcp-protocol-version": MODERN_VERSION}
    exchange.url = "http://127.0.0.1:8080/mcp"
    try:
        answer = await path.pipeline.handle(exchange, path.route)
        assert answer is not None
        if answer.rest is not None:
            await answer.rest.aclose()
        return answer.first
    finally:
        await background.stop()


def _upstream(path: InProcess) -> list[tuple[object, ...]]:
    return [e for e in path.log if e[0] == "upstream"]


def test_an_unknown_uri_never_goes_upstream_with_the_callers_credential(path: InProcess) -> None:
    # The attack: a listen naming made-up URIs made the gateway list every upstream's
    # resources with a credential minted for the caller, before any decision about them.
    reply = asyncio.run(_listen(path, "workspace://made-up/x"))
    assert [e for e in _upstream(path) if e[3] == CALLER] == []
    assert reply["error"]["message"].startswith("resource not found: 'workspace://made-up/x'")


def test_an_unknown_uri_is_learnt_as_the_gateway_then_subscribed(path: InProcess) -> None:
    _wire_learning(path)
    reply = asyncio.run(_listen(path, KNOWN))
    assert reply["method"] == SUBSCRIPTIONS_ACKNOWLEDGED
    listed = [e for e in _upstream(path) if e[1] == "resources/list"]
    assert listed and all(e[3] == GATEWAY for e in listed)
    assert all(e[3] != CALLER for e in _upstream(path) if e[1] != SUBSCRIPTIONS_LISTEN)


def test_a_uri_still_unknown_after_learning_refuses_the_listen(path: InProcess) -> None:
    _wire_learning(path)
    reply = asyncio.run(_listen(path, "workspace://nowhere"))
    assert reply["error"]["code"] == -32602
    assert "resource not found: 'workspace://nowhere'" in reply["error"]["message"]
    assert all(e[3] != CALLER for e in _upstream(path))
