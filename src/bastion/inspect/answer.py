"""What an upstream sent, judged: the pure part of the inspection stage.

`judge` takes one message, the caller's tenant and the detectors for the upstream's rules
(`Rules`, merged when a list fans out over several upstreams), and returns what to deliver
(the message, a rewritten one, an `inspection.*` error instead of a response, or nothing) with
the findings (rule, kind, place and a digest — never the text). The stage
(`bastion.pipeline.inspection`) owns the caches, the records, the alerts and the labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
from bastion.types import JSON, META_SERVER_INFO

__all__ = ["META_INSPECTION", "Checked", "Finding", "Rules", "judge"]

# `_meta` key of the note a flagged answer carries to the client.
META_INSPECTION = "io.bastion/inspection"
# What the client is told an item stands in for.
_WHY = {"tenant": "another tenant's data"}
# In answers that list an upstream's own definitions, what defines a tool, prompt or template
# (its pinned fields) and a server's instructions and info are not tenant data: the tenant
# guard does not read them (a description may well say "ids look like acme-t1"); pins and
# poisoning do. Everything else in such an answer is read like any answer.
_DEFINED = {
    "tools": frozenset(FIELDS["tool"]),
    "prompts": frozenset(FIELDS["prompt"]),
    "resourceTemplates": frozenset(FIELDS["template"]),
}
_DECLARED = frozenset({"instructions", "serverInfo"})
_STRICTNESS: dict[str, int] = {"off": 0, "flag": 1, "redact": 2, "block": 3}


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
class Checked:
    """One message after the rules: what to deliver (None: nothing) and what was found."""

    message: JSON | None
    findings: list[Finding] = field(default_factory=list)
    foreign: set[str] = field(default_factory=set)
    blocked: bool = False


def judge(
    rules: Rules,
    message: JSON,
    tenant: str,
    request_id: Any,
    *,
    final: bool,
    definitions: bool,
    guard: TenantGuard | None,
    secrets: SecretScanner | None,
    injection: InjectionScanner,
) -> Checked:
    """Apply the rules to one message for a caller in `tenant`, with the detectors given (None:
    that rule is off). Pure: no I/O, no effects. `definitions`: the message lists the
    upstream's own definitions. `final`: it is the response (a blocked response becomes an
    error; anything else blocked is dropped)."""
    # The inspection note is the gateway's word: an upstream's own would look vetted.
    message = _unnoted(message)
    if guard is None and secrets is None and rules.injection == "off":
        return Checked(message)
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
                theirs = [h for h in guard.scan(text) if h.kind not in (tenant, RESERVED_TENANT)]
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
        by_text = dict(zip(texts, injection.scan_many(texts), strict=True))
        for place, text in found:
            injected += [(place, hit) for hit in by_text[text]]
    return _verdict(rules, message, request_id, final, foreign, spans, injected)


def _verdict(
    rules: Rules,
    message: JSON,
    request_id: Any,
    final: bool,
    foreign: dict[Place, list[Hit]],
    spans: dict[Place, list[tuple[Hit, str]]],
    injected: list[tuple[Place, Hit]],
) -> Checked:
    texts = dict(strings(message)) if foreign or spans or injected else {}
    # A key that was found is text a record must not show, even as part of a place.
    hidden = keys_found([*foreign, *spans, *(p for p, _ in injected)])
    checked = Checked(message)
    for place, hits in foreign.items():
        for hit in hits:
            checked.foreign.add(hit.kind)
            checked.findings.append(_finding(hit, place, rules.tenants, texts, hidden))
    for place, found in spans.items():
        checked.findings += [_finding(hit, place, action, texts, hidden) for hit, action in found]
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
