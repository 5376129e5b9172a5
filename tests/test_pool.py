"""The upstream pool: one pooled channel per (upstream, tenant), even under concurrent first
requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.conftest import free_port

from bastion import config
from bastion.upstream.pool import Upstreams


@pytest.fixture
async def upstreams(tmp_path: Path) -> AsyncIterator[Upstreams]:
    # Nothing listens on the port: the era probe fails (after a real wait on the socket), so
    # the pool falls back to a legacy channel. The channel opens no connection until used.
    text = f"""
listen: {{host: 127.0.0.1, port: {free_port()}}}
auth: {{mode: none, tenant: acme, agent: test-agent}}
upstreams:
  slow:
    transport: http
    url: http://127.0.0.1:{free_port()}/mcp
"""
    pool = Upstreams(config.parse(text, base=tmp_path))
    yield pool
    await pool.close()


async def test_concurrent_first_requests_share_one_channel(upstreams: Upstreams) -> None:
    """Twenty first requests of one tenant arrive together: before the fix each awaited the
    era probe between its cache check and its insert, so each made its own channel and all but
    the last one inserted leaked (never closed, never reused)."""
    channels = await asyncio.gather(
        *(upstreams.stateless_channel("slow", "acme") for _ in range(20))
    )
    assert len({id(channel) for channel in channels}) == 1
    assert await upstreams.stateless_channel("slow", "acme") is channels[0]


async def test_tenants_never_share_a_pooled_channel(upstreams: Upstreams) -> None:
    acme, globex = await asyncio.gather(
        upstreams.stateless_channel("slow", "acme"),
        upstreams.stateless_channel("slow", "globex"),
    )
    assert acme is not globex
