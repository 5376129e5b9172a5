"""The admin API's credential: one bearer token, and the ASGI guard that demands it.

The token comes from `admin.token`, a secret reference resolved at start; without one, a random
token is generated at first start into `<state_dir>/admin-token` (mode 0600) and kept there
for later starts. Every admin request must carry `Authorization: Bearer <token>`, compared in
constant time; an agent's access token is no admin token, whatever it holds.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import orjson

from bastion.asgi import ASGIApp, Receive, Scope, Send
from bastion.config import Settings
from bastion.errors import ConfigError
from bastion.state.secrets import resolve, stored_secret

log = logging.getLogger("bastion.admin")

TOKEN_FILE = "admin-token"  # noqa: S105 - the file's name, not a token
MIN_TOKEN_LENGTH = 16
_CHALLENGE = b'Bearer realm="bastion-admin"'


def token_path(settings: Settings) -> Path:
    """Where the generated admin token is kept."""
    return Path(settings.state_dir) / TOKEN_FILE


async def admin_token(settings: Settings) -> str:
    """The admin token: `admin.token` resolved, else the state directory's (made if absent)."""
    reference = settings.admin.token
    if reference is None:
        return stored_secret(token_path(settings), "admin token", MIN_TOKEN_LENGTH)
    token = (await resolve(reference, "admin.token")).strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            [f"admin.token: expected at least {MIN_TOKEN_LENGTH} characters, found {len(token)}"]
        )
    return token


class AdminGuard:
    """ASGI middleware: refuse (401) a request without the admin token; log each admin call."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        what = f"{scope['method']} {scope['path']}"
        problem = self._problem(scope["headers"])
        if problem is not None:
            log.warning("admin request refused: %s (%s from %s)", problem, what, _client(scope))
            await _unauthorized(send, problem)
            return
        status = 0

        async def observed(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, observed)
        finally:
            log.info("admin %s -> %s", what, status or "no answer")

    def _problem(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """Why the request is not the admin's, or None; never says what was presented."""
        values = [value for name, value in headers if name == b"authorization"]
        if not values:
            return "no Authorization header; expected 'Bearer <admin token>'"
        if len(values) > 1:
            return "more than one Authorization header"
        scheme, _, presented = values[0].partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            return "expected Authorization: Bearer <admin token>"
        if not hmac.compare_digest(presented.strip(), self._token):
            return "the bearer token is not the admin token"
        return None


async def _unauthorized(send: Send, message: str) -> None:
    body = orjson.dumps({"error": "admin.unauthorized", "message": message})
    error = b"" if message.startswith("no Authorization") else b', error="invalid_token"'
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", _CHALLENGE + error),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown"
