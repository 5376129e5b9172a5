"""Deciding: default deny, forbid wins, with the policies that decided and why.

Policies are partitioned at load by the actions their scope can match and by the tenant their
principal scope names (`principal in Bastion::Tenant::"acme"`), so one request is evaluated
against the small set that can apply to its (action, tenant): a decision costs the same with
10 policies or 10,000. Sets are built on first use and kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cedarpy
import orjson
from cedarpy import _internal as cedar_native

from bastion.errors import shown
from bastion.policy.catalog import Catalog
from bastion.policy.schema import GROUPS, NAMESPACE, PolicySchema
from bastion.policy.source import PolicyDoc

log = logging.getLogger("bastion.policy")

_ACTION = f"{NAMESPACE}::Action"
_TENANT = f"{NAMESPACE}::Tenant"
_MAX_PRINCIPALS = 4096


@dataclass(frozen=True)
class Who:
    """The calling principal as policy sees it."""

    agent: str
    tenant: str
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    environment: str = ""
    user: str | None = None


@dataclass(frozen=True)
class CedarRequest:
    """One question to the engine."""

    who: Who
    action: str  # action id, e.g. "workspace__search_tasks" or "read_resource"
    resource: tuple[str, str]  # (entity type without namespace, id)
    context: Mapping[str, Any]
    extra_entities: tuple[Mapping[str, Any], ...] = ()  # e.g. a Resource not in the catalog
    # The tool, prompt or URI as the caller named it on its route (`echo`, not `echo__echo`,
    # on /servers/echo/mcp), for messages; None: the resource id.
    named: str | None = None


@dataclass
class Verdict:
    """What the engine decided."""

    allowed: bool
    policies: tuple[str, ...]
    reasons: tuple[str, ...]
    obligations: dict[str, Any] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    undecided: bool = False  # partial evaluation: depends on what is not known yet


def _uid(kind: str, ident: str) -> dict[str, str]:
    return {"type": f"{NAMESPACE}::{kind}", "id": ident}


def _ref(kind: str, ident: str) -> dict[str, Any]:
    return {"__entity": _uid(kind, ident)}


class PolicyEngine:
    """Validated policies over a schema and a catalog, ready to decide."""

    def __init__(
        self, schema: PolicySchema, catalog: Catalog, docs: Sequence[PolicyDoc], version: int = 1
    ) -> None:
        self.schema = schema
        self.catalog = catalog
        self.docs = {doc.id: doc for doc in docs}
        self.version = version
        self._sets: dict[tuple[str, str], cedarpy.PolicySet] = {}
        self._principals: dict[Who, Any] = {}
        # action id → tenant ("" for any) → policy ids
        self._index: dict[str, dict[str, list[str]]] = {}
        for doc in docs:
            tenant = _tenant_scope(doc.est.get("principal", {}))
            for action in self.actions_of(doc.est.get("action", {})):
                self._index.setdefault(action, {}).setdefault(tenant, []).append(doc.id)
        self._base = cedarpy.Entities.from_json_str(json.dumps(self._catalog_entities()))
        self.needs = referenced(doc.est for doc in docs)

    # -- partitions --------------------------------------------------------------------------

    def actions_of(self, scope: Mapping[str, Any]) -> set[str]:
        """The concrete actions a policy's action scope can match (groups expanded)."""
        op = scope.get("op")
        every = set(self.schema.actions) - GROUPS
        if op == "All":
            return every
        named: list[str] = []
        if "entity" in scope:
            named.append(scope["entity"]["id"])
        named.extend(e["id"] for e in scope.get("entities", []))
        if op == "==":
            return set(named)
        out: set[str] = set()
        for name in named:
            out.add(name)
            out.update(a for a, parent in self.schema.parents.items() if parent == name)
        return out - GROUPS

    def policy_ids(self, action: str, tenant: str) -> list[str]:
        """The policies that can apply to an (action, tenant)."""
        buckets = self._index.get(action, {})
        return [*buckets.get(tenant, ()), *buckets.get("", ())]

    def _set(self, action: str, tenant: str) -> cedarpy.PolicySet:
        key = (action, tenant)
        found = self._sets.get(key)
        if found is not None:
            return found
        ids = self.policy_ids(action, tenant)
        document = {
            "staticPolicies": {pid: self.docs[pid].est for pid in ids},
            "templates": {},
            "templateLinks": [],
        }
        built = cedarpy.PolicySet.from_json_str(json.dumps(document))
        self._sets[key] = built
        return built

    # -- entities ----------------------------------------------------------------------------

    def _catalog_entities(self) -> list[dict[str, Any]]:
        entities: list[dict[str, Any]] = [
            {
                "uid": {"type": _ACTION, "id": action},
                "attrs": {},
                "parents": [
                    {"type": _ACTION, "id": parent}
                    for parent in (self.schema.parents.get(action),)
                    if parent is not None
                ],
            }
            for action in sorted(self.schema.actions)
        ]
        for server, trusted in self.catalog.servers.items():
            environment = self.catalog.environments.get(server, "")
            attrs = {"trusted": trusted, "environment": environment}
            entities.append({"uid": _uid("Server", server), "attrs": attrs, "parents": []})
        for action, tool in self.schema.tool_actions.items():
            entities.append(
                {
                    "uid": _uid("Tool", action),
                    "attrs": {
                        "server": _ref("Server", tool.upstream),
                        "name": tool.name,
                        **tool.annotations,
                        "trusted": self.catalog.servers.get(tool.upstream, False),
                        "labels": list(tool.labels),
                    },
                    "parents": [_uid("Server", tool.upstream)],
                }
            )
        for pid, (server, name) in self.catalog.prompts.items():
            entities.append(
                {
                    "uid": _uid("Prompt", pid),
                    "attrs": {"server": _ref("Server", server), "name": name},
                    "parents": [_uid("Server", server)],
                }
            )
        return entities

    def _entities(self, who: Who, extra: tuple[Mapping[str, Any], ...]) -> Any:
        handle = self._principals.get(who)
        if handle is None:
            delta = [
                {"uid": _uid("Tenant", who.tenant), "attrs": {}, "parents": []},
                {
                    "uid": _uid("Agent", who.agent),
                    "attrs": {
                        "tenant": _ref("Tenant", who.tenant),
                        "roles": sorted(who.roles),
                        "scopes": sorted(who.scopes),
                        "environment": who.environment,
                    },
                    "parents": [_uid("Tenant", who.tenant)],
                },
            ]
            if who.user is not None:
                delta.append(
                    {
                        "uid": _uid("User", who.user),
                        "attrs": {"tenant": _ref("Tenant", who.tenant)},
                        "parents": [_uid("Tenant", who.tenant)],
                    }
                )
            handle = self._base.with_added_json_str(json.dumps(delta))
            if len(self._principals) >= _MAX_PRINCIPALS:
                self._principals.clear()
            self._principals[who] = handle
        if extra:
            handle = handle.with_added_json_str(json.dumps(list(extra)))
        return handle

    # -- deciding ----------------------------------------------------------------------------

    def decide(self, request: CedarRequest) -> Verdict:
        """Allow or deny, with the deciding policies, their reasons and obligations."""
        if request.action not in self.schema.actions:
            what = shown(request.named or request.action)
            return Verdict(False, (), (f"{what} is not a known action (tool not in the catalog)",))
        who = request.who
        native = {
            "principal": _uid("Agent", who.agent),
            "action": {"type": _ACTION, "id": request.action},
            "resource": _uid(*request.resource),
            "context": orjson.dumps(request.context).decode(),
        }
        entities = self._entities(who, request.extra_entities)
        raw = cedar_native.is_authorized_batch(
            [native], self._set(request.action, who.tenant), entities._inner, None, False
        )[0]
        answer = orjson.loads(raw)
        diagnostics = answer.get("diagnostics") or {}
        return self._verdict(request, answer.get("decision"), diagnostics)

    def _verdict(
        self, request: CedarRequest, decision: Any, diagnostics: Mapping[str, Any]
    ) -> Verdict:
        # Cedar reports the deciding policies in no fixed order; sorted, the reasons built from
        # them (and so the error message) read the same on every call.
        ids = tuple(sorted(diagnostics.get("reason") or ()))
        errors = tuple(sorted(diagnostics.get("errors") or (), key=str))
        if decision == "Allow" and not errors:
            docs = [self.docs[i] for i in ids if i in self.docs]
            return Verdict(
                True,
                ids,
                tuple(d.reason for d in docs),
                obligations_of(docs),
            )
        if errors:
            # Cedar skips a policy that errors; a skipped forbid must not turn into an allow.
            log.warning("policy evaluation errors for %s: %s", request.action, errors)
            return Verdict(
                False, ids, (f"policy could not be evaluated: {errors[0]}",), errors=errors
            )
        forbids = [self.docs[i] for i in ids if i in self.docs and self.docs[i].effect == "forbid"]
        if forbids:
            return Verdict(False, tuple(d.id for d in forbids), tuple(d.reason for d in forbids))
        resource = shown(request.named or request.resource[1])
        who = request.who
        return Verdict(
            False,
            (),
            (
                f"no policy permits agent {shown(who.agent)} of tenant {shown(who.tenant)} "
                f"to {_verb(request.action)} {resource} (default deny)",
            ),
        )

    def may(self, request: CedarRequest, unknown: Sequence[str]) -> bool:
        """Whether the request can be allowed for some values of the context attributes named
        in `unknown` (the rest known): false only when it is denied whatever they are."""
        if request.action not in self.schema.actions:
            return False
        return self._partial(request, unknown).get("decision") != "Deny"

    def reach(self, request: CedarRequest, unknown: Sequence[str]) -> Verdict:
        """What partial evaluation says of a request whose context attributes `unknown` are
        not known (the inventory's question): allowed whatever they are; `undecided` when it
        depends on them; else denied. `policies` are those that may decide (permits and
        forbids), `obligations` those of the permits. A report, never an enforcement."""
        if request.action not in self.schema.actions:
            return Verdict(False, (), (f"{shown(request.action)} is not a known action",))
        answer = self._partial(request, unknown)
        diagnostics = answer.get("diagnostics") or {}
        ids = sorted({*diagnostics.get("reason", ()), *diagnostics.get("may_be_determining", ())})
        docs = [self.docs[i] for i in ids if i in self.docs]
        permits = [doc for doc in docs if doc.effect == "permit"]
        return Verdict(
            allowed=answer.get("decision") == "Allow",
            policies=tuple(doc.id for doc in docs),
            reasons=tuple(doc.reason for doc in docs),
            obligations=obligations_of(permits),
            errors=tuple(str(e) for e in diagnostics.get("errors") or ()),
            undecided=answer.get("decision") not in ("Allow", "Deny"),
        )

    def _partial(self, request: CedarRequest, unknown: Sequence[str]) -> dict[str, Any]:
        """cedarpy's partial evaluation of `request` with `unknown` context attributes."""
        context = dict(request.context)
        for name in unknown:
            context[name] = {"__extn": {"fn": "unknown", "arg": name}}
        who = request.who
        native = {
            "principal": f"{NAMESPACE}::Agent::{json.dumps(who.agent)}",
            "action": f"{_ACTION}::{json.dumps(request.action)}",
            "resource": f"{NAMESPACE}::{request.resource[0]}::{json.dumps(request.resource[1])}",
            "context": orjson.dumps(context).decode(),
        }
        result = cedarpy.is_authorized_partial(
            native,
            self._set(request.action, who.tenant),
            self._entities(who, request.extra_entities),
        )
        answer: dict[str, Any] = result._authz_resp
        return answer


def obligations_of(docs: Sequence[PolicyDoc]) -> dict[str, Any]:
    """What the permits that allowed a call ask for: approval, rate limits, redactions."""
    out: dict[str, Any] = {}
    sensitive: set[str] = set()
    for doc in docs:
        notes = doc.annotations
        if "approval" in notes and notes["approval"].lower() not in ("false", "no", "off"):
            out["approval"] = approval_of(doc.id, notes, out.get("approval"))
        sensitive.update(sensitive_names(notes.get("sensitive", "")))
        if notes.get("rate"):
            out.setdefault("rate", []).append({"policy": doc.id, "limit": notes["rate"]})
        if notes.get("redact"):
            paths = [p.strip() for p in notes["redact"].split(",") if p.strip()]
            out.setdefault("redact", []).extend(paths)
    if sensitive and "approval" in out:  # what the approver is shown first
        out["approval"]["sensitive"] = sorted(sensitive)
    return out


def approval_of(policy: str, notes: Mapping[str, str], before: Any) -> dict[str, Any]:
    """The approval obligation of one permit: `mode` human (a person decides) or client (the
    client is asked; also the older `required`/`true`), the approver roles (`@approvers`, none:
    the configured default) and `@approval_timeout` seconds. Of two permits asking, a
    person's approval wins over the client's."""
    human = notes["approval"].lower() == "human"
    if isinstance(before, dict) and before.get("mode") == "human" and not human:
        return before
    found: dict[str, Any] = {"required": True, "policy": policy}
    found["mode"] = "human" if human else "client"
    if notes.get("approvers"):
        found["approvers"] = sensitive_names(notes["approvers"])
    if notes.get("approval_timeout"):
        found["timeout"] = float(notes["approval_timeout"])
    return found


def sensitive_names(text: str) -> list[str]:
    """The argument names or paths of a `@sensitive("to, cc, message.to")` annotation."""
    return [name.strip() for name in text.split(",") if name.strip()]


def referenced(ests: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """Every attribute name any policy reads or tests (`x.name`, `x has name`). The request
    context is built with only these, so policies that never read the history or the rate
    counters do not pay for them."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in (".", "has") and isinstance(value, dict) and "attr" in value:
                    names.add(str(value["attr"]))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for est in ests:
        walk(est.get("conditions", []))
    return frozenset(names)


def _tenant_scope(scope: Mapping[str, Any]) -> str:
    entity = scope.get("entity")
    if scope.get("op") == "in" and isinstance(entity, dict) and entity.get("type") == _TENANT:
        return str(entity.get("id", ""))
    return ""


def _verb(action: str) -> str:
    if "__" in action:
        return "call tool"
    return action.replace("_", " ")
