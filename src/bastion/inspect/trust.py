"""Upstream trust: the port the request path reads pins and quarantines through, and the
screen that applies pins, poisoning and shadowing rules to what upstreams declare.

```
Trust (port)   check(upstream, kind, name, definition) → "pinned" | "new" | "changed"
               seen(upstream, kind) → the definitions last seen, by name
               flag(...)            an alert, once per upstream, name and digest
               quarantined(upstream) → why, or None;  quarantine(upstream, why)  (durable)
Screen         the items of one upstream's list page a client may see; the refusal of a
               call whose definition is withheld (changed, poisoned, shadowing) or whose
               upstream is quarantined
```

The implementation (`bastion.control.registry.trust.TrustView`) reads an immutable snapshot
of the registry store and queues every write (a first pin, a pending version) to background
work: nothing here does I/O. A definition seen for the first time is pinned (trust on first
use); one that differs from its pin is "changed" and withheld until an operator approves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

from bastion.config import Inspect
from bastion.errors import BastionError, DefinitionWithheld, Quarantined, ToolChanged, shown
from bastion.inspect.pins import Kind, item_name, pinned
from bastion.inspect.poisoning import description_hits, invisible, shadowed
from bastion.types import JSON

__all__ = ["PinState", "Screen", "Trust"]

PinState = Literal["pinned", "new", "changed"]


# Verdicts kept for calls (route, upstream, kind, name); cleared whole when full.
_MAX_VERDICTS = 4096


class Trust(Protocol):
    """Pins and quarantines as the request path sees them: in-memory reads, queued writes."""

    def check(self, upstream: str, kind: Kind, name: str, definition: JSON) -> PinState:
        """The pin state of a definition an upstream offers now (remembered as the one last
        seen). "new" queues its pin; "changed" queues a pending version for an operator."""
        ...

    def remember(self, upstream: str, kind: Kind, name: str, definition: JSON) -> None:
        """Remember a definition as the one last seen, without pinning it (`pins: off`)."""
        ...

    def seen(self, upstream: str, kind: Kind) -> Mapping[str, JSON]:
        """The definitions of an upstream last seen in any listing, by name."""
        ...

    def flag(
        self, upstream: str, kind: Kind, name: str, definition: JSON, rule: str, kinds: list[str]
    ) -> None:
        """Alert that a definition was flagged by `rule` (`poisoning`, `shadowing`) for
        `kinds`: once per upstream, name and digest, however often it is listed."""
        ...

    def quarantined(self, upstream: str) -> str | None:
        """Why the upstream is out of service for every tenant, or None."""
        ...

    async def quarantine(self, upstream: str, reason: str) -> None:
        """Take the upstream out of service, durably and for every replica sharing the
        store, until an operator releases it."""
        ...


class Screen:
    """Applies `upstreams.<name>.inspect` (`pins`, `poisoning`, `shadowing`) to listed items
    and to calls. Pure over the trust's snapshot: no I/O."""

    def __init__(self, rules: Mapping[str, Inspect], trust: Trust) -> None:
        self.rules = rules
        self.trust = trust
        # Per-call verdicts, reused while the trust's generation stands (a trust without one
        # is judged afresh each time): hashing and scanning a definition on every call
        # would cost more than deciding the call.
        self._verdicts: dict[tuple[Any, ...], tuple[int, BastionError | None]] = {}

    def items(
        self, route: tuple[str, ...], multiplex: bool, upstream: str, kind: Kind, items: list[JSON]
    ) -> list[JSON]:
        """The items of `upstream`'s list page a client of the route may see: changed
        definitions (under `pins: enforce`) and withheld ones are left out, flagged ones
        alerted. Items are checked in order, so a name's first definition is its pin."""
        kept: list[JSON] = []
        for item in items:
            name = item_name(kind, item)
            if name is None or self._listed(route, multiplex, upstream, kind, name, item) is None:
                kept.append(item)
        return kept

    def _listed(
        self, route: tuple[str, ...], multiplex: bool, upstream: str, kind: Kind, name: str,
        item: JSON,
    ) -> BastionError | None:  # fmt: skip
        """The verdict on a listed item. Judging a description on a virtual server looks at
        every other upstream's names, so a whole list judged afresh costs O(tools²): once
        the item is remembered (which moves the generation only when it changed), the
        verdict cached for calls serves, and is cached for them in turn."""
        rules = self.rules.get(upstream)
        if rules is not None:
            if rules.pins == "enforce":
                self.trust.check(upstream, kind, name, item)
            else:
                self.trust.remember(upstream, kind, name, item)
        if rules is None or self.trust.seen(upstream, kind).get(name) is not item:
            # Not remembered (too many names): judged as it is, as before.
            return self._verdict(route, multiplex, upstream, kind, name, item)
        return self.refusal(route, multiplex, upstream, kind, name)

    def observe(self, upstream: str, kind: Kind, items: list[JSON]) -> None:
        """Note definitions the gateway listed for itself (the policy catalog): pinned on
        first sight, remembered for calls and for the shadowing of other upstreams' names."""
        rules = self.rules.get(upstream)
        if rules is None:
            return
        for item in items:
            name = item_name(kind, item)
            if name is None:
                continue
            if rules.pins == "enforce":
                self.trust.check(upstream, kind, name, item)
            else:
                self.trust.remember(upstream, kind, name, item)

    def refusal(
        self, route: tuple[str, ...], multiplex: bool, upstream: str, kind: Kind | None, name: str
    ) -> BastionError | None:
        """Why a call to `upstream` (of `kind` and `name`, None for a method that names no
        tool or prompt) is refused here: the upstream is quarantined, or the definition last
        seen is changed or withheld. None when it may go on to policy."""
        generation = getattr(self.trust, "generation", None)
        key = (route, multiplex, upstream, kind, name)
        cached = self._verdicts.get(key) if generation is not None else None
        if cached is not None and cached[0] == generation:
            return cached[1]
        refusal = self._refusal(route, multiplex, upstream, kind, name)
        if generation is not None and generation == getattr(self.trust, "generation", None):
            if len(self._verdicts) >= _MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = (generation, refusal)
        return refusal

    def _refusal(
        self, route: tuple[str, ...], multiplex: bool, upstream: str, kind: Kind | None, name: str
    ) -> BastionError | None:
        why = self.trust.quarantined(upstream)
        if why is not None:
            return Quarantined(
                f"upstream {upstream!r} is quarantined ({why}); an operator must release it "
                f"(bastion quarantine release {upstream})"
            )
        if kind is None:
            return None
        definition = self.trust.seen(upstream, kind).get(name)
        if definition is None:
            return None  # never listed: nothing to judge it by (policy lists before deciding)
        return self._verdict(route, multiplex, upstream, kind, name, definition)

    def _verdict(
        self,
        route: tuple[str, ...],
        multiplex: bool,
        upstream: str,
        kind: Kind,
        name: str,
        definition: JSON,
    ) -> BastionError | None:
        """The refusal a definition earns under the upstream's rules, or None (shown,
        perhaps flagged)."""
        rules = self.rules.get(upstream)
        if rules is None:
            return None
        if rules.pins == "enforce":
            if self.trust.check(upstream, kind, name, definition) == "changed":
                return ToolChanged(
                    f"the {kind} {shown(name)} of upstream {upstream!r} changed since it was "
                    f"pinned; it is withheld until an operator approves the new version "
                    f"(bastion tools diff {upstream} {kind} {shown(name)})"
                )
        else:
            self.trust.remember(upstream, kind, name, definition)
        item = (upstream, kind, name, definition)
        others = self._others(route, multiplex, upstream)
        if rules.poisoning != "off":
            text = definition.get("description")
            hits = description_hits(text, others, upstream) if isinstance(text, str) else []
            found = sorted({hit.kind for hit in [*hits, *invisible(name)]})
            refusal = self._judge(rules.poisoning, "poisoning", item, found)
            if refusal is not None:
                return refusal
        if rules.shadowing != "off" and multiplex:
            earlier = {u: others[u] for u in route[: route.index(upstream)] if u in others}
            shadow = self._shadow(upstream, kind, name, definition, earlier)
            if shadow is not None:
                return self._judge(rules.shadowing, "shadowing", item, [":".join(shadow)])
        return None

    def _judge(
        self, mode: str, rule: str, item: tuple[str, Kind, str, JSON], found: list[str]
    ) -> BastionError | None:
        """Flag what `rule` found (alerted once per definition); withhold it under
        `withhold`."""
        if not found:
            return None
        upstream, kind, name, definition = item
        self.trust.flag(upstream, kind, name, definition, rule, found)
        if mode != "withhold":
            return None
        return DefinitionWithheld(
            f"the {kind} {shown(name)} of upstream {upstream!r} is withheld ({rule}: "
            f"{', '.join(found)[:200]})"
        )

    def _others(
        self, route: tuple[str, ...], multiplex: bool, upstream: str
    ) -> dict[str, set[str]]:
        """The tool and prompt names of the route's other upstreams (none off a virtual
        server)."""
        if not multiplex:
            return {}
        return {
            other: {*self.trust.seen(other, "tool"), *self.trust.seen(other, "prompt")}
            for other in route
            if other != upstream
        }

    def _shadow(
        self,
        upstream: str,
        kind: Kind,
        name: str,
        definition: JSON,
        earlier: Mapping[str, set[str]],
    ) -> tuple[str, str] | None:
        """The earlier upstream's name this one shadows, unless both are the same definition
        (the same server software behind two names is no impostor)."""
        hit = shadowed(name, earlier)
        if hit is None:
            return None
        theirs = self.trust.seen(hit[0], kind).get(hit[1])
        if theirs is not None and _unnamed(kind, theirs) == _unnamed(kind, definition):
            return None
        return hit


def _unnamed(kind: Kind, definition: JSON) -> JSON:
    return {k: v for k, v in pinned(kind, definition).items() if k != "name"}
