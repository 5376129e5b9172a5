"""Mirrored arguments (SEP-2243, 2026-07-28): a tool's schema marks arguments with
`x-mcp-header: Name`, and clients repeat their values in `Mcp-Param-Name` headers so that
load balancers can route on them without reading the body.

On the way in the copies must agree with the body (a header missing while the body has the
value, or naming something else, is refused with -32020), because whatever sits in front of
the gateway may have acted on them. On the way out the upstream gets copies rebuilt from the
arguments as decided (after approval and redaction), never the client's own.
"""

from __future__ import annotations

import math
import re
from typing import Any

from bastion import methods
from bastion.errors import HeaderMismatch, shown
from bastion.pipeline.exchange import Exchange
from bastion.policy.catalog import Catalog, action_id
from bastion.upstream.base import header_value

__all__ = ["check", "rebuild"]

_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def check(exchange: Exchange, catalog: Catalog | None) -> None:
    """Refuse a 2026-07-28 tool call whose `Mcp-Param-*` headers disagree with its body."""
    sent = exchange.mirrored
    for header, name in _mirrors(exchange, catalog):
        arguments = exchange.params.get("arguments")
        value = arguments.get(name) if isinstance(arguments, dict) else None
        found = sent.get(header.lower())
        if found is None and value is not None:
            raise HeaderMismatch(
                f"Mcp-Param-{header} header is required: arguments.{name} is in the body"
            )
        if found is not None and (value is None or not _same(found, value)):
            raise HeaderMismatch(
                f"Mcp-Param-{header} header {shown(found)} does not match body "
                f"arguments.{name} {shown(value)}"
            )


def rebuild(exchange: Exchange, catalog: Catalog | None) -> dict[str, str]:
    """The `Mcp-Param-*` headers the upstream gets for this call."""
    arguments = exchange.params.get("arguments")
    out: dict[str, str] = {}
    for header, name in _mirrors(exchange, catalog):
        value = arguments.get(name) if isinstance(arguments, dict) else None
        text = _text(value)
        if text is not None:
            out[f"Mcp-Param-{header}"] = header_value(text)
    return out


def _mirrors(exchange: Exchange, catalog: Catalog | None) -> list[tuple[str, str]]:
    """(header name, argument name) for each mirrored argument of the called tool."""
    target = exchange.target
    if catalog is None or target is None or exchange.method != methods.TOOLS_CALL:
        return []
    tool = catalog.tools.get(action_id(target.upstream, str(target.name)))
    properties = tool.input_schema.get("properties") if tool is not None else None
    if not isinstance(properties, dict):
        return []
    out = []
    for name, spec in properties.items():
        header = spec.get("x-mcp-header") if isinstance(spec, dict) else None
        if isinstance(header, str) and _HEADER_NAME.match(header):
            out.append((header, str(name)))
    return out


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _same(header: str, value: Any) -> bool:
    """Whether a (decoded) header carries this body value: strings exactly, numbers as
    numbers, booleans as true/false."""
    if isinstance(value, bool) or isinstance(value, str):
        return header == _text(value)
    if isinstance(value, int | float):
        try:
            return float(header) == float(value)
        except ValueError:
            return False
    return False
