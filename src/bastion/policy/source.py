"""Where policies come from: `.cedar` files, and grants in the YAML config compiled to Cedar.

Every policy gets a stable id: its `@id` annotation, else `<file>#<n>` (the n-th policy of the
file, from 0); a grant compiles to `grant:<id>` (and `grant:<id>:list` for listing the server).
Ids appear in decisions, the audit trail and `bastion policy explain`.

The gateway adds one policy of its own, `environment-separation`: a forbid that keeps every
agent to upstreams of its own environment, with the configured exceptions written into it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy

from bastion.config import ArgumentRule, CrossEnvironment, Grant
from bastion.errors import PolicyLoadError

_NS = "Bastion"
_EMPTY_SCOPE = "unable to find an applicable action given the policy scope constraints"
log = logging.getLogger("bastion.policy")


@dataclass(frozen=True)
class PolicyDoc:
    """One static Cedar policy with where it came from."""

    id: str
    effect: str  # "permit" | "forbid"
    origin: str  # "<file> policy <n>" or "grant <id>"
    est: Mapping[str, Any]  # Cedar's JSON form, annotations included
    annotations: Mapping[str, str] = field(default_factory=dict)
    place: tuple[str, int] = ("", 0)  # (source name, position in it)

    @property
    def reason(self) -> str:
        """What the policy says about itself (`@reason`), else its id."""
        return self.annotations.get("reason") or f"policy {self.id}"

    def text(self) -> str:
        """The policy in Cedar syntax."""
        document = {"staticPolicies": {self.id: self.est}, "templates": {}, "templateLinks": []}
        return cedarpy.policies_from_json_str(json.dumps(document)).strip()


@dataclass(frozen=True)
class SourceText:
    """One unit of policy text to parse and validate: a file or the compiled grants."""

    name: str
    text: str
    ids: tuple[str, ...] = ()  # for grants: the id of each policy in order


def read_files(files: Iterable[str]) -> list[SourceText]:
    """Read the policy files; a missing or unreadable file is a load error."""
    out: list[SourceText] = []
    problems: list[str] = []
    for file in files:
        try:
            out.append(SourceText(file, Path(file).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}")
    if problems:
        raise PolicyLoadError(problems)
    return out


def load_policies(sources: Iterable[SourceText]) -> list[PolicyDoc]:
    """Parse every source into policies with ids; every problem is reported at once."""
    docs: list[PolicyDoc] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for source in sources:
        try:
            document = json.loads(cedarpy.policies_to_json_str(source.text))
        except ValueError as exc:
            problems.append(f"{source.name}: not valid Cedar: {_first_line(exc)}")
            continue
        if document.get("templates"):
            problems.append(f"{source.name}: templates (?principal, ?resource) are not supported")
            continue
        ordered = sorted(document.get("staticPolicies", {}).items(), key=lambda kv: _index(kv[0]))
        for n, (_, est) in enumerate(ordered):
            annotations = {k: (v or "") for k, v in (est.get("annotations") or {}).items()}
            if source.ids:
                pid, origin = source.ids[n], f"grant {source.ids[n].split(':')[1]}"
            else:
                pid = annotations.get("id") or f"{Path(source.name).name}#{n}"
                origin = f"{source.name} policy {n}"
                if source.name == BUILT_IN:
                    origin = BUILT_IN
            if pid in seen:
                problems.append(f"{origin}: id {pid!r} is already used by {seen[pid]}")
                continue
            seen[pid] = origin
            problems.extend(_check_annotations(origin, annotations))
            est = {**est, "annotations": {**annotations, "id": pid}}
            docs.append(
                PolicyDoc(
                    pid, est["effect"], origin, est, {**annotations, "id": pid}, (source.name, n)
                )
            )
    if problems:
        raise PolicyLoadError(problems)
    return docs


@dataclass(frozen=True)
class Problem:
    """A validation error of one policy."""

    place: tuple[str, int]  # (source name, position), as PolicyDoc.place
    text: str  # names the policy by file and position (or grant)
    error: str  # Cedar's own message


def validate(sources: Iterable[SourceText], schema: cedarpy.Schema) -> list[Problem]:
    """Strict validation of each source against the schema."""
    problems: list[Problem] = []
    for source in sources:
        result = cedarpy.validate_policies(source.text, schema)
        for error in result.errors:
            if _EMPTY_SCOPE in error.error:
                # A group with no tools yet (its upstreams were not listed): the policy simply
                # applies to nothing until they are.
                log.warning("%s: %s", source.name, error.error)
                continue
            where = source.name
            n = _index(error.policy_id) if error.policy_id else -1
            if error.policy_id:
                label = source.ids[n] if source.ids and n < len(source.ids) else None
                annotated = result.id_annotations_by_policy_id.get(error.policy_id)
                where = (
                    f"grant {label.split(':')[1]}"
                    if label
                    else f"{source.name} policy {n}" + (f" ({annotated})" if annotated else "")
                )
            problems.append(Problem((source.name, n), f"{where}: {error.error}", error.error))
    return problems


PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


def parse_rate(text: str) -> tuple[int, float]:
    """'10/minute' → (10, 60.0); ValueError for anything else."""
    count, _, period = text.strip().partition("/")
    if not count.isdigit() or int(count) < 1 or period not in PERIODS:
        raise ValueError(f"expected a rate like '10/minute', found {text!r}")
    return int(count), PERIODS[period]


def parse_redaction(text: str) -> list[tuple[str, tuple[str | int | None, ...]]]:
    """'$.arguments.body, $.result.content[*].text' → [(root, steps)], root 'arguments' or
    'result'; a step is a key, an index, or None for [*]. ValueError when malformed."""
    out = []
    for raw in text.split(","):
        path = raw.strip()
        if not path:
            continue
        steps: list[str | int | None] = []
        for match in re.finditer(r"\.([A-Za-z0-9_-]+)|\[(\*|[0-9]+|'[^']*')\]|(.)", path[1:]):
            key, index, stray = match.groups()
            if stray is not None or not path.startswith("$"):
                raise ValueError(f"cannot read the JSON path {path!r}")
            if key is not None:
                steps.append(key)
            elif index == "*":
                steps.append(None)
            elif index.startswith("'"):
                steps.append(index[1:-1])
            else:
                steps.append(int(index))
        if not steps or steps[0] not in ("arguments", "result"):
            raise ValueError(f"a redaction path starts with $.arguments or $.result: {path!r}")
        out.append((str(steps[0]), tuple(steps[1:])))
    return out


def _check_annotations(origin: str, annotations: Mapping[str, str]) -> list[str]:
    problems = []
    if "rate" in annotations:
        try:
            parse_rate(annotations["rate"])
        except ValueError as exc:
            problems.append(f"{origin}: @rate: {exc}")
    if "redact" in annotations:
        try:
            parse_redaction(annotations["redact"])
        except ValueError as exc:
            problems.append(f"{origin}: @redact: {exc}")
    problems.extend(_check_approval(origin, annotations))
    if "sensitive" in annotations:
        names = [n.strip() for n in annotations["sensitive"].split(",")]
        if not names or not all(_SENSITIVE.fullmatch(n) for n in names):
            problems.append(
                f"{origin}: @sensitive: expected argument names or paths separated by commas "
                f'(e.g. "to, cc, message.to"), found {annotations["sensitive"][:60]!r}'
            )
    return problems


_APPROVAL_MODES = ("human", "client", "required", "true", "yes", "false", "no", "off")


def _check_approval(origin: str, annotations: Mapping[str, str]) -> list[str]:
    """`@approval("human" | "client")` (`required`/`true` are the older spelling of client),
    `@approval_timeout("seconds")`."""
    problems = []
    mode = annotations.get("approval")
    if mode is not None and mode.lower() not in _APPROVAL_MODES:
        problems.append(f'{origin}: @approval: expected "human" or "client", found {mode[:40]!r}')
    timeout = annotations.get("approval_timeout")
    if timeout is not None:
        try:
            ok = 0 < float(timeout) < float("inf")
        except ValueError:
            ok = False
        if not ok:
            problems.append(
                f"{origin}: @approval_timeout: expected seconds above 0, found {timeout[:40]!r}"
            )
    return problems


_SENSITIVE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_-]*|\[\d+\])*")


def _index(policy_id: str) -> int:
    digits = policy_id.removeprefix("policy")
    return int(digits) if digits.isdigit() else 0


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:500]


# -- environment separation ------------------------------------------------------------------

BUILT_IN = "built-in"
SEPARATION_ID = "environment-separation"
SEPARATION_REASON = (
    "environment separation: an agent reaches only upstreams of its own environment "
    "(exceptions: policy.cross_environment)"
)
# The environment of the upstream a request reaches: the Server itself for the list actions,
# the server of the tool, prompt or resource for the others.
_UPSTREAM_IS = (
    f"((resource is {_NS}::Server && resource.environment {{op}} {{value}}) ||\n"
    "   (resource has server && resource.server.environment {op} {value}))"
)


def compile_separation(exceptions: Iterable[CrossEnvironment]) -> SourceText:
    """The built-in forbid: an agent whose environment is not the upstream's is denied,
    unless an exception of `policy.cross_environment` names it. A forbid wins over any permit,
    so an exception can only be written here, where `policy explain` shows it."""
    excepted = [_exception(e) for e in exceptions]
    heads = [f"@id({_str(SEPARATION_ID)})", f"@reason({_str(SEPARATION_REASON)})"]
    if exceptions:
        notes = "; ".join(f"{e.from_}->{e.to}: {e.reason}" for e in exceptions)
        heads.append(f"@exceptions({_str(notes)})")
    differs = _UPSTREAM_IS.format(op="!=", value="principal.environment")
    text = "\n".join(heads) + f"\nforbid (principal, action, resource)\nwhen {{\n  {differs}\n}}"
    if excepted:
        text += "\nunless {\n  " + " ||\n  ".join(excepted) + "\n}"
    return SourceText(BUILT_IN, text + ";")


def _exception(exception: CrossEnvironment) -> str:
    parts = [
        f"principal.environment == {_str(exception.from_)}",
        _UPSTREAM_IS.format(op="==", value=_str(exception.to)),
    ]
    if exception.tenant != "*":
        parts.append(f"principal in {_NS}::Tenant::{_str(exception.tenant)}")
    if exception.agents:
        agents = ", ".join(f"{_NS}::Agent::{_str(a)}" for a in exception.agents)
        parts.append(f"[{agents}].contains(principal)")
    if exception.servers:
        servers = ", ".join(f"{_NS}::Server::{_str(s)}" for s in exception.servers)
        parts.append(f"resource in [{servers}]")  # `in` holds for a Server itself
    return "(" + " &&\n   ".join(parts) + ")"


# -- grants --------------------------------------------------------------------------------


def compile_grants(grants: Iterable[Grant]) -> SourceText:
    """The grants as one Cedar source, each grant a permit (plus one for listing)."""
    parts: list[str] = []
    ids: list[str] = []
    for grant in grants:
        for pid, text in _grant(grant):
            ids.append(pid)
            parts.append(text)
    return SourceText("config grants", "\n\n".join(parts), tuple(ids))


def _str(value: str) -> str:
    return json.dumps(value)


def _grant(grant: Grant) -> list[tuple[str, str]]:
    principal = (
        "principal" if grant.tenant == "*" else f"principal in {_NS}::Tenant::{_str(grant.tenant)}"
    )
    server = None if grant.server == "*" else f"{_NS}::Server::{_str(grant.server)}"
    who: list[str] = [f"principal == {_NS}::Agent::{_str(a)}" for a in grant.agents]
    if grant.roles:
        roles = ", ".join(_str(r) for r in grant.roles)
        who.append(f"principal.roles.containsAny([{roles}])")
    common = [f"({' || '.join(who)})"] if who else []
    head = [f"@id({_str('grant:' + grant.id)})"]
    head.append(f"@reason({_str(grant.reason or f'granted by {grant.id}')})")
    if grant.approval:
        head.append(f"@approval({_str('human' if grant.approval == 'human' else 'client')})")
        if grant.approvers:
            head.append(f"@approvers({_str(', '.join(grant.approvers))})")
        if grant.approval_timeout_seconds is not None:
            head.append(f"@approval_timeout({_str(str(grant.approval_timeout_seconds))})")
    if grant.rate:
        head.append(f"@rate({_str(grant.rate)})")
    if grant.sensitive:
        head.append(f"@sensitive({_str(', '.join(grant.sensitive))})")
    out: list[tuple[str, str]] = []

    def emit(suffix: str, action: str, resource: str, conditions: list[str]) -> None:
        pid = f"grant:{grant.id}{suffix}"
        heads = [f"@id({_str(pid)})", *head[1:]] if suffix else head
        if suffix == ":list":  # listing a server carries no obligations
            heads = heads[:2]
        body = f"permit (\n  {principal},\n  {action},\n  {resource}\n)"
        if conditions:
            body += " when {\n  " + " &&\n  ".join(conditions) + "\n}"
        out.append((pid, "\n".join(heads) + "\n" + body + ";"))

    if grant.tools:
        conditions = list(common)
        if grant.read_only:
            conditions.append("context.tool.read_only")
        conditions.extend(_argument(name, rule) for name, rule in grant.arguments.items())
        if grant.tools == "*":
            action = f'action in {_NS}::Action::"call_tool"'
        else:
            actions = ", ".join(
                f"{_NS}::Action::{_str(f'{grant.server}__{t}')}" for t in grant.tools
            )
            action = f"action in [{actions}]"
        resource = f"resource in {server}" if server else "resource"
        emit("", action, resource, conditions)
    if grant.prompts:
        conditions = list(common)
        if grant.prompts != "*":
            prompts = ", ".join(
                f"{_NS}::Prompt::{_str(f'{grant.server}__{p}')}" for p in grant.prompts
            )
            conditions.append(f"[{prompts}].contains(resource)")
        actions = f'action in [{_NS}::Action::"get_prompt", {_NS}::Action::"complete"]'
        resource = f"resource is {_NS}::Prompt" + (f" in {server}" if server else "")
        emit(":prompts" if grant.tools else "", actions, resource, conditions)
    if grant.resources:
        conditions = list(common)
        if grant.resources != "*":
            globs = " || ".join(f"context.uri like {_glob(g)}" for g in grant.resources)
            conditions.append(f"({globs})")
        actions = f'action in [{_NS}::Action::"read_resource", {_NS}::Action::"subscribe_resource"]'
        resource = f"resource is {_NS}::Resource" + (f" in {server}" if server else "")
        suffix = ":resources" if (grant.tools or grant.prompts) else ""
        emit(suffix, actions, resource, conditions)
    listing = f"resource == {server}" if server else "resource"
    emit(":list", f'action in {_NS}::Action::"list"', listing, list(common))
    return out


def _glob(pattern: str) -> str:
    """A glob as a Cedar `like` pattern: `*` stays a wildcard, quotes are escaped."""
    return '"' + pattern.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _argument(name: str, rule: ArgumentRule) -> str:
    ref = f"context.input.{name}" if name.isidentifier() else f"context.input[{_str(name)}]"
    if rule.like is not None:
        return f"{ref} like {_glob(rule.like)}"
    if rule.one_of is not None:
        return f"[{', '.join(_str(v) for v in rule.one_of)}].contains({ref})"
    if rule.max is not None:
        return f"{ref} <= {rule.max}"
    value = rule.equals
    literal = (
        ("true" if value else "false")
        if isinstance(value, bool)
        else str(value)
        if isinstance(value, int)
        else _str(str(value))
    )
    return f"{ref} == {literal}"
