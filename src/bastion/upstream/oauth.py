"""Token requests Bastion makes as a client: RFC 8693 exchange at an external server."""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import quote, urlencode

import orjson

from bastion.errors import UpstreamError, UpstreamUnavailable, WireError
from bastion.wire import Pool


async def exchange_token(
    token_endpoint: str, form: dict[str, str], client_id: str, client_secret: str, upstream: str
) -> tuple[str, float]:
    """POST a token-exchange request (client_secret_basic); the access token and its lifetime.

    Failures name the upstream whose credential could not be obtained; the call then fails
    closed rather than going upstream without a credential.
    """
    basic = base64.b64encode(f"{quote(client_id)}:{quote(client_secret)}".encode()).decode()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
        "Authorization": f"Basic {basic}",
    }
    pool = Pool(token_endpoint, 1, 5.0, 10.0)
    try:
        async with asyncio.timeout(15):
            response = await pool.request("POST", headers, urlencode(form).encode())
            async with response:
                body = await response.read()
    except (TimeoutError, OSError, WireError) as exc:
        raise UpstreamUnavailable(
            f"the token endpoint for upstream {upstream!r} cannot be reached: {exc}"
        ) from exc
    finally:
        pool.close()
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(
            f"token exchange for upstream {upstream!r} did not answer JSON"
        ) from exc
    if response.status != 200 or not isinstance(answer, dict) or "access_token" not in answer:
        detail = (
            answer.get("error_description") or answer.get("error")
            if isinstance(answer, dict)
            else None
        )
        raise UpstreamError(
            f"token exchange for upstream {upstream!r} was refused (HTTP {response.status}"
            f"{': ' + str(detail) if detail else ''})"
        )
    return str(answer["access_token"]), float(answer.get("expires_in", 60))
