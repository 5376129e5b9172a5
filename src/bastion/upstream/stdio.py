"""Stdio upstreams: a subprocess per (upstream, tenant), restarted with backoff when it dies.

One process serves every conversation of its tenant, so the process remaps request ids and
progress tokens to its own and routes what the server says back to whoever asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import orjson

from bastion.config import StdioUpstream
from bastion.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from bastion.methods import INITIALIZE, INITIALIZED, PROGRESS, SERVER_DISCOVER
from bastion.types import JSON, LEGACY_VERSIONS, PROBE_META, Era
from bastion.upstream.base import (
    Answer,
    answer_from,
    message_problem,
    response_for,
    speaks_modern,
    usable_id,
)

log = logging.getLogger("bastion.upstream.stdio")

MAX_LINE_BYTES = 16 * 1024 * 1024
# How long a starting server may take to answer initialize, at least: a cold start on a busy
# machine (a Python server importing its SDK) can outlast a request's deadline, and a start
# given up would be spawned again just as cold.
START_SECONDS = 30.0
_GATEWAY_CAPABILITIES: JSON = {"sampling": {}, "elicitation": {}, "roots": {"listChanged": True}}


def expand(value: str, tenant: str) -> str:
    """Fill the placeholders a stdio command or env value may use."""
    return value.replace("{python}", sys.executable).replace("{tenant}", tenant)


class StdioProcess:
    """One running server process and the routing of its messages."""

    def __init__(self, name: str, settings: StdioUpstream, tenant: str) -> None:
        self.name = name
        self.settings = settings
        self.tenant = tenant
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._write_lock = asyncio.Lock()
        # The start under way (spawn and handshake), owned here rather than by the request
        # that began it: a request that stops waiting must not leave a half-started process.
        self._starting: asyncio.Task[None] | None = None
        self._ready: asyncio.subprocess.Process | None = None  # the process whose handshake ran
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[JSON | BaseException]] = {}
        self._tokens: dict[str, tuple[Any, asyncio.Queue[JSON | BaseException]]] = {}
        self._listeners: set[asyncio.Queue[JSON]] = set()
        self._backoff = settings.restart.initial_seconds
        self._not_before = 0.0
        self.initialized: JSON | None = None
        self.modern: bool | None = (
            None if settings.protocol == "auto" else (settings.protocol == "modern")
        )
        self.exits = 0

    @property
    def running(self) -> bool:
        """Whether the process is up."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def ready(self) -> bool:
        """Whether the process is up and its handshake done."""
        return self.running and self._ready is self._proc

    async def ensure(self) -> None:
        """Start the process (and its handshake) unless it is ready; honour the backoff.

        A request waits for a start at most the upstream's `timeout_seconds`; the start itself
        goes on, so a server slow to come up (a cold start on a busy machine) serves the next
        request instead of being started again.
        """
        if self.ready:
            return
        start = self._starting
        if start is None or start.done():
            start = self._starting = asyncio.create_task(
                self._start(), name=f"stdio-{self.name}-start"
            )
            start.add_done_callback(_observed)
        limit = self.settings.timeout_seconds
        try:
            async with asyncio.timeout(limit):
                await asyncio.shield(start)
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream {self.name!r} did not finish starting within {limit:g} s"
            ) from None

    async def _start(self) -> None:
        """Spawn the process and run its handshake; a failed handshake ends the process."""
        wait = self._not_before - time.monotonic()
        if wait > self.settings.timeout_seconds:
            raise UpstreamUnavailable(
                f"upstream {self.name!r} exited; next restart in {wait:.1f} s"
            )
        if wait > 0:
            await asyncio.sleep(wait)
        await self._spawn()
        proc = self._proc
        try:
            await self._handshake()
        except BaseException:
            # Never leave a process running that was not initialized: it would be taken for
            # a ready one.
            if proc is not None and proc.returncode is None:
                proc.kill()
            raise
        self._ready = proc

    async def _spawn(self) -> None:
        env = {k: os.environ[k] for k in self.settings.env_passthrough if k in os.environ}
        env.update({k: expand(v, self.tenant) for k, v in self.settings.env.items()})
        command = [expand(part, self.tenant) for part in self.settings.command]
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=self.settings.cwd,
                limit=MAX_LINE_BYTES,
            )
        except OSError as exc:
            self._schedule_restart()
            raise UpstreamUnavailable(f"upstream {self.name!r} could not start: {exc}") from exc
        self.initialized = None
        proc = self._proc
        self._tasks = [
            asyncio.create_task(self._read_stdout(proc), name=f"stdio-{self.name}-out"),
            asyncio.create_task(self._read_stderr(proc), name=f"stdio-{self.name}-err"),
        ]
        log.info("started upstream %r for tenant %r (pid %s)", self.name, self.tenant, proc.pid)

    async def _handshake(self) -> None:
        if self.modern is None:
            self.modern = await self._probe_modern()
        if self.modern:
            return
        params = {
            "protocolVersion": LEGACY_VERSIONS[0],
            "capabilities": _GATEWAY_CAPABILITIES,
            "clientInfo": {"name": "bastion", "version": "0.1.0"},
        }
        reply = await self._call(
            {"jsonrpc": "2.0", "id": 0, "method": INITIALIZE, "params": params},
            limit=max(self.settings.timeout_seconds, START_SECONDS),
        )
        result = reply.get("result")
        if not isinstance(result, dict):
            raise UpstreamError(f"upstream {self.name!r} refused initialize")
        self.initialized = result
        await self.write({"jsonrpc": "2.0", "method": INITIALIZED})

    async def _probe_modern(self) -> bool:
        probe = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": SERVER_DISCOVER,
            "params": {"_meta": PROBE_META},
        }
        try:
            reply = await self._call(probe, limit=min(5.0, self.settings.timeout_seconds))
        except UpstreamError:
            return False
        return speaks_modern(reply)

    async def _call(self, message: JSON, limit: float | None = None) -> JSON:
        async for reply in self.request(message, direct=True, limit=limit):
            if "method" not in reply:
                return reply
        raise UpstreamError(f"upstream {self.name!r} gave no answer")

    async def request(
        self,
        message: JSON,
        *,
        direct: bool = False,
        limit: float | None = None,
        inflight: dict[Any, Any] | None = None,
    ) -> AsyncGenerator[JSON, None]:
        """Send a request under a fresh id; yield related messages, then the response."""
        if not direct:
            await self.ensure()
        upstream_id = next(self._ids)
        if inflight is not None:
            inflight[message["id"]] = upstream_id
        queue: asyncio.Queue[JSON | BaseException] = asyncio.Queue()
        self._pending[upstream_id] = queue
        outgoing = dict(message)
        outgoing["id"] = upstream_id
        token = _progress_token(message)
        if token is not None:
            mapped = f"{upstream_id}"
            self._tokens[mapped] = (token, queue)
            outgoing["params"] = _with_token(message["params"], mapped)
        limit = limit if limit is not None else self.settings.timeout_seconds
        try:
            await self.write(outgoing)
            while True:
                try:
                    async with asyncio.timeout(limit):
                        item = await queue.get()
                except TimeoutError as exc:
                    if direct:
                        raise UpstreamTimeout(f"upstream {self.name!r} did not answer") from exc
                    raise UpstreamTimeout(
                        f"upstream {self.name!r} sent nothing for {limit:g} s"
                    ) from exc
                if isinstance(item, BaseException):
                    raise item
                if "method" not in item and item.get("id") == upstream_id:
                    yield response_for(item, message["id"], self.name)
                    self._backoff = self.settings.restart.initial_seconds
                    return
                yield item
        finally:
            if inflight is not None:
                inflight.pop(message["id"], None)
            self._pending.pop(upstream_id, None)
            if token is not None:
                self._tokens.pop(f"{upstream_id}", None)

    async def write(self, message: JSON) -> None:
        """Write one line to the process."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise UpstreamUnavailable(f"upstream {self.name!r} is not running")
        async with self._write_lock:
            try:
                proc.stdin.write(orjson.dumps(message) + b"\n")
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise UpstreamUnavailable(f"upstream {self.name!r} closed its input") from exc

    def listen(self) -> asyncio.Queue[JSON]:
        """A queue receiving what the server sends unasked (list changes, updates)."""
        queue: asyncio.Queue[JSON] = asyncio.Queue(maxsize=1024)
        self._listeners.add(queue)
        return queue

    def unlisten(self, queue: asyncio.Queue[JSON]) -> None:
        """Stop delivering to a listener queue."""
        self._listeners.discard(queue)

    async def _read_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None  # noqa: S101 - created with PIPE
        try:
            while True:
                try:
                    line = await proc.stdout.readline()
                except ValueError:
                    self._fail_all(UpstreamError(f"upstream {self.name!r} sent a line over 16 MiB"))
                    continue
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    message = orjson.loads(line)
                except orjson.JSONDecodeError:
                    log.warning("upstream %r wrote a non-JSON line to stdout", self.name)
                    self._fail_all(UpstreamError(f"upstream {self.name!r} sent invalid JSON"))
                    continue
                if isinstance(message, dict):
                    self._route(message)
        finally:
            code = await proc.wait()
            self.exits += 1
            log.warning("upstream %r (tenant %r) exited with code %s", self.name, self.tenant, code)
            # Unless a later start has replaced this process already (its requests are not
            # this one's to fail): fail what waits on it, and restart it unless it was closed.
            if self._proc is proc or self._proc is None:
                self._fail_all(
                    UpstreamUnavailable(f"upstream {self.name!r} exited with code {code}")
                )
            if self._proc is proc:
                self._schedule_restart()

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None  # noqa: S101 - created with PIPE
        with contextlib.suppress(ValueError):
            async for line in proc.stderr:
                log.info("[%s] %s", self.name, line.decode(errors="replace").rstrip())

    def _route(self, message: JSON) -> None:
        problem = message_problem(message)
        if problem is not None:
            log.warning("upstream %r sent %s; dropped", self.name, problem)
            return
        if "method" not in message:
            id_ = message.get("id")
            queue = self._pending.get(id_) if usable_id(id_) else None  # type: ignore[arg-type]
            if queue is not None:
                queue.put_nowait(message)
            return
        params = message.get("params") or {}
        token = params.get("progressToken") if message["method"] == PROGRESS else None
        if token is not None and str(token) in self._tokens:
            original, queue = self._tokens[str(token)]
            out = dict(message)
            out["params"] = {**params, "progressToken": original}
            queue.put_nowait(out)
            return
        if "id" in message and len(self._pending) == 1:
            # A server request while exactly one call is in flight belongs to that call.
            next(iter(self._pending.values())).put_nowait(message)
            return
        for listener in list(self._listeners):
            with contextlib.suppress(asyncio.QueueFull):
                listener.put_nowait(message)

    def _fail_all(self, exc: BaseException) -> None:
        for queue in self._pending.values():
            queue.put_nowait(exc)

    def _schedule_restart(self) -> None:
        self._not_before = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.settings.restart.max_seconds)
        self._proc = None
        self.initialized = None

    async def close(self) -> None:
        """Terminate the process, a start under way, and its reader tasks."""
        start, self._starting = self._starting, None
        if start is not None and not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await start
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.terminate()
            try:
                async with asyncio.timeout(3):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []


def _observed(task: asyncio.Task[None]) -> None:
    """Take a start's failure, which every waiter has seen (or none was left to see)."""
    if not task.cancelled():
        task.exception()


def _progress_token(message: JSON) -> Any:
    params = message.get("params")
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    return meta.get("progressToken") if isinstance(meta, dict) else None


def _with_token(params: JSON, token: str) -> JSON:
    return {**params, "_meta": {**params["_meta"], "progressToken": token}}


class StdioChannel:
    """A conversation over a shared stdio process."""

    def __init__(self, process: StdioProcess) -> None:
        self._process = process
        self.era = Era.MODERN if process.modern else Era.LEGACY
        self.inflight: dict[Any, Any] = {}

    async def open(self, headers: Mapping[str, str]) -> JSON | None:
        """The process's InitializeResult (legacy) or None (it speaks 2026-07-28)."""
        await self._process.ensure()
        return self._process.initialized

    async def call(self, message: JSON, headers: Mapping[str, str]) -> Answer:
        """Relay one request through the process."""
        replies = self._process.request(message, inflight=self.inflight)
        return await answer_from(replies, self._process.name)

    async def send(self, message: JSON, headers: Mapping[str, str]) -> None:
        """Write a notification or a response to a server request."""
        await self._process.ensure()
        await self._process.write(message)

    async def listen(self, headers: Mapping[str, str]) -> AsyncIterator[JSON]:
        """Yield what the process sends unasked, for as long as the caller reads."""
        await self._process.ensure()
        queue = self._process.listen()
        try:
            while True:
                yield await queue.get()
        finally:
            self._process.unlisten(queue)

    async def close(self, headers: Mapping[str, str] | None = None) -> None:
        """The process outlives one conversation; nothing to release here."""
