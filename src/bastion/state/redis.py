"""The one Redis (or Valkey) connection a gateway's shared-state adapters use.

```
RedisState                 one client (a connection pool), one key prefix, one deadline
├── key(*parts)            "<prefix><part>:<part>…": every adapter's keys under one prefix
├── run(what, operation)   await with the deadline; any failure → StateUnavailable (503)
└── script(source)         a Lua script registered once, run atomically by the server
```

Every operation fails closed: a Redis that is down, refuses, or answers after
`state.timeout_seconds` raises `StateUnavailable`, naming the server (never its password)
and what was being done, and the request is refused. Nothing is answered from a guess: a
replay cache that cannot be asked is a replay let through. The client reconnects by itself on
the next operation, so service resumes as soon as Redis does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bastion.config import Settings
from bastion.config.shared import read_reference
from bastion.errors import StateUnavailable

__all__ = [
    "RedisState",
    "open_shared",
]

_T = TypeVar("_T")


class RedisState:
    """A client for one Redis server and a key prefix, with a deadline on every operation."""

    def __init__(self, url: str, *, prefix: str = "bastion:", timeout: float = 1.0) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.where = _where(url)
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=10,
            max_connections=256,
        )

    def key(self, *parts: str) -> str:
        """A key of this gateway's namespace."""
        return self.prefix + ":".join(parts)

    async def run(self, what: str, operation: Awaitable[_T]) -> _T:
        """Await one Redis operation within the deadline; `StateUnavailable` saying `what`
        could not be done when Redis fails, refuses or is late."""
        try:
            async with asyncio.timeout(self.timeout):
                return await operation
        except (RedisError, OSError, TimeoutError) as exc:
            raise StateUnavailable(
                f"the shared state at {self.where} could not {what}: "
                f"{type(exc).__name__}; refusing until it answers"
            ) from exc

    def script(self, source: str) -> Any:
        """A Lua script the server runs atomically (loaded on first use, by digest after)."""
        return self.client.register_script(source)

    async def ping(self) -> None:
        """Raise `StateUnavailable` unless Redis answers."""
        await self.run("answer a ping", self.client.ping())

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()


def _where(url: str) -> str:
    """The server an address names, without user or password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}"


def open_shared(settings: Settings) -> RedisState | None:
    """The Redis connection `state` names, or None for `state.store: memory`."""
    state = settings.state
    if state.store != "redis" or state.url is None:
        return None
    url = read_reference(state.url, "state.url")
    return RedisState(url, prefix=state.prefix, timeout=state.timeout_seconds)
