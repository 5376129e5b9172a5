"""A real PostgreSQL server for tests, on loopback in a temporary directory.

Use it with `postgres = pg.postgres` in a test module: that session fixture starts one server
for the whole session, `postgres.database()` gives a test a fresh database,
and `start_server()` starts a private one (for a test that stops and restarts it).

The binaries come from Debian's `postgresql` package (/usr/lib/postgresql/<version>/bin), which
`make test` installs; missing, the tests fail on CI and are skipped elsewhere. PostgreSQL
refuses to run as root, so as root the server runs as the `postgres` system user. The superuser
password is generated for each server and only a Unix socket-less TCP listener on 127.0.0.1
is opened.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from tests.conftest import IN_CI, free_port

PG_GLOB = "/usr/lib/postgresql/*/bin/initdb"
SUPERUSER = "bastion_test"


def binaries() -> Path:
    """The newest PostgreSQL bin directory; fail on CI, skip elsewhere, when there is none."""
    found = sorted(glob.glob(PG_GLOB), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    problem = None
    if not found:
        problem = f"PostgreSQL is not installed (no {PG_GLOB})"
    elif os.geteuid() == 0 and not _has_user("postgres"):
        problem = "running as root needs the `postgres` system user to start PostgreSQL"
    if problem is None:
        return Path(found[-1]).parent
    message = f"{problem}; run `make test`, which installs it"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@dataclass
class PgServer:
    """One PostgreSQL server: its directory, port and superuser password."""

    bindir: Path
    root: Path
    port: int
    password: str = field(repr=False)
    _databases: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    def dsn(self, dbname: str = "postgres", *, password: bool = True) -> str:
        """A URL DSN for the superuser, with or without the password."""
        secret = f":{self.password}" if password else ""
        return f"postgresql://{SUPERUSER}{secret}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit superuser connection (for setting up and for tampering)."""
        return psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=5)

    def database(self) -> str:
        """A fresh, empty database; its DSN (with the password)."""
        self._databases += 1
        name = f"test_{self._databases}_{secrets.token_hex(4)}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def start(self) -> None:
        """Start the server and wait (at most 30 s) until it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories= "
            "-c fsync=off -c full_page_writes=off -c max_connections=50"
        )
        self._ctl("start", "-l", str(self.root / "server.log"), "-o", options)

    def stop(self) -> None:
        """Stop the server (fast: open sessions are ended) and wait at most 30 s."""
        self._ctl("stop", "-m", "fast")

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _ctl(self, *args: str) -> None:
        command = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "30", *args]
        result = _as_postgres(command, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {args[0]} failed ({result.returncode}): {result.stderr}\n{self.log()}"
            )


def _as_postgres(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program, as the `postgres` user when we are root."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@contextlib.contextmanager
def start_server() -> Iterator[PgServer]:
    """A new server in a temporary directory, stopped and removed afterwards."""
    bindir = binaries()
    # Not under pytest's tmp_path: its parents are private to root, and postgres must enter.
    root = Path(tempfile.mkdtemp(prefix="bastion-pg-"))
    try:
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
        server = PgServer(bindir, root, free_port(), secrets.token_urlsafe(24))
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        init = [
            str(bindir / "initdb"), "-D", str(server.data), "-U", SUPERUSER,
            f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        result = _as_postgres(init, timeout=120)
        pwfile.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr}")
        server.start()
        try:
            yield server
        finally:
            try:
                server.stop()
            except (RuntimeError, subprocess.TimeoutExpired):
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    server._ctl("stop", "-m", "immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """One PostgreSQL server for the test session."""
    with start_server() as server:
        yield server
