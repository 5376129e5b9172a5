"""The probe's cases, derived from the deployment. Pure: no I/O.

`generate(surface)` turns what the configuration says (tenants, `tenant_arguments`, approvals,
limits) and what the gateway lists to each tenant's probe identity into named attacks, family by
family: cross-tenant ids, sessions and the canary (`tenancy`), headers and malformed bodies
(`protocol`), tokens (`tokens`), and here the tools a tenant may not reach: hidden tools called
by name and approvals bypassed with a forged state. `verdicts.judge` turns the answers into held
or failed.
"""

from __future__ import annotations

from collections.abc import Iterator

from bastion.control.probe.protocol import header_cases, malformed_cases
from bastion.control.probe.tenancy import arguments_for, canary_cases, session_cases, tenant_cases
from bastion.control.probe.tokens import token_cases
from bastion.control.probe.types import Case, Listing, Surface
from bastion.methods import TOOLS_CALL

__all__ = ["generate"]


def generate(surface: Surface) -> tuple[list[Case], list[str]]:
    """Every case the deployment calls for, and what was left out and why."""
    skipped: list[str] = []
    cases = [
        *tenant_cases(surface),
        *session_cases(surface),
        *_hidden_cases(surface, skipped),
        *_approval_cases(surface, skipped),
        *header_cases(surface),
        *token_cases(surface, skipped),
        *malformed_cases(surface),
        *canary_cases(surface, skipped),
    ]
    if not surface.tenant_arguments:
        skipped.append("tenant arguments: no upstream declares tenant_arguments")
    if len(surface.tenants) < 2:
        skipped.append("cross-tenant cases: fewer than two tenants to probe")
    return cases, skipped


def _hidden_cases(surface: Surface, skipped: list[str]) -> Iterator[Case]:
    for tenant in surface.tenants:
        shown = set(surface.listings.get(tenant, Listing()).tools)
        for name, tool in surface.catalog.items():
            if name in shown:
                continue
            if not (tool.read_only or surface.allow_writes):
                skipped.append(f"hidden-tool:{tenant}:{name}: not read-only (--allow-writes)")
                continue
            patterns = surface.tenant_arguments.get(tool.upstream, {})
            yield Case(
                name=f"hidden-tool:{tenant}:{name}",
                kind="call",
                tried=f"{tenant} calls {name}, which its tools/list does not show, by name",
                expected="refused by the gateway",
                tenant=tenant,
                spec={
                    "method": TOOLS_CALL,
                    "params": {"name": name, "arguments": arguments_for(tool, tenant, patterns)},
                },
            )


def _approval_cases(surface: Surface, skipped: list[str]) -> Iterator[Case]:
    forged = "bastion1.eyJjIjogInByb2JlIn0.0000"  # the shape of a state, no valid MAC
    yes = {"bastion.approval": {"action": "accept", "content": {"approve": True}}}
    for tenant in surface.tenants:
        for name in sorted(surface.approval_tools & set(surface.listings[tenant].tools)):
            tool = surface.catalog[name]
            if not (tool.read_only or surface.allow_writes):
                skipped.append(f"approval-bypass:{tenant}:{name}: not read-only (--allow-writes)")
                continue
            patterns = surface.tenant_arguments.get(tool.upstream, {})
            params = {
                "name": name,
                "arguments": arguments_for(tool, tenant, patterns),
                "requestState": forged,
                "inputResponses": yes,
            }
            yield Case(
                name=f"approval-bypass:{tenant}:{name}:forged-state",
                kind="call",
                tried=f"{tenant} calls {name} with a forged requestState and an approval",
                expected="refused or asked for approval, never executed",
                tenant=tenant,
                spec={"method": TOOLS_CALL, "params": params, "asked_is_held": True},
            )
