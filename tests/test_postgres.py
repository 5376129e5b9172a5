"""The PostgreSQL connection helpers every store shares (bastion/postgres.py): a DSN read
without its password leaking into a message, a repr, or an error's text; the settings a
connection gets unless its DSN says otherwise. No server needed: the stores' own tests
(test_audit_postgres.py, test_fleet_detectors.py, test_registry_postgres.py) connect."""

from __future__ import annotations

import secrets

import pytest
from psycopg.conninfo import conninfo_to_dict

from bastion.errors import AuditUnavailable, BastionError, RegistryUnavailable
from bastion.postgres import Server, describe


def parsed(
    dsn: str,
    *,
    key: str = "registry.dsn",
    error: type[BastionError] = RegistryUnavailable,
    tcp_user_timeout_ms: int = 5000,
) -> Server:
    return Server.parse(
        dsn,
        key=key,
        error=error,
        application_name="bastion-test",
        connect_timeout=3,
        tcp_user_timeout_ms=tcp_user_timeout_ms,
    )


@pytest.mark.parametrize(
    ("dsn", "where"),
    [
        (
            "postgresql://bastion:PW@db.internal:5433/audit",
            "postgresql://bastion@db.internal:5433/audit",
        ),
        ("host=db user=bastion password=PW dbname=reg", "postgresql://bastion@db/reg"),
        ("hostaddr=10.0.0.7 password=PW", "postgresql://10.0.0.7/"),
        ("password=PW", "postgresql://localhost/"),
    ],
)
def test_the_server_is_named_without_its_password(dsn: str, where: str) -> None:
    password = secrets.token_hex(8)
    server = parsed(dsn.replace("PW", password))
    assert server.where == where == describe(conninfo_to_dict(dsn))
    assert server.password == password
    assert password not in repr(server)  # a server logged or in a traceback keeps it secret


def test_a_dsn_that_does_not_parse_names_the_key_and_never_the_password() -> None:
    password = secrets.token_hex(8)
    with pytest.raises(AuditUnavailable) as caught:
        parsed(f"host=db password='{password}", key="audit.dsn", error=AuditUnavailable)
    assert caught.value.message == "audit.dsn is not a PostgreSQL DSN"
    # libpq's own message (which may quote the DSN) is neither the cause nor the context.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_an_error_text_is_one_line_with_the_password_masked() -> None:
    password = secrets.token_hex(8)
    server = parsed(f"host=db user=u password={password}")
    failure = OSError(f"connection failed:\n  password {password} was refused\n")
    assert server.detail(failure) == "connection failed: password *** was refused"
    assert parsed("host=db").detail(OSError("a\n b")) == "a b"  # no password: nothing masked


def test_connection_settings_are_defaults_the_dsn_overrides() -> None:
    server = parsed("host=db connect_timeout=9 application_name=mine", tcp_user_timeout_ms=15000)
    settings = conninfo_to_dict(server.conninfo)
    assert settings["connect_timeout"] == "9" and settings["application_name"] == "mine"
    assert settings["tcp_user_timeout"] == "15000" and settings["host"] == "db"
    assert (settings["keepalives"], settings["keepalives_idle"]) == ("1", "10")
    assert (settings["keepalives_interval"], settings["keepalives_count"]) == ("5", "3")
