"""The benchmark's load generator: a child process driven by bench/run.py.

It reads one JSON command per line on stdin and answers one JSON line on stdout. A phase
command makes a fresh pooled aiohttp session, opens it with warm-up calls at the phase's
concurrency, samples the server processes' CPU time from /proc, runs the measured calls
(sequential or N workers), samples CPU again, and reports latency percentiles, throughput,
CPU per call and errors. Every response is checked: HTTP 200, a JSON-RPC result for the
request's id, isError false, and the text echoed back.

Commands::

    {"cmd": "phase", "url": ..., "era": "modern"|"legacy", "calls": N, "concurrency": C,
     "warmup": W, "timeout": seconds, "pids": {"label": pid, ...}}
    {"cmd": "quit"}

Run it by hand for a quick probe: ``echo '{"cmd":"phase",...}' | python bench/load.py``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import math
import os
import sys
import time
from typing import Any

import aiohttp
import orjson

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
MODERN_HEADERS = {
    "Content-Type": "application/json",
    "Accept": ACCEPT,
    "MCP-Protocol-Version": MODERN,
    "Mcp-Method": "tools/call",
    "Mcp-Name": "echo",
}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
}
CALL_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)
MAX_ERROR_SAMPLES = 5
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str) -> float | None:
    """User + system CPU time of a process (all its threads) from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class Phase:
    """One measured phase against one target."""

    def __init__(self, cmd: dict[str, Any]) -> None:
        self.url: str = cmd["url"]
        self.era: str = cmd["era"]
        self.calls: int = int(cmd["calls"])
        self.concurrency: int = max(1, int(cmd["concurrency"]))
        self.warmup: int = int(cmd.get("warmup", 0))
        self.timeout: float = float(cmd["timeout"])
        self.pids: dict[str, int] = cmd.get("pids", {})
        self.headers: dict[str, str] = dict(MODERN_HEADERS)
        self.session_id: str | None = None
        self.latencies: list[int] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self._ids = itertools.count(1)

    # -- one call ---------------------------------------------------------------------------

    def _body(self, request_id: int, text: str) -> bytes:
        params: dict[str, Any] = {"name": "echo", "arguments": {"text": text}}
        if self.era == "modern":
            params["_meta"] = MODERN_META
        return orjson.dumps(
            {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
        )

    async def call(self, session: aiohttp.ClientSession, record: bool) -> None:
        request_id = next(self._ids)
        text = f"bench {request_id}"
        body = self._body(request_id, text)
        try:
            start = time.perf_counter_ns()
            async with session.post(self.url, data=body, headers=self.headers) as response:
                data = await response.read()
            elapsed = time.perf_counter_ns() - start
            problem = _check(response.status, response.content_type, data, request_id, text)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none ends the run
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            if record:
                self.latencies.append(elapsed)
            return
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(problem[:300])

    async def batch(self, session: aiohttp.ClientSession, count: int, record: bool) -> None:
        """`count` calls, one after another (concurrency 1) or spread over workers."""
        if self.concurrency == 1:
            for _ in range(count):
                await self.call(session, record)
            return
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await self.call(session, record)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, count))))

    # -- legacy handshake -------------------------------------------------------------------

    async def open_legacy(self, session: aiohttp.ClientSession) -> None:
        """initialize once, then notifications/initialized; keep the Mcp-Session-Id if any."""
        hello = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": LEGACY,
                "capabilities": {},
                "clientInfo": {"name": "bastion-bench", "version": "0.1.0"},
            },
        }
        base = {"Content-Type": "application/json", "Accept": ACCEPT}
        async with session.post(self.url, data=orjson.dumps(hello), headers=base) as response:
            data = await response.read()
            if response.status != 200:
                raise RuntimeError(f"initialize: HTTP {response.status}: {data[:200]!r}")
            self.session_id = response.headers.get("Mcp-Session-Id")
        self.headers = {**base, "MCP-Protocol-Version": LEGACY}
        if self.session_id is not None:
            self.headers["Mcp-Session-Id"] = self.session_id
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with session.post(self.url, data=orjson.dumps(note), headers=self.headers) as resp:
            await resp.read()
            if resp.status != 202:
                raise RuntimeError(f"notifications/initialized: HTTP {resp.status}")

    async def close_legacy(self, session: aiohttp.ClientSession) -> None:
        if self.session_id is None:
            return
        try:
            async with asyncio.timeout(5):
                async with session.delete(self.url, headers=self.headers) as response:
                    await response.read()
        except (aiohttp.ClientError, TimeoutError):
            pass

    # -- the phase --------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=CALL_TIMEOUT) as session:
            try:
                async with asyncio.timeout(self.timeout):
                    if self.era == "legacy":
                        await self.open_legacy(session)
                    # Warm-up at the phase's concurrency opens every pooled connection.
                    await self.batch(session, max(self.warmup, self.concurrency), record=False)
            except TimeoutError:
                return {"ok": False, "fatal": f"warm-up exceeded {self.timeout:g} s"}
            except Exception as exc:  # noqa: BLE001
                return {"ok": False, "fatal": f"setup failed: {type(exc).__name__}: {exc}"}
            warm_errors, self.errors = self.errors, 0
            warm_samples, self.error_samples = self.error_samples, []
            gc.collect()
            cpu_before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
            own_before = cpu_seconds("self")
            start = time.perf_counter()
            timed_out = False
            try:
                async with asyncio.timeout(self.timeout):
                    await self.batch(session, self.calls, record=True)
            except TimeoutError:
                timed_out = True
            wall = time.perf_counter() - start
            own_after = cpu_seconds("self")
            cpu_after = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
            if self.era == "legacy":
                await self.close_legacy(session)
        done = len(self.latencies)
        missing = self.calls - done - self.errors
        errors = self.errors + max(0, missing)
        ordered = sorted(ns / 1e6 for ns in self.latencies)
        cpu_ms: dict[str, float | None] = {}
        for name in self.pids:
            before, after = cpu_before[name], cpu_after[name]
            cpu_ms[name] = None if before is None or after is None else (after - before) * 1e3
        per_call = {
            name: (None if ms is None or not self.calls else ms / self.calls)
            for name, ms in cpu_ms.items()
        }
        client_ms = (
            (own_after - own_before) * 1e3
            if own_after is not None and own_before is not None
            else None
        )
        return {
            "ok": errors == 0 and not timed_out,
            "calls": self.calls,
            "succeeded": done,
            "errors": errors,
            "error_samples": self.error_samples,
            "timed_out": timed_out,
            "warmup_calls": max(self.warmup, self.concurrency),
            "warmup_errors": warm_errors,
            "warmup_error_samples": warm_samples,
            "concurrency": self.concurrency,
            "session_id": self.session_id is not None,
            "wall_s": wall,
            "calls_per_s": done / wall if wall > 0 else math.nan,
            "p50_ms": percentile(ordered, 0.50),
            "p90_ms": percentile(ordered, 0.90),
            "p99_ms": percentile(ordered, 0.99),
            "mean_ms": sum(ordered) / done if done else math.nan,
            "min_ms": ordered[0] if ordered else math.nan,
            "max_ms": ordered[-1] if ordered else math.nan,
            "cpu_ms": cpu_ms,
            "cpu_ms_per_call": per_call,
            "client_cpu_ms_per_call": (
                client_ms / self.calls if client_ms is not None and self.calls else None
            ),
        }


def _check(status: int, ctype: str, data: bytes, request_id: int, text: str) -> str | None:
    """None when the answer is a successful echo of `text` for `request_id`, else why not."""
    if status != 200:
        return f"HTTP {status}: {data[:200]!r}"
    try:
        if ctype == "text/event-stream":
            message = None
            for line in data.split(b"\n"):
                if line.startswith(b"data:"):
                    candidate = orjson.loads(line[5:])
                    if isinstance(candidate, dict) and candidate.get("id") == request_id:
                        message = candidate
            if message is None:
                return f"SSE answer without a response: {data[:200]!r}"
        else:
            message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return f"not JSON ({ctype}): {data[:200]!r}"
    if not isinstance(message, dict) or message.get("id") != request_id:
        return f"wrong id: {data[:200]!r}"
    result = message.get("result")
    if not isinstance(result, dict) or result.get("isError"):
        return f"not a successful result: {data[:200]!r}"
    content = result.get("content")
    if not content or content[0].get("text") != text:
        return f"echo mismatch: {data[:200]!r}"
    return None


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main() -> int:
    with _runner() as runner:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd.get("cmd") == "quit":
                break
            if cmd.get("cmd") == "ping":
                reply: dict[str, Any] = {"ok": True}
            elif cmd.get("cmd") == "phase":
                reply = runner.run(Phase(cmd).run())
            else:
                reply = {"ok": False, "fatal": f"unknown command {cmd.get('cmd')!r}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
