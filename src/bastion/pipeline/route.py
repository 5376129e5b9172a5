"""Routing: which upstream serves a request, and under which of its own names.

A multiplexing route (a virtual server) exposes tools and prompts as `<upstream>__<name>`.
Upstream names never contain an underscore, so the first `__` always ends the prefix and the
mapping is reversible whatever the tool's own name is. Resource URIs are left as the upstream
wrote them; the route learns which upstream owns which URI and template from the lists.

```
owners       per route: URI (and template) → the upstream that first listed it. Another
             upstream listing it is a claim: refused (not learnt, never routed to it).
views        per route and tenant: the URIs and templates that tenant's own list calls
             showed it; a tenant's request is routed only by its own view, then by the
             gateway's (what the gateway learns listing as itself, tenant `bastion`).
```
"""

from __future__ import annotations

import logging
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from bastion.config import RESERVED_TENANT, TOOL_SEPARATOR
from bastion.errors import InvalidParams, shown
from bastion.methods import METHODS, Routing
from bastion.pipeline.exchange import Exchange
from bastion.types import JSON, Target

log = logging.getLogger("bastion.dispatch")

# Bounds on what upstreams can make the gateway remember (a hostile one may list millions).
VIEW_URIS = 10_000  # URIs in one tenant's view of a route; the oldest learnt go first
VIEW_TEMPLATES = 1_000  # templates in one tenant's view of a route; the oldest go first
OWNED_URIS = 50_000  # URIs one upstream may own on a route; beyond, none is learnt
OWNED_TEMPLATES = 256  # templates one upstream may own on a route; beyond, none is learnt
TEMPLATE_EXPRESSIONS = 16  # a template with more `{…}` is not learnt
TEMPLATE_URI_CHARS = 8_192  # a longer URI is matched against no template
_CLAIMS_REMEMBERED = 10_000  # (claimant, item) pairs already alerted, per route


@dataclass(frozen=True, slots=True)
class UriTemplate:
    """An RFC 6570 template as the route matches it: literals around expressions; `{+x}` and
    `{#x}` take any characters, the others any but `/ ? #`. Matched in linear time (an
    upstream's template never gets to run a backtracking regular expression)."""

    literals: tuple[str, ...]  # one more than the expressions
    wide: tuple[bool, ...]  # per expression: may it span `/ ? #`

    @classmethod
    def parse(cls, template: str) -> UriTemplate:
        """The template's shape; two templates of the same shape are the same template."""
        literals, wide, at = [], [], 0
        for found in re.finditer(r"\{([^{}]*)\}", template):
            literals.append(template[at : found.start()])
            wide.append(found.group(1)[:1] in ("+", "#"))
            at = found.end()
        literals.append(template[at:])
        return cls(tuple(literals), tuple(wide))

    def matches(self, uri: str) -> bool:
        """Whether the template expands to `uri` (each expression to at least one character)."""
        first = self.literals[0]
        if len(uri) > TEMPLATE_URI_CHARS or not uri.startswith(first):
            return False
        size = len(uri)
        # Where the run of characters a narrow expression may take ends, from each position.
        stop = [size] * (size + 1)
        for i in range(size - 1, -1, -1):
            stop[i] = i if uri[i] in "/?#" else stop[i + 1]
        starts = [len(first)]
        for wide, literal in zip(self.wide, self.literals[1:], strict=True):
            ends = bytearray(size + 1)
            covered = 0
            for p in starts:  # ascending: each end is marked once
                last = size if wide else stop[p]
                for e in range(max(p + 1, covered + 1), last + 1):
                    ends[e] = 1
                covered = max(covered, last)
            starts = [
                e + len(literal) for e in range(size + 1) if ends[e] and uri.startswith(literal, e)
            ]
            if not starts:
                return False
        return size in starts


@dataclass(frozen=True, slots=True)
class Claim:
    """An upstream listing a URI or template another upstream of the route owns: refused."""

    kind: str  # "uri" or "template"
    value: str  # the URI or the template as the claimant wrote it
    claimant: str
    owner: str
    first: bool  # the first such claim of this claimant on this route: alert once


@dataclass
class _View:
    """What one tenant's own list calls showed it on a route (or the gateway's, listing as
    itself): URI → owner, and the shapes of its templates."""

    uris: OrderedDict[str, str] = field(default_factory=OrderedDict)
    templates: OrderedDict[UriTemplate, None] = field(default_factory=OrderedDict)
    full: bool = False  # the bound was reached (logged once)


@dataclass
class UriIndex:
    """Who owns which resource URI and template on a route, and which tenant saw which.

    Ownership is per route, across tenants and the gateway: the first upstream to list a URI
    (or a template of a shape) owns it for as long as the gateway runs, so a URI of a route
    is served by one upstream for everyone. Views are per tenant: a tenant's read is routed
    by what its own listings showed, then by the gateway's view. The gateway's view (tenant
    `bastion`) is the upstreams' answer to the gateway itself, not any tenant's data.
    """

    route: str
    _owners: dict[str, str] = field(default_factory=dict)
    _template_owners: dict[UriTemplate, str] = field(default_factory=dict)  # oldest first
    _owned: Counter[tuple[str, str]] = field(default_factory=Counter)  # (upstream, kind)
    _views: dict[str, _View] = field(default_factory=dict)
    _claims: OrderedDict[tuple[str, str, str], None] = field(default_factory=OrderedDict)

    def learn_resources(self, tenant: str, upstream: str, items: list[JSON]) -> list[Claim]:
        """Learn the URIs an upstream listed to `tenant`; return those it claims."""
        view = self._views.setdefault(tenant, _View())
        claims: list[Claim] = []
        for item in items:
            uri = item.get("uri")
            if not isinstance(uri, str):
                continue
            owner = self._owners.get(uri)
            if owner is None and self._may_own(upstream, "uri", OWNED_URIS):
                owner = self._owners[uri] = upstream
                self._owned[(upstream, "uri")] += 1
            if owner is None:
                continue
            if owner != upstream:
                claims.append(self._claim("uri", uri, upstream, owner))
                continue
            view.uris.pop(uri, None)
            view.uris[uri] = owner
            if len(view.uris) > VIEW_URIS:
                view.uris.popitem(last=False)
                self._log_full(view, tenant, "URIs", VIEW_URIS)
        return claims

    def learn_templates(self, tenant: str, upstream: str, items: list[JSON]) -> list[Claim]:
        """Learn the URI templates an upstream listed to `tenant`; return those it claims
        (a template of the same shape as another upstream's)."""
        view = self._views.setdefault(tenant, _View())
        claims: list[Claim] = []
        for item in items:
            text = item.get("uriTemplate")
            if not isinstance(text, str):
                continue
            template = UriTemplate.parse(text)
            if len(template.wide) > TEMPLATE_EXPRESSIONS:
                log.warning(
                    "route %r: upstream %r lists a template with more than %d expressions: "
                    "not learnt",
                    self.route,
                    upstream,
                    TEMPLATE_EXPRESSIONS,
                )
                continue
            owner = self._template_owners.get(template)
            if owner is None and self._may_own(upstream, "template", OWNED_TEMPLATES):
                owner = self._template_owners[template] = upstream
                self._owned[(upstream, "template")] += 1
            if owner is None:
                continue
            if owner != upstream:
                claims.append(self._claim("template", text, upstream, owner))
                continue
            view.templates.pop(template, None)
            view.templates[template] = None
            if len(view.templates) > VIEW_TEMPLATES:
                view.templates.popitem(last=False)
                self._log_full(view, tenant, "templates", VIEW_TEMPLATES)
        return claims

    def resolve(self, uri: str, tenant: str) -> str | None:
        """The upstream serving `uri` for `tenant`: an exact URI its own view or the gateway's
        holds, else the oldest owned template of those views matching it; None if none."""
        views = [v for t in dict.fromkeys((tenant, RESERVED_TENANT)) if (v := self._views.get(t))]
        for view in views:
            owner = view.uris.get(uri)
            if owner is not None:
                return owner
        for template, owner in self._template_owners.items():
            if any(template in v.templates for v in views) and template.matches(uri):
                return owner
        return None

    def _may_own(self, upstream: str, kind: str, limit: int) -> bool:
        """Whether `upstream` may own one more item of `kind` (never by taking another's)."""
        if self._owned[(upstream, kind)] < limit:
            return True
        if self._owned[(upstream, kind)] == limit:
            self._owned[(upstream, kind)] += 1  # logged once
            log.warning(
                "route %r: upstream %r lists more than %d resource %ss: the rest are not "
                "learnt (reads of them are not routed)",
                self.route,
                upstream,
                limit,
                kind,
            )
        return False

    def _claim(self, kind: str, value: str, claimant: str, owner: str) -> Claim:
        key = (claimant, kind, value)
        first = key not in self._claims
        if first:
            self._claims[key] = None
            if len(self._claims) > _CLAIMS_REMEMBERED:
                self._claims.popitem(last=False)
        return Claim(kind, value, claimant, owner, first)

    def _log_full(self, view: _View, tenant: str, what: str, limit: int) -> None:
        if not view.full:
            view.full = True
            log.warning(
                "route %r: tenant %r's index holds %d %s, the most it keeps: the oldest are "
                "forgotten (learnt again from the next listing)",
                self.route,
                tenant,
                limit,
                what,
            )


@dataclass
class Route:
    """One MCP endpoint: a path and the upstreams behind it."""

    name: str
    path: str
    upstreams: tuple[str, ...]
    multiplex: bool
    instructions: str | None = None
    index: UriIndex = field(init=False)

    def __post_init__(self) -> None:
        self.index = UriIndex(self.name)

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

    def learn_resources(self, upstream: str, items: list[JSON], tenant: str) -> list[Claim]:
        """Remember which upstream listed which resource URIs to `tenant`; return the URIs it
        listed that another upstream of the route owns (refused, not learnt)."""
        if not self.multiplex or upstream not in self.upstreams:
            return []
        return self.index.learn_resources(tenant, upstream, items)

    def learn_templates(self, upstream: str, items: list[JSON], tenant: str) -> list[Claim]:
        """Remember which upstream offers which URI templates (RFC 6570, simple expansions)
        to `tenant`; return the templates another upstream of the route owns (refused)."""
        if not self.multiplex or upstream not in self.upstreams:
            return []
        return self.index.learn_templates(tenant, upstream, items)

    def resolve_uri(self, uri: str, tenant: str = RESERVED_TENANT) -> Target | None:
        """The upstream owning a resource URI as `tenant` has seen it (its own listings, then
        the gateway's), or None. Without a tenant, the gateway's listings only."""
        if not self.multiplex:
            return Target(self.upstreams[0], uri)
        owner = self.index.resolve(uri, tenant)
        return Target(owner, uri) if owner is not None else None

    def target(self, exchange: Exchange) -> Target | None:
        """Where a request goes; None for methods the gateway answers or fans out itself."""
        method = exchange.method
        params = exchange.params
        known = METHODS.get(method)
        routing = known.routing if known is not None else None
        tenant = exchange.principal.tenant if exchange.principal else RESERVED_TENANT
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
            return self.resolve_uri(uri, tenant)
        if routing is Routing.BY_REF:
            return self._by_ref(method, params.get("ref"), tenant)
        return None

    def _by_ref(self, method: str, ref: object, tenant: str) -> Target | None:
        """Where a request naming a prompt or resource in params.ref goes."""
        if not isinstance(ref, dict):
            raise InvalidParams(f"{method} needs params.ref as an object")
        if ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
            return self.resolve_name(ref["name"], "prompt")
        if ref.get("type") == "ref/resource" and isinstance(ref.get("uri"), str):
            return self.resolve_uri(ref["uri"], tenant)
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
