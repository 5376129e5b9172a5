"""The benchmark's load generator: a child process driven by bench/run.py.

It reads one JSON command per line on stdin and answers one JSON line on stdout. A phase
command makes a fresh pooled aiohttp session, opens it with warm-up calls at the phase's
concurrency, samples the server processes' CPU time from /proc, runs the measured calls
(sequential or N workers), samples CPU again, and reports latency percentiles, throughput,
CPU per call and errors. Every response is checked: HTTP 200, a JSON-RPC result for the
request's id, isError false, and the text echoed back.

With an "auth" member the phase acts as an OAuth client of Bastion: before the warm-up it gets
one access token from the token endpoint (client_credentials, private_key_jwt with the agent's
key), then sends it on every call as `Authorization: Bearer`. With "scheme": "dpop" the token
is bound to a key this process made, and every call carries `Authorization: DPoP` and a NEW
DPoP proof; the proofs are made before the warm-up and again before the measured calls (not
while the clock runs: a proof costs the client an ES256 signature), so each is fresh (iat
well within Bastion's 60 s window) and unique (its own jti).

A token phase measures the token endpoint itself: it makes one unique client assertion per
request first, then posts them as `client_credentials` requests over C workers, checking that
each answer is HTTP 200 with an access_token.

Commands::

    {"cmd": "phase", "url": ..., "era": "modern"|"legacy", "calls": N, "concurrency": C,
     "warmup": W, "timeout": seconds, "pids": {"label": pid or [pid, ...], ...},
     "auth": null | {"scheme": "bearer"|"dpop", "token_url": ..., "issuer": ...,
                     "resource": ..., "agent": ..., "kid": ..., "pem": path},
     "tool": "echo" (the tool's name at the target), "headers": {...} (sent on every request)}
    {"cmd": "tokens", "token_url": ..., "issuer": ..., "resource": ..., "agent": ...,
     "kid": ..., "pem": path, "requests": N, "concurrency": C, "warmup": W,
     "timeout": seconds, "pids": {...}}
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
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson

from bastion.identity.dpop import make_proof
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey, generate

# Ordinary prose to pad an echo answer with (no ids, secrets or instructions: nothing for the
# inspection rules to find, which is the common case they must make cheap).
_FILLER = (
    "The quarterly plan covers the website relaunch, the onboarding revamp and the audit of "
    "checkout accessibility; each team reports progress weekly and flags risks early. "
) * 14000
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
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FORM = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
# Proofs older than this are remade rather than sent (Bastion accepts iat up to 60 s + 5 s).
PROOF_MAX_AGE_S = 40.0
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str | list[int]) -> float | None:
    """User + system CPU time of a process (all its threads) from /proc/PID/stat.

    A list of pids (a target made of several processes) gives their sum, or None when any of
    them is gone: a partial sum would understate the target's cost.
    """
    if isinstance(pid, list):
        parts = [cpu_seconds(one) for one in pid]
        return None if not parts or None in parts else sum(p for p in parts if p is not None)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


@dataclass(frozen=True)
class CpuSample:
    """CPU time of one or more processes at one moment, two ways.

    `ticks`: utime + stime from /proc/PID/stat (s; counts exited threads too; 10 ms steps).
    `threads`: each live thread's run time from /proc/PID/task/TID/schedstat (ns), or None
    where the kernel keeps no schedstat.
    """

    ticks: float | None
    threads: dict[tuple[int, int], int] | None


def _threads_ns(pid: int | str) -> dict[tuple[int, int], int] | None:
    owner = os.getpid() if pid == "self" else int(pid)
    found: dict[tuple[int, int], int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                found[(owner, int(tid))] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile: it is missing from this sample
    return found


def cpu_sample(pid: int | str | list[int]) -> CpuSample:
    """A CpuSample of a process, or of several (summed)."""
    pids = pid if isinstance(pid, list) else [pid]
    threads: dict[tuple[int, int], int] | None = {}
    for one in pids:
        part = _threads_ns(one)
        threads = None if part is None or threads is None else threads | part
    return CpuSample(cpu_seconds(pid), threads)


def cpu_ms_between(before: CpuSample, after: CpuSample) -> tuple[float | None, str]:
    """CPU ms spent between two samples, and how it was measured.

    To the nanosecond (schedstat) when no thread that ran before ended meanwhile (a thread
    born meanwhile spent all its time inside the interval); otherwise from the clock ticks,
    which keep the time of ended threads but step by 10 ms.
    """
    if before.ticks is None or after.ticks is None:
        return None, "gone"
    if before.threads is not None and after.threads is not None:
        if before.threads.keys() <= after.threads.keys():
            spent = sum(after.threads.values()) - sum(before.threads.values())
            return spent / 1e6, "schedstat"
    return (after.ticks - before.ticks) * 1e3, "ticks"


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# -- identity: the client side of Bastion's OAuth --------------------------------------------


class Agent:
    """A registered agent as its own client: its key, and client assertions signed with it."""

    def __init__(self, spec: dict[str, Any]) -> None:
        with open(spec["pem"], "rb") as f:
            self.key = SigningKey.from_pem(f.read(), spec["kid"], "ES256")
        self.id: str = spec["agent"]
        self.issuer: str = spec["issuer"]  # the assertion's aud: Bastion's issuer
        self.token_url: str = spec["token_url"]
        self.resource: str = spec["resource"]

    def assertion(self, now: float) -> str:
        """A private_key_jwt client assertion (RFC 7523) with a unique jti."""
        claims = {
            "iss": self.id,
            "sub": self.id,
            "aud": self.issuer,
            "iat": int(now),
            "exp": int(now) + 120,
            "jti": uuid.uuid4().hex,
        }
        return mint(self.key, claims, typ="JWT")

    def form(self, now: float) -> bytes:
        """A client_credentials token request body, form-encoded."""
        return urlencode(
            {
                "grant_type": "client_credentials",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": self.assertion(now),
                "resource": self.resource,
            }
        ).encode("ascii")


_HOLDER: SigningKey | None = None


def holder_key() -> SigningKey:
    """This process's DPoP key (one per load generator, made on first use)."""
    global _HOLDER
    if _HOLDER is None:
        _HOLDER = generate("ES256")
    return _HOLDER


class Proofs:
    """DPoP proofs for one URL and token, made ahead in batches, each used once."""

    def __init__(self, key: SigningKey, url: str, token: str) -> None:
        self.key, self.url, self.token = key, url, token
        self._pool: list[str] = []
        self._made_at = 0.0
        self.made = 0
        self.made_late = 0  # made on demand, while calls were being timed

    def make(self, method: str = "POST") -> str:
        self.made += 1
        return make_proof(self.key, method, self.url, time.time(), access_token=self.token)

    def fill(self, count: int) -> None:
        """Replace the pool with `count` fresh proofs (call this outside the timed section)."""
        self._pool = [self.make() for _ in range(count)]
        self._pool.reverse()  # pop() from the end hands them out oldest first
        self._made_at = time.monotonic()

    def take(self) -> str:
        if self._pool and time.monotonic() - self._made_at < PROOF_MAX_AGE_S:
            return self._pool.pop()
        self.made_late += 1
        return self.make()


async def fetch_token(
    session: aiohttp.ClientSession, agent: Agent, dpop_key: SigningKey | None
) -> dict[str, Any]:
    """One access token from Bastion's token endpoint, DPoP-bound when `dpop_key` is given."""
    headers = dict(FORM)
    if dpop_key is not None:
        headers["DPoP"] = make_proof(dpop_key, "POST", agent.token_url, time.time())
    data = agent.form(time.time())
    async with session.post(agent.token_url, data=data, headers=headers) as response:
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"token endpoint: HTTP {response.status}: {body[:300]!r}")
    answer: dict[str, Any] = orjson.loads(body)
    if not isinstance(answer.get("access_token"), str):
        raise RuntimeError(f"token endpoint: no access_token in {body[:300]!r}")
    return answer


class Phase:
    """One measured phase against one target."""

    def __init__(self, cmd: dict[str, Any]) -> None:
        self.url: str = cmd["url"]
        self.era: str = cmd["era"]
        self.calls: int = int(cmd["calls"])
        self.concurrency: int = max(1, int(cmd["concurrency"]))
        self.warmup: int = int(cmd.get("warmup", 0))
        self.timeout: float = float(cmd["timeout"])
        self.pids: dict[str, int | list[int]] = cmd.get("pids", {})
        # The tool's name at this target (a gateway may rename it, e.g. ContextForge's
        # "<gateway>-<tool>"), and static headers every request carries (a peer's own token).
        self.tool: str = cmd.get("tool") or "echo"
        # The echo's text is padded to this many bytes, so the answer is as large (the
        # inspection stage reads all of it).
        self.answer_bytes: int = int(cmd.get("answer_bytes") or 0)
        self.extra_headers: dict[str, str] = dict(cmd.get("headers") or {})
        self.headers: dict[str, str] = {
            **MODERN_HEADERS,
            "Mcp-Name": self.tool,
            **self.extra_headers,
        }
        self.auth: dict[str, Any] | None = cmd.get("auth")
        self.auth_headers: dict[str, str] = {}
        self.token_type: str | None = None
        self.proofs: Proofs | None = None
        self.session_id: str | None = None
        self.latencies: list[int] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self._ids = itertools.count(1)

    # -- one call ---------------------------------------------------------------------------

    def _body(self, request_id: int, text: str) -> bytes:
        params: dict[str, Any] = {"name": self.tool, "arguments": {"text": text}}
        if self.era == "modern":
            params["_meta"] = MODERN_META
        return orjson.dumps(
            {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
        )

    async def call(self, session: aiohttp.ClientSession, record: bool) -> None:
        request_id = next(self._ids)
        text = f"bench {request_id}"
        if self.answer_bytes > len(text):
            text += " " + _FILLER[: self.answer_bytes - len(text) - 1]
        body = self._body(request_id, text)
        headers = self.headers
        if self.proofs is not None:
            headers = {**headers, "DPoP": self.proofs.take()}
        try:
            start = time.perf_counter_ns()
            async with session.post(self.url, data=body, headers=headers) as response:
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

    # -- identity ---------------------------------------------------------------------------

    async def authorize(self, session: aiohttp.ClientSession) -> None:
        """Get this phase's access token; with DPoP, bind it to this process's key."""
        if self.auth is None:
            return
        dpop = self.auth["scheme"] == "dpop"
        key = holder_key() if dpop else None
        answer = await fetch_token(session, Agent(self.auth), key)
        token = answer["access_token"]
        self.token_type = answer.get("token_type")
        expected = "DPoP" if dpop else "Bearer"
        if self.token_type != expected:
            raise RuntimeError(f"expected token_type {expected}, found {self.token_type!r}")
        self.auth_headers = {"Authorization": f"{expected} {token}"}
        self.headers.update(self.auth_headers)
        if key is not None:
            self.proofs = Proofs(key, self.url, token)

    def _with_proof(self, headers: dict[str, str], method: str = "POST") -> dict[str, str]:
        if self.proofs is None:
            return headers
        return {**headers, "DPoP": self.proofs.make(method)}

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
        base = {
            "Content-Type": "application/json",
            "Accept": ACCEPT,
            **self.extra_headers,
            **self.auth_headers,
        }
        async with session.post(
            self.url, data=orjson.dumps(hello), headers=self._with_proof(base)
        ) as response:
            data = await response.read()
            if response.status != 200:
                raise RuntimeError(f"initialize: HTTP {response.status}: {data[:200]!r}")
            self.session_id = response.headers.get("Mcp-Session-Id")
        self.headers = {**base, "MCP-Protocol-Version": LEGACY}
        if self.session_id is not None:
            self.headers["Mcp-Session-Id"] = self.session_id
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with session.post(
            self.url, data=orjson.dumps(note), headers=self._with_proof(self.headers)
        ) as resp:
            await resp.read()
            if resp.status != 202:
                raise RuntimeError(f"notifications/initialized: HTTP {resp.status}")

    async def close_legacy(self, session: aiohttp.ClientSession) -> None:
        if self.session_id is None:
            return
        try:
            async with asyncio.timeout(5):
                headers = self._with_proof(self.headers, "DELETE")
                async with session.delete(self.url, headers=headers) as response:
                    await response.read()
        except (aiohttp.ClientError, TimeoutError):
            pass

    # -- the phase --------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=CALL_TIMEOUT) as session:
            try:
                async with asyncio.timeout(self.timeout):
                    await self.authorize(session)
                    if self.era == "legacy":
                        await self.open_legacy(session)
                    if self.proofs is not None:
                        self.proofs.fill(max(self.warmup, self.concurrency))
                    # Warm-up at the phase's concurrency opens every pooled connection.
                    await self.batch(session, max(self.warmup, self.concurrency), record=False)
                    if self.proofs is not None:
                        # Fresh proofs for the measured calls, made before the clock starts.
                        self.proofs.fill(self.calls)
            except TimeoutError:
                return {"ok": False, "fatal": f"warm-up exceeded {self.timeout:g} s"}
            except Exception as exc:  # noqa: BLE001
                return {"ok": False, "fatal": f"setup failed: {type(exc).__name__}: {exc}"}
            warm_errors, self.errors = self.errors, 0
            warm_samples, self.error_samples = self.error_samples, []
            gc.collect()
            cpu_before = {name: cpu_sample(pid) for name, pid in self.pids.items()}
            own_before = cpu_sample("self")
            start = time.perf_counter()
            timed_out = False
            try:
                async with asyncio.timeout(self.timeout):
                    await self.batch(session, self.calls, record=True)
            except TimeoutError:
                timed_out = True
            wall = time.perf_counter() - start
            own_after = cpu_sample("self")
            cpu_after = {name: cpu_sample(pid) for name, pid in self.pids.items()}
            if self.era == "legacy":
                await self.close_legacy(session)
        done = len(self.latencies)
        missing = self.calls - done - self.errors
        errors = self.errors + max(0, missing)
        ordered = sorted(ns / 1e6 for ns in self.latencies)
        measured = {name: cpu_ms_between(cpu_before[name], cpu_after[name]) for name in self.pids}
        cpu_ms = {name: ms for name, (ms, _) in measured.items()}
        per_call = {
            name: (None if ms is None or not self.calls else ms / self.calls)
            for name, ms in cpu_ms.items()
        }
        client_ms, _ = cpu_ms_between(own_before, own_after)
        return {
            "cpu_source": {name: source for name, (_, source) in measured.items()},
            "cpu_ms_ticks": {  # the same from clock ticks (10 ms steps), for comparison
                name: None
                if cpu_before[name].ticks is None or cpu_after[name].ticks is None
                else (cpu_after[name].ticks - cpu_before[name].ticks) * 1e3  # type: ignore[operator]
                for name in self.pids
            },
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
            "auth": None if self.auth is None else self.auth["scheme"],
            "token_type": self.token_type,
            "proofs_made": None if self.proofs is None else self.proofs.made,
            "proofs_made_late": None if self.proofs is None else self.proofs.made_late,
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


class TokenPhase:
    """Throughput of the token endpoint: unique client assertions, posted over C workers."""

    def __init__(self, cmd: dict[str, Any]) -> None:
        self.agent = Agent(cmd)
        self.requests: int = int(cmd["requests"])
        self.concurrency: int = max(1, int(cmd["concurrency"]))
        self.warmup: int = int(cmd.get("warmup", 0))
        self.timeout: float = float(cmd["timeout"])
        self.pids: dict[str, int | list[int]] = cmd.get("pids", {})
        self.latencies: list[int] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.forms: list[bytes] = []

    def prepare(self, count: int) -> None:
        """`count` request bodies, each with its own signed assertion (made before timing)."""
        now = time.time()
        self.forms = [self.agent.form(now) for _ in range(count)]
        self.forms.reverse()

    async def request(self, session: aiohttp.ClientSession, record: bool) -> None:
        body = self.forms.pop()
        try:
            start = time.perf_counter_ns()
            async with session.post(self.agent.token_url, data=body, headers=FORM) as response:
                data = await response.read()
            elapsed = time.perf_counter_ns() - start
            problem = _check_token(response.status, data)
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
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await self.request(session, record)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, count))))

    async def run(self) -> dict[str, Any]:
        warmup = max(self.warmup, self.concurrency)
        self.prepare(warmup)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=CALL_TIMEOUT) as session:
            try:
                async with asyncio.timeout(self.timeout):
                    await self.batch(session, warmup, record=False)
            except TimeoutError:
                return {"ok": False, "fatal": f"warm-up exceeded {self.timeout:g} s"}
            except Exception as exc:  # noqa: BLE001
                return {"ok": False, "fatal": f"setup failed: {type(exc).__name__}: {exc}"}
            warm_errors, self.errors = self.errors, 0
            warm_samples, self.error_samples = self.error_samples, []
            start_prepare = time.perf_counter()
            self.prepare(self.requests)
            prepare_s = time.perf_counter() - start_prepare
            gc.collect()
            cpu_before = {name: cpu_sample(pid) for name, pid in self.pids.items()}
            own_before = cpu_sample("self")
            start = time.perf_counter()
            timed_out = False
            try:
                async with asyncio.timeout(self.timeout):
                    await self.batch(session, self.requests, record=True)
            except TimeoutError:
                timed_out = True
            wall = time.perf_counter() - start
            own_after = cpu_sample("self")
            cpu_after = {name: cpu_sample(pid) for name, pid in self.pids.items()}
        done = len(self.latencies)
        errors = self.errors + max(0, self.requests - done - self.errors)
        ordered = sorted(ns / 1e6 for ns in self.latencies)
        cpu_ms = {name: cpu_ms_between(cpu_before[name], cpu_after[name])[0] for name in self.pids}
        client_ms, _ = cpu_ms_between(own_before, own_after)
        return {
            "ok": errors == 0 and not timed_out,
            "requests": self.requests,
            "succeeded": done,
            "errors": errors,
            "error_samples": self.error_samples,
            "timed_out": timed_out,
            "warmup_requests": warmup,
            "warmup_errors": warm_errors,
            "warmup_error_samples": warm_samples,
            "concurrency": self.concurrency,
            "assertions_prepare_s": prepare_s,
            "wall_s": wall,
            "tokens_per_s": done / wall if wall > 0 else math.nan,
            "p50_ms": percentile(ordered, 0.50),
            "p90_ms": percentile(ordered, 0.90),
            "p99_ms": percentile(ordered, 0.99),
            "mean_ms": sum(ordered) / done if done else math.nan,
            "min_ms": ordered[0] if ordered else math.nan,
            "max_ms": ordered[-1] if ordered else math.nan,
            "cpu_ms": cpu_ms,
            "cpu_ms_per_token": {
                name: None if ms is None or not self.requests else ms / self.requests
                for name, ms in cpu_ms.items()
            },
            "client_cpu_ms_per_token": (
                client_ms / self.requests if client_ms is not None and self.requests else None
            ),
        }


def _check_token(status: int, data: bytes) -> str | None:
    """None when the token endpoint answered 200 with a Bearer access token, else why not."""
    if status != 200:
        return f"HTTP {status}: {data[:200]!r}"
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError:
        return f"not JSON: {data[:200]!r}"
    if not isinstance(answer, dict):
        return f"not a JSON object: {data[:200]!r}"
    token = answer.get("access_token")
    if not isinstance(token, str) or token.count(".") != 2:
        return f"no access_token: {data[:200]!r}"
    if answer.get("token_type") != "Bearer":
        return f"token_type {answer.get('token_type')!r}: {data[:200]!r}"
    return None


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
            elif cmd.get("cmd") == "tokens":
                try:
                    phase = TokenPhase(cmd)
                except (OSError, KeyError, ValueError) as exc:
                    reply = {"ok": False, "fatal": f"bad command: {type(exc).__name__}: {exc}"}
                else:
                    reply = runner.run(phase.run())
            else:
                reply = {"ok": False, "fatal": f"unknown command {cmd.get('cmd')!r}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
