"""Where replicas share state: the hot state in Redis (`state`), the registry in PostgreSQL
(`registry`). Both default to one process's own: memory and the SQLite file of `state_dir`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bastion.config.base import _Frozen
from bastion.errors import ConfigError

__all__ = [
    "RegistrySettings",
    "SharedState",
    "read_reference",
    "store_reference",
]


def store_reference(value: str | None, schemes: tuple[str, ...]) -> str | None:
    """A store's address as the config may hold it: env:NAME, file:PATH, or a URL of one of
    `schemes` without a password (a literal secret in the file is refused)."""
    if value is None or re.match(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$", value):
        return value
    if value.startswith("vault:"):
        raise ValueError("expected env:NAME or file:PATH; vault: is not read here")
    if re.search(r"(?i)\bpassword\s*=", value) or re.match(r"^[a-z+]+://[^/?#@]*:[^/?#@]*@", value):
        raise ValueError(
            "an address with a password must come from a secret reference (env:NAME or "
            "file:PATH); literal secrets are refused"
        )
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in schemes:
        raise ValueError(f"expected env:NAME, file:PATH or a {'/'.join(schemes)} URL")
    return value


class SharedState(_Frozen):
    """The hot state replicas share: sessions and their SSE buffers, replay caches, rate
    counters, pending approvals, the fleet's detector events. `memory` keeps it in this
    process (one gateway); `redis` in Redis or Valkey at `url`, failing closed
    (`state.unavailable`, 503) when an operation gets no answer within `timeout_seconds`."""

    store: Literal["memory", "redis"] = "memory"
    url: str | None = None  # env:NAME, file:PATH or redis:// / rediss:// without a password
    prefix: str = Field("bastion:", pattern=r"^[A-Za-z0-9:_.-]{1,64}$")
    timeout_seconds: float = Field(1.0, gt=0, le=30)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return store_reference(value, ("redis", "rediss", "unix"))

    @model_validator(mode="after")
    def _needs_url(self) -> SharedState:
        if self.store == "redis" and self.url is None:
            raise ValueError("store redis needs state.url")
        return self


class RegistrySettings(_Frozen):
    """Where agents, revocations, killed sessions, pins, quarantines and reviews live: the
    SQLite file `registry.db` of `state_dir` (one machine), or one PostgreSQL database every
    replica reads (`dsn`: env:NAME, file:PATH or a postgresql:// DSN without a password)."""

    store: Literal["sqlite", "postgres"] = "sqlite"
    dsn: str | None = None

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value and "=" in value:
            if re.search(r"(?i)\bpassword\s*=", value):
                raise ValueError(
                    "a DSN with a password must come from a secret reference (env:NAME or "
                    "file:PATH); literal secrets are refused"
                )
            return value  # a libpq key=value DSN
        return store_reference(value, ("postgres", "postgresql"))

    @model_validator(mode="after")
    def _needs_dsn(self) -> RegistrySettings:
        if self.store == "postgres" and self.dsn is None:
            raise ValueError("store postgres needs registry.dsn")
        return self


def read_reference(reference: str, key: str) -> str:
    """The address a store reference names: the variable of env:NAME, the file of file:PATH
    (stripped), else the literal itself; ConfigError naming `key` when it cannot be read.
    Called once, when a gateway or a command opens its stores."""
    kind, _, rest = reference.partition(":")
    if kind == "env":
        value = os.environ.get(rest, "").strip()
        if not value:
            raise ConfigError([f"{key}: environment variable {rest!r} is not set"])
        return value
    if kind == "file":
        try:
            value = Path(rest).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError([f"{key}: cannot read {rest}: {exc.strerror}"]) from exc
        if not value:
            raise ConfigError([f"{key}: {rest} is empty"])
        return value
    return reference
