"""Authorization: may this principal do this, here and now — decided by Cedar policy.

The stage turns an exchange into a Cedar request (principal, action, resource, context), asks
the engine, and leaves the decision on the exchange: allowed or denied, the deciding policies,
their reasons and the obligations of the permits (approval, rate, redaction). The context is
built with only the attributes some policy reads.

The policy itself is loaded at start from the files and grants in the config, validated
against a schema generated from the upstreams' own tool lists, and reloaded when a file
changes; a reload that fails keeps the last good policy running and says why in the log. All
of that is `PolicyLoader`'s (catalog.py), in background work: this stage only reads the engine
it published, and takes the time from a clock it is given.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from bastion import methods
from bastion.background import Jobs
from bastion.config import Settings
from bastion.errors import ArgumentMismatch, Overloaded, PolicyError, StateUnavailable
from bastion.pipeline.catalog import Lister, PolicyLoader, ResourceIndex
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.history import History, history_key
from bastion.pipeline.route import requested_name
from bastion.pipeline.tenancy import TenantNames, client_ip
from bastion.policy.approval import ApprovalState, ApprovalStates, call_digest
from bastion.policy.catalog import action_id
from bastion.policy.engine import CedarRequest, PolicyEngine, Verdict, Who
from bastion.policy.redaction import paths, redact
from bastion.policy.schema import LIST_ACTIONS, METHOD_ACTIONS
from bastion.policy.source import parse_rate
from bastion.state.memory import ReplayCache, Replays
from bastion.state.rates import RateCounter
from bastion.types import JSON, Decision, Era, Principal

log = logging.getLogger("bastion.policy")

# Requests with nothing for policy to decide: answered by the gateway itself (lists are then
# filtered item by item), or only giving up access (resources/unsubscribe).
_NOTHING_TO_DECIDE = ("no upstream action to decide; list items are filtered by policy",)


class Authorizer:
    """Decides on each exchange from values only: the policy engine the loader published,
    the exchange, the rate counters, and `clock` (wall-clock seconds) for time. `ticks` (a
    monotonic clock) paces the background listings the stage asks for."""

    def __init__(
        self,
        settings: Settings,
        lister: Lister,
        rates: RateCounter,
        approvals: ApprovalStates | None = None,
        clock: Callable[[], float] = time.time,
        ticks: Callable[[], float] = time.monotonic,
        used_states: Replays | None = None,
    ) -> None:
        self.settings = settings
        self.policy = settings.policy
        self.rates = rates
        self._clock = clock
        self.approvals = approvals or ApprovalStates(
            secrets.token_bytes(32), settings.policy.approval_timeout_seconds
        )
        # Approval states used up: this process's, or every replica's (Redis) when shared.
        self._used_states: Replays = used_states if used_states is not None else ReplayCache()
        self.history = History(clock)
        # Listing, reloading and learning URIs: background work, asked for by the pipeline.
        self.jobs = Jobs("catalog")
        self.loader = PolicyLoader(settings, lister, self.jobs, ticks)
        self.resources = ResourceIndex(settings, self.jobs, ticks)
        self._tenant_names = TenantNames(settings)

    @property
    def engine(self) -> PolicyEngine | None:
        """The policy in force (an immutable engine, replaced whole by the loader)."""
        return self.loader.engine

    @property
    def problem(self) -> str | None:
        """Why the last reload or rebuild failed, while it stands."""
        return self.loader.problem

    def background(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        """The work the gateway runs for this stage: the policy-file watcher and the catalog
        jobs (relisting upstreams, learning routes' resource URIs)."""
        return [("policy files", self.loader.watch.run), ("catalog", self.jobs.run)]

    async def start(self, save: bool = True) -> None:
        """List every upstream, then load the policy (see `PolicyLoader.start`)."""
        await self.loader.start(save)

    def reload(self) -> bool:
        """Rebuild from the policy files now (blocking; see `PolicyLoader.reload`)."""
        return self.loader.reload()

    async def relist(self, upstream: str, tool: str | None = None) -> None:
        """Make sure the catalog holds an upstream and tool, asking the background to list
        it again when it lacks them (see `PolicyLoader.relist`); never lists by itself."""
        await self.loader.relist(upstream, tool)

    # -- deciding ----------------------------------------------------------------------------

    async def authorize(self, exchange: Exchange) -> None:
        """Set `exchange.decision`; a deny also sets `exchange.denial`, and so does shared
        state (rates, used approvals) that cannot be asked: refused, never guessed (503)."""
        try:
            await self._authorize(exchange)
        except StateUnavailable as exc:
            exchange.denial = exc

    async def _authorize(self, exchange: Exchange) -> None:
        engine = self.engine
        principal = exchange.principal
        assert engine is not None and principal is not None  # noqa: S101 - started, authn ran
        request = await self._request(engine, exchange, principal)
        if request is None:
            if isinstance(exchange.decision, Decision):  # refused while building the request
                exchange.denial = PolicyError(
                    exchange.decision.reasons[0], data=_data(exchange.decision)
                )
            else:
                exchange.decision = Decision(True, _NOTHING_TO_DECIDE)
            return
        verdict = engine.decide(request)
        if verdict.allowed and "approval" in verdict.obligations:
            exchange.approval_state = await self._approval_state(exchange, principal)
        if verdict.allowed and "rate" in verdict.obligations:
            verdict = await self._limit(exchange, principal, request.action, verdict)
        exchange.decision = Decision(
            verdict.allowed, verdict.reasons, verdict.policies, verdict.obligations
        )
        if not verdict.allowed:
            exchange.denial = PolicyError(_message(verdict), data=_data(exchange.decision))
            return
        if exchange.method == methods.TOOLS_CALL:
            await self._remember(exchange, principal, request.action)
            _redact_arguments(exchange, verdict.obligations)

    async def _request(
        self, engine: PolicyEngine, exchange: Exchange, principal: Principal
    ) -> CedarRequest | None:
        method = exchange.method
        target = exchange.target
        if target is None:
            return None
        needs = engine.needs
        context: dict[str, Any] = {}
        named: Mapping[str, Any] = {}  # the values tenant_arguments may name a tenant in
        if method == methods.TOOLS_CALL:
            action = action_id(target.upstream, str(target.name))
            resource = ("Tool", action)
            arguments = exchange.params.get("arguments")
            if "input" in needs and action in engine.schema.tool_actions:
                try:
                    context["input"] = engine.schema.convert(action, arguments)
                except ArgumentMismatch as exc:
                    exchange.decision = Decision(
                        False, (f"arguments do not match the tool's input schema: {exc}",)
                    )
                    return None
            if "tool" in needs:
                context["tool"] = {"__entity": {"type": "Bastion::Tool", "id": action}}
            named = arguments if isinstance(arguments, dict) else {}
            extra: tuple[Mapping[str, Any], ...] = ()
        elif method in (methods.PROMPTS_GET, methods.COMPLETION_COMPLETE) and (
            method == methods.PROMPTS_GET
            or (exchange.params.get("ref") or {}).get("type") == "ref/prompt"
        ):
            action = METHOD_ACTIONS[method]
            prompt = action_id(target.upstream, str(target.name))
            resource = ("Prompt", prompt)
            extra = (
                ()
                if prompt in engine.catalog.prompts
                else (_entity("Prompt", prompt, target.upstream, {"name": str(target.name)}),)
            )
            arguments = exchange.params.get("arguments")
            named = arguments if isinstance(arguments, dict) else {}
        elif method in METHOD_ACTIONS:
            action = METHOD_ACTIONS[method]
            uri = str(target.name)
            resource = ("Resource", uri)
            extra = (_entity("Resource", uri, target.upstream, {}),)
            if action != "complete":
                context["uri"] = uri
            named = {"uri": uri}
        else:
            return None
        tenants = self._tenant_names.named(target.upstream, named)
        if tenants and tenants != [principal.tenant]:
            exchange.foreign_tenants = tuple(t for t in tenants if t != principal.tenant)
        if "request" in needs:
            context["request"] = await self._situation(exchange, principal, action, tenants, needs)
        shown_as = requested_name(exchange)  # the route's name for it, for the messages
        who = _who(principal, self.settings.environment)
        return CedarRequest(who, action, resource, context, extra, named=shown_as)

    async def _situation(
        self,
        exchange: Exchange,
        principal: Principal,
        action: str,
        tenants: list[str],  # named by the tenant-scoped arguments
        needs: frozenset[str],
    ) -> dict[str, Any]:
        now = self._clock()
        situation: dict[str, Any] = {
            "method": exchange.method,
            "route": exchange.route,
            "environment": self.settings.environment,
        }
        if "client_ip" in needs:
            situation["client_ip"] = {"__extn": {"fn": "ip", "arg": client_ip(exchange.client)}}
        if "time" in needs:
            moment = time.gmtime(now)
            situation["time"] = {
                "unix": int(now),
                "hour": moment.tm_hour,
                "weekday": moment.tm_wday,
            }
        if "user" in needs and principal.user is not None:
            situation["user"] = {"__entity": {"type": "Bastion::User", "id": principal.user}}
        if "tenants" in needs:
            situation["tenants"] = [
                {"__entity": {"type": "Bastion::Tenant", "id": t}} for t in tenants
            ]
        if "history" in needs:
            tools, labels = self.history.get(history_key(exchange, principal))
            situation["history"] = {"tools": tools, "labels": labels}
        if "rate" in needs:
            who = f"{principal.tenant}/{principal.agent}/{principal.user or ''}"
            situation["rate"] = {
                "tool": await self.rates.peek(f"ctx:{who}:{action}", 60.0),
                "all": await self.rates.peek(f"ctx:{who}", 60.0),
            }
        return situation

    async def _approval_state(
        self, exchange: Exchange, principal: Principal
    ) -> ApprovalState | str | None:
        """The approval a 2026-07-28 retry brings, verified here and used up: integrity,
        principal, exact call, expiry, first use. A string says why it is refused; None means
        the call brings no state of ours (it will be asked for). Legacy sessions approve on
        the call's own stream, so a state there counts for nothing."""
        if exchange.era is not Era.MODERN:
            return None
        # Bound to the call as sent, before `@redact` rewrites its arguments, and to where it
        # goes; the approval stage issues its states for the same digest.
        target = exchange.target
        place = (exchange.route, *((target.upstream, str(target.name)) if target else ()))
        call = call_digest(principal.binding_key(), exchange.method, exchange.params, place)
        exchange.approval_call = call
        now = self._clock()
        found = self.approvals.verify(exchange.params.get("requestState"), call, now)
        if not isinstance(found, ApprovalState):
            return found
        try:
            fresh = await self._used_states.first_use(found.nonce, found.expires_at, now)
        except Overloaded:  # refused, and recorded as such, rather than forgetting a live one
            return "the gateway holds too many pending approvals; call again shortly"
        # Issued before the used states were remembered (a restarted or flushed Redis, whose
        # replicas share the signing key): it may have been used already.
        if found.expires_at - self.approvals.lifetime < self._used_states.remembers_since():
            return "the approval was issued before the gateway's memory of used ones began"
        if not fresh:
            return "the approval was already used"
        return found

    async def _limit(
        self, exchange: Exchange, principal: Principal, action: str, verdict: Verdict
    ) -> Verdict:
        """Apply `@rate` obligations: per principal and tool, over the shared counter. Only
        a retry bringing a verified approval state is the same call, counted when it was
        first made; a state that merely looks like one counts as a new call."""
        if isinstance(exchange.approval_state, ApprovalState):
            return verdict
        for rule in verdict.obligations["rate"]:
            limit, window = parse_rate(rule["limit"])
            who = f"{principal.tenant}/{principal.agent}/{principal.user or ''}"
            key = f"rate:{rule['policy']}:{who}:{action}"
            counted, _ = await self.rates.hit(key, window, limit)
            if not counted:
                return Verdict(
                    False,
                    (rule["policy"],),
                    (
                        f"rate limit {rule['limit']} of policy {rule['policy']} exceeded; "
                        "try again later",
                    ),
                    {"rate": verdict.obligations["rate"]},
                )
        return verdict

    async def _remember(self, exchange: Exchange, principal: Principal, action: str) -> None:
        engine = self.engine
        assert engine is not None  # noqa: S101 - started
        tool = engine.schema.tool_actions.get(action)
        self.history.add(history_key(exchange, principal), action, tool.labels if tool else ())
        if "rate" in engine.needs:
            who = f"{principal.tenant}/{principal.agent}/{principal.user or ''}"
            await self.rates.hit(f"ctx:{who}:{action}", 60.0)
            await self.rates.hit(f"ctx:{who}", 60.0)

    # -- lists -------------------------------------------------------------------------------

    def visible(
        self, exchange: Exchange, upstream: str, method: str, items: list[JSON]
    ) -> list[JSON]:
        """The items of an upstream's list page that the caller may use; none when the caller
        may not list that upstream at all."""
        engine = self.engine
        principal = exchange.principal
        if engine is None or principal is None:
            return []
        who = _who(principal, self.settings.environment)
        list_action = METHOD_ACTIONS[method]
        assert list_action in LIST_ACTIONS  # noqa: S101 - only list methods come here
        later = ("request",) if "request" in engine.needs else ()
        if not engine.may(CedarRequest(who, list_action, ("Server", upstream), {}), later):
            return []
        out = []
        for item in items:
            spec = _item_request(engine, upstream, method, item)
            if spec is None:
                continue
            action, resource, extra, unknown = spec
            context: dict[str, Any] = {}
            if method == methods.RESOURCES_LIST:
                context["uri"] = resource[1]
            if method == methods.TOOLS_LIST and "tool" in engine.needs:
                context["tool"] = {"__entity": {"type": "Bastion::Tool", "id": action}}
            request = CedarRequest(who, action, resource, context, extra)
            if engine.may(request, (*unknown, *later)):
                out.append(item)
        return out


def _item_request(
    engine: PolicyEngine, upstream: str, method: str, item: JSON
) -> tuple[str, tuple[str, str], tuple[Mapping[str, Any], ...], tuple[str, ...]] | None:
    if method == methods.TOOLS_LIST:
        name = item.get("name")
        if not isinstance(name, str):
            return None
        action = action_id(upstream, name)
        return action, ("Tool", action), (), ("input",)
    if method == methods.PROMPTS_LIST:
        name = item.get("name")
        if not isinstance(name, str):
            return None
        prompt = action_id(upstream, name)
        extra = (
            ()
            if prompt in engine.catalog.prompts
            else (_entity("Prompt", prompt, upstream, {"name": name}),)
        )
        return "get_prompt", ("Prompt", prompt), extra, ()
    key = "uri" if method == methods.RESOURCES_LIST else "uriTemplate"
    uri = item.get(key)
    if not isinstance(uri, str):
        return None
    unknown = () if method == methods.RESOURCES_LIST else ("uri",)
    return "read_resource", ("Resource", uri), (_entity("Resource", uri, upstream, {}),), unknown


def _redact_arguments(exchange: Exchange, obligations: Mapping[str, Any]) -> None:
    """`@redact("$.arguments…")`: the upstream and the audit trail see the redacted call."""
    arguments = exchange.params.get("arguments")
    changed = arguments
    for steps in paths(obligations, "arguments"):
        changed = redact(changed, steps)
    if changed is not arguments:
        exchange.message = {**exchange.message, "params": {**exchange.params, "arguments": changed}}


def _who(principal: Principal, gateway_environment: str) -> Who:
    # Only a caller without identity (`auth: none`, which a prod gateway refuses) has no
    # environment: it is the gateway's own. An agent's comes from the registry (authn).
    return Who(
        principal.agent,
        principal.tenant,
        principal.roles,
        principal.scopes,
        principal.environment or gateway_environment,
        principal.user,
    )


def _entity(kind: str, ident: str, server: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "uid": {"type": f"Bastion::{kind}", "id": ident},
        "attrs": {"server": {"__entity": {"type": "Bastion::Server", "id": server}}, **attrs},
        "parents": [{"type": "Bastion::Server", "id": server}],
    }


def _message(verdict: Verdict) -> str:
    return "denied by policy: " + "; ".join(verdict.reasons)


def _data(decision: Decision) -> dict[str, Any]:
    return {"policies": list(decision.policies), "reason": "; ".join(decision.reasons)}
