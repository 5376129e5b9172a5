"""Who is logged in to the console: people, their roles, and server-side sessions.

A session lives in this process's memory only (bounded: the oldest goes first when full); the
browser holds an opaque random id in a cookie, never the admin token or an identity token.
Each session has its own CSRF token, which every form carries and every POST must repeat.
Nothing here does I/O.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = [
    "RIGHTS",
    "LoginAttempt",
    "Person",
    "Session",
    "Sessions",
    "may",
]

# What each console role may do; `view` is every page. An operator acts on agents and
# upstreams, an approver decides held calls, an admin does all of it.
RIGHTS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"view"}),
    "operator": frozenset({"view", "operate"}),
    "approver": frozenset({"view", "approve"}),
    "admin": frozenset({"view", "operate", "approve"}),
}
# A login begun and not finished within this long is forgotten.
LOGIN_SECONDS = 600.0
MAX_LOGINS = 1000


@dataclass(frozen=True, slots=True)
class Person:
    """A logged-in operator: an identity to audit (`actor`), a display name and roles."""

    actor: str  # "admin-token" or "<issuer>#<sub>": what the audit trail names
    name: str
    roles: frozenset[str]
    via: str  # "admin-token" or "oidc"


def may(person: Person, right: str) -> bool:
    """Whether any of the person's roles grants `right` (view, operate, approve)."""
    return any(right in RIGHTS.get(role, frozenset()) for role in person.roles)


@dataclass(slots=True)
class Session:
    """One browser's login: the person, the CSRF token of its forms, when it ends."""

    id: str
    person: Person
    csrf: str
    expires_at: float
    notice: str | None = None  # what the last form did, shown once on the next page

    def csrf_ok(self, presented: str | None) -> bool:
        """Whether a form's token is this session's, compared in constant time."""
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """An OIDC login in flight: what the callback must match (PKCE verifier, nonce, the
    browser that began it)."""

    verifier: str
    nonce: str
    browser: str  # a random value also held in the browser's login cookie
    expires_at: float


@dataclass
class Sessions:
    """The sessions and OIDC logins of one console, in memory, each bounded."""

    lifetime: float
    limit: int
    _sessions: OrderedDict[str, Session] = field(default_factory=OrderedDict)
    _logins: OrderedDict[str, LoginAttempt] = field(default_factory=OrderedDict)

    def open(self, person: Person, now: float) -> Session:
        """A new session for `person` (a fresh id: a login never reuses one)."""
        session = Session(
            secrets.token_urlsafe(32), person, secrets.token_urlsafe(32), now + self.lifetime
        )
        self._sessions[session.id] = session
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None, now: float) -> Session | None:
        """The live session of that id, or None (an expired one is dropped)."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= now:
            del self._sessions[session_id]
            return None
        return session

    def close(self, session_id: str | None) -> None:
        """End a session (logout)."""
        if session_id:
            self._sessions.pop(session_id, None)

    def begin_login(self, attempt: LoginAttempt) -> str:
        """Remember an OIDC login; the `state` that names it."""
        state = secrets.token_urlsafe(32)
        self._logins[state] = attempt
        while len(self._logins) > MAX_LOGINS:
            self._logins.popitem(last=False)
        return state

    def finish_login(self, state: str, now: float) -> LoginAttempt | None:
        """The login `state` names, once: a replayed or expired state finds nothing."""
        attempt = self._logins.pop(state, None)
        if attempt is None or attempt.expires_at <= now:
            return None
        return attempt
