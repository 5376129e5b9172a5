"""How each kind of case is sent: one function per kind, over the driver in run.py."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from bastion.control.probe.client import ACCEPT, LEGACY, MODERN
from bastion.control.probe.protocol import list_request
from bastion.control.probe.types import Case, Observation
from bastion.errors import InputError
from bastion.identity.dpop import make_proof
from bastion.identity.jwt import mint
from bastion.identity.keys import generate as generate_key
from bastion.methods import INITIALIZE, INITIALIZED, TOOLS_CALL, TOOLS_LIST

if TYPE_CHECKING:
    from bastion.control.probe.identities import Identity
    from bastion.control.probe.run import Probe

__all__ = ["run"]


def run(probe: Probe, case: Case, who: Identity) -> Observation:
    """Send one case as `who`; what came back."""
    try:
        return _KINDS[case.kind](probe, case, who)
    except InputError as exc:  # e.g. the token endpoint refused: this case cannot run
        return Observation(None, note=f"failed: {exc.message}")


def _call(probe: Probe, case: Case, who: Identity) -> Observation:
    capabilities: dict[str, Any] | None = (
        {"elicitation": {}} if case.spec.get("asked_is_held") else None
    )
    seen = probe.gateway.call(
        who, case.spec["method"], dict(case.spec["params"]), capabilities=capabilities
    )
    return Observation(seen.status, seen.body, seen.note, probe.leaks(case, seen.body))


def _headers(probe: Probe, case: Case, who: Identity) -> Observation:
    return probe.gateway.call(
        who, case.spec["method"], dict(case.spec["params"]), headers=dict(case.spec["headers"])
    )


def _raw(probe: Probe, case: Case, who: Identity) -> Observation:
    headers = {
        "Authorization": "Bearer " + probe.gateway.bearer(who),
        "Mcp-Method": TOOLS_LIST,
        "MCP-Protocol-Version": MODERN,
    }
    size = case.spec.get("size")
    if size is None:
        return probe.gateway.post(bytes(case.spec["body"]), headers)
    # A tools/list whose one string parameter pads the body to exactly `size` bytes.
    filler = int(size) - len(list_request('{"x": ""}'))
    return probe.gateway.post(list_request('{"x": "' + "a" * filler + '"}'), headers)


def _session(probe: Probe, case: Case, who: Identity) -> Observation:
    gateway = probe.gateway
    owner = probe.roster.identity_for(case.spec["owner"])
    url = gateway.url + gateway.main
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": INITIALIZE,
        "params": {
            "protocolVersion": LEGACY,
            "capabilities": {},
            "clientInfo": {"name": "bastion-probe", "version": "1"},
        },
    }
    mine = {
        "Content-Type": "application/json",
        "Accept": ACCEPT,
        "Authorization": "Bearer " + gateway.bearer(owner),
    }
    opened = gateway.http.post(url, json=init, headers=mine)
    session = opened.headers.get("mcp-session-id")
    if opened.status_code != 200 or not session:
        return Observation(
            None, note=f"failed: {owner.agent} could not open a session (HTTP {opened.status_code})"
        )
    mine |= {"Mcp-Session-Id": session, "MCP-Protocol-Version": LEGACY}
    try:
        gateway.http.post(url, json={"jsonrpc": "2.0", "method": INITIALIZED}, headers=mine)
        theirs = {**mine, "Authorization": "Bearer " + gateway.bearer(who)}
        list_tools = {"jsonrpc": "2.0", "id": 1, "method": TOOLS_LIST, "params": {}}
        return gateway.post(json.dumps(list_tools).encode(), theirs)
    finally:
        gateway.http.delete(url, headers=mine)


def _token(probe: Probe, case: Case, who: Identity) -> Observation:
    trick = case.spec["trick"]
    gateway = probe.gateway
    if trick in ("dpop-without-proof", "dpop-replayed-proof"):
        return _dpop(probe, trick, who)
    if trick == "assertion-replay":
        assertion = gateway.assertion(who)
        first = gateway.token_request(who, gateway.main, assertion=assertion)
        again = gateway.token_request(who, gateway.main, assertion=assertion)
        note = "" if first.status_code == 200 else f"the first use got HTTP {first.status_code}"
        return Observation(again.status_code, _body(again), note)
    if trick == "revoked":
        token = gateway.token(who, gateway.main)
        claims = probe.claims_of(token)
        control = gateway.call(None, TOOLS_LIST, {}, authorization="Bearer " + token)
        probe.roster.registry.revoke_token(
            str(claims["jti"]),
            float(claims["exp"]) + 3600,
            f"bastion probe run {probe.run_id}: revoked-token case",
        )
        seen = gateway.until_refused(token)
        note = "" if control.status == 200 else f"before revocation it got HTTP {control.status}"
        return Observation(seen.status, seen.body, note)
    return gateway.call(None, TOOLS_LIST, {}, authorization=_forged(probe, trick, who))


def _forged(probe: Probe, trick: str, who: Identity) -> str:
    if trick == "no-token":
        return ""
    if trick == "other-audience":
        return "Bearer " + probe.gateway.token(who, probe.other_route or probe.main)
    claims = probe.claims_of(probe.gateway.bearer(who))
    claims["jti"] = uuid.uuid4().hex
    if trick == "alg-none":
        head = _b64url(json.dumps({"alg": "none", "typ": "at+jwt"}).encode())
        return f"Bearer {head}.{_b64url(json.dumps(claims).encode())}."
    if trick == "foreign-key":
        return "Bearer " + mint(generate_key("ES256"), claims)
    now = int(time.time())  # expired: the deployment's own key, an hour past `exp`
    claims.update(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    return "Bearer " + mint(probe.signing_key(), claims)


def _dpop(probe: Probe, trick: str, who: Identity) -> Observation:
    gateway = probe.gateway
    holder = generate_key("ES256")
    token = gateway.token(who, gateway.main, proof_key=holder)
    if trick == "dpop-without-proof":
        return gateway.call(None, TOOLS_LIST, {}, authorization="Bearer " + token)
    proof = make_proof(holder, "POST", gateway.resources[gateway.main], time.time(), token)
    headers = {"DPoP": proof}
    first = gateway.call(None, TOOLS_LIST, {}, authorization="DPoP " + token, headers=headers)
    again = gateway.call(None, TOOLS_LIST, {}, authorization="DPoP " + token, headers=headers)
    note = "" if first.status == 200 else f"the proof's first use got HTTP {first.status}"
    return Observation(again.status, again.body, note)


def _canary(probe: Probe, case: Case, who: Identity) -> Observation:
    spec = case.spec
    planter = probe.roster.identity_for(str(case.victim))
    where = probe.id_of(planter, spec["id_pattern"])
    if where is None:
        return Observation(None, note=f"failed: no object of {planter.tenant} to plant under")
    marker = probe.new_marker()
    planted = probe.gateway.call(
        planter,
        TOOLS_CALL,
        {
            "name": spec["writer"],
            "arguments": {spec["id_argument"]: where, spec["text_argument"]: marker},
        },
    )
    result = planted.body.get("result") if isinstance(planted.body, dict) else None
    if not isinstance(result, dict) or result.get("isError"):
        return Observation(
            None, note=f"failed: the canary could not be planted (HTTP {planted.status})"
        )
    search = {"name": spec["search"], "arguments": {spec["query_argument"]: marker}}
    own = probe.gateway.call(planter, TOOLS_CALL, search)
    theirs = probe.gateway.call(who, TOOLS_CALL, search)
    note = (
        ""
        if probe.canary_hits(own.body, marker)
        else (f"{planter.tenant}'s own search did not find the canary")
    )
    return Observation(theirs.status, theirs.body, note, probe.canary_hits(theirs.body, marker))


def _body(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_KINDS = {
    "call": _call,
    "headers": _headers,
    "raw": _raw,
    "session": _session,
    "token": _token,
    "canary": _canary,
}
