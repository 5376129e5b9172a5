"""The ASGI types every plain-ASGI part of Bastion speaks; imports nothing of Bastion's.

One definition, as Starlette keeps in `starlette/types.py`: the transport front, the HTTP/1.1
server, the tracing wrapper, the admin API's guard and the token endpoints all use these.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
