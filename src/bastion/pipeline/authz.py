"""Authorization: may this principal do this here and now.

The policy engine arrives with its own stage work; until then every authenticated request that
routed to a real target is allowed, and the decision is still recorded on the exchange.
"""

from __future__ import annotations

from bastion.pipeline.exchange import Exchange
from bastion.types import Decision

_ALLOW = Decision(allowed=True, reasons=("auth: none allows every routed request",))


class Authorizer:
    """Decides on each exchange that reached a target."""

    def authorize(self, exchange: Exchange) -> None:
        """Set `exchange.decision`; a deny also sets `exchange.denial`."""
        exchange.decision = _ALLOW
