"""The gateway's view of the agent registry: an immutable in-memory copy the request path
reads, and the background watcher that keeps it current.

The watcher asks the registry's `version()` every `POLL_SECONDS` in a worker thread and loads
a new snapshot only when it moved; each load is published whole. A change made in this
process (the admin API, an alert's suspension) asks the watcher to read at once (`reread`).
When the registry cannot be read for `STALE_SECONDS`, `require_current` makes the request path
refuse rather than judge by a copy that could miss a revocation.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from bastion.background import Refresher
from bastion.control.registry.agents import Agent, Registry
from bastion.errors import RegistryUnavailable

# How often the gateway's background work asks the registry whether it changed: a suspension,
# revocation or killed session made by another process is in force within about this long.
POLL_SECONDS = 0.2
# A view not confirmed against the registry for this long is stale: the request path refuses
# (fail closed) rather than miss a revocation while the registry cannot be read.
STALE_SECONDS = 5.0


@dataclass(frozen=True)
class _ViewState:
    """One published copy of the registry: replaced whole, never changed."""

    version: int
    agents: Mapping[str, Agent]
    by_spiffe_id: Mapping[str, Agent]
    revoked: frozenset[str]
    killed: frozenset[str]
    tenants: frozenset[str] = frozenset()


_EMPTY = _ViewState(-1, MappingProxyType({}), MappingProxyType({}), frozenset(), frozenset())


class RegistryView:
    """The gateway's in-memory copy of the registry, kept current in the background.

    Lookups read one immutable snapshot and never touch the database. `watch` (a refresher
    the gateway runs) asks `version()` every `POLL_SECONDS` in a worker thread and reloads
    only when it moved; `require_current` lets the request path fail closed when that has
    not worked for `STALE_SECONDS`.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        poll: float = POLL_SECONDS,
        stale_after: float = STALE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._stale_after = stale_after
        self._clock = clock
        self._lock = threading.Lock()  # the watcher's thread and the token endpoint both read
        self._state = _EMPTY
        self._checked = -math.inf
        self._seen = -1  # the version the last change hooks ran for
        self._uses: dict[str, float] = {}
        self.watch = Refresher("registry", self._poll, every=poll)
        self.refresh()
        self._seen = self._state.version

    @property
    def version(self) -> int:
        """The registry version this view holds."""
        return self._state.version

    def refresh(self) -> bool:
        """Reload when the registry changed since the last load; return whether it reloaded.
        Blocking I/O: the watcher runs it in a worker thread; the CLI and the token endpoint
        call it directly."""
        with self._lock:
            changed = self._registry.version() != self._state.version
            if changed:
                snapshot = self._registry.snapshot()
                agents = dict(snapshot.agents)
                self._state = _ViewState(
                    version=snapshot.version,
                    agents=MappingProxyType(agents),
                    by_spiffe_id=MappingProxyType(
                        {a.spiffe_id: a for a in agents.values() if a.spiffe_id}
                    ),
                    revoked=snapshot.revoked_jtis,
                    killed=snapshot.killed_sessions,
                    tenants=frozenset(a.tenant for a in agents.values()),
                )
            self._checked = self._clock()
        return changed

    async def _poll(self) -> bool:
        """One round of the watcher: whether the view moved since the last round's hooks ran
        (whoever refreshed it: the watcher, the token endpoint)."""
        await asyncio.to_thread(self.refresh)
        version = self._state.version
        changed, self._seen = version != self._seen, version
        return changed

    async def reread(self) -> None:
        """Read the registry now, in the background, and wait for it (with what follows a
        change, such as ending revoked agents' sessions): after a change made in this
        process (the admin API, an alert's suspension), in force before this returns."""
        await self.watch.ask(STALE_SECONDS)

    def require_current(self) -> None:
        """Raise RegistryUnavailable when the registry has not been read for `stale_after`
        seconds (the watcher cannot reach it): a stale view could miss a revocation."""
        age = self._clock() - self._checked
        if age > self._stale_after:
            raise RegistryUnavailable(
                f"the agent registry was last read {age:.0f} s ago (expected within "
                f"{self._stale_after:g} s); refusing until it can be read"
            )

    def agent(self, agent_id: str) -> Agent | None:
        """The agent with this id, or None."""
        return self._state.agents.get(agent_id)

    def agent_by_spiffe_id(self, spiffe_id: str) -> Agent | None:
        """The agent registered with this SPIFFE ID (unique in the registry), or None."""
        return self._state.by_spiffe_id.get(spiffe_id)

    def agents(self) -> Iterable[Agent]:
        """Every registered agent, whatever its status."""
        return self._state.agents.values()

    def tenants(self) -> frozenset[str]:
        """The tenants of every registered agent (the tenant guard looks for their objects)."""
        return self._state.tenants

    def revoked(self, jti: str) -> bool:
        """Whether the token with this jti was revoked."""
        return jti in self._state.revoked

    def session_killed(self, session_id_hash: str) -> bool:
        """Whether the session with this id hash was killed."""
        return session_id_hash in self._state.killed

    def note_use(self, agent_id: str, when: float) -> None:
        """Remember that an agent was let in at `when`: a dict write on the request path; the
        gateway's `UsageRecorder` takes the notes and writes them to the registry."""
        if when > self._uses.get(agent_id, 0.0):
            self._uses[agent_id] = when

    def take_uses(self) -> dict[str, float]:
        """The last-use notes since the previous call (agent id → time), and forget them."""
        uses, self._uses = self._uses, {}
        return uses
