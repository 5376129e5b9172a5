"""What the upstreams offer, as policy sees it: tools with their input schemas and the
annotations policy may believe, prompts, servers.

A tool's annotations are hints written by whoever runs the server. Unless the operator marks a
server `trusted`, policy sees the pessimistic value of every hint (not read-only, destructive,
not idempotent, open-world), so a permit for "read-only tools" never opens a tool merely because
it calls itself read-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bastion.config import TOOL_SEPARATOR, HttpUpstream, StdioUpstream
from bastion.types import JSON

_PESSIMISTIC = {"read_only": False, "destructive": True, "idempotent": False, "open_world": True}
_HINTS = {
    "read_only": "readOnlyHint",
    "destructive": "destructiveHint",
    "idempotent": "idempotentHint",
    "open_world": "openWorldHint",
}


def action_id(upstream: str, name: str) -> str:
    """The Cedar action of one upstream tool: the name a virtual server exposes."""
    return f"{upstream}{TOOL_SEPARATOR}{name}"


@dataclass(frozen=True)
class ToolInfo:
    """One upstream tool."""

    upstream: str
    name: str
    input_schema: JSON
    annotations: Mapping[str, bool]  # what policy sees (pessimistic unless trusted)
    labels: tuple[str, ...] = ()

    @property
    def action(self) -> str:
        """Its Cedar action id."""
        return action_id(self.upstream, self.name)


@dataclass(frozen=True)
class Catalog:
    """Tools, prompts and servers of every upstream, as last listed."""

    tools: Mapping[str, ToolInfo] = field(default_factory=dict)
    prompts: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # id → (server, name)
    servers: Mapping[str, bool] = field(default_factory=dict)  # name → trusted
    listed: Mapping[str, JSON] = field(default_factory=dict)  # raw listings, for the snapshot
    environments: Mapping[str, str] = field(default_factory=dict)  # server → its environment

    @classmethod
    def build(
        cls,
        upstreams: Mapping[str, HttpUpstream | StdioUpstream],
        listings: Mapping[str, JSON],
        environment: str = "dev",
    ) -> Catalog:
        """From each upstream's `{"tools": [...], "prompts": [...]}` listing; `environment`
        is the gateway's, for upstreams that do not name their own."""
        tools: dict[str, ToolInfo] = {}
        prompts: dict[str, tuple[str, str]] = {}
        for upstream, listing in listings.items():
            settings = upstreams.get(upstream)
            if settings is None:
                continue
            for raw in listing.get("tools") or []:
                info = _tool(upstream, raw, settings.trusted, settings.labels)
                if info is not None:
                    tools[info.action] = info
            for raw in listing.get("prompts") or []:
                name = raw.get("name") if isinstance(raw, dict) else None
                if isinstance(name, str) and name:
                    prompts[action_id(upstream, name)] = (upstream, name)
        servers = {name: up.trusted for name, up in upstreams.items()}
        kept = {k: v for k, v in listings.items() if k in upstreams}
        environments = {name: up.environment or environment for name, up in upstreams.items()}
        return cls(tools, prompts, servers, kept, environments)

    def tool(self, upstream: str, name: str) -> ToolInfo | None:
        """A tool by server and original name."""
        return self.tools.get(action_id(upstream, name))


def _tool(
    upstream: str, raw: Any, trusted: bool, labels: Mapping[str, tuple[str, ...]]
) -> ToolInfo | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        return None
    schema = raw.get("inputSchema")
    if not isinstance(schema, dict):
        schema = {"type": "object", "properties": {}}
    found = raw.get("annotations")
    hints: dict[str, Any] = found if isinstance(found, dict) else {}
    annotations = dict(_PESSIMISTIC)
    if trusted:
        for key, hint in _HINTS.items():
            value = hints.get(hint)
            if isinstance(value, bool):
                annotations[key] = value
        # The spec's own defaults: destructive and open-world unless said otherwise, and a
        # read-only tool is never destructive.
        if annotations["read_only"]:
            annotations["destructive"] = False
    return ToolInfo(upstream, raw["name"], schema, annotations, labels.get(raw["name"], ()))
