"""Agents' last-use times: noted in memory on the request path, written to the registry here.

Access reviews ask which agents are still used, so every gateway records when it last let each
agent in (a request that passed authentication, or a token issued). A request only writes a
dict entry in the `RegistryView`; this recorder, one of the gateway's services, takes the notes
every few seconds and writes them in one registry transaction in a worker thread, and once more
when the gateway stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from bastion.control.registry.agents import Registry
from bastion.control.registry.view import RegistryView
from bastion.errors import RegistryError

log = logging.getLogger("bastion.registry")

FLUSH_SECONDS = 2.0


class UsageRecorder:
    """Writes the view's last-use notes to the registry in batches, off the request path."""

    def __init__(
        self, view: RegistryView, registry: Registry, interval: float = FLUSH_SECONDS
    ) -> None:
        self._view = view
        self._registry = registry
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin flushing every `interval` seconds (a gateway service hook)."""
        self._task = asyncio.create_task(self._run(), name="bastion-usage-recorder")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop the periodic flush, then write what is left, waiting up to `grace` seconds
        for another writer (a gateway service hook)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.flush(wait=True), grace)
        except (TimeoutError, RegistryError) as exc:
            log.warning("last-use times not written at shutdown: %s", exc)

    async def flush(self, *, wait: bool = False) -> int:
        """Write the notes taken since the last flush; how many agents' times were written
        (notes a busy database refused stay in the registry's buffer for the next round)."""
        uses = self._view.take_uses()
        return await asyncio.to_thread(self._write, uses, wait)

    def _write(self, uses: dict[str, float], wait: bool) -> int:
        for agent_id, when in uses.items():
            self._registry.touch(agent_id, when)
        return self._registry.flush_touches(wait=wait)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except RegistryError as exc:  # the registry is unreachable: try again next round
                log.warning("last-use times not written yet: %s", exc)
