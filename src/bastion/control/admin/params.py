"""What an admin request asks for: its query parameters and body, checked.

Every problem is a `BadRequest` (HTTP 400) naming the parameter; values are quoted shortened,
so an answer never carries much of what the client sent.
"""

from __future__ import annotations

import re
import time

import orjson
from starlette.requests import Request

from bastion.audit import Query
from bastion.audit.read import parse_time
from bastion.audit.record import PHASES, VERDICTS
from bastion.errors import BadRequest, shown

MAX_LIMIT = 10_000
MAX_BODY_BYTES = 64 * 1024
FILTERS = ("tenant", "agent", "tool", "decision", "phase", "since", "until")
_COUNT = re.compile(r"[0-9]{1,9}")


def params(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each at most once and known; empty values count as absent."""
    found: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            expected = ", ".join(allowed) or "none"
            raise BadRequest(name[:40], f"unknown parameter; expected {expected}")
        if name in found:
            raise BadRequest(name, "given more than once")
        if value.strip():
            found[name] = value.strip()
    return found


def audit_query(given: dict[str, str], limit: int) -> Query:
    """The store query of `bastion audit query`'s filters, with the same time syntax."""
    for name, known in (("decision", VERDICTS), ("phase", PHASES)):
        value = given.get(name)
        if value is not None and value not in known:
            expected = ", ".join(sorted(known))
            raise BadRequest(name, f"expected one of {expected}, found {shown(value)}")
    now = time.time()
    since, until = given.get("since"), given.get("until")
    return Query(
        tenant=given.get("tenant"),
        agent=given.get("agent"),
        tool=given.get("tool"),
        decision=given.get("decision"),
        phase=given.get("phase"),
        since=None if since is None else parse_time(since[:100], now, "since"),
        until=None if until is None else parse_time(until[:100], now, "until"),
        limit=limit,
    )


def count(given: dict[str, str], name: str, default: int) -> int:
    """A positive integer parameter up to MAX_LIMIT."""
    raw = given.get(name)
    if raw is None:
        return default
    if not _COUNT.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(name, f"expected an integer from 1 to {MAX_LIMIT}, found {shown(raw)}")
    return int(raw)


async def reason(request: Request) -> str | None:
    """`reason` from an optional JSON object body (`{"reason": "..."}`)."""
    return (await fields(request, ("reason",))).get("reason")


async def fields(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """Text members of an optional JSON object body, each one of `allowed`."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest("body", f"expected at most {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return {}
    names = ", ".join(f'"{name}"' for name in allowed)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("body", f'expected a JSON object like {{"{allowed[0]}": "..."}}') from None
    if not isinstance(data, dict) or set(data) - set(allowed):
        raise BadRequest("body", f"expected a JSON object with only {names}")
    found: dict[str, str] = {}
    for name, value in data.items():
        if value is not None and not isinstance(value, str):
            raise BadRequest(name, f"expected text, found {type(value).__name__}")
        if value is not None:
            found[name] = value
    return found
