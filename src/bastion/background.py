"""Background work: what the gateway keeps current beside the request path.

The request path reads immutable snapshots (the registry view, the signing keys, the policy
engine, the routes' resource indexes) and never does the I/O that refreshes them. That I/O
runs here, in tasks one owner starts and stops:

```
Background ─┬─► Refresher  one job, every N seconds and whenever asked (registry, keys,
            │              policy files, idle sessions)
            └─► Jobs       on-demand work per key, deduplicated (relisting an upstream,
                           learning a route's resource URIs)
```

A request that needs fresher data *asks* and waits with a deadline; the work itself runs in
the background task, once for every asker at the same time. Nothing here imports the rest of
Bastion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("bastion.background")

Round = Callable[[], Awaitable[bool]]  # one round of a refresher: True when it changed something
Hook = Callable[[], Awaitable[None]]  # what follows a round that changed something
Work = Callable[[], Awaitable[None]]  # one run of an on-demand job
_RESTART_SECONDS = 1.0


class Refresher:
    """One piece of background work, run every `every` seconds (from the start, when set)
    and whenever asked. Rounds never overlap; `gap` seconds at least separate two rounds, so
    that a flood of asks costs one round per gap. A failing round is logged when it starts
    failing and when it recovers, then tried again at the next turn."""

    def __init__(
        self,
        name: str,
        work: Round,
        every: float | None = None,
        gap: float = 0.0,
    ) -> None:
        self.name = name
        self._work = work
        self._every = every
        self._gap = gap
        self._hooks: list[Hook] = []
        self._wake: asyncio.Event | None = None
        self._upcoming: asyncio.Future[bool] | None = None  # resolved when the next round ends
        self._failing = False
        self.running = False
        self.rounds = 0

    def after_change(self, hook: Hook) -> None:
        """Run `hook` after every round that changed something (inside the round, so that an
        `ask` returns only once the hook has run too)."""
        self._hooks.append(hook)

    async def ask(self, within: float) -> bool:
        """Have a round start after this call and wait until it ended, at most `within`
        seconds. False when none ended in time, or when nothing runs this refresher."""
        if not self.running or self._wake is None:
            return False
        if self._upcoming is None:
            self._upcoming = asyncio.get_running_loop().create_future()
        upcoming = self._upcoming
        self._wake.set()
        try:
            async with asyncio.timeout(within):
                return await asyncio.shield(upcoming)
        except TimeoutError:
            return False

    async def run(self) -> None:
        """The loop; runs until cancelled (by the gateway's `Background`)."""
        self._wake = asyncio.Event()
        self.running = True
        try:
            first = self._every is not None  # a periodic job's first round runs at once
            while True:
                if not first:
                    await self._turn()
                first = False
                await self._round()
                if self._gap:
                    await asyncio.sleep(self._gap)  # pacing, not synchronisation
        finally:
            self.running = False
            if self._upcoming is not None and not self._upcoming.done():
                self._upcoming.set_result(False)
            self._upcoming = None

    async def _turn(self) -> None:
        """Wait until asked, or until the period ends."""
        assert self._wake is not None  # noqa: S101 - set by run()
        if self._every is None:
            await self._wake.wait()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._every):
                    await self._wake.wait()
        self._wake.clear()

    async def _round(self) -> None:
        waiting, self._upcoming = self._upcoming, None
        ended = False
        try:
            if await self._work():
                for hook in self._hooks:
                    await hook()
            ended = True
            if self._failing:
                log.info("background %s works again", self.name)
                self._failing = False
        except Exception as exc:  # noqa: BLE001 - logged once per outage, tried again
            ended = True
            if not self._failing:
                log.warning("background %s failed: %s (trying again)", self.name, exc)
                log.debug("background %s failed", self.name, exc_info=True)
            self._failing = True
        finally:
            self.rounds += 1
            if waiting is not None and not waiting.done():
                waiting.set_result(ended)


class Jobs:
    """On-demand background work, one run per key at a time: an ask for a key whose run is
    in flight joins it. At most `limit` keys wait or run at once; beyond, asks are refused."""

    def __init__(self, name: str, limit: int = 256) -> None:
        self.name = name
        self._limit = limit
        self._queue: asyncio.Queue[tuple[str, Work]] | None = None
        self._inflight: dict[str, asyncio.Future[bool]] = {}
        self.running = False

    async def ask(self, key: str, work: Work, within: float) -> bool:
        """Run `work` for `key` in the background (or join the run in flight) and wait for it
        at most `within` seconds. True when a run ended in time (whatever it found); False
        when it did not, when too many keys are in flight, or when nothing runs the jobs."""
        if not self.running or self._queue is None:
            return False
        future = self._inflight.get(key)
        if future is None:
            if len(self._inflight) >= self._limit:
                log.warning(
                    "background %s: %d jobs in flight; %r refused",
                    self.name,
                    len(self._inflight),
                    key,
                )
                return False
            future = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
            self._queue.put_nowait((key, work))
        try:
            async with asyncio.timeout(within):
                return await asyncio.shield(future)
        except TimeoutError:
            return False

    async def run(self) -> None:
        """The loop: each asked job in its own task of one task group; runs until cancelled."""
        self._queue = asyncio.Queue()
        self.running = True
        try:
            async with asyncio.TaskGroup() as group:
                while True:
                    key, work = await self._queue.get()
                    group.create_task(self._one(key, work), name=f"bastion-{self.name}-{key}")
        finally:
            self.running = False
            for future in self._inflight.values():
                if not future.done():
                    future.set_result(False)
            self._inflight.clear()
            self._queue = None

    async def _one(self, key: str, work: Work) -> None:
        ended = False
        try:
            await work()
            ended = True
        except Exception:  # noqa: BLE001 - a job's failure is its askers' to see, not the group's
            ended = True
            log.exception("background %s: job %r failed", self.name, key)
        finally:
            future = self._inflight.pop(key, None)
            if future is not None and not future.done():
                future.set_result(ended)


class Background:
    """The owner of the gateway's background tasks: `start` launches each job, `stop`
    cancels and awaits every one. A job that ends or fails is logged and started again after
    a second; nothing outlives `stop`, nothing is fire-and-forget."""

    def __init__(self) -> None:
        self._jobs: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Own one more job (a refresher's or a job runner's `run`); before `start`."""
        self._jobs.append((name, run))

    @property
    def names(self) -> list[str]:
        """The jobs owned, in the order they start."""
        return [name for name, _ in self._jobs]

    async def start(self) -> None:
        """Launch every job; when this returns, each has begun (and can be asked)."""
        for name, run in self._jobs:
            self._tasks.append(asyncio.create_task(self._keep(name, run), name=f"bastion-{name}"))
        # Tasks run their first step in creation order, before this one resumes: each job is
        # marked running before the gateway serves its first request.
        await asyncio.sleep(0)

    async def stop(self) -> None:
        """Cancel every job and wait until each has ended."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keep(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while True:
            started = time.monotonic()
            try:
                await run()
                log.error("background job %s ended; starting it again", name)
            except Exception:
                log.exception("background job %s failed; starting it again", name)
            # Never a hot loop, however quickly the job fails.
            await asyncio.sleep(max(0.0, _RESTART_SECONDS - (time.monotonic() - started)))
