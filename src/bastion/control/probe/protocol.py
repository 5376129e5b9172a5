"""The protocol cases: 2026-07-28 requests whose `Mcp-*` headers disagree with their body, and
malformed JSON-RPC bodies (not JSON, a batch, duplicate keys, deep nesting, params that are not
an object, a null id, one byte over `limits.max_body_bytes`). Pure: no I/O.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

from bastion.control.probe.types import Case, Surface
from bastion.methods import TOOLS_CALL, TOOLS_LIST

__all__ = ["header_cases", "list_request", "malformed_cases"]

_DEEP = "[" * 200 + "]" * 200


def list_request(params: str, *, head: str = '"id": 1') -> bytes:
    """A tools/list request spelled out by hand, so that it can be malformed: `params` and
    `head` (the members before the method) are written into the body as they are."""
    method = json.dumps(TOOLS_LIST)
    return f'{{"jsonrpc": "2.0", {head}, "method": {method}, "params": {params}}}'.encode()


def header_cases(surface: Surface) -> Iterator[Case]:
    """Each `Mcp-*` header (and the protocol version) contradicting the body it comes with."""
    if not surface.tenants:
        return
    tenant = surface.tenants[0]
    shown = [n for n in surface.listings[tenant].tools if surface.catalog[n].read_only]
    hidden = [n for n, t in surface.catalog.items() if t.read_only and n not in shown]
    header_name = shown[0] if shown else "bastion-probe-tool"
    body_name = (hidden or shown[1:] or ["bastion-probe-other"])[0]
    call = {"name": body_name, "arguments": {}}
    mismatches = {
        "mcp-name": ({"Mcp-Name": header_name}, TOOLS_CALL, call),
        "mcp-name-base64": (
            {"Mcp-Name": "=?base64?" + _b64(header_name) + "?="},
            TOOLS_CALL,
            call,
        ),
        "mcp-method": ({"Mcp-Method": TOOLS_LIST}, TOOLS_CALL, call),
        "protocol-version": ({"MCP-Protocol-Version": "2025-11-25"}, TOOLS_LIST, {}),
    }
    for label, (headers, method, params) in mismatches.items():
        yield Case(
            name=f"header-mismatch:{label}",
            kind="headers",
            tried=f"2026-07-28 request whose {next(iter(headers))} header disagrees with the body",
            expected="HTTP 400, JSON-RPC -32020 (or -32022 for the version)",
            tenant=tenant,
            denial=False,
            expect="status",
            statuses=(400,),
            spec={"headers": headers, "method": method, "params": params},
        )


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def malformed_cases(surface: Surface) -> Iterator[Case]:
    """Bodies the gateway must refuse with a 4xx JSON-RPC error, never a 5xx."""
    if not surface.tenants:
        return
    tenant = surface.tenants[0]
    bodies = {
        "not-json": b'{"jsonrpc": "2.0", "id": 1, "method": ',
        "batch": b"[" + list_request("{}") + b"]",
        "duplicate-keys": list_request("{}", head='"id": 1, "id": 2'),
        "deep-nesting": list_request('{"x": ' + _DEEP + "}"),
        "params-not-object": list_request("[1]"),
        "null-id": list_request("{}", head='"id": null'),
    }
    for label, body in bodies.items():
        yield Case(
            name=f"malformed:{label}",
            kind="raw",
            tried=f"a {label.replace('-', ' ')} JSON-RPC body",
            expected="a 4xx JSON-RPC error, never 5xx",
            tenant=tenant,
            denial=False,
            expect="status",
            statuses=tuple(range(400, 500)),
            spec={"body": body},
        )
    yield Case(
        name="malformed:oversized",
        kind="raw",
        tried=f"a body of {surface.max_body_bytes + 1} bytes (limits.max_body_bytes + 1)",
        expected="413",
        tenant=tenant,
        denial=False,
        expect="status",
        statuses=(413,),
        spec={"size": surface.max_body_bytes + 1},
    )
