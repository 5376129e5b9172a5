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

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from bastion import methods
from bastion.audit.detect import Alert
from bastion.config import RESERVED_TENANT, Settings
from bastion.inspect.answer import Checked, Rules, judge
from bastion.inspect.injection import InjectionScanner
from bastion.inspect.secrets import SecretScanner
from bastion.inspect.tenants import TenantGuard
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.history import History, history_key
from bastion.pipeline.session import ClientSession
from bastion.policy.redaction import paths, redact
from bastion.types import JSON, Era, Principal, Target
from bastion.upstream.base import Answer

__all__ = ["Inspection"]

log = logging.getLogger("bastion.inspection")

# Findings kept per exchange for its outcome record (the count is always exact).
_MAX_FINDINGS = 32
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
# Answers that are content the upstream serves: its configured labels come with them.
_CONTENT = frozenset({methods.TOOLS_CALL, methods.RESOURCES_READ, methods.PROMPTS_GET})

Alerting = Callable[[Alert], Awaitable[None]]
Quarantining = Callable[[str, str], Awaitable[None]]


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
        return answer.wrapped(first or _dropped(exchange), self._rest(exchange, rules, answer))

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
    ) -> Checked:
        """Apply the rules to one message for a caller in `tenant`: no I/O, no effects.
        `definitions`: the message lists the upstream's own definitions."""
        return judge(
            rules,
            message,
            tenant,
            request_id,
            final=final,
            definitions=definitions,
            guard=self._guard(rules, tenant),
            secrets=self._secret_scanner(rules),
            injection=self._injection,
        )

    # -- effects -------------------------------------------------------------------------------

    async def _effects(self, exchange: Exchange, rules: Rules, checked: Checked) -> None:
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
        self, exchange: Exchange, principal: Principal, rules: Rules, checked: Checked
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
