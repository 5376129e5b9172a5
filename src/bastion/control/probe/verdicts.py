"""The probe's verdicts: what the gateway answered, judged held or failed, with evidence that
names codes, policies and field paths, never a token or the data itself. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bastion.control.probe.types import Case, Observation, Verdict
from bastion.inspect.tenants import TenantGuard

__all__ = ["judge", "leaked_paths", "marker_paths"]

# Codes of refusals before anything reaches an upstream. `upstream.*` means the call went
# through, and so does `inspection.*`: an answer withheld on the way back came from an upstream
# that was asked (a probe's request must be stopped on the way in).
_REFUSALS = ("protocol.", "auth.", "policy.", "session.")
_SHOWN = 120  # characters of a message kept as evidence


def judge(case: Case, seen: Observation) -> Verdict:
    """Held or failed, with what was observed and the evidence for it."""
    observed, evidence = _describe(seen)
    if seen.status is None or seen.note.startswith("failed:"):
        return Verdict(case, False, observed, evidence or seen.note)
    if seen.status >= 500:
        return Verdict(case, False, observed, evidence)
    if case.expect == "status":
        code = _error(seen.body).get("code")
        held = seen.status in case.statuses and (case.rpc_code is None or code == case.rpc_code)
    elif case.expect == "no_marker":
        held = not seen.leaked
    else:
        refused = _refused(seen) or (
            bool(case.spec.get("asks_ok") or case.spec.get("asked_is_held")) and _asks(seen.body)
        )
        held = refused or (case.expect == "no_leak" and not seen.leaked)
        held = held and not seen.leaked
    return Verdict(case, held, observed, evidence)


def _error(body: Any) -> dict[str, Any]:
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _refused(seen: Observation) -> bool:
    if seen.status is not None and 400 <= seen.status < 500:
        return True
    data = _error(seen.body).get("data")
    code = data.get("code") if isinstance(data, dict) else None
    return isinstance(code, str) and code.startswith(_REFUSALS)


def _asks(body: Any) -> bool:
    result = body.get("result") if isinstance(body, dict) else None
    return isinstance(result, dict) and result.get("resultType") == "input_required"


def _describe(seen: Observation) -> tuple[str, str]:
    if seen.status is None:
        return "no answer", seen.note
    error = _error(seen.body)
    parts: list[str] = []
    if error:
        found = error.get("data")
        data: dict[str, Any] = found if isinstance(found, dict) else {}
        what = f"HTTP {seen.status}, JSON-RPC {error.get('code')}"
        if data.get("code"):
            what += f" {data['code']}"
        parts.append(str(error.get("message", ""))[:_SHOWN])
        if data.get("policies"):
            parts.append("policies " + ", ".join(map(str, data["policies"])))
    elif isinstance(seen.body, dict) and isinstance(seen.body.get("error"), str):
        what = f"HTTP {seen.status}, {seen.body['error']}"  # an OAuth error body
        parts.append(str(seen.body.get("error_description", ""))[:_SHOWN])
    elif isinstance(seen.body, dict) and "result" in seen.body:
        result = seen.body["result"]
        flag = " (isError)" if isinstance(result, dict) and result.get("isError") else ""
        what = f"HTTP {seen.status}, a result{flag}"
        if _asks(seen.body):
            what = f"HTTP {seen.status}, asked for approval (input_required)"
    else:
        what = f"HTTP {seen.status}"
    if seen.leaked:
        parts.append("leaked at " + ", ".join(seen.leaked[:8]))
    if seen.note:
        parts.append(seen.note)
    return what, "; ".join(p for p in parts if p)


def _walk(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")
    elif isinstance(value, str):
        yield path, value


def leaked_paths(body: Any, patterns: list[str], tenants: list[str], own: str) -> tuple[str, ...]:
    """The field paths of `body` that name an object of a tenant other than `own`."""
    guard = TenantGuard(patterns, tenants)
    found = [
        path for path, text in _walk(body, "$") if any(hit.kind != own for hit in guard.scan(text))
    ]
    return tuple(found)


def marker_paths(body: Any, marker: str) -> tuple[str, ...]:
    """The field paths of `body` whose text carries the canary marker."""
    return tuple(path for path, text in _walk(body, "$") if marker in text)
