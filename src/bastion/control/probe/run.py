"""The probe's driver: one run against a running gateway.

It reads the gateway's OAuth metadata (`client`), enlists its identities (`identities`), lists
what each tenant is shown and builds the catalog the gateway trusts, derives the cases
(`cases`), sends each one (`attacks`) and judges the answers (`verdicts`). When it ends, its own
agents are offboarded and a token of one of them must then be refused.

Read-only by default: a tool is called only when the catalog the gateway trusts marks it
read-only (`trusted` upstream, `readOnlyHint`), unless `allow_writes`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion import config
from bastion.app import routes_for
from bastion.control.probe import attacks
from bastion.control.probe.cases import generate
from bastion.control.probe.client import REVOKE_S, Gateway
from bastion.control.probe.identities import Identity, Roster
from bastion.control.probe.types import Case, Listing, PromptInfo, Surface, ToolInfo, Verdict
from bastion.control.probe.verdicts import judge, leaked_paths, marker_paths
from bastion.errors import InputError
from bastion.identity.jwt import unverified_claims
from bastion.identity.keys import SigningKey
from bastion.methods import (
    PROMPTS_LIST,
    RESOURCES_TEMPLATES_LIST,
    TOOLS_CALL,
    TOOLS_LIST,
    list_keys,
)
from bastion.policy.catalog import Catalog
from bastion.state.keystore import FileKeyStore

__all__ = ["Probe", "Result"]


@dataclass
class Result:
    """What a run found."""

    verdicts: list[Verdict]
    skipped: list[str]
    identities: list[str]
    seconds: float
    run_id: str

    @property
    def failed(self) -> list[Verdict]:
        """The cases that did not hold."""
        return [v for v in self.verdicts if not v.held]


class Probe:
    """One run against the gateway at `url` configured by `settings`."""

    roster: Roster  # set when the run starts: opening the registry may fail

    def __init__(
        self,
        settings: config.Settings,
        url: str,
        agents: list[str],
        *,
        allow_writes: bool = False,
        max_cases: int = 300,
        timeout: float = 10.0,
    ) -> None:
        self.settings = settings
        self.agents = agents
        self.allow_writes = allow_writes
        self.max_cases = max_cases
        self.run_id = uuid.uuid4().hex[:8]
        self.state = Path(settings.state_dir)
        self.skipped: list[str] = []
        routes = routes_for(settings)
        paths = [r.path for r in routes]
        if not paths:
            raise InputError("the configuration serves no MCP route to probe")
        # The route attacked: the first virtual server, else the first route.
        main = next((r.path for r in routes if r.multiplex), paths[0])
        # Another route, for tokens of the wrong audience.
        self.other_route = next((p for p in paths if p != main), None)
        self.gateway = Gateway(url, main, timeout)

    @property
    def main(self) -> str:
        """The route attacked."""
        return self.gateway.main

    def run(self) -> Result:
        """Derive the cases, run them, clean up; the verdicts."""
        started = time.monotonic()
        self.roster = Roster(self.settings, self.run_id, self.agents, self.skipped)
        try:
            self.gateway.discover(r.path for r in routes_for(self.settings))
            verdicts = self._attack()
        finally:
            verdicts_after = self._retire()
            self.roster.close()
            self.gateway.close()
        return Result(
            verdicts + verdicts_after,
            self.skipped,
            [i.agent for i in self.roster.identities],
            time.monotonic() - started,
            self.run_id,
        )

    def _attack(self) -> list[Verdict]:
        self.roster.enlist(self.gateway)
        cases, skipped = generate(self._surface())
        self.skipped += skipped
        if len(cases) > self.max_cases:
            self.skipped.append(f"{len(cases) - self.max_cases} cases beyond --max-cases")
            cases = cases[: self.max_cases]
        verdicts: list[Verdict] = []
        shown: set[str] = set()  # groups whose plain spelling already failed
        for case, who in self.roster.assign(self.gateway, cases):
            group = case.spec.get("group")
            if group in shown:
                # The weakness is shown; each further attempt would reach the upstream again
                # (and its answers may count towards quarantining it).
                self.skipped.append(f"{case.name}: the plain spelling already failed")
                continue
            verdict = judge(case, attacks.run(self, case, who))
            if group is not None and not verdict.held:
                shown.add(group)
            verdicts.append(verdict)
        return verdicts

    def _retire(self) -> list[Verdict]:
        """Offboard the probe's own agents; then a token of one must be refused."""
        mine = self.roster.retire()
        last = next((w for w in reversed(mine) if self.main in w.tokens), None)
        if last is None or not self.gateway.resources:
            return []
        case = Case(
            name="token:offboarded-agent",
            kind="token",
            tried="a token of a probe agent offboarded at the end of the run",
            expected=f"401 within {REVOKE_S:g} s",
            tenant=last.tenant,
            denial=False,
            expect="status",
            statuses=(401,),
        )
        return [judge(case, self.gateway.until_refused(last.tokens[self.main]))]

    # -- what the deployment offers ---------------------------------------------------------

    def _surface(self) -> Surface:
        route = next(r for r in routes_for(self.settings) if r.path == self.main)
        catalog = self._catalog(route.upstreams, route.multiplex)
        listings: dict[str, Listing] = {}
        for who in self.roster.identities:
            if who.tenant not in listings:
                listings[who.tenant] = self._listing(who)
        for listing in listings.values():  # a tool shown but not in the saved catalog
            for name in listing.tools:
                catalog.setdefault(name, ToolInfo(name, "", {}, False))
        approvals = {
            (f"{g.server}__{t}" if route.multiplex else t)
            for g in self.settings.policy.grants
            if g.approval and g.tools != "*"
            for t in g.tools
        }
        return Surface(
            route=self.main,
            other_route=self.other_route,
            tenants=tuple(listings),
            tenant_arguments={
                name: dict(up.tenant_arguments)
                for name, up in self.settings.upstreams.items()
                if name in route.upstreams and up.tenant_arguments
            },
            catalog=catalog,
            listings=listings,
            approval_tools=frozenset(approvals),
            max_body_bytes=self.settings.limits.max_body_bytes,
            signing_key_readable=(self.state / "keys" / "index.json").is_file(),
            allow_writes=self.allow_writes,
        )

    def _catalog(self, upstreams: tuple[str, ...], multiplex: bool) -> dict[str, ToolInfo]:
        """Every tool of the route from the catalog the gateway saved, read-only as policy
        believes it (pessimistic unless the upstream is `trusted`)."""
        try:
            saved = json.loads((self.state / "policy-catalog.json").read_text())
        except (OSError, ValueError):
            self.skipped.append("hidden tools: no policy-catalog.json in the state directory")
            return {}
        built = Catalog.build(self.settings.upstreams, saved if isinstance(saved, dict) else {})
        return {
            (info.action if multiplex else info.name): ToolInfo(
                info.action if multiplex else info.name,
                info.upstream,
                info.input_schema,
                bool(info.annotations.get("read_only")),
            )
            for info in built.tools.values()
            if info.upstream in upstreams
        }

    def _listing(self, who: Identity) -> Listing:
        tools = [t.get("name") for t in self._list(who, TOOLS_LIST)]
        prompts = [
            PromptInfo(
                str(p["name"]),
                str(p["name"]).partition("__")[0],
                tuple(
                    (str(a.get("name")), bool(a.get("required")))
                    for a in p.get("arguments") or []
                    if isinstance(a, dict)
                ),
            )
            for p in self._list(who, PROMPTS_LIST)
            if isinstance(p.get("name"), str)
        ]
        templates = [str(t.get("uriTemplate")) for t in self._list(who, RESOURCES_TEMPLATES_LIST)]
        return Listing(tuple(str(t) for t in tools if t), tuple(prompts), tuple(templates))

    def _list(self, who: Identity, method: str) -> Iterator[dict[str, Any]]:
        key = list_keys(method)[0]
        cursor: str | None = None
        for _ in range(20):  # pages; bounded
            params = {"cursor": cursor} if cursor else {}
            seen = self.gateway.call(who, method, params)
            result = seen.body.get("result") if isinstance(seen.body, dict) else None
            if not isinstance(result, dict):
                return
            yield from (item for item in result.get(key) or [] if isinstance(item, dict))
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str):
                return

    # -- for the attacks --------------------------------------------------------------------

    def leaks(self, case: Case, body: Any) -> tuple[str, ...]:
        """Field paths of an answer's result naming another tenant's objects."""
        result = body.get("result") if isinstance(body, dict) else None
        if result is None:
            return ()
        patterns = [
            p for up in self.settings.upstreams.values() for p in up.tenant_arguments.values()
        ]
        tenants = sorted({i.tenant for i in self.roster.identities} | {case.victim or case.tenant})
        return leaked_paths(result, patterns, tenants, case.tenant)

    def canary_hits(self, body: Any, marker: str) -> tuple[str, ...]:
        """Field paths of an answer that carry the canary's marker."""
        return marker_paths(body, marker)

    def new_marker(self) -> str:
        """A canary marker no real object carries."""
        return f"bastion-probe-canary-{self.run_id}-{secrets.token_hex(6)}"

    def signing_key(self) -> SigningKey:
        """The deployment's current token-signing key (for the expired-token case only)."""
        store = FileKeyStore(self.state / "keys", self.settings.auth.signing_alg, math.inf)
        store.load()
        return store.current()

    def claims_of(self, token: str) -> dict[str, Any]:
        """A token's claims, unverified (to re-sign them as a forger would)."""
        return unverified_claims(token)

    def id_of(self, who: Identity, pattern: str) -> str | None:
        """An existing object id of `who`'s tenant, found in the answers of its read-only
        tools that need no arguments (the canary is planted under it)."""
        glob = pattern.replace("{tenant}", who.tenant)
        regex = re.compile(
            "".join(
                "[A-Za-z0-9_.:-]+" if p == "*" else re.escape(p) for p in re.split(r"(\*)", glob)
            )
        )
        for tool in list(self._list(who, TOOLS_LIST)):
            schema = tool.get("inputSchema") or {}
            hints = tool.get("annotations") or {}
            if schema.get("required") or not hints.get("readOnlyHint"):
                continue
            seen = self.gateway.call(who, TOOLS_CALL, {"name": tool["name"], "arguments": {}})
            match = regex.search(
                json.dumps(seen.body.get("result") if isinstance(seen.body, dict) else None)
            )
            if match:
                return match.group(0)
        return None
