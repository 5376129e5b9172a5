"""The cross-tenant cases: one tenant's probe identity names another tenant's objects in tool
and prompt arguments and resource URIs (under several spellings of the victim's name), presents
another tenant's session, and (with `allow_writes`) searches for a canary planted in another
tenant. Pure: no I/O.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from bastion.control.probe.types import Case, Listing, Surface, ToolInfo
from bastion.methods import PROMPTS_GET, RESOURCES_READ, TOOLS_CALL

__all__ = ["arguments_for", "canary_cases", "pairs", "session_cases", "tenant_cases"]

_MISSING = "0-bastion-probe"  # fills `*`: an object of the caller's own tenant that is not there

# Spellings of the victim tenant's name inside an id (the gateway must read them all as it).
_NAME_TRICKS: dict[str, Callable[[str], str]] = {
    "plain": lambda t: t,
    "upper-case": str.upper,
    "percent-encoded": lambda t: f"%{ord(t[0]):02X}{t[1:]}",
    "double-percent-encoded": lambda t: f"%25{ord(t[0]):02X}{t[1:]}",
    "fullwidth": lambda t: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in t),
    "zero-width": lambda t: f"{t[:1]}\u200b{t[1:]}",
}


def pairs(surface: Surface) -> Iterator[tuple[str, str]]:
    """Every ordered (own, victim) pair of distinct tenants."""
    return itertools.permutations(surface.tenants, 2)


def _fill(pattern: str, tenant: str, rest: str) -> str:
    return pattern.replace("{tenant}", tenant).replace("*", rest)


def arguments_for(tool: ToolInfo, tenant: str, patterns: Mapping[str, str]) -> dict[str, Any]:
    """Arguments that fit the tool's schema, naming only (missing) objects of `tenant`."""
    properties = tool.schema.get("properties") or {}
    out: dict[str, Any] = {}
    for name in tool.schema.get("required") or []:
        spec = properties.get(name) or {}
        if name in patterns:
            out[name] = _fill(patterns[name], tenant, _MISSING)
        elif spec.get("enum"):
            out[name] = spec["enum"][0]
        else:
            kinds = {"integer": 1, "number": 1, "boolean": False, "array": [], "object": {}}
            out[name] = kinds.get(str(spec.get("type")), "bastion probe")
    return out


def _spellings(prefix: str, victim: str, suffix: str, own: str) -> Iterator[tuple[str, str, bool]]:
    """(trick, value, strict): strict tricks must be refused; the others must not leak."""
    for trick, spell in _NAME_TRICKS.items():
        yield trick, prefix + spell(victim) + suffix, True
    yield "padded", f" {prefix}{victim}{suffix}\t", True
    if prefix.endswith("/"):
        yield "dot-segments", f"{prefix}{own}/../{victim}{suffix}", True
    if prefix.endswith("://"):
        yield "user-info", f"{prefix}{own}@{victim}{suffix}", True
    # No look-alike letters that nothing folds (Cyrillic "о"): the gateway passes them on, the
    # upstream echoes them in its error, inspection reads that as the victim's object, and the
    # healthy upstream would be counted towards quarantine by its own self-test.


def _carriers(surface: Surface, tenant: str, upstream: str, arg: str) -> list[tuple[str, Any]]:
    """What can carry the argument for this tenant: ("tool", ToolInfo), ("prompt", …)."""
    listing = surface.listings.get(tenant, Listing())
    found: list[tuple[str, Any]] = []
    for name in listing.tools:
        tool = surface.catalog.get(name)
        props = (tool.schema.get("properties") or {}) if tool else {}
        if tool and tool.upstream == upstream and tool.read_only and arg in props:
            found.append(("tool", tool))
    for prompt in listing.prompts:
        if prompt.upstream == upstream and arg in dict(prompt.arguments):
            found.append(("prompt", prompt))
    return found


def tenant_cases(surface: Surface) -> Iterator[Case]:
    """Each tenant names each other tenant's objects in the arguments `tenant_arguments`
    declares, through every tool and prompt that carries one, and in resource URIs."""
    for own, victim in pairs(surface):
        for upstream, patterns in surface.tenant_arguments.items():
            for arg, pattern in patterns.items():
                if "{tenant}" not in pattern:
                    continue
                if "://" in pattern:
                    yield from _resource_cases(surface, own, victim, upstream, arg, pattern)
                    continue
                prefix, _, rest = pattern.partition("{tenant}")
                suffix = rest.replace("*", "1")
                for index, (what, carrier) in enumerate(_carriers(surface, own, upstream, arg)):
                    spellings = list(_spellings(prefix, victim, suffix, own))
                    for trick, value, strict in spellings if index == 0 else spellings[:1]:
                        yield _argument_case(
                            surface, own, victim, what, carrier, arg, trick, value, strict, patterns
                        )


def _argument_case(
    surface: Surface,
    own: str,
    victim: str,
    what: str,
    carrier: Any,
    arg: str,
    trick: str,
    value: str,
    strict: bool,
    patterns: Mapping[str, str],
) -> Case:
    if what == "tool":
        params = {
            "name": carrier.name,
            "arguments": {**arguments_for(carrier, own, patterns), arg: value},
        }
        method = TOOLS_CALL
    else:
        filled = {
            n: _fill(patterns[n], own, _MISSING) if n in patterns else "bastion probe"
            for n, required in carrier.arguments
            if required
        }
        params = {"name": carrier.name, "arguments": {**filled, arg: value}}
        method = PROMPTS_GET
    return Case(
        name=f"tenant-argument:{own}->{victim}:{what}:{carrier.name}:{arg}:{trick}",
        kind="call",
        tried=f"{own} names {victim}'s object in {arg} ({trick} spelling) of {what} {carrier.name}",
        expected="refused by the gateway"
        if strict
        else f"refused, or nothing of {victim} in the answer",
        tenant=own,
        victim=victim,
        crossing=True,
        expect="refused" if strict else "no_leak",
        spec={
            "method": method,
            "params": params,
            "group": f"{own}->{victim}:{what}:{carrier.name}:{arg}",
        },
    )


def _resource_cases(
    surface: Surface, own: str, victim: str, upstream: str, arg: str, pattern: str
) -> Iterator[Case]:
    static = pattern.partition("{tenant}")[0]
    listing = surface.listings.get(own, Listing())
    templates = [t for t in listing.templates if t.startswith(static + "{tenant}")]
    if templates:
        others = surface.tenant_arguments.get(upstream, {})
        uri = templates[0]
        for name, other in others.items():
            if "://" not in other:
                uri = uri.replace("{" + name + "}", _fill(other, victim, "1"))
        uri = re.sub(r"\{(?!tenant\})[^}]*\}", "1", uri)
    else:
        uri = _fill(pattern, "{tenant}", "1")
    prefix, _, suffix = uri.partition("{tenant}")
    for trick, value, strict in _spellings(prefix, victim, suffix, own):
        yield Case(
            name=f"tenant-resource:{own}->{victim}:{upstream}:{arg}:{trick}",
            kind="call",
            tried=f"{own} reads {victim}'s resource ({trick} spelling)",
            expected="refused by the gateway"
            if strict
            else f"refused, or nothing of {victim} in the answer",
            tenant=own,
            victim=victim,
            crossing=True,
            expect="refused" if strict else "no_leak",
            spec={
                "method": RESOURCES_READ,
                "params": {"uri": value},
                "group": f"{own}->{victim}:resource:{upstream}:{arg}",
            },
        )


def session_cases(surface: Surface) -> Iterator[Case]:
    """Each tenant presents a legacy session another tenant opened."""
    for owner, presenter in pairs(surface):
        yield Case(
            name=f"foreign-session:{owner}->{presenter}",
            kind="session",
            tried=f"{presenter} presents a legacy session {owner} opened",
            expected="404, as for an unknown session",
            tenant=presenter,
            victim=owner,
            crossing=True,
            expect="status",
            statuses=(404,),
            spec={"owner": owner},
        )


def canary_cases(surface: Surface, skipped: list[str]) -> Iterator[Case]:
    """A marker planted in one tenant and searched for from each other (writes: only with
    `allow_writes`); what cannot be planted is added to `skipped`."""
    if not surface.allow_writes:
        skipped.append("canary: plants an object, needs --allow-writes")
        return
    for searcher, planter in pairs(surface):
        plan = _canary_plan(surface, searcher, planter)
        if plan is None:
            skipped.append(
                f"canary:{planter}->{searcher}: no write tool of {planter} with a tenant id and "
                "a text argument, or no search tool both are shown"
            )
            continue
        yield Case(
            name=f"canary:{planter}->{searcher}",
            kind="canary",
            tried=f"plant a marked object in {planter} with {plan['writer']}, search for the "
            f"marker as {planter} and then as {searcher} with {plan['search']}",
            expected=f"the marker never reaches {searcher} (an inspection.foreign_tenant error "
            "or no hit)",
            tenant=searcher,
            victim=planter,
            denial=False,
            expect="no_marker",
            spec=plan,
        )


def _canary_plan(surface: Surface, searcher: str, planter: str) -> dict[str, str] | None:
    writers = surface.listings[planter].tools
    searches = set(surface.listings[searcher].tools) & set(writers)
    search = next(
        (
            (name, _text_argument(surface.catalog[name]))
            for name in sorted(searches)
            if surface.catalog[name].read_only
            and "search" in name
            and _text_argument(surface.catalog[name])
        ),
        None,
    )
    for name in writers:
        tool = surface.catalog[name]
        patterns = surface.tenant_arguments.get(tool.upstream, {})
        required = tool.schema.get("required") or []
        ids = [a for a in required if a in patterns and "://" not in patterns[a]]
        text = _text_argument(tool, exclude=set(patterns))
        if not tool.read_only and ids and text and search and len(required) == 2:
            return {
                "writer": name,
                "id_argument": ids[0],
                "id_pattern": patterns[ids[0]],
                "text_argument": text,
                "search": search[0],
                "query_argument": search[1] or "",
            }
    return None


def _text_argument(tool: ToolInfo, exclude: set[str] | None = None) -> str | None:
    properties = tool.schema.get("properties") or {}
    for name in tool.schema.get("required") or []:
        if name not in (exclude or set()) and (properties.get(name) or {}).get("type") == "string":
            return str(name)
    return None
