"""The exchange: per-request state carried through every stage."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bastion.errors import BastionError
from bastion.types import JSON, Decision, Era, Principal, Target

if TYPE_CHECKING:
    from bastion.pipeline.session import ClientSession


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
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    trace_id: str | None = None
    request_bytes: int = 0

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
