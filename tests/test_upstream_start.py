"""A virtual server's list while one of its stdio upstreams is slow to start.

A list request waits for the upstream's first start within the upstream's deadline
(`timeout_seconds`); when the start takes longer, the list says which upstream it lacks and
why (`_meta["bastion/unavailable"]`, and a warning in the log) and the start goes on, so a later
list has the upstream's items without a second start. The same holds when the policy catalog
missed the upstream at gateway start (listing it timed out): the list names it until policy has
listed it again. A partial list is never silent.

The slow server is `tests/fixtures/bad_stdio_upstream.py` held by a gate file per tenant: the
test opens the gate when it wants the start to end, so nothing here depends on how long a
start takes on this machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import FIXTURES, modern_body, modern_headers, until_async

from bastion import config
from bastion.app import Gateway
from bastion.pipeline.dispatch import META_UNAVAILABLE

QUICK = [f"quick__{n}" for n in ("crash", "garbage", "hang", "whoami", "env", "echo")]
SLOW = [f"slow__{n}" for n in ("crash", "garbage", "hang", "whoami", "env", "echo")]


def settings_for(tmp: Path, slow_timeout: float) -> config.Settings:
    """Two stdio upstreams behind /mcp; `slow` starts only once its tenant's gate is open."""
    fixture = FIXTURES / "bad_stdio_upstream.py"
    return config.parse(
        f"""
state_dir: {tmp / "state"}
auth: {{mode: none, tenant: acme, agent: tester}}
audit: {{enabled: false}}
policy:
  catalog_timeout_seconds: 1
  grants:
    - {{id: everything, tenant: "*", server: "*", tools: "*", prompts: "*", resources: "*"}}
upstreams:
  quick:
    transport: stdio
    command: ["{sys.executable}", "{fixture}"]
    env: {{BAD_TENANT: "{{tenant}}"}}
  slow:
    transport: stdio
    command: ["{sys.executable}", "{fixture}"]
    env:
      BAD_TENANT: "{{tenant}}"
      BAD_STARTS: "{tmp / "starts"}"
      BAD_GATE: "{tmp}/gate-{{tenant}}"
    timeout_seconds: {slow_timeout}
virtual_servers:
  v: {{path: /mcp, upstreams: [quick, slow]}}
"""
    )


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[list[Gateway]]:
    """Gateways a test starts; all stopped at its end."""
    gateways: list[Gateway] = []
    yield gateways
    for gateway in gateways:
        await gateway.stop()


async def start(gateways: list[Gateway], settings: config.Settings) -> Gateway:
    gateway = Gateway(settings)
    gateways.append(gateway)
    await gateway.start()
    return gateway


async def tools_list(gateway: Gateway, path: str = "/mcp") -> dict[str, Any]:
    """POST tools/list to `path` through the gateway's ASGI app; the result."""
    body = json.dumps(modern_body("tools/list")).encode()
    headers = [(k.lower().encode(), v.encode()) for k, v in modern_headers("tools/list").items()]
    headers.append((b"host", b"127.0.0.1"))
    sent: list[MutableMapping[str, Any]] = []
    delivered = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers,
        "client": ("127.0.0.1", 5555),
        "query_string": b"",
    }
    await gateway(scope, receive, send)
    assert sent[0]["status"] == 200
    answer = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert answer["jsonrpc"] == "2.0" and answer["id"] == 1
    result: dict[str, Any] = answer["result"]
    return result


def names(result: dict[str, Any]) -> list[str]:
    return [tool["name"] for tool in result["tools"]]


def missing(result: dict[str, Any]) -> dict[str, str]:
    """{upstream: why} for the upstreams the list says it lacks."""
    found = result.get("_meta", {}).get(META_UNAVAILABLE, [])
    return {entry["upstream"]: entry["reason"] for entry in found}


def starts(tmp: Path, tenant: str) -> int:
    path = tmp / "starts"
    return path.read_text().split().count(tenant) if path.exists() else 0


async def test_a_list_waits_for_a_slow_first_start(tmp_path: Path, started: list[Gateway]) -> None:
    (tmp_path / "gate-bastion").touch()  # policy's own listing starts at once
    gateway = await start(started, settings_for(tmp_path, slow_timeout=30))
    listing = asyncio.create_task(tools_list(gateway))
    # The client's server has started and waits at its gate: the list must be waiting too.
    await until_async(lambda: _now(starts(tmp_path, "acme") == 1), "the slow server's start")
    assert not listing.done()
    (tmp_path / "gate-acme").touch()
    result = await asyncio.wait_for(listing, 30)
    assert names(result) == QUICK + SLOW
    assert missing(result) == {}


async def test_a_start_past_the_deadline_is_named_then_served(
    tmp_path: Path, started: list[Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "gate-bastion").touch()
    gateway = await start(started, settings_for(tmp_path, slow_timeout=1))
    with caplog.at_level(logging.WARNING, logger="bastion.dispatch"):
        result = await tools_list(gateway)
    assert names(result) == QUICK
    assert missing(result) == {"slow": "upstream 'slow' did not finish starting within 1 s"}
    assert "'slow'" in caplog.text and "did not finish starting" in caplog.text
    (tmp_path / "gate-acme").touch()

    async def served() -> bool:
        return names(await tools_list(gateway)) == QUICK + SLOW

    await until_async(served, "the slow server's tools in the list")
    assert starts(tmp_path, "acme") == 1  # the start went on; it was not begun again


async def test_an_upstream_the_catalog_missed_at_start_is_named_until_listed(
    tmp_path: Path, started: list[Gateway]
) -> None:
    """The issue's case: policy lists every upstream at gateway start, a cold stdio server
    missed that listing, and its tools vanished from the merged list without a word."""
    (tmp_path / "gate-acme").touch()  # the client's own server is quick; policy's is not
    gateway = await start(started, settings_for(tmp_path, slow_timeout=30))
    result = await tools_list(gateway)
    assert names(result) == QUICK
    assert "not in the policy catalog yet" in missing(result)["slow"]
    alone = await tools_list(gateway, "/servers/slow/mcp")  # its own route says so too
    assert names(alone) == [] and "not in the policy catalog yet" in missing(alone)["slow"]
    (tmp_path / "gate-bastion").touch()

    async def listed() -> dict[str, Any] | None:
        found = await tools_list(gateway)
        return found if names(found) == QUICK + SLOW else None

    result = await until_async(listed, "the slow server's tools in the list")
    assert missing(result) == {}


def _now(value: bool) -> asyncio.Future[bool]:
    """An already-finished awaitable, for `until` over a plain condition."""
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
