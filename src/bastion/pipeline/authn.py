"""Authentication: who is calling. Builds the Principal once per request.

Until the identity stage lands, the only mode is `auth: none`: every caller is the configured
tenant's anonymous agent, and the gateway refuses to start with it off loopback.
"""

from __future__ import annotations

from bastion.config import Auth
from bastion.pipeline.exchange import Exchange
from bastion.types import Principal


class Authenticator:
    """Turns request credentials into a Principal."""

    def __init__(self, settings: Auth) -> None:
        self._anonymous = Principal(tenant=settings.tenant, agent=settings.agent)

    def authenticate(self, exchange: Exchange) -> None:
        """Set `exchange.principal` (or a denial)."""
        exchange.principal = self._anonymous
