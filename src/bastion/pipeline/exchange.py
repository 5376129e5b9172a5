"""The exchange: per-request state carried through every stage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bastion.errors import BastionError
from bastion.ids import random_hex
from bastion.methods import TOOLS_CALL
from bastion.observe.metrics import method_label
from bastion.types import JSON, Decision, Era, Principal, Target

if TYPE_CHECKING:
    from bastion.observe.tracing import Attributes, RequestTrace
    from bastion.pipeline.session import ClientSession
    from bastion.policy.approval import ApprovalState


@dataclass(slots=True)
class Exchange:
    """One JSON-RPC message on its way through the gateway.

    A stage that refuses the request sets `denial`; later stages do not run.
    """

    message: JSON
    era: Era
    protocol_version: str
    route: str
    client: str
    principal: Principal | None = None
    session: ClientSession | None = None
    target: Target | None = None
    decision: Decision | None = None
    denial: BastionError | None = None
    forward_headers: dict[str, str] = field(default_factory=dict)
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    request_id: str = field(default_factory=lambda: random_hex(16))
    trace_id: str | None = None
    trace: RequestTrace | None = None  # None for the gateway's own calls (catalog, index)
    request_bytes: int = 0
    credential_id: str | None = None  # the jti of the credential minted for the upstream
    # Signs of reaching across a tenant line, for the trail and its detectors: the other
    # tenants named by tenant-scoped arguments, and a session id presented by someone else.
    foreign_tenants: tuple[str, ...] = ()
    foreign_session: bool = False
    # The approval a retry brings, as the decision stage verified it (and used it up), or
    # why it was refused; None when the call brings none (set only under `@approval`).
    approval_state: ApprovalState | str | None = None
    approval_call: str | None = None  # what an approval of this call is bound to
    # Set by the pipeline: the decision record is written and the call allowed, so an outcome
    # record is due; when the stages before the upstream finished; the HTTP status of an
    # error the gateway answers itself (None: the answer's own).
    recorded: bool = False
    args_digest: str | None = None  # the trail's digest of the arguments, made once
    admitted: float = 0.0
    http_status: int | None = None
    # The HTTP request it came in: headers (lower-case names), method and URL, and the legacy
    # session it names. The transport fills these; the stages read them.
    headers: dict[str, str] = field(default_factory=dict)
    http_method: str = "POST"
    url: str = ""
    session_id: str | None = None
    # `Mcp-Param-*` headers as sent, decoded, by lower-case name without the prefix.
    mirrored: dict[str, str] = field(default_factory=dict)
    # Set by the inspection stage: what its rules found in the answer (the first findings,
    # as records keep them, and how many in all), whether it withheld the answer, and the
    # other tenants whose objects the upstream sent.
    findings: list[dict[str, str]] = field(default_factory=list)
    inspected: int = 0
    blocked: bool = False
    answer_tenants: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        """The JSON-RPC method."""
        return str(self.message.get("method", ""))

    @property
    def params(self) -> JSON:
        """The params object (empty when absent)."""
        params = self.message.get("params")
        return params if isinstance(params, dict) else {}

    @property
    def id(self) -> Any:
        """The JSON-RPC id."""
        return self.message.get("id")

    def span_attributes(self) -> Attributes:
        """What the request's trace may say about it: names, decision and error code, never
        tokens or argument values (called when its span ends)."""
        method = self.method
        attributes: Attributes = {
            "mcp.method.name": method_label(method),
            "mcp.protocol.version": self.protocol_version,
            "bastion.route": self.route,
        }
        target = self.target
        if target is not None:
            attributes["bastion.upstream"] = target.upstream
            name = self.params.get("name")
            if method == TOOLS_CALL and isinstance(name, str):
                attributes["gen_ai.tool.name"] = name
        principal = self.principal
        if principal is not None:
            attributes["bastion.tenant"] = principal.tenant
            attributes["bastion.agent"] = principal.agent
        denial = self.denial
        if denial is not None:
            attributes["bastion.decision"] = "deny"
            attributes["error.type"] = denial.code
            attributes["rpc.response.status_code"] = str(denial.rpc_code)
        elif self.decision is not None:
            attributes["bastion.decision"] = "allow" if self.decision.allowed else "deny"
        return attributes
