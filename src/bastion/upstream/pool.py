"""Every configured upstream: HTTP pools, stdio processes and launched demo servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from urllib.parse import urlsplit

from bastion.config import HttpUpstream, Settings, StdioUpstream
from bastion.errors import UpstreamError
from bastion.types import JSON, LEGACY_VERSIONS
from bastion.upstream.base import Channel
from bastion.upstream.http import HttpClient, LegacyHttpChannel, ModernHttpChannel
from bastion.upstream.stdio import StdioChannel, StdioProcess, expand

log = logging.getLogger("bastion.upstream")

_GATEWAY_HELLO: JSON = {
    "protocolVersion": LEGACY_VERSIONS[0],
    "capabilities": {},
    "clientInfo": {"name": "bastion", "version": "0.1.0"},
}


class Upstreams:
    """Hands out channels to upstreams; owns their connections and processes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._http = {
            name: HttpClient(name, up)
            for name, up in settings.upstreams.items()
            if isinstance(up, HttpUpstream)
        }
        self._processes: dict[tuple[str, str], StdioProcess] = {}
        self._pooled: dict[tuple[str, str], Channel] = {}
        self._pool_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._launched: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        """Launch the HTTP upstreams the config says to start, and wait until they listen."""
        for name, upstream in self.settings.upstreams.items():
            if isinstance(upstream, HttpUpstream) and upstream.launch:
                await self._launch(name, upstream)

    async def _launch(self, name: str, upstream: HttpUpstream) -> None:
        url = urlsplit(upstream.url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        if await _listening(host, port):
            # Otherwise the gateway would talk to whatever already holds the port.
            raise UpstreamError(f"cannot launch upstream {name!r}: {host}:{port} is already in use")
        base = self.settings.base_url()
        command = [expand(part, "").replace("{bastion}", base) for part in upstream.launch]
        proc = await asyncio.create_subprocess_exec(
            *command, cwd=upstream.cwd, env=dict(os.environ), stdin=asyncio.subprocess.DEVNULL
        )
        self._launched.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise UpstreamError(
                    f"launched upstream {name!r} exited with code {proc.returncode}"
                )
            if await _listening(host, port):
                log.info("launched upstream %r (pid %s) at %s", name, proc.pid, upstream.url)
                return
            await asyncio.sleep(0.05)
        raise UpstreamError(f"launched upstream {name!r} did not listen on {host}:{port} in 30 s")

    async def close(self) -> None:
        """Close every pool, process and launched server."""
        for channel in self._pooled.values():
            await channel.close()
        for client in self._http.values():
            await client.close()
        for process in self._processes.values():
            await process.close()
        for proc in self._launched:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(5):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

    def _process(self, name: str, tenant: str) -> StdioProcess:
        key = (name, tenant)
        process = self._processes.get(key)
        if process is None:
            settings = self.settings.upstreams[name]
            assert isinstance(settings, StdioUpstream)  # noqa: S101 - caller checked
            process = StdioProcess(name, settings, tenant)
            self._processes[key] = process
        return process

    async def session_channel(self, name: str, hello: JSON, tenant: str) -> Channel:
        """A channel for one legacy client session: its own upstream session over HTTP."""
        upstream = self.settings.upstreams[name]
        if isinstance(upstream, StdioUpstream):
            process = self._process(name, tenant)
            await process.ensure()
            return StdioChannel(process)
        client = self._http[name]
        if upstream.protocol == "modern":
            return ModernHttpChannel(client)
        return LegacyHttpChannel(client, hello)

    async def attach_channel(
        self, name: str, hello: JSON, tenant: str, attachment: JSON | None
    ) -> Channel:
        """A channel for a legacy client session another replica opened: joined to the same
        upstream session over HTTP (`attachment`); over stdio, this replica's process for the
        tenant; without an attachment (the upstream had not opened), a new one, as
        `session_channel` gives."""
        upstream = self.settings.upstreams[name]
        if (
            attachment is None
            or isinstance(upstream, StdioUpstream)
            or upstream.protocol == "modern"
        ):
            return await self.session_channel(name, hello, tenant)
        return LegacyHttpChannel.attached(self._http[name], hello, attachment)

    async def stateless_channel(self, name: str, tenant: str) -> Channel:
        """A channel for 2026-07-28 requests: stateless when the upstream is modern, else a
        legacy session pooled per tenant (never shared across tenants)."""
        upstream = self.settings.upstreams[name]
        if isinstance(upstream, StdioUpstream):
            process = self._process(name, tenant)
            await process.ensure()
            return StdioChannel(process)
        key = (name, tenant)
        channel = self._pooled.get(key)
        if channel is not None:
            return channel
        # The era probe awaits: without the lock, first requests arriving together would each
        # make a channel, and all but the last one stored would leak.
        async with self._pool_locks.setdefault(key, asyncio.Lock()):
            channel = self._pooled.get(key)
            if channel is None:
                channel = await self._new_channel(name)
                self._pooled[key] = channel
        return channel

    async def _new_channel(self, name: str) -> Channel:
        client = self._http[name]
        if await client.supports_modern():
            return ModernHttpChannel(client)
        return LegacyHttpChannel(client, _GATEWAY_HELLO)


async def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections at host:port."""
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
