"""What operators do from the console, each act checked, carried out and audited.

The same operations as the admin API and the CLI (suspend, resume, offboard, rotate a key;
approve a changed tool; release a quarantined upstream; decide an access-review finding;
approve or deny a held call), called as functions, never over HTTP. Each is written to the
audit trail as `console/<act>` with the person's identity in `detail.actor`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request

from bastion.audit import AuditRecord, AuditWriter
from bastion.config import Settings
from bastion.control.cli.agents import jwk_from_pem
from bastion.control.console.sessions import Person
from bastion.control.governance import reviewer
from bastion.control.registry.agents import AgentStatus
from bastion.control.registry.locator import RegistryLocator, registry_call, trust_call
from bastion.control.registry.store import SqlRegistry
from bastion.control.registry.trust import SqlTrustStore
from bastion.errors import AuditUnavailable, BadRequest, InputError
from bastion.pipeline.chain import Pipeline

__all__ = ["Acts"]

log = logging.getLogger("bastion.console")
T = TypeVar("T")
ROUTE = "/console"
STATUSES = {
    "suspend": AgentStatus.SUSPENDED,
    "resume": AgentStatus.ACTIVE,
    "offboard": AgentStatus.OFFBOARDED,
}


class Acts:
    """The console's writes over one gateway's registry, trust store, pipeline and trail."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        writer: AuditWriter | None,
        registry: RegistryLocator | None,
        trust: RegistryLocator | None,
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._writer = writer
        self._registry = registry
        self._trust = trust

    async def audit(
        self,
        act: str,
        person: Person | None,
        decision: str,
        reason: str | None,
        detail: dict[str, Any],
        request: Request,
        tenant: str | None = None,
    ) -> bool:
        """An operator's act (or a refused login) in the trail; whether it was committed.
        The agent acted on is named in `detail`, never in `agent`: the act is the person's."""
        if self._writer is None:
            return False
        client = request.client
        who = (
            {"actor": person.actor, "actor_name": person.name, "via": person.via} if person else {}
        )
        record = AuditRecord(
            time=time.time(),
            request_id=uuid.uuid4().hex,
            phase="decision",
            tenant=tenant,
            client=f"{client.host}:{client.port}" if client else None,
            route=ROUTE,
            method=f"console/{act.removeprefix('console/')}",
            decision="allow" if decision == "allow" else "deny",
            reason=reason,
            detail={**who, **detail},
        )
        try:
            await self._writer.append(record, True)
        except AuditUnavailable as exc:
            log.error("console %s not audited: %s", act, exc.message)
            return False
        return True

    # -- agents ------------------------------------------------------------------------------

    async def agent_status(
        self, person: Person, agent_id: str, action: str, reason: str | None, request: Request
    ) -> str:
        """Suspend, resume or offboard an agent, in force here before answering."""
        status = STATUSES.get(action)
        if status is None:
            raise BadRequest("action", "expected suspend, resume or offboard")
        reason = reason or None
        agent = await self._registry_call(lambda r: r.set_status(agent_id, status, reason))
        if self._pipeline.agents is not None:
            await self._pipeline.agents.reread()
        detail = {"target_agent": agent.id, "status": str(agent.status)}
        await self.audit(f"agents/{action}", person, "allow", reason, detail, request, agent.tenant)
        log.info("console: %s %s agent %r", person.actor, action, agent.id)
        return f"Agent {agent.id} is now {agent.status}."

    async def rotate_key(self, person: Person, agent_id: str, key: str, request: Request) -> str:
        """Replace an agent's public keys with a PEM public key or a JWK Set."""
        jwks = _public_keys(key)
        agent = await self._registry_call(lambda r: r.rotate_key(agent_id, jwks))
        if self._pipeline.agents is not None:
            await self._pipeline.agents.reread()
        kids = [str(k.get("kid", "")) for k in jwks["keys"]]
        detail = {"target_agent": agent.id, "kids": kids}
        await self.audit("agents/rotate_key", person, "allow", None, detail, request, agent.tenant)
        return f"Agent {agent.id} now has {len(kids)} key(s): {', '.join(kids)}."

    async def _registry_call(self, work: Callable[[SqlRegistry], T]) -> T:
        return await registry_call(self._registry, work)

    # -- upstream trust ------------------------------------------------------------------------

    async def approve_pin(self, person: Person, fields: dict[str, str], request: Request) -> str:
        """Make a pending definition the pin; shown and callable again within the poll."""
        upstream, kind, name = (_required(fields, key) for key in ("upstream", "kind", "name"))
        digest = fields.get("digest") or None
        pin = await self._trust_call(
            lambda s: s.approve(upstream, kind, name, digest, person.actor)
        )
        detail = {"upstream": upstream, "kind": kind, "name": name, "digest": pin.digest}
        await self.audit(
            "tools/approve", person, "allow", fields.get("reason") or None, detail, request
        )
        return f"Approved the new {kind} {name} of {upstream}."

    async def release(self, person: Person, fields: dict[str, str], request: Request) -> str:
        """Put a quarantined upstream back in service."""
        upstream = _required(fields, "upstream")
        released = await self._trust_call(lambda s: s.release(upstream, person.actor))
        detail = {"upstream": upstream, "quarantined_for": released.reason}
        await self.audit(
            "quarantines/release", person, "allow", fields.get("reason") or None, detail, request
        )
        return f"Released {upstream} from quarantine."

    async def _trust_call(self, work: Callable[[SqlTrustStore], T]) -> T:
        return await trust_call(self._trust, work)

    # -- access reviews ------------------------------------------------------------------------

    async def start_review(self, person: Person, request: Request) -> str:
        """Open a review of the findings as of now (of the last 30 days' use)."""
        now = time.time()

        def run() -> Any:
            found = reviewer.findings(self._settings, now - 30 * 86400, now)
            with reviewer.review_store(self._settings) as store:
                return store.start(found, {"since": "30d"}, person.actor, now)

        review = await asyncio.to_thread(run)
        detail = {"review": review.id, "findings": len(review.findings)}
        await self.audit("reviews/start", person, "allow", None, detail, request)
        return f"Review {review.id} started with {len(review.findings)} finding(s)."

    async def decide_finding(self, person: Person, fields: dict[str, str], request: Request) -> str:
        """Keep or revoke one finding of the open review, carried out at once."""
        finding_id, verdict = _required(fields, "finding"), _required(fields, "decision")
        reason = fields.get("reason") or None
        review, finding, made = await asyncio.to_thread(
            reviewer.decide, self._settings, None, finding_id, verdict, reason, person.actor,
            time.time(),
        )  # fmt: skip
        if finding.kind == "agent" and made.decision == "revoke" and self._pipeline.agents:
            await self._pipeline.agents.reread()
        detail = {"review": review.id, "finding": finding.id, "subject": finding.subject,
                  "decision": made.decision, "effect": made.effect}  # fmt: skip
        await self.audit("reviews/decide", person, "allow", reason, detail, request)
        return f"{made.decision.capitalize()}: {finding.subject} ({made.effect})."

    async def close_review(self, person: Person, request: Request) -> str:
        """Close the open review (all its findings decided)."""

        def run() -> Any:
            with reviewer.review_store(self._settings) as store:
                return store.close_review(store.current().id, person.actor, time.time())

        review = await asyncio.to_thread(run)
        await self.audit("reviews/close", person, "allow", None, {"review": review.id}, request)
        return f"Review {review.id} closed."


def _required(fields: dict[str, str], name: str) -> str:
    value = fields.get(name, "").strip()
    if not value:
        raise BadRequest(name, "required")
    return value[:500]


def _public_keys(text: str) -> dict[str, Any]:
    """A JWK Set from a pasted PEM public key or JWK Set; never a private key."""
    text = text.strip()
    if not text:
        raise BadRequest("key", "required: a PEM public key or a JWK Set")
    if text.startswith("-----BEGIN"):
        if "PRIVATE" in text.split("\n", 1)[0]:
            raise BadRequest("key", "expected a public key; never paste a private key here")
        try:
            return {"keys": [jwk_from_pem(text.encode(), "the key")]}
        except InputError as exc:
            raise BadRequest("key", exc.message) from None
    try:
        data = json.loads(text)
    except ValueError:
        raise BadRequest("key", "expected a PEM public key or a JWK Set as JSON") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) for k in keys):
        raise BadRequest("key", 'expected a JWK Set: {"keys": [...]}')
    if any("d" in k for k in keys):
        raise BadRequest("key", "expected public keys; this JWK Set holds private material")
    return {"keys": keys}
