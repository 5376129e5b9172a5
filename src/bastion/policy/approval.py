"""Approval states: what a 2026-07-28 client carries from an approval prompt to its retry.

The gateway answers a call that needs approval with `input_required` and a `requestState`
string it signed; the retry brings it back. Only a state this process signed, for this
principal and exactly this call, before its expiry, relaxes the obligations of the retry (the
retry is the same call, so its rate limit was already counted). Anything else that merely
looks like one is treated as no state at all. Single use is the caller's part: each state has
a nonce for a replay cache.

```
state   = "bastion1." ‖ base64url(payload JSON) ‖ "." ‖ hex HMAC-SHA256(key, base64url part)
payload = {"c": call digest, "e": expiry (unix s), "n": nonce,
           "k": "ask" | "continue", "u": the upstream's own requestState (continue only)}
```

`ask` states come with Bastion's approval prompt; `continue` states wrap the requestState of
an upstream that itself asked for more input after the call was approved, so that the one
approval carries the call through its rounds without being reusable for another call.

Pure: the key and the clock are passed in; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlencode

__all__ = [
    "ADMIN_ROLE",
    "PREFIX",
    "ApprovalLinks",
    "ApprovalState",
    "ApprovalStates",
    "Asker",
    "Person",
    "Prompt",
    "call_digest",
    "may_decide",
    "prompt",
]

PREFIX = "bastion1."
_MAX_STATE = 64 * 1024  # a longer string is not ours; refused before any work


@dataclass(frozen=True, slots=True)
class ApprovalState:
    """A verified state: which round it opens, until when, its nonce, the upstream's state."""

    kind: Literal["ask", "continue"]
    expires_at: float
    nonce: str
    upstream_state: str | None = None


class ApprovalStates:
    """Signs and verifies approval states with one process-local key."""

    def __init__(self, key: bytes, lifetime: float) -> None:
        self._key = key
        self.lifetime = lifetime

    def issue(
        self,
        call: str,
        now: float,
        kind: Literal["ask", "continue"] = "ask",
        upstream_state: str | None = None,
    ) -> str:
        """A signed state for `call` (a digest of principal, method and params)."""
        payload: dict[str, object] = {
            "c": call,
            "e": int(now + self.lifetime),
            "n": secrets.token_urlsafe(12),
            "k": kind,
        }
        if upstream_state is not None:
            payload["u"] = upstream_state
        raw = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        return f"{PREFIX}{raw}.{self._mac(raw)}"

    def verify(self, state: object, call: str, now: float) -> ApprovalState | str | None:
        """None when `state` is not one of ours at all; the verified state; or why it is
        refused (altered, another call or principal, expired, unreadable)."""
        if not isinstance(state, str) or not state.startswith(PREFIX):
            return None
        if len(state) > _MAX_STATE:
            return "the approval state is too long to be one this gateway issued"
        raw, _, mac = state[len(PREFIX) :].rpartition(".")
        if not raw or not hmac.compare_digest(mac.encode(), self._mac(raw).encode()):
            return "the approval state was altered or comes from another gateway process"
        try:
            payload = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        except (ValueError, binascii.Error):
            return "the approval state cannot be read"
        if not isinstance(payload, dict):
            return "the approval state cannot be read"
        if payload.get("c") != call:
            return "the approval was given for another call or another principal"
        expires = payload.get("e")
        if not isinstance(expires, int) or now > expires:
            return "the approval expired; call again to be asked anew"
        kind = payload.get("k")
        upstream = payload.get("u")
        if kind not in ("ask", "continue") or not isinstance(upstream, str | None):
            return "the approval state cannot be read"
        return ApprovalState(kind, float(expires), str(payload.get("n")), upstream)

    def _mac(self, raw: str) -> str:
        return hmac.new(self._key, raw.encode(), hashlib.sha256).hexdigest()


def call_digest(
    who: tuple[object, ...],
    method: str,
    params: Mapping[str, object],
    place: tuple[str, ...] = (),
) -> str:
    """What an approval is bound to: the principal, where the call goes (`place`: the route,
    the upstream and the tool's own name, so `echo` on one server is not `echo` on another)
    and the call as the client sent it, without the parts that carry the approval itself
    (`requestState`, `inputResponses`) or transport notes (`_meta`)."""
    kept = {k: v for k, v in params.items() if k not in ("_meta", "requestState", "inputResponses")}
    text = json.dumps(
        {"who": list(who), "where": list(place), "method": method, "params": kept},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


# -- who may decide, and signed links ------------------------------------------------------

ADMIN_ROLE = "admin"  # the admin token's holder: may decide whatever the approvers


@dataclass(frozen=True, slots=True)
class Person:
    """Who decides on a held call: a name, the roles they hold, the channel they use
    (`console`, `admin-api`, `link`), their identity provider's subject, and — when the
    credential they presented was an agent's access token — that agent (always refused)."""

    name: str
    roles: tuple[str, ...]
    channel: str
    subject: str | None = None
    agent: str | None = None


def may_decide(person: Person, approvers: Sequence[str], requester: str) -> str | None:
    """None when `person` may decide on a call of agent `requester` that `approvers` (roles)
    may approve; else why not. An agent never approves, least of all its own call."""
    if person.agent is not None:
        return "an agent's access token cannot decide on approvals; a person must"
    if requester in (person.name, person.subject):
        return f"the requesting agent {requester!r} cannot decide on its own call"
    if ADMIN_ROLE in person.roles or set(person.roles) & set(approvers):
        return None
    wanted = ", ".join(approvers) or "(none configured)"
    return f"{person.name!r} holds none of the approver roles of this call: {wanted}"


class ApprovalLinks:
    """Signed callback links a webhook can deliver: one person, one item, one decision,
    until `exp`. The key stays in the state directory; the clock is passed in.

    ```
    /approvals/{id}/{approve|deny}?by=NAME&roles=R1,R2&exp=UNIX&sig=HEX
    sig = HMAC-SHA256(key, JSON ["bastion-approval-link", id, decision, by, roles, exp])
    ```
    """

    def __init__(self, key: bytes, lifetime: float) -> None:
        self._key = key
        self.lifetime = lifetime

    def sign(self, approval_id: str, decision: str, person: Person, now: float) -> str:
        """The link's path and query."""
        roles = ",".join(person.roles)
        exp = str(int(now + self.lifetime))
        sig = self._mac(approval_id, decision, person.name, roles, exp)
        query = urlencode({"by": person.name, "roles": roles, "exp": exp, "sig": sig})
        return f"/approvals/{quote(approval_id, safe='')}/{decision}?{query}"

    def verify(
        self, approval_id: str, decision: str, query: Mapping[str, str], now: float
    ) -> Person | str:
        """The person the link was made for, or why the link is refused."""
        fields = [query.get(name) for name in ("by", "roles", "exp", "sig")]
        if any(value is None or len(value) > 1000 for value in fields):
            return "the link lacks by, roles, exp or sig (or one is too long)"
        by, roles, exp, sig = (str(value) for value in fields)
        expected = self._mac(approval_id, decision, by, roles, exp)
        if not hmac.compare_digest(sig.encode(), expected.encode()):
            return "the link's signature does not match: it was altered or not made here"
        if not exp.isdigit() or now > int(exp):
            return "the link expired"
        return Person(by, tuple(r for r in roles.split(",") if r), "link")

    def _mac(self, *parts: str) -> str:
        text = json.dumps(["bastion-approval-link", *parts])
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()


# -- what the approver is shown ------------------------------------------------------------

VALUE_LIMIT = 240  # characters of one value shown whole; a longer one loses its middle
_HEAD, _TAIL = 160, 60
MAX_VALUES = 200  # a call with more values than a person can read is not put to one
# A value marked sensitive (a recipient, an egress target) is never cut: longer than this,
# the call is not put to a person at all.
SENSITIVE_LIMIT = 1000
# Control, format (zero-width, bidi overrides), separator, unassigned and blank-looking
# characters could hide or reorder what the approver reads: they are shown as escapes. In
# sensitive values and in argument names every non-ASCII character is (a Cyrillic `е` in
# `acmе.com` looks like a Latin `e`).
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
_BLANKS = frozenset("\u115f\u1160\u2800\u3164\uffa0")  # fillers that render as nothing


@dataclass(frozen=True, slots=True)
class Prompt:
    """The text put to the approver and, for the audit, how each value was shown."""

    text: str
    values: tuple[Mapping[str, Any], ...]  # {"path", "sensitive", "chars", "shortened"}


@dataclass(frozen=True, slots=True)
class Asker:
    """Who asks: the agent, its tenant, and the user it acts for (if any)."""

    agent: str
    tenant: str
    user: str | None


def prompt(
    asker: Asker,
    server: str,
    tool: str,
    called_as: str,
    arguments: object,
    sensitive: Sequence[str],
) -> Prompt | str:
    """The approval prompt for one tool call: tool, server, and every argument value (long
    ones shortened in the middle, never dropped), those the policy marks sensitive first. A
    call too large to show whole is not put to a person: the reason is returned instead."""
    leaves = list(_leaves(arguments, ()))
    if len(leaves) > MAX_VALUES:
        return (
            f"the call has {len(leaves)} argument values, more than the {MAX_VALUES} an "
            "approver can be shown; it cannot be approved"
        )
    rows = []
    for path, value in leaves:
        name = _path(path)
        if _is_sensitive(path, sensitive):
            text = _text(value)
            if len(text) > SENSITIVE_LIMIT:
                return (
                    f"the value of {name}, marked sensitive by policy, has {len(text)} "
                    f"characters, more than the {SENSITIVE_LIMIT} shown whole; it cannot be "
                    "approved"
                )
            rows.append((False, name, json.dumps(text, ensure_ascii=True), len(text), False))
            continue
        shown, chars, cut = _value(value)
        rows.append((True, name, shown, chars, cut))
    rows.sort(key=lambda row: row[0])  # stable: sensitive first, then in the call's order
    who = f"agent {_clean(asker.agent)} of tenant {_clean(asker.tenant)}"
    if asker.user:
        who += f", acting for user {_clean(asker.user)}"
    head = f"{_clean(tool)} on server {_clean(server)}"
    if called_as != tool:
        head += f" (called as {_clean(called_as)})"
    lines = [
        "Bastion asks you to approve one tool call.",
        f"Who: {who}",
        f"Tool: {head}",
    ]
    if not rows:
        lines.append("Arguments: none")
    else:
        marked = sum(1 for row in rows if not row[0])
        lines.append(f"Arguments ({len(rows)} values, {marked} marked sensitive by policy):")
        lines.extend(
            f"  {'[SENSITIVE] ' if not later else ''}{name} = {shown}"
            for later, name, shown, _, _ in rows
        )
    lines.append("Approving releases this one call with exactly these arguments.")
    values = tuple(
        {"path": name, "sensitive": not later, "chars": chars, "shortened": cut}
        for later, name, _, chars, cut in rows
    )
    return Prompt("\n".join(lines), values)


def _leaves(
    value: object, path: tuple[str | int, ...]
) -> Iterator[tuple[tuple[str | int, ...], object]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, (*path, str(key)))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    elif path or value not in (None, {}):
        yield path, value


def _path(path: tuple[str | int, ...]) -> str:
    out = ""
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        elif step.isascii() and step.isidentifier():
            out += f".{step}" if out else step
        else:
            out += "[" + json.dumps(step, ensure_ascii=True) + "]"
    return out or "(arguments)"


def _is_sensitive(path: tuple[str | int, ...], marked: Sequence[str]) -> bool:
    """Marked by name (a key anywhere on the path: a nested `to` is a recipient too) or by a
    path prefix such as `message.to`."""
    names = {step for step in path if isinstance(step, str)}
    shown = _path(path)
    return any(
        mark in names or shown == mark or shown.startswith((mark + ".", mark + "["))
        for mark in marked
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _value(value: object) -> tuple[str, int, bool]:
    """The value as shown, its length in characters, and whether its middle was cut."""
    text = _text(value)
    chars = len(text)
    if chars > VALUE_LIMIT:
        hidden = chars - _HEAD - _TAIL
        text_shown = (
            _quote(text[:_HEAD]) + f" …[{hidden} characters not shown]… " + _quote(text[-_TAIL:])
        )
        return text_shown, chars, True
    return (_quote(text) if isinstance(value, str) else _clean(text)), chars, False


def _quote(text: str) -> str:
    return _clean(json.dumps(text, ensure_ascii=False))


def _clean(text: str) -> str:
    if text.isascii() and text.isprintable():
        return text
    return "".join(f"\\u{ord(ch):04x}" if _hidden(ch) else ch for ch in text)


def _hidden(ch: str) -> bool:
    return ch != " " and (unicodedata.category(ch) in _HIDDEN or ch in _BLANKS)
