"""Authorization: may this principal do this, here and now — decided by Cedar policy.

The stage turns an exchange into a Cedar request (principal, action, resource, context), asks
the engine, and leaves the decision on the exchange: allowed or denied, the deciding policies,
their reasons and the obligations of the permits (approval, rate, redaction). The context is
built with only the attributes some policy reads.

The policy itself is loaded at start from the files and grants in the config, validated
against a schema generated from the upstreams' own tool lists, and reloaded when a file
changes; a reload that fails keeps the last good policy running and says why in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from bastion.config import Settings
from bastion.errors import BastionError, Overloaded, PolicyError, UpstreamTimeout
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.obligations import redact
from bastion.pipeline.route import requested_name
from bastion.policy.approval import ApprovalState, ApprovalStates, call_digest
from bastion.policy.build import build_engine, fingerprint
from bastion.policy.catalog import Catalog, action_id
from bastion.policy.engine import CedarRequest, PolicyEngine, Verdict, Who
from bastion.policy.schema import LIST_ACTIONS, METHOD_ACTIONS, ArgumentMismatch
from bastion.policy.source import PolicyLoadError, parse_rate, parse_redaction
from bastion.state.memory import ReplayCache
from bastion.state.rates import RateCounter
from bastion.types import JSON, Decision, Era, Principal

log = logging.getLogger("bastion.policy")

Lister = Callable[[str], Awaitable[JSON]]  # upstream → {"tools": [...], "prompts": [...]}

_RETRY_LISTING_SECONDS = 5.0
_MAX_HISTORIES = 10_000
_HISTORY_IDLE_SECONDS = 3600.0
_NO_TENANT = "(unrecognized)"
# Requests with nothing for policy to decide: answered by the gateway itself (lists are then
# filtered item by item), or only giving up access (resources/unsubscribe).
_NOTHING_TO_DECIDE = ("no upstream action to decide; list items are filtered by policy",)


class History:
    """What each session (or, without one, each principal) already did: tools called and the
    labels of those tools. Bounded; idle entries go first."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[float, set[str], set[str]]] = OrderedDict()

    def get(self, key: str) -> tuple[list[str], list[str]]:
        item = self._items.get(key)
        if item is None or item[0] < time.monotonic() - _HISTORY_IDLE_SECONDS:
            return [], []
        return sorted(item[1]), sorted(item[2])

    def add(self, key: str, tool: str, labels: Iterable[str]) -> None:
        item = self._items.get(key)
        if item is None:
            item = (0.0, set(), set())
        tools, seen = item[1], item[2]
        tools.add(tool)
        seen.update(labels)
        self._items[key] = (time.monotonic(), tools, seen)
        self._items.move_to_end(key)
        if len(self._items) > _MAX_HISTORIES:
            self._items.popitem(last=False)


class Authorizer:
    """Holds the running policy and decides on each exchange."""

    def __init__(
        self,
        settings: Settings,
        lister: Lister,
        rates: RateCounter,
        approvals: ApprovalStates | None = None,
    ) -> None:
        self.settings = settings
        self.policy = settings.policy
        self._lister = lister
        self.rates = rates
        self.approvals = approvals or ApprovalStates(
            secrets.token_bytes(32), settings.policy.approval_timeout_seconds
        )
        self._used_states = ReplayCache()
        self.history = History()
        self.engine: PolicyEngine | None = None
        self.problem: str | None = None  # why the last reload failed, while it stands
        self._print: tuple[tuple[str, int, int], ...] = ()
        self._checked = 0.0
        self._listed_at: dict[str, float] = {}
        self._listings: dict[str, JSON] = {}
        self._list_errors: dict[str, BastionError] = {}
        self._snapshot = Path(settings.state_dir) / "policy-catalog.json"
        self._tenant_patterns = {
            name: {arg: _tenant_regex(glob) for arg, glob in up.tenant_arguments.items()}
            for name, up in settings.upstreams.items()
        }
        self._lock = asyncio.Lock()

    # -- loading -----------------------------------------------------------------------------

    async def start(self, save: bool = True) -> None:
        """List every upstream's tools and prompts, then load the policy. An invalid policy
        raises PolicyLoadError (the gateway refuses to start). The listings are saved for
        `bastion policy` and for starting while an upstream is down (unless `save` is off)."""
        saved = self._read_snapshot()
        names = list(self.settings.upstreams)
        found = await asyncio.gather(*(self._list(n) for n in names), return_exceptions=True)
        for name, listing in zip(names, found, strict=True):
            if isinstance(listing, dict):
                self._listings[name] = listing
                continue
            if isinstance(listing, BastionError):
                self._list_errors[name] = listing
            if name in saved:
                log.warning(
                    "upstream %r cannot be listed (%s); using its last saved listing", name, listing
                )
                self._listings[name] = saved[name]
            else:
                log.warning(
                    "upstream %r cannot be listed (%s); its tools are denied until it can",
                    name,
                    listing,
                )
        self._print = fingerprint(self.policy)
        self.engine = build_engine(self.policy, self._catalog())
        if save:
            self._write_snapshot()
        log.info(
            "policy loaded: %d policies over %d tools",
            len(self.engine.docs),
            len(self.engine.schema.tool_actions),
        )

    async def _list(self, upstream: str) -> JSON:
        self._listed_at[upstream] = time.monotonic()
        limit = self.policy.catalog_timeout_seconds
        try:
            async with asyncio.timeout(limit):
                return await self._lister(upstream)
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream {upstream!r} did not list its tools within {limit} s"
            ) from None

    def _catalog(self) -> Catalog:
        return Catalog.build(self.settings.upstreams, self._listings)

    def _read_snapshot(self) -> dict[str, JSON]:
        try:
            data = json.loads(self._snapshot.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_snapshot(self) -> None:
        try:
            self._snapshot.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._snapshot.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._listings, sort_keys=True), encoding="utf-8")
            tmp.replace(self._snapshot)
        except OSError as exc:
            log.warning("cannot save the tool catalog to %s: %s", self._snapshot, exc)

    def maybe_reload(self) -> None:
        """Reload when a policy file changed (checked at most every `reload_seconds`)."""
        now = time.monotonic()
        if now < self._checked + self.policy.reload_seconds:
            return
        self._checked = now
        current = fingerprint(self.policy)
        if current == self._print:
            return
        self._print = current
        self.reload()

    def reload(self) -> bool:
        """Rebuild from the files; on failure keep the running policy and record why."""
        assert self.engine is not None  # noqa: S101 - started
        try:
            engine = build_engine(
                self.policy, self.engine.catalog, self.engine.version + 1, self.engine.schema
            )
        except PolicyLoadError as exc:
            self.problem = exc.message
            log.error("policy reload failed, the previous policy stays in force: %s", exc.message)
            return False
        self.engine = engine
        self.problem = None
        log.info("policy reloaded (version %d): %d policies", engine.version, len(engine.docs))
        return True

    async def relist(self, upstream: str, tool: str | None = None) -> None:
        """List an upstream again when the catalog lacks it (it was down at start) or lacks
        the tool called (added since); at most every 5 s per upstream. The policy is rebuilt
        and revalidated with the new tools; if it no longer validates the old one stays."""
        engine = self.engine
        if engine is None or upstream not in self.settings.upstreams:
            return
        if upstream in self._listings and (
            tool is None or action_id(upstream, tool) in engine.schema.tool_actions
        ):
            return
        if time.monotonic() < self._listed_at.get(upstream, 0.0) + _RETRY_LISTING_SECONDS:
            self._unlisted(upstream)
            return
        async with self._lock:
            if time.monotonic() < self._listed_at.get(upstream, 0.0) + _RETRY_LISTING_SECONDS:
                self._unlisted(upstream)
                return
            try:
                listing = await self._list(upstream)
            except Exception as exc:  # noqa: BLE001 - any failure: try again later
                log.info("upstream %r cannot be listed: %s", upstream, exc)
                if isinstance(exc, BastionError):
                    self._list_errors[upstream] = exc
                self._unlisted(upstream)
                return
            self._list_errors.pop(upstream, None)
            if listing == self._listings.get(upstream):
                return
            previous = self._listings.get(upstream)
            self._listings[upstream] = listing
            try:
                self.engine = build_engine(self.policy, self._catalog(), engine.version + 1)
            except PolicyLoadError as exc:
                if previous is not None:
                    self._listings[upstream] = previous
                else:
                    del self._listings[upstream]
                self.problem = exc.message
                log.error(
                    "policy invalid with %r's new tools, previous policy kept: %s",
                    upstream,
                    exc.message,
                )
                return
            log.info("upstream %r listed again: policy rebuilt over its tools", upstream)
            self._write_snapshot()

    def _unlisted(self, upstream: str) -> None:
        """A call to an upstream never listed fails as that upstream last failed (nothing is
        forwarded: without its tool list there is nothing policy could allow)."""
        if upstream not in self._listings and upstream in self._list_errors:
            raise self._list_errors[upstream]

    # -- deciding ----------------------------------------------------------------------------

    async def authorize(self, exchange: Exchange) -> None:
        """Set `exchange.decision`; a deny also sets `exchange.denial`."""
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
            exchange.approval_state = self._approval_state(exchange, principal)
        if verdict.allowed and "rate" in verdict.obligations:
            verdict = await self._limit(exchange, principal, request.action, verdict)
        exchange.decision = Decision(
            verdict.allowed, verdict.reasons, verdict.policies, verdict.obligations
        )
        if not verdict.allowed:
            exchange.denial = PolicyError(_message(verdict), data=_data(exchange.decision))
            return
        if exchange.method == "tools/call":
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
        if method == "tools/call":
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
        elif method in ("prompts/get", "completion/complete") and (
            method == "prompts/get"
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
        tenants = self._tenants(target.upstream, named)
        if tenants and tenants != [principal.tenant]:
            exchange.foreign_tenants = tuple(t for t in tenants if t != principal.tenant)
        if "request" in needs:
            context["request"] = await self._situation(exchange, principal, action, tenants, needs)
        shown_as = requested_name(exchange)  # the route's name for it, for the messages
        return CedarRequest(_who(principal), action, resource, context, extra, named=shown_as)

    async def _situation(
        self,
        exchange: Exchange,
        principal: Principal,
        action: str,
        tenants: list[str],  # named by the tenant-scoped arguments
        needs: frozenset[str],
    ) -> dict[str, Any]:
        now = time.time()
        situation: dict[str, Any] = {
            "method": exchange.method,
            "route": exchange.route,
            "environment": self.policy.environment,
        }
        if "client_ip" in needs:
            situation["client_ip"] = {"__extn": {"fn": "ip", "arg": _ip(exchange.client)}}
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

    def _tenants(self, upstream: str, values: Mapping[str, Any]) -> list[str]:
        """The tenants the tenant-scoped arguments name (`tenant_arguments` of the upstream)."""
        patterns = self._tenant_patterns.get(upstream)
        if not patterns:
            return []
        named: set[str] = set()
        for arg, pattern in patterns.items():
            value = values.get(arg)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str):
                    for spelling in _spellings(item):
                        match = pattern.fullmatch(spelling)
                        if match is not None:
                            named.add(match.group("tenant"))
                elif item is not None:
                    named.add(_NO_TENANT)
        return sorted(named)

    def _approval_state(
        self, exchange: Exchange, principal: Principal
    ) -> ApprovalState | str | None:
        """The approval a 2026-07-28 retry brings, verified here and used up: integrity,
        principal, exact call, expiry, first use. A string says why it is refused; None means
        the call brings no state of ours (it will be asked for). Legacy sessions approve on
        the call's own stream, so a state there counts for nothing."""
        if exchange.era is not Era.MODERN:
            return None
        call = call_digest(principal.binding_key(), exchange.method, exchange.params)
        found = self.approvals.verify(exchange.params.get("requestState"), call, time.time())
        if not isinstance(found, ApprovalState):
            return found
        try:
            if not self._used_states.first_use(found.nonce, found.expires_at):
                return "the approval was already used"
        except Overloaded:  # refused, and recorded as such, rather than forgetting a live one
            return "the gateway holds too many pending approvals; call again shortly"
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
        who = _who(principal)
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
            if method == "resources/list":
                context["uri"] = resource[1]
            if method == "tools/list" and "tool" in engine.needs:
                context["tool"] = {"__entity": {"type": "Bastion::Tool", "id": action}}
            request = CedarRequest(who, action, resource, context, extra)
            if engine.may(request, (*unknown, *later)):
                out.append(item)
        return out


def _item_request(
    engine: PolicyEngine, upstream: str, method: str, item: JSON
) -> tuple[str, tuple[str, str], tuple[Mapping[str, Any], ...], tuple[str, ...]] | None:
    if method == "tools/list":
        name = item.get("name")
        if not isinstance(name, str):
            return None
        action = action_id(upstream, name)
        return action, ("Tool", action), (), ("input",)
    if method == "prompts/list":
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
    key = "uri" if method == "resources/list" else "uriTemplate"
    uri = item.get(key)
    if not isinstance(uri, str):
        return None
    unknown = () if method == "resources/list" else ("uri",)
    return "read_resource", ("Resource", uri), (_entity("Resource", uri, upstream, {}),), unknown


def _redact_arguments(exchange: Exchange, obligations: Mapping[str, Any]) -> None:
    """`@redact("$.arguments…")`: the upstream and the audit trail see the redacted call."""
    arguments = exchange.params.get("arguments")
    changed = arguments
    for text in obligations.get("redact", ()):
        for root, steps in parse_redaction(text):
            if root == "arguments":
                changed = redact(changed, steps)
    if changed is not arguments:
        exchange.message = {**exchange.message, "params": {**exchange.params, "arguments": changed}}


def _who(principal: Principal) -> Who:
    return Who(
        principal.agent,
        principal.tenant,
        principal.roles,
        principal.scopes,
        principal.environment or "",
        principal.user,
    )


def _entity(kind: str, ident: str, server: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "uid": {"type": f"Bastion::{kind}", "id": ident},
        "attrs": {"server": {"__entity": {"type": "Bastion::Server", "id": server}}, **attrs},
        "parents": [{"type": "Bastion::Server", "id": server}],
    }


def history_key(exchange: Exchange, principal: Principal) -> str:
    if exchange.session is not None:
        return f"s:{exchange.session.id}"
    return "p:" + "/".join(str(part) for part in principal.binding_key())


def _ip(client: str) -> str:
    host = client.rpartition(":")[0].strip("[]")
    return host if re.fullmatch(r"[0-9a-fA-F:.]+", host or "") else "0.0.0.0"  # noqa: S104


def _spellings(value: str) -> set[str]:
    """The ways an upstream might read an id the client spelled: as sent, percent-decoded,
    and each folded for case and compatibility forms (NFKC: fullwidth letters, ligatures).
    The client chooses the spelling; it must not choose which tenant the check sees."""
    forms = {value, unquote(value)}
    return forms | {unicodedata.normalize("NFKC", form).casefold() for form in forms}


def _tenant_regex(glob: str) -> re.Pattern[str]:
    out = []
    for part in re.split(r"(\{tenant\}|\*)", glob):
        if part == "{tenant}":
            out.append(r"(?P<tenant>[a-z0-9]+(?:-[a-z0-9]+)*?)")
        elif part == "*":
            out.append(".*")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out), re.DOTALL)


def _message(verdict: Verdict) -> str:
    return "denied by policy: " + "; ".join(verdict.reasons)


def _data(decision: Decision) -> dict[str, Any]:
    return {"policies": list(decision.policies), "reason": "; ".join(decision.reasons)}
