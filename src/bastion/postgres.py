"""What every PostgreSQL store shares about its connection: `Server`, `describe`,
`bound_waits`, `close_if_interrupted`.

The audit store (audit/postgres.py), the fleet's detectors (audit/fleet.py) and the registry
(control/registry/pg.py) each hold one connection of their own and say different things when it
fails; what they do alike lives here:

- **A DSN is read without letting libpq speak**: its message may quote the DSN, password and
  all, so a DSN that does not parse is refused with the config key only.
- **The server is named without the password** (`postgresql://user@host:port/dbname`), and an
  error's text has the password masked before it reaches a message.
- **Connections fail fast and notice a dead peer**: a connect timeout and TCP keepalives unless
  the DSN says otherwise.

Imported only by those stores, so psycopg is loaded only when PostgreSQL is configured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from bastion.errors import BastionError

__all__ = ["Server", "bound_waits", "close_if_interrupted", "describe"]


@dataclass(frozen=True, slots=True)
class Server:
    """The PostgreSQL server a DSN names: `where` for messages, and what it takes to connect.

    The password and the connection string (which holds it) stay out of the repr.
    """

    where: str
    conninfo: str = field(repr=False)
    password: str = field(repr=False)

    @classmethod
    def parse(
        cls,
        dsn: str,
        *,
        key: str,
        error: type[BastionError],
        application_name: str,
        connect_timeout: int,
        tcp_user_timeout_ms: int,
    ) -> Server:
        """The server of `dsn` with these connection settings where the DSN sets none;
        `error` naming `key` when the DSN does not parse."""
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error:
            # libpq's message may quote the DSN, password and all.
            raise error(f"{key} is not a PostgreSQL DSN") from None
        settings = {
            "connect_timeout": str(connect_timeout),
            "application_name": application_name,
            "keepalives": "1",
            "keepalives_idle": "10",
            "keepalives_interval": "5",
            "keepalives_count": "3",
            "tcp_user_timeout": str(tcp_user_timeout_ms),
        }
        given = {name: value for name, value in params.items() if value is not None}
        return cls(
            where=describe(params),
            conninfo=make_conninfo("", **{**settings, **given}),
            password=str(params.get("password") or ""),
        )

    def connect(self) -> psycopg.Connection[Any]:
        """A new connection in autocommit mode (each store opens its transactions itself)."""
        return psycopg.connect(self.conninfo, autocommit=True)

    def detail(self, exc: BaseException) -> str:
        """The error's text on one line, the password masked (a server may quote it back)."""
        text = " ".join(str(exc).split())
        return text.replace(self.password, "***") if self.password else text


def describe(params: dict[str, Any]) -> str:
    """Where a DSN points, as `postgresql://user@host:port/dbname`, without the password."""
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


def bound_waits(conn: psycopg.Connection[Any]) -> None:
    """Limit how long a transaction may idle and how long a lock is waited for, on this session.

    A replica cut off inside its transaction must not hold the other replicas' writes for long:
    the server ends such a transaction, and a wait for the write lock gives up.
    """
    conn.execute("SET idle_in_transaction_session_timeout = '15s'")
    conn.execute("SET lock_timeout = '10s'")


def close_if_interrupted(conn: psycopg.Connection[Any] | None) -> None:
    """Close `conn` when a failure left it inside a transaction, so that the next call starts
    over on a fresh connection rather than on a statement cut off midway."""
    if conn is None or conn.closed:
        return
    if conn.info.transaction_status != TransactionStatus.IDLE:
        conn.close()
