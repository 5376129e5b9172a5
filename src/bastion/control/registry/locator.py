"""Where a configuration's registry lives, and opening it: the one way every part of the
control plane (gateway assembly, admin API, console, CLI, governance) reaches the registry.

`registry.store: sqlite` (the default) is `<state_dir>/registry.db`; `registry.store:
postgres` is the database `registry.dsn` names (a secret reference, read once here). The
admin API and the console keep a `RegistryLocator` rather than a connection: each operator's
act opens the registry, works in a worker thread and closes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bastion.config import Settings
from bastion.config.shared import read_reference
from bastion.control.registry.db import Database, SqliteDatabase
from bastion.control.registry.pins import SqlTrustStore
from bastion.control.registry.store import PostgresRegistry, SqliteRegistry, SqlRegistry
from bastion.errors import NotAvailable

__all__ = ["RegistryLocator", "locate", "open_registry", "registry_call", "trust_call"]

_T = TypeVar("_T")
FILE_NAME = "registry.db"


@dataclass(frozen=True)
class RegistryLocator:
    """The registry of one configuration: a SQLite file (`path`) or a PostgreSQL DSN (`dsn`,
    kept out of `repr`: it may hold the password)."""

    path: Path | None = None
    dsn: str | None = field(default=None, repr=False)

    def registry(self, *, create: bool = False) -> SqlRegistry:
        """The registry's agents, revocations and killed sessions (`create`: on first run,
        make the file or the tables; without it, RegistryUnavailable when there are none)."""
        if self.dsn is not None:
            return PostgresRegistry(self.dsn, create=create)
        return SqliteRegistry(self._path(), create=create)

    def database(self, *, create: bool = False) -> Database:
        """A connection of its own, for the tables beside the agents' (pins and quarantines,
        reviews): `TrustStore(locator.database())`, `ReviewStore(...)`."""
        if self.dsn is not None:
            from bastion.control.registry.pg import PostgresDatabase  # psycopg only when used

            return PostgresDatabase(self.dsn, create=create)
        return SqliteDatabase(self._path(), create=create)

    def _path(self) -> Path:
        if self.path is None:
            raise NotAvailable("no registry is configured")
        return self.path


def locate(settings: Settings) -> RegistryLocator:
    """The registry `settings` name (reading `registry.dsn`'s secret reference; ConfigError
    naming the key when it cannot be read)."""
    if settings.registry.store == "postgres" and settings.registry.dsn is not None:
        return RegistryLocator(dsn=read_reference(settings.registry.dsn, "registry.dsn"))
    return RegistryLocator(path=Path(settings.state_dir) / FILE_NAME)


def open_registry(settings: Settings, *, create: bool = False) -> SqlRegistry:
    """The registry `settings` name, opened (`create`: the gateway's first run; the CLI and
    the console open an existing one and fail with RegistryUnavailable otherwise)."""
    locator = locate(settings)
    if create and locator.path is not None:
        locator.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return locator.registry(create=create)


async def registry_call(locator: RegistryLocator | None, work: Callable[[SqlRegistry], _T]) -> _T:
    """Run `work` on the registry in a worker thread (the admin API and the console: an
    operator's act, never the request path); NotAvailable without a registry."""
    if locator is None:
        raise NotAvailable("identity is off (auth.mode: none); there is no agent registry")

    def run() -> _T:
        with locator.registry() as registry:
            return work(registry)

    return await asyncio.to_thread(run)


async def trust_call(locator: RegistryLocator | None, work: Callable[[SqlTrustStore], _T]) -> _T:
    """Run `work` on the pins and quarantines in a worker thread (the admin API and the
    console); NotAvailable when the gateway keeps none."""
    if locator is None:
        raise NotAvailable("this gateway keeps no pins (no registry store)")

    def run() -> _T:
        with SqlTrustStore(locator.database()) as store:
            return work(store)

    return await asyncio.to_thread(run)
