"""Upstream credentials: what the upstream gets instead of the client's token.

Nothing from the client's request headers is forwarded (no Authorization, no cookies): the
upstream headers are built here from the principal alone. Under `auth: none` the upstream is
told the tenant in `X-Bastion-Tenant`; the identity stage replaces it with a minted JWT.
"""

from __future__ import annotations

from bastion.pipeline.exchange import Exchange

TENANT_HEADER = "X-Bastion-Tenant"


class Credentials:
    """Builds the headers an upstream call carries."""

    def attach(self, exchange: Exchange) -> None:
        """Fill `exchange.upstream_headers` for the exchange's principal."""
        if exchange.principal is not None:
            exchange.upstream_headers[TENANT_HEADER] = exchange.principal.tenant
