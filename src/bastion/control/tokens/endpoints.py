"""HTTP endpoints of the embedded authorization server (plain ASGI).

`/.well-known/oauth-authorization-server` (RFC 8414), `/.well-known/jwks.json` and the token
endpoint `/oauth/token` (form-encoded POST, RFC 6749 errors, `Cache-Control: no-store`; a body
over `MAX_FORM_BYTES`, or over `limits.max_body_bytes` when smaller, is refused with 413).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

import orjson

from bastion.asgi import ASGIApp, Receive, Scope, Send
from bastion.control.tokens.service import TokenService
from bastion.errors import OAuthError, shown

log = logging.getLogger("bastion.oauth")

MAX_FORM_BYTES = 64 * 1024  # a token request is a few kB: two JWTs and a few names
_NO_STORE = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]


def oauth_endpoints(service: TokenService) -> dict[str, ASGIApp]:
    """The path → handler map the front mounts next to the MCP routes."""

    limit = min(MAX_FORM_BYTES, service.settings.limits.max_body_bytes)

    async def metadata(scope: Scope, receive: Receive, send: Send) -> None:
        await _answer(send, 200, service.metadata(), [(b"access-control-allow-origin", b"*")])

    async def jwks(scope: Scope, receive: Receive, send: Send) -> None:
        # The key store's watcher (the gateway's background) keeps the keys current.
        await _answer(send, 200, service.keys.jwks(), [(b"cache-control", b"max-age=60")])

    async def token(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await _answer(
                send,
                405,
                {"error": "invalid_request", "error_description": "use POST"},
                [(b"allow", b"POST")],
            )
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            form = await _form(receive, headers, limit)
            body = await service.token(form, headers.get("dpop"))
        except OAuthError as exc:
            log.info("token request refused: %s (%s)", exc.error, exc.message)
            extra = {
                401: [(b"www-authenticate", b'Bearer error="invalid_client"')],
                503: [(b"retry-after", b"1")],
            }.get(exc.status, [])
            await _answer(send, exc.status, exc.body(), _NO_STORE + extra)
            return
        await _answer(send, 200, body, _NO_STORE)

    async def authorize(scope: Scope, receive: Receive, send: Send) -> None:
        body = {
            "error": "unsupported_response_type",
            "error_description": "agents get tokens at the token endpoint "
            "(client_credentials with private_key_jwt, or token exchange)",
        }
        await _answer(send, 400, body, _NO_STORE)

    return {
        "/.well-known/oauth-authorization-server": metadata,
        "/oauth/authorize": authorize,
        "/.well-known/jwks.json": jwks,
        "/oauth/token": token,
    }


async def _form(receive: Receive, headers: dict[str, str], limit: int) -> dict[str, str]:
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise OAuthError(
            "invalid_request", "the token endpoint takes application/x-www-form-urlencoded"
        )
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit, f"{int(length)} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise OAuthError("invalid_request", "the client went away")
        chunk = event.get("body", b"")
        size += len(chunk)
        # Chunked bodies have no length up front; the server cuts an oversized one just past
        # its own limit, so the count still passes ours and the form is never parsed cut.
        if size > limit:
            raise _too_large(limit, "more")
        chunks.append(chunk)
        if not event.get("more_body"):
            break
    try:
        pairs = parse_qsl(
            b"".join(chunks).decode("utf-8"), keep_blank_values=True, strict_parsing=False
        )
    except UnicodeDecodeError as exc:
        raise OAuthError("invalid_request", "the form is not UTF-8") from exc
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise OAuthError("invalid_request", f"parameter {shown(key)} appears more than once")
        form[key] = value
    return form


def _too_large(limit: int, found: str) -> OAuthError:
    return OAuthError(
        "invalid_request", f"expected a token request of at most {limit} bytes, found {found}", 413
    )


async def _answer(
    send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]]
) -> None:
    data = orjson.dumps(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
