"""The shared ground of every section: the frozen model, name and secret patterns, environments."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ENVIRONMENTS",
    "NAME_PATTERN",
    "RATE_PATTERN",
    "RESERVED_TENANT",
    "SECRET_REFERENCE",
    "TOOL_SEPARATOR",
    "Environment",
]

# Upstream names become tool-name prefixes (`workspace__search_tasks`): no underscores in them,
# so the first "__" in an exposed name always ends the prefix.
NAME_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"
TOOL_SEPARATOR = "__"
# The tenant the gateway itself acts in when it lists upstreams for policy; no agent, seed or
# `auth: none` caller may be in it, so nothing of a real tenant's is ever shared with it.
RESERVED_TENANT = "bastion"
# A secret is named, never written in the file: env:NAME, file:PATH or vault:PATH#KEY.
SECRET_REFERENCE = r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+|vault:[^#]+#.+)$"  # noqa: S105
# Where a gateway, an upstream, a virtual server or an agent belongs. An agent reaches only
# upstreams of its own environment (a built-in forbid); a `prod` gateway refuses `demo` parts.
Environment = Literal["dev", "staging", "prod", "demo"]
ENVIRONMENTS: tuple[str, ...] = ("dev", "staging", "prod", "demo")
# A grant's rate: calls per unit of time (`30/minute`).
RATE_PATTERN = r"^[1-9][0-9]*/(second|minute|hour|day)$"


class _Frozen(BaseModel):
    """The base of every section: immutable once parsed, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")
