"""The probe's values: what the deployment offers (`Surface`), an attack (`Case`), what the
gateway answered (`Observation`) and the outcome (`Verdict`). Imports nothing of the probe's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Case",
    "Listing",
    "Observation",
    "PromptInfo",
    "Surface",
    "ToolInfo",
    "Verdict",
]


@dataclass(frozen=True)
class ToolInfo:
    """A tool as the probed route exposes it, and whether calling it can change anything."""

    name: str
    upstream: str
    schema: Mapping[str, Any]
    read_only: bool


@dataclass(frozen=True)
class PromptInfo:
    """A prompt as the probed route exposes it."""

    name: str
    upstream: str
    arguments: tuple[tuple[str, bool], ...]  # (name, required)


@dataclass(frozen=True)
class Listing:
    """What one tenant's probe identity is shown on the probed route."""

    tools: tuple[str, ...] = ()
    prompts: tuple[PromptInfo, ...] = ()
    templates: tuple[str, ...] = ()


@dataclass(frozen=True)
class Surface:
    """The deployment as the probe sees it."""

    route: str  # the virtual server attacked (a path)
    other_route: str | None  # another route, for tokens of the wrong audience
    tenants: tuple[str, ...]
    tenant_arguments: Mapping[str, Mapping[str, str]]  # upstream → argument → pattern
    catalog: Mapping[str, ToolInfo]  # every tool of the route, shown or not
    listings: Mapping[str, Listing]  # tenant → what its probe identity is shown
    approval_tools: frozenset[str] = frozenset()
    max_body_bytes: int = 4 * 1024 * 1024
    signing_key_readable: bool = True
    allow_writes: bool = False


@dataclass(frozen=True)
class Case:
    """One attack: what is tried, by which tenant's identity, and what must happen."""

    name: str
    kind: str  # how the driver runs it: call, headers, raw, session, token, canary
    tried: str
    expected: str
    tenant: str  # the attacking principal's tenant
    victim: str | None = None
    crossing: bool = False  # counts towards the cross-tenant detector
    denial: bool = True  # counts towards the denial detectors
    expect: str = "refused"  # refused | no_leak | status | no_marker
    statuses: tuple[int, ...] = ()
    rpc_code: int | None = None
    spec: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """What the gateway answered, as the driver saw it."""

    status: int | None  # HTTP status; None when nothing came back
    body: Any = None  # the JSON answer, when there was one
    note: str = ""  # the driver's own finding (no answer, a control that failed, …)
    leaked: tuple[str, ...] = ()  # field paths that carry the victim's objects or the marker


@dataclass(frozen=True)
class Verdict:
    """A case with its outcome."""

    case: Case
    held: bool
    observed: str
    evidence: str
