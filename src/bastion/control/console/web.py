"""The console's HTTP plumbing: security headers, forms, rendering, cookies.

Every answer carries a strict Content-Security-Policy (`default-src 'self'`, no inline script
or style), `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer` and `no-store`. A form body
is read bounded and parsed strictly (each field at most once); nothing here trusts it further.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from bastion.asgi import ASGIApp, Receive, Scope, Send
from bastion.errors import BadRequest

__all__ = [
    "COOKIE",
    "LOGIN_COOKIE",
    "PREFIX",
    "SecurityHeaders",
    "Templates",
    "form",
    "secure_cookie",
    "set_cookie",
]

PREFIX = "/console"
COOKIE = "bastion_console"
LOGIN_COOKIE = "bastion_console_login"
MAX_FORM_BYTES = 64 * 1024
HERE = Path(__file__).resolve().parent

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """ASGI middleware: the console's security headers on every answer, pages and assets."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in _HEADERS}
                kept = [(n, v) for n, v in message.get("headers", []) if n not in names]
                if not any(n == b"cache-control" for n, _ in kept):
                    kept.append((b"cache-control", b"no-store"))
                message = {**message, "headers": kept + _HEADERS}
            await send(message)

        await self._app(scope, receive, with_headers)


class Templates:
    """The shipped Jinja2 templates, autoescaped."""

    def __init__(self) -> None:
        self._env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def render(self, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        """A page from `templates/<name>`."""
        body = self._env.get_template(name).render(prefix=PREFIX, **values)
        return HTMLResponse(body, status)


async def form(request: Request) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body: fields, each at most once."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise BadRequest("content-type", "expected application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise BadRequest("body", f"expected at most {MAX_FORM_BYTES} bytes")
    found: dict[str, str] = {}
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("body", "expected a URL-encoded form in UTF-8") from None
    for name, value in pairs:
        if name in found:
            raise BadRequest(name[:40], "given more than once")
        found[name] = value
    return found


def secure_cookie(request: Request, public_https: bool) -> bool:
    """Whether cookies must be `Secure`: the console is reached over https (its public URL,
    the request, or the TLS proxy in front says so)."""
    forwarded = request.headers.get("x-forwarded-proto", "")
    return public_https or request.url.scheme == "https" or forwarded.lower() == "https"


def set_cookie(
    response: Response, name: str, value: str, age: int, *, secure: bool, lax: bool = False
) -> None:
    """An HttpOnly cookie for the console's paths (SameSite=Strict unless `lax`)."""
    response.set_cookie(
        name,
        value,
        max_age=age,
        path=PREFIX,
        httponly=True,
        secure=secure,
        samesite="lax" if lax else "strict",
    )
