"""The inspection stage: everything an upstream sends toward a client, checked before any
client sees it — after the upstream stage, before the outcome is recorded.

Every message of an answer is inspected on its own as it streams (the response, and the
notifications and server requests before it), and so is each message an upstream starts on
a session's stream. The rules, per upstream (`upstreams.*.inspect`):

- `tenants`: objects of a tenant other than the caller's (the upstream's `tenant_arguments`
  patterns, searched in every string: `bastion.inspect.tenants`);
- `secrets` and `personal_data`: keys, tokens, passwords; e-mail, cards, phones, IBANs;
- `injection`: instructions aimed at the model.

`block` answers the request with an `inspection.*` error instead of the data (a notification
or server request is dropped); `redact` withholds the items around another tenant's objects,
or replaces a secret by its kind; `flag` delivers it. Whatever was found is kept on the
exchange for the outcome record (rule, kind, place and a digest, never the text), labels the
session for policy (`foreign`, `private`, `untrusted`, and the upstream's own labels), and a
foreign tenant's object raises an alert against the upstream — the suspect, not the agent —
and, after `quarantine.after` such answers, takes the upstream out of service.

The `@redact("$.result…")` obligations of the decision are applied here too, before the rules.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bastion import methods
from bastion.audit.detect import Alert
from bastion.config import RESERVED_TENANT, Containment, Inspect, Settings
from bastion.errors import ForeignTenant, InjectionFound, InspectionError, SecretFound
from bastion.inspect.content import (
    JSON_TEXT,
    KEY,
    Place,
    keys_found,
    opened,
    prefixes,
    strings,
    withhold,
)
from bastion.inspect.hits import Hit
from bastion.inspect.injection import InjectionScanner
from bastion.inspect.pins import FIELDS
from bastion.inspect.secrets import SecretScanner
from bastion.inspect.tenants import TenantGuard
from bastion.pipeline.authz import History, history_key
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.session import ClientSession
from bastion.policy.redaction import paths, redact
from bastion.types import JSON, META_SERVER_INFO, Era, Principal, Target
from bastion.upstream.base import Answer

__all__ = ["Finding", "Inspection", "Rules"]

log = logging.getLogger("bastion.inspection")

# `_meta` key of the note a flagged answer carries to the client.
META_INSPECTION = "io.bastion/inspection"
# Findings kept per exchange for its outcome record (the count is always exact).
_MAX_FINDINGS = 32
# What the client is told an item stands in for.
_WHY = {"tenant": "another tenant's data"}
# The labels a session collects for what its answers carried.
_LABELS = {"tenant": "foreign", "secret": "private", "personal_data": "private"}
_LABELS["injection"] = "untrusted"
# Answers that list an upstream's own definitions. What defines a tool, prompt or template
# (its pinned fields) and a server's instructions and info are not tenant data: the tenant
# guard does not read them (a description may well say "ids look like acme-t1"); pins and
# poisoning do. Everything else in such an answer (an error, `_meta`, members that are not
# pinned) is read like any answer.
_DEFINITIONS = frozenset(
    {
        methods.TOOLS_LIST,
        methods.PROMPTS_LIST,
        methods.RESOURCES_TEMPLATES_LIST,
        methods.INITIALIZE,
        methods.SERVER_DISCOVER,
    }
)
_DEFINED = {
    "tools": frozenset(FIELDS["tool"]),
    "prompts": frozenset(FIELDS["prompt"]),
    "resourceTemplates": frozenset(FIELDS["template"]),
}
_DECLARED = frozenset({"instructions", "serverInfo"})
# Answers that are content the upstream serves: its configured labels come with them.
_CONTENT = frozenset({methods.TOOLS_CALL, methods.RESOURCES_READ, methods.PROMPTS_GET})
_STRICTNESS: dict[str, int] = {"off": 0, "flag": 1, "redact": 2, "block": 3}

Alerting = Callable[[Alert], Awaitable[None]]
Quarantining = Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Finding:
    """What a rule found in one message: never the text itself."""

    rule: str
    kind: str
    place: str
    action: str
    digest: str

    def record(self) -> dict[str, str]:
        """The finding as the outcome record keeps it."""
        return {
            "rule": self.rule,
            "kind": self.kind,
            "place": self.place,
            "action": self.action,
            "digest": self.digest,
        }


@dataclass(frozen=True)
class Rules:
    """The rules for answers from a set of upstreams (a fan-out list merges several: the
    strictest action of theirs applies, and every naming pattern)."""

    upstreams: tuple[str, ...]
    tenants: Containment
    secrets: Containment
    personal_data: Containment
    injection: str
    patterns: frozenset[str]
    personal_kinds: frozenset[str]
    labels: frozenset[str]
    quarantine_after: int | None

    @classmethod
    def of(cls, names: Iterable[str], settings: Settings) -> Rules:
        """The merged rules of these upstreams."""
        found = [(name, settings.upstreams[name]) for name in names if name in settings.upstreams]
        rules = [up.inspect for _, up in found]

        def strictest(pick: Callable[[Inspect], str]) -> Any:
            return max((pick(r) for r in rules), key=_STRICTNESS.__getitem__, default="off")

        afters = [r.quarantine.after for r in rules if r.quarantine.after is not None]
        return cls(
            upstreams=tuple(name for name, _ in found),
            tenants=strictest(lambda r: r.tenants),
            secrets=strictest(lambda r: r.secrets),
            personal_data=strictest(lambda r: r.personal_data),
            injection=strictest(lambda r: r.injection),
            patterns=frozenset(p for _, up in found for p in up.tenant_arguments.values()),
            personal_kinds=frozenset(k for r in rules for k in r.personal_kinds),
            labels=frozenset(label for r in rules for label in r.labels),
            quarantine_after=min(afters, default=None),
        )


@dataclass
class _Checked:
    """One message after the rules: what to deliver (None: nothing) and what was found."""

    message: JSON | None
    findings: list[Finding] = field(default_factory=list)
    foreign: set[str] = field(default_factory=set)
    blocked: bool = False


class Inspection:
    """Applies the result obligations of the decision and the upstreams' inspection rules to
    every message an upstream sends toward a client."""

    def __init__(
        self,
        settings: Settings,
        history: History | None = None,
        tenants: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.enabled = settings.inspection.enabled
        self._history = history
        self._known = tenants or (lambda: frozenset())
        self._configured = frozenset(
            {g.tenant for g in settings.policy.grants if g.tenant and g.tenant != "*"}
            | {a.tenant for a in settings.auth.agents}
            | set(settings.inspection.tenants)
        )
        self._rules: dict[tuple[str, ...], Rules] = {}
        self._guards: dict[tuple[frozenset[str], frozenset[str]], TenantGuard] = {}
        # Per caller tenant, the other tenants (a set as large as the registry's tenants) and
        # the known set they came from: rebuilt when the registry view publishes a new one,
        # not on every answer (issue 17: 0.28 ms per answer at 10,000 tenants).
        self._others: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        self._secrets: dict[frozenset[str], SecretScanner] = {}
        self._injection = InjectionScanner()
        self._leaks: dict[str, int] = {}
        # Set by the gateway: raise an alert; take an upstream out of service.
        self.alert: Alerting | None = None
        self.quarantine: Quarantining | None = None

    # -- the stage ---------------------------------------------------------------------------

    async def inspect(
        self, exchange: Exchange, answer: Answer, upstreams: tuple[str, ...]
    ) -> Answer:
        """The answer as the client may see it: each message checked as it comes."""
        answer = self._obligations(exchange, answer)
        if not self.enabled:
            return answer
        rules = self.rules(upstreams)
        first = await self.message(exchange, rules, answer.first, final=answer.rest is None)
        if answer.rest is None:
            assert first is not None  # noqa: S101 - a final response is never dropped
            return Answer(first)
        return Answer(first or _dropped(exchange), self._rest(exchange, rules, answer))

    async def unsolicited(
        self, session: ClientSession, upstream: str, message: JSON
    ) -> JSON | None:
        """A message an upstream started on a legacy session's stream (a notification, a
        server request): checked like an answer, as the session's principal sees it."""
        if not self.enabled:
            return message
        exchange = Exchange(message, Era.LEGACY, session.protocol_version, session.route, "")
        exchange.principal = session.principal
        exchange.session = session
        exchange.target = Target(upstream)
        return await self.message(exchange, self.rules((upstream,)), message, final=False)

    async def _rest(
        self, exchange: Exchange, rules: Rules, answer: Answer
    ) -> AsyncGenerator[JSON, None]:
        rest = answer.rest
        assert rest is not None  # noqa: S101 - only streams come here
        try:
            async for message in rest:
                final = "method" not in message and message.get("id") == exchange.id
                checked = await self.message(exchange, rules, message, final=final)
                if checked is not None:
                    yield checked
        finally:
            await rest.aclose()

    async def message(
        self, exchange: Exchange, rules: Rules, message: JSON, *, final: bool
    ) -> JSON | None:
        """One message from an upstream, checked: what to deliver, None to drop it."""
        principal = exchange.principal
        if principal is None:
            return message
        checked = self.check(
            rules,
            message,
            principal.tenant,
            exchange.id,
            final=final,
            definitions=final and exchange.method in _DEFINITIONS,
        )
        await self._effects(exchange, rules, checked)
        return checked.message

    def rules(self, upstreams: tuple[str, ...]) -> Rules:
        """The merged rules of these upstreams (cached)."""
        rules = self._rules.get(upstreams)
        if rules is None:
            rules = self._rules[upstreams] = Rules.of(upstreams, self.settings)
        return rules

    # -- the pure part -------------------------------------------------------------------------

    def check(
        self,
        rules: Rules,
        message: JSON,
        tenant: str,
        request_id: Any,
        *,
        final: bool,
        definitions: bool = False,
    ) -> _Checked:
        """Apply the rules to one message for a caller in `tenant`: no I/O, no effects.
        `definitions`: the message lists the upstream's own definitions."""
        # The inspection note is the gateway's word: an upstream's own would look vetted.
        message = _unnoted(message)
        guard = self._guard(rules, tenant)
        secrets = self._secret_scanner(rules)
        if guard is None and secrets is None and rules.injection == "off":
            return _Checked(message)
        foreign: dict[Place, list[Hit]] = {}
        spans: dict[Place, list[tuple[Hit, str]]] = {}
        injected: list[tuple[Place, Hit]] = []
        # Each string is read where it lies (no copy of the message); only a string that
        # could name another tenant is read in its decoded and folded forms, and the
        # detectors make one pass over all the strings to find the few worth a closer look.
        found = list(strings(message))
        # The same key or value recurs through rows: each distinct string is scanned once.
        texts = list(dict.fromkeys(text for _, text in found))
        if guard is not None:
            for place, text in found:
                if definitions and _declared(place):
                    continue
                if guard.may_name(text):
                    theirs = [
                        h for h in guard.scan(text) if h.kind not in (tenant, RESERVED_TENANT)
                    ]
                    if theirs:
                        foreign[place] = theirs
                        if rules.tenants == "redact":
                            foreign.update(_inside(guard, text, place, tenant))
        if secrets is not None:
            by_text = dict(zip(texts, secrets.scan_many(texts), strict=True))
            for place, text in found:
                for hit in by_text[text]:
                    action = rules.secrets if hit.rule == "secret" else rules.personal_data
                    if action != "off":
                        spans.setdefault(place, []).append((hit, action))
        if rules.injection != "off":
            by_text = dict(zip(texts, self._injection.scan_many(texts), strict=True))
            for place, text in found:
                injected += [(place, hit) for hit in by_text[text]]
        return self._verdict(rules, message, request_id, final, foreign, spans, injected)

    def _verdict(
        self,
        rules: Rules,
        message: JSON,
        request_id: Any,
        final: bool,
        foreign: dict[Place, list[Hit]],
        spans: dict[Place, list[tuple[Hit, str]]],
        injected: list[tuple[Place, Hit]],
    ) -> _Checked:
        texts = dict(strings(message)) if foreign or spans or injected else {}
        # A key that was found is text a record must not show, even as part of a place.
        hidden = keys_found([*foreign, *spans, *(p for p, _ in injected)])
        checked = _Checked(message)
        for place, hits in foreign.items():
            for hit in hits:
                checked.foreign.add(hit.kind)
                checked.findings.append(_finding(hit, place, rules.tenants, texts, hidden))
        for place, found in spans.items():
            checked.findings += [
                _finding(hit, place, action, texts, hidden) for hit, action in found
            ]
        checked.findings += [_finding(h, p, rules.injection, texts, hidden) for p, h in injected]
        if not checked.findings:
            return checked
        blocking = [f for f in checked.findings if f.action == "block"]
        if blocking:
            checked.blocked = True
            checked.message = _refusal(blocking, request_id) if final else None
            return checked
        body = message
        if foreign and rules.tenants == "redact":
            body, _ = withhold(body, set(foreign), _WHY["tenant"])
        redactions = {p: [h for h, a in found if a == "redact"] for p, found in spans.items()}
        body = _redact_spans(body, {p: hits for p, hits in redactions.items() if hits})
        if injected:
            body = _noted(body, sorted({h.kind for _, h in injected}))
        checked.message = body
        return checked

    # -- effects -------------------------------------------------------------------------------

    async def _effects(self, exchange: Exchange, rules: Rules, checked: _Checked) -> None:
        """What a checked message leaves behind: findings on the exchange, labels on the
        session, and for another tenant's objects an alert against the upstream."""
        principal = exchange.principal
        assert principal is not None  # noqa: S101 - checked only for callers
        # The upstream's own labels come with what it answers, not with its lists.
        labels = set(rules.labels) if exchange.method in _CONTENT else set()
        labels.update(_LABELS[f.rule] for f in checked.findings if f.rule in _LABELS)
        if labels and self._history is not None:
            self._history.add(history_key(exchange, principal), None, labels)
        if not checked.findings:
            return
        exchange.inspected += len(checked.findings)
        room = _MAX_FINDINGS - len(exchange.findings)
        exchange.findings += [f.record() for f in checked.findings[: max(room, 0)]]
        exchange.blocked = exchange.blocked or checked.blocked
        if checked.foreign:
            exchange.answer_tenants = tuple(sorted({*exchange.answer_tenants, *checked.foreign}))
            await self._leaked(exchange, principal, rules, checked)

    async def _leaked(
        self, exchange: Exchange, principal: Principal, rules: Rules, checked: _Checked
    ) -> None:
        """Another tenant's objects in an answer: the upstream is the suspect."""
        suspect = exchange.target.upstream if exchange.target else ",".join(rules.upstreams)
        tenants = sorted(checked.foreign)
        action = rules.tenants
        log.warning(
            "upstream %r answered %s/%s with objects of %d other tenant(s): %s",
            suspect,
            principal.tenant,
            principal.agent,
            len(tenants),
            "blocked" if checked.blocked else action,
        )
        if self.alert is not None:
            await self.alert(
                Alert(
                    rule="foreign_tenant_answer",
                    severity="critical",
                    tenant=principal.tenant,
                    agent=principal.agent,
                    message=(
                        f"upstream {suspect!r} sent objects of another tenant toward "
                        f"{principal.tenant}/{principal.agent} ({action})"
                    ),
                    request_id=exchange.request_id,
                    time=time.time(),
                    facts={
                        "suspect": "upstream",
                        "upstream": suspect,
                        "foreign_tenants": tenants,
                        "action": action,
                    },
                )
            )
        after = rules.quarantine_after
        if after is None:
            return
        for name in suspect.split(","):
            count = self._leaks[name] = self._leaks.get(name, 0) + 1
            if count >= after and self.quarantine is not None:
                reason = f"{count} answers carried another tenant's objects"
                try:
                    await self.quarantine(name, reason)
                except Exception:  # the alert stands; the operator sees why it did not
                    log.exception("quarantining upstream %r failed", name)

    # -- helpers -------------------------------------------------------------------------------

    def _guard(self, rules: Rules, tenant: str) -> TenantGuard | None:
        if rules.tenants == "off" or not rules.patterns:
            return None
        known = self._known()
        cached = self._others.get(tenant)
        if cached is None or cached[0] is not known:
            if len(self._others) > 4096:
                self._others.clear()
            others = frozenset((self._configured | known) - {tenant, RESERVED_TENANT})
            cached = self._others[tenant] = (known, others)
        others = cached[1]
        if not others:
            return None
        key = (rules.patterns, others)
        guard = self._guards.get(key)
        if guard is None:
            if len(self._guards) > 256:
                self._guards.clear()
            guard = self._guards[key] = TenantGuard(rules.patterns, others)
        return guard

    def _secret_scanner(self, rules: Rules) -> SecretScanner | None:
        kinds: set[str] = set()
        if rules.secrets != "off":
            kinds.add("secret")
        if rules.personal_data != "off":
            kinds |= rules.personal_kinds
        if not kinds:
            return None
        key = frozenset(kinds)
        scanner = self._secrets.get(key)
        if scanner is None:
            scanner = self._secrets[key] = SecretScanner(key)
        return scanner

    def _obligations(self, exchange: Exchange, answer: Answer) -> Answer:
        """The `@redact("$.result…")` obligations of the decision."""
        decision = exchange.decision
        if decision is None or not decision.obligations:
            return answer
        steps = paths(decision.obligations, "result")
        if not steps:
            return answer

        def fix(body: JSON) -> JSON:
            for path in steps:
                body = redact(body, path)
            return body

        return answer.map_result(exchange.id, fix)


def _inside(guard: TenantGuard, text: str, place: Place, tenant: str) -> dict[Place, list[Hit]]:
    """Another tenant's objects inside a text that holds JSON, by their places there (so
    that redaction withholds the items, not the whole text)."""
    found: dict[Place, list[Hit]] = {}
    for inner, value in opened(text, place):
        theirs = [h for h in guard.scan(value) if h.kind not in (tenant, RESERVED_TENANT)]
        if theirs:
            found[inner] = theirs
    return found


def _finding(
    hit: Hit, place: Place, action: str, texts: dict[Place, str], hidden: set[str]
) -> Finding:
    text = texts.get(place, "")
    found = text[hit.start : hit.end].encode("utf-8", "surrogatepass")
    return Finding(
        rule=hit.rule,
        kind=hit.kind,
        place=_path(place, hidden),
        action=action,
        digest="sha256:" + hashlib.sha256(found).hexdigest()[:32],
    )


def _path(place: Place, hidden: set[str] | None = None) -> str:
    """`("result", "content", 0, "text")` as `$.result.content[0].text`; a key that was found
    shows as `{key}`, the JSON inside a text as `#json`."""
    out = "$"
    for step in place:
        if step == KEY:
            continue  # the key before it is the place
        if step == JSON_TEXT:
            out += ".#json"
        elif isinstance(step, int):
            out += f"[{step}]"
        else:
            out += ".{key}" if hidden and step in hidden else f".{step}"
    return out


def _refusal(blocking: list[Finding], request_id: Any) -> JSON:
    """The error a client gets instead of a blocked response."""
    rules = {f.rule for f in blocking}
    error: InspectionError
    if "tenant" in rules:
        error = ForeignTenant(
            "the upstream's answer was withheld: it carried another tenant's data"
        )
    elif rules & {"secret", "personal_data"}:
        kinds = sorted({f.kind for f in blocking if f.rule in ("secret", "personal_data")})
        error = SecretFound(
            "the upstream's answer was withheld: it carried secrets or personal data",
            data={"kinds": kinds},
        )
    else:
        kinds = sorted({f.kind for f in blocking})
        error = InjectionFound(
            "the upstream's answer was withheld: it carried instructions aimed at the model",
            data={"kinds": kinds},
        )
    return {"jsonrpc": "2.0", "id": request_id, "error": error.rpc_error()}


def _redact_spans(message: JSON, spans: dict[Place, list[Hit]]) -> JSON:
    """The message with each found secret replaced by `[redacted:<kind>]` (in a key too; a
    subtree read whole, below the walk's depth, goes whole)."""
    if not spans:
        return message
    on_the_way = prefixes(spans)

    def key(name: str, place: Place) -> str:
        hits = spans.get((*place, name, KEY))
        return _cut(name, hits) if hits else name

    def fix(value: Any, place: Place) -> Any:
        if place in spans:
            if isinstance(value, str):
                return _cut(value, spans[place])
            return "".join(sorted({f"[redacted:{h.kind}]" for h in spans[place]}))
        if place not in on_the_way:
            return value
        if isinstance(value, dict):
            return {key(k, place): fix(v, (*place, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v, (*place, i)) for i, v in enumerate(value)]
        return value

    out: JSON = {}
    for name, value in message.items():
        if name in ("jsonrpc", "id", "method"):
            out[name] = value
        else:
            out[key(name, ())] = fix(value, (name,))
    return out


def _cut(text: str, hits: list[Hit]) -> str:
    out = text
    for hit in sorted(hits, key=lambda h: h.start, reverse=True):
        out = f"{out[: hit.start]}[redacted:{hit.kind}]{out[hit.end :]}"
    return out


def _declared(place: Place) -> bool:
    """Whether a place of a definitions answer is what an upstream declares (a pinned field
    of a listed tool, prompt or template; its instructions or server info), not tenant
    data."""
    if len(place) < 2 or place[0] != "result":
        return False
    fields = _DEFINED.get(place[1]) if isinstance(place[1], str) else None
    if fields is not None:
        index = place[2] if len(place) > 3 else None
        return isinstance(index, int) and index >= 0 and place[3] in fields
    if place[1] == "_meta":
        return len(place) > 3 and place[2] == META_SERVER_INFO
    return place[1] in _DECLARED


def _unnoted(message: JSON) -> JSON:
    """The message without an inspection note of the upstream's own making in its
    `_meta` (only the gateway says what it inspected)."""
    for key in ("result", "params"):
        body = message.get(key)
        meta = body.get("_meta") if isinstance(body, dict) else None
        if isinstance(meta, dict) and META_INSPECTION in meta:
            assert isinstance(body, dict)  # noqa: S101 - meta came from it
            kept = {k: v for k, v in meta.items() if k != META_INSPECTION}
            return {**message, key: {**body, "_meta": kept}}
    return message


def _noted(message: JSON, kinds: list[str]) -> JSON:
    """A flagged answer tells the client its content is untrusted, in `_meta`."""
    note = {"untrusted": True, "reason": "instructions aimed at the model", "kinds": kinds}
    for key in ("result", "params"):
        body = message.get(key)
        if isinstance(body, dict):
            meta = body.get("_meta")
            meta = meta if isinstance(meta, dict) else {}
            return {**message, key: {**body, "_meta": {**meta, META_INSPECTION: note}}}
    return message


def _dropped(exchange: Exchange) -> JSON:
    """What stands first in a stream whose first message was dropped: a log message saying
    so (the transport needs a first message to start the stream with)."""
    return {
        "jsonrpc": "2.0",
        "method": methods.MESSAGE,
        "params": {
            "level": "warning",
            "logger": "bastion",
            "data": "a message from the upstream was withheld by inspection",
        },
    }
