"""The inspection stage: what an upstream sent back, checked and rewritten before any client
sees it — after the upstream stage, before the outcome is recorded.

Today it applies the `@redact("$.result…")` obligations of the decision to the response (a
response alone, or the last message of a stream). Every further check on answers (tenant
guard, secrets, injection markers, tool pins) belongs here too, as one more rule over the same
messages.
"""

from __future__ import annotations

from bastion.pipeline.exchange import Exchange
from bastion.policy.redaction import paths, redact
from bastion.types import JSON
from bastion.upstream.base import Answer

__all__ = ["Inspection"]


class Inspection:
    """Applies the result rules of a decision to an answer."""

    def inspect(self, exchange: Exchange, answer: Answer) -> Answer:
        """The answer as the client may see it."""
        decision = exchange.decision
        if decision is None or not decision.obligations:
            return answer
        steps = paths(decision.obligations, "result")
        if not steps:
            return answer

        def fix(body: JSON) -> JSON:
            for path in steps:
                body = redact(body, path)
            return body

        return answer.map_result(exchange.id, fix)
