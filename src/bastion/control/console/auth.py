"""The console's logins and its guard: OIDC (code + PKCE) or the admin token, then a session.

```
GET  /console/login                 the login page (OIDC button when configured; admin token)
POST /console/login/token           admin token -> a session (the token itself is never kept)
GET  /console/login/oidc            -> the issuer (see oidc.py)
GET  /console/auth/callback         <- the issuer; a session for the person it names
POST /console/logout
```

Before login, forms carry a login token that must equal the login cookie's (double submit),
so no other site can log a browser in. After login, every POST must carry the session's CSRF
token and come from this origin (Origin, when the browser sends one), and the person's roles
must grant the act. Every login, good or refused, is in the audit trail.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from bastion.config import Settings
from bastion.control.console.oidc import OidcClient, OidcLoginError, pkce_pair
from bastion.control.console.sessions import LOGIN_SECONDS, LoginAttempt, Person, Session, may
from bastion.control.console.sessions import Sessions as SessionStore
from bastion.control.console.web import (
    COOKIE,
    LOGIN_COOKIE,
    PREFIX,
    Templates,
    form,
    secure_cookie,
    set_cookie,
)

__all__ = ["ADMIN_TOKEN_PERSON", "Logins", "refused"]

log = logging.getLogger("bastion.console")

ADMIN_TOKEN_PERSON = Person("admin-token", "admin (admin token)", frozenset({"admin"}), "token")
Audit = Callable[[str, Person | None, str, str | None, dict[str, Any], Request], Awaitable[bool]]


def refused(status: int, message: str) -> HTTPException:
    """A console request refused: its HTTP status and a message safe to show the person."""
    return HTTPException(status, message)


class Logins:
    """Sessions, the two ways in, and the checks every console request passes."""

    def __init__(
        self,
        settings: Settings,
        token: str | None,
        oidc: OidcClient | None,
        templates: Templates,
        audit: Audit,
    ) -> None:
        console = settings.console
        self.sessions = SessionStore(float(console.session_lifetime_seconds), console.max_sessions)
        self._token = None if token is None else token.encode()
        self._oidc = oidc
        self._templates = templates
        self._audit = audit
        self._https = settings.base_url().startswith("https://")
        self._origin = settings.base_url()
        self._lifetime = console.session_lifetime_seconds

    # -- the guard -------------------------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        """The request's live session, if any."""
        return self.sessions.get(request.cookies.get(COOKIE), time.time())

    def require(self, request: Request, right: str) -> Session:
        """The session, when it may do `right`; else refused (401 without one, 403)."""
        session = self.session(request)
        if session is None:
            raise refused(401, "log in first")
        if not may(session.person, right):
            raise refused(403, f"your roles ({', '.join(sorted(session.person.roles))}) "
                              f"do not allow this ({right})")  # fmt: skip
        return session

    async def posted(self, request: Request, right: str) -> tuple[Session, dict[str, str]]:
        """A POST's session and form, once origin, CSRF token and role all hold."""
        self._same_origin(request)
        session = self.require(request, "view")
        fields = await form(request)
        if not session.csrf_ok(fields.pop("csrf", None)):
            log.warning("console: POST %s refused: missing or wrong CSRF token", request.url.path)
            raise refused(403, "the form's CSRF token is missing or not this session's")
        if not may(session.person, right):
            raise refused(403, f"your roles ({', '.join(sorted(session.person.roles))}) "
                              f"do not allow this ({right})")  # fmt: skip
        return session, fields

    def _same_origin(self, request: Request) -> None:
        """Refuse a form another site posted: by the browser's Sec-Fetch-Site, else Origin
        (which is "null" under this console's no-referrer policy, so it decides only when a
        real origin is named)."""
        fetched = request.headers.get("sec-fetch-site")
        if fetched is not None and fetched not in ("same-origin", "none"):
            raise refused(403, "this form was posted from another site")
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            return
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin not in (own, self._origin):
            raise refused(403, "this form was posted from another site")

    # -- login pages -------------------------------------------------------------------------

    async def page(
        self, request: Request, problem: str | None = None, status: int = 200
    ) -> Response:
        """The login page, with a fresh login token in its forms and cookie."""
        login = secrets.token_urlsafe(24)
        response = self._templates.render(
            "login.html", status, login=login, oidc=self._oidc is not None, problem=problem,
            token=self._token is not None,
            person=None, issuer=self._oidc.issuer if self._oidc else None,
        )  # fmt: skip
        set_cookie(
            response,
            LOGIN_COOKIE,
            login,
            int(LOGIN_SECONDS),
            secure=self._secure(request),
            lax=True,
        )
        return response

    async def with_token(self, request: Request) -> Response:
        """Exchange the admin token for a session; a wrong token is refused and audited."""
        self._same_origin(request)
        fields = await form(request)
        self._login_token(request, fields.get("login"))
        if self._token is None:
            raise refused(404, "the admin-token login is off (admin.enabled: false)")
        presented = fields.get("token", "").strip().encode()
        if not presented or not hmac.compare_digest(presented, self._token):
            await self._audit(
                "console/login", None, "deny", "wrong admin token", {"via": "token"}, request
            )
            log.warning("console: admin-token login refused from %s", _client(request))
            return await self.page(request, "That is not the admin token.", 401)
        return await self._opened(request, ADMIN_TOKEN_PERSON)

    async def oidc_start(self, request: Request) -> Response:
        """Send the browser to the issuer, remembering what the callback must match."""
        if self._oidc is None:
            raise refused(404, "no OIDC issuer is configured (console.issuer)")
        browser = secrets.token_urlsafe(24)
        verifier, challenge = pkce_pair()
        nonce = secrets.token_urlsafe(24)
        attempt = LoginAttempt(verifier, nonce, browser, time.time() + LOGIN_SECONDS)
        state = self.sessions.begin_login(attempt)
        try:
            target = await self._oidc.authorize_url(
                state, challenge, nonce, self._callback(request)
            )
        except OidcLoginError as exc:
            return await self.page(request, exc.message, 502)
        response = RedirectResponse(target, 303)
        set_cookie(
            response,
            LOGIN_COOKIE,
            browser,
            int(LOGIN_SECONDS),
            secure=self._secure(request),
            lax=True,
        )
        return response

    async def oidc_callback(self, request: Request) -> Response:
        """Finish an OIDC login: one use of `state`, from the browser that began it."""
        if self._oidc is None:
            raise refused(404, "no OIDC issuer is configured (console.issuer)")
        query = request.query_params
        attempt = self.sessions.finish_login(query.get("state", ""), time.time())
        if attempt is None:
            return await self.page(
                request, "This login is unknown, used or expired; start again.", 400
            )
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        if not hmac.compare_digest(cookie.encode(), attempt.browser.encode()):
            return await self.page(request, "This login was begun in another browser.", 400)
        if "error" in query or not query.get("code"):
            error = query.get("error", "no code")[:60]
            return await self.page(request, f"The issuer did not log you in ({error}).", 401)
        iss = query.get("iss")
        if iss is not None and iss.rstrip("/") != self._oidc.issuer:
            return await self.page(request, "The answer came from another issuer.", 400)
        try:
            person = await self._oidc.redeem(
                query["code"], attempt.verifier, attempt.nonce, self._callback(request)
            )
        except OidcLoginError as exc:
            await self._audit("console/login", None, "deny", exc.message, {"via": "oidc"}, request)
            return await self.page(request, exc.message, 403)
        return await self._opened(request, person)

    async def logout(self, request: Request) -> Response:
        """End the session (a POST with its CSRF token)."""
        session, _ = await self.posted(request, "view")
        self.sessions.close(session.id)
        await self._audit("console/logout", session.person, "allow", None, {}, request)
        response = RedirectResponse(f"{PREFIX}/login", 303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    async def _opened(self, request: Request, person: Person) -> Response:
        """A new session for `person`. The answer is a page that moves on by itself: a
        session cookie set in answer to a cross-site navigation (the issuer's redirect) is
        only sent once the browser navigates from this site."""
        session = self.sessions.open(person, time.time())
        await self._audit(
            "console/login",
            person,
            "allow",
            None,
            {"via": person.via, "roles": sorted(person.roles)},
            request,
        )
        log.info("console: %s logged in (%s)", person.actor, ", ".join(sorted(person.roles)))
        response = self._templates.render("welcome.html", person=person)
        set_cookie(response, COOKIE, session.id, self._lifetime, secure=self._secure(request))
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return response

    def _login_token(self, request: Request, presented: str | None) -> None:
        cookie = request.cookies.get(LOGIN_COOKIE)
        if (
            not cookie
            or not presented
            or not hmac.compare_digest(cookie.encode(), presented.encode())
        ):
            raise refused(403, "the login form's token is missing or stale; reload the login page")

    def _callback(self, request: Request) -> str:
        return f"{self._origin}{PREFIX}/auth/callback"

    def _secure(self, request: Request) -> bool:
        return secure_cookie(request, self._https)


def _client(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "unknown"
