"""The token cases: no token, an unsigned one, one signed by a stranger's key, an expired one,
one for another route, a revoked one, DPoP misuse, and a client assertion used twice. Pure: no
I/O (the driver forges and presents the tokens).
"""

from __future__ import annotations

from collections.abc import Iterator

from bastion.control.probe.types import Case, Surface

__all__ = ["token_cases"]


def token_cases(surface: Surface, skipped: list[str]) -> Iterator[Case]:
    """Each way of presenting a token the gateway must refuse; what the deployment cannot
    support (one route, an unreadable signing key) is added to `skipped`."""
    if not surface.tenants:
        return
    tenant = surface.tenants[0]
    tricks = {
        "no-token": "no Authorization header",
        "alg-none": "an unsigned token (alg none) with real claims",
        "foreign-key": "a token with real claims signed by a key the gateway does not know",
        "expired": "a token signed by the deployment's key, expired an hour ago",
        "other-audience": "a real token for another route",
        "revoked": "a real token after its jti was revoked in the registry",
        "dpop-without-proof": "a DPoP-bound token presented as a bearer token",
        "dpop-replayed-proof": "a DPoP proof presented a second time",
        "assertion-replay": "the same private_key_jwt assertion at the token endpoint twice",
    }
    for trick, tried in tricks.items():
        if trick == "other-audience" and surface.other_route is None:
            skipped.append("token:other-audience: the deployment serves one route")
            continue
        if trick == "expired" and not surface.signing_key_readable:
            skipped.append("token:expired: the state directory's signing key is not readable")
            continue
        yield Case(
            name=f"token:{trick}",
            kind="token",
            tried=tried,
            expected="400 or 401 at the token endpoint" if trick == "assertion-replay" else "401",
            tenant=tenant,
            denial=False,
            expect="status",
            statuses=(400, 401) if trick == "assertion-replay" else (401,),
            spec={"trick": trick},
        )
