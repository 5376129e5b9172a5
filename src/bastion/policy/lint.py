"""`bastion policy lint`: policies that are valid Cedar but probably not what was meant.

- a permit with no tenant condition (it applies across tenants);
- a permit whose principal is a wildcard (anyone at all, unconstrained);
- a policy that can never match (its scope names resource types its actions never take, or
  its conditions are false whatever the request);
- a permit shadowed by an unconditional forbid that covers all it could allow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cedarpy

from bastion.policy.engine import PolicyEngine
from bastion.policy.schema import NAMESPACE

_TENANT = f"{NAMESPACE}::Tenant"


@dataclass(frozen=True)
class Finding:
    """One thing lint flags."""

    policy: str
    origin: str
    kind: str  # cross-tenant | wildcard-principal | never-matches | shadowed
    message: str

    def __str__(self) -> str:
        return f"{self.policy} ({self.origin}): {self.kind}: {self.message}"


def lint(engine: PolicyEngine) -> list[Finding]:
    """Every finding, in policy order."""
    findings: list[Finding] = []
    docs = list(engine.docs.values())
    for doc in docs:
        est = doc.est
        principal = est.get("principal", {})
        conditions = est.get("conditions", [])
        if doc.effect == "permit":
            if not _names_tenant(principal, conditions):
                findings.append(
                    Finding(
                        doc.id,
                        doc.origin,
                        "cross-tenant",
                        "this permit has no tenant condition, so it applies to every tenant; "
                        'scope it with `principal in Bastion::Tenant::"…"` or a condition on '
                        "principal.tenant",
                    )
                )
            if principal.get("op") == "All" and not _mentions(conditions, "principal"):
                findings.append(
                    Finding(
                        doc.id,
                        doc.origin,
                        "wildcard-principal",
                        "this permit names no principal at all: any caller it applies to",
                    )
                )
        impossible = _never_matches(engine, est)
        if impossible is not None:
            findings.append(Finding(doc.id, doc.origin, "never-matches", impossible))
    forbids = [d for d in docs if d.effect == "forbid" and not d.est.get("conditions")]
    for doc in docs:
        if doc.effect != "permit":
            continue
        for forbid in forbids:
            if _covers(engine, forbid.est, doc.est):
                findings.append(
                    Finding(
                        doc.id,
                        doc.origin,
                        "shadowed",
                        f"the unconditional forbid {forbid.id} ({forbid.origin}) covers "
                        "everything this permit allows, so it never allows anything",
                    )
                )
                break
    return findings


def _names_tenant(principal: Mapping[str, Any], conditions: Any) -> bool:
    entity = principal.get("entity") or (principal.get("in") or {}).get("entity") or {}
    if entity.get("type") == _TENANT:
        return True
    return _mentions(conditions, "tenant") or _mentions(conditions, _TENANT)


def _mentions(node: Any, name: str) -> bool:
    if isinstance(node, dict):
        if node.get("attr") == name or node.get("Var") == name or node.get("type") == name:
            return True
        return any(_mentions(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, name) for v in node)
    return bool(node == name)


def _never_matches(engine: PolicyEngine, est: Mapping[str, Any]) -> str | None:
    actions = engine.actions_of(est.get("action", {}))
    if not actions:
        return "its action scope matches no action of this deployment"
    resource = est.get("resource", {})
    wanted = resource.get("entity_type") if resource.get("op") == "is" else None
    if wanted is not None:
        kinds = set().union(*(_resource_kinds(engine, a) for a in actions))
        if wanted not in kinds:
            return f"its actions never take a resource of type {wanted}"
    if not est.get("conditions"):
        return None
    # Partial evaluation with everything about the request unknown: if the policy is not even
    # possibly determining, its conditions are false whatever the request is.
    # (Scopes are checked above; with them in, an unknown principal would keep every
    # condition residual.)
    bare = {**est, "principal": {"op": "All"}, "action": {"op": "All"}, "resource": {"op": "All"}}
    single = {"staticPolicies": {"p": bare}, "templates": {}, "templateLinks": []}
    policies = cedarpy.PolicySet.from_json_str(json.dumps(single))
    for action in sorted(actions)[:50]:
        request = {
            "principal": None,
            "action": f'{NAMESPACE}::Action::"{action}"',
            "resource": None,
            "context": None,
        }
        answer = cedarpy.is_authorized_partial(request, policies, [])
        diagnostics = answer._authz_resp.get("diagnostics") or {}  # noqa: SLF001
        if (
            diagnostics.get("may_be_determining")
            or diagnostics.get("reason")
            or diagnostics.get("errors")
        ):
            return None
    return "its conditions are false for every request"


def _resource_kinds(engine: PolicyEngine, action: str) -> set[str]:
    if action in engine.schema.tool_actions:
        return {f"{NAMESPACE}::Tool"}
    if action in ("read_resource", "subscribe_resource"):
        return {f"{NAMESPACE}::Resource"}
    if action == "get_prompt":
        return {f"{NAMESPACE}::Prompt"}
    if action == "complete":
        return {f"{NAMESPACE}::Prompt", f"{NAMESPACE}::Resource"}
    return {f"{NAMESPACE}::Server"}


def _covers(engine: PolicyEngine, forbid: Mapping[str, Any], permit: Mapping[str, Any]) -> bool:
    for part in ("principal", "resource"):
        outer, inner = forbid.get(part, {}), permit.get(part, {})
        if outer.get("op") != "All" and outer != inner:
            return False
    outer_actions = engine.actions_of(forbid.get("action", {}))
    inner_actions = engine.actions_of(permit.get("action", {}))
    return bool(inner_actions) and inner_actions <= outer_actions
