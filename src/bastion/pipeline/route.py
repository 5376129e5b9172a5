"""Routing: which upstream serves a request, and under which of its own names.

A multiplexing route (a virtual server) exposes tools and prompts as `<upstream>__<name>`.
Upstream names never contain an underscore, so the first `__` always ends the prefix and the
mapping is reversible whatever the tool's own name is. Resource URIs are left as the upstream
wrote them; the route learns which upstream owns which URI and template from the lists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bastion.config import TOOL_SEPARATOR
from bastion.errors import InvalidParams, shown
from bastion.methods import METHODS, Routing
from bastion.pipeline.exchange import Exchange
from bastion.types import JSON, Target


@dataclass
class Route:
    """One MCP endpoint: a path and the upstreams behind it."""

    name: str
    path: str
    upstreams: tuple[str, ...]
    multiplex: bool
    instructions: str | None = None
    _uris: dict[str, str] = field(default_factory=dict)
    _templates: list[tuple[re.Pattern[str], str]] = field(default_factory=list)

    def expose(self, upstream: str, name: str) -> str:
        """The name a client sees for an upstream's tool or prompt."""
        return f"{upstream}{TOOL_SEPARATOR}{name}" if self.multiplex else name

    def resolve_name(self, exposed: str, kind: str) -> Target:
        """The upstream and original name behind an exposed tool or prompt name."""
        if not self.multiplex:
            return Target(self.upstreams[0], exposed)
        upstream, sep, name = exposed.partition(TOOL_SEPARATOR)
        if not sep or not name or upstream not in self.upstreams:
            raise InvalidParams(
                f"unknown {kind} {shown(exposed)}: names on this route are "
                f"'<server>{TOOL_SEPARATOR}<{kind}>' with <server> one of {list(self.upstreams)}"
            )
        return Target(upstream, name)

    def learn_resources(self, upstream: str, items: list[JSON]) -> None:
        """Remember which upstream listed which resource URIs."""
        for item in items:
            uri = item.get("uri")
            if isinstance(uri, str):
                self._uris[uri] = upstream

    def learn_templates(self, upstream: str, items: list[JSON]) -> None:
        """Remember which upstream offers which URI templates (RFC 6570, simple expansions)."""
        for item in items:
            template = item.get("uriTemplate")
            if isinstance(template, str):
                pattern = re.compile(_template_regex(template))
                self._templates = [
                    (p, u) for p, u in self._templates if p.pattern != pattern.pattern
                ]
                self._templates.append((pattern, upstream))

    def resolve_uri(self, uri: str) -> Target | None:
        """The upstream owning a resource URI, or None when the route has not seen it."""
        if not self.multiplex:
            return Target(self.upstreams[0], uri)
        owner = self._uris.get(uri)
        if owner is None:
            matches = {u for p, u in self._templates if p.fullmatch(uri)}
            if len(matches) == 1:
                owner = matches.pop()
        return Target(owner, uri) if owner is not None else None

    def target(self, exchange: Exchange) -> Target | None:
        """Where a request goes; None for methods the gateway answers or fans out itself."""
        method = exchange.method
        params = exchange.params
        known = METHODS.get(method)
        routing = known.routing if known is not None else None
        if routing is Routing.BY_NAME:
            assert known is not None and known.names is not None  # noqa: S101 - the table
            name = params.get("name")
            if not isinstance(name, str):
                raise InvalidParams(f"{method} needs params.name as a string")
            return self.resolve_name(name, known.names)
        if routing is Routing.BY_URI:
            uri = params.get("uri")
            if not isinstance(uri, str):
                raise InvalidParams(f"{method} needs params.uri as a string")
            return self.resolve_uri(uri)
        if routing is Routing.BY_REF:
            return self._by_ref(method, params.get("ref"))
        return None

    def _by_ref(self, method: str, ref: object) -> Target | None:
        """Where a request naming a prompt or resource in params.ref goes."""
        if not isinstance(ref, dict):
            raise InvalidParams(f"{method} needs params.ref as an object")
        if ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
            return self.resolve_name(ref["name"], "prompt")
        if ref.get("type") == "ref/resource" and isinstance(ref.get("uri"), str):
            return self.resolve_uri(ref["uri"])
        raise InvalidParams(f"{method} ref must be ref/prompt or ref/resource")


def requested_name(exchange: Exchange) -> str | None:
    """The tool, prompt or resource as the caller named it on its route — `echo` on
    /servers/echo/mcp where policy says `echo__echo` — for messages about the request; what
    `Route.expose` gives for the resolved target. None when the request names none."""
    params = exchange.params
    ref = params.get("ref")
    for value in (
        params.get("name"),
        params.get("uri"),
        ref.get("name") if isinstance(ref, dict) else None,
        ref.get("uri") if isinstance(ref, dict) else None,
    ):
        if isinstance(value, str):
            return value
    return None


def _template_regex(template: str) -> str:
    out = []
    for literal, expr in re.findall(r"([^{]*)(\{[^}]*\})?", template):
        out.append(re.escape(literal))
        if expr:
            out.append("(.+)" if expr[1:2] in ("+", "#") else "([^/?#]+)")
    return "".join(out)
