"""A real Redis server for tests, on loopback in a temporary directory.

Use it with `redis_server = rs.redis_server` in a test module (one server for the session;
`redis_server.url(db)` gives a test its own database number, flushed first), or
`start_redis()` for a private one a test stops and restarts. Every server gets a password
generated here and listens on 127.0.0.1 only, with persistence off.

The binary is Debian's `redis-server`, which `make test` installs; missing, the tests fail on
CI and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.conftest import IN_CI, free_port

__all__ = [
    "RedisServer",
    "binary",
    "redis_server",
    "start_redis",
]

_DATABASES = 64


def binary() -> str:
    """The redis-server program; fail on CI, skip elsewhere, when there is none."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is not None:
        return found
    message = "redis-server is not installed; run `make test`, which installs it"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class RedisServer:
    """One redis-server process: its directory, port and password."""

    program: str
    root: Path
    port: int
    password: str = field(repr=False)
    process: subprocess.Popen[bytes] | None = None
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def url(self, db: int | None = None) -> str:
        """A redis:// URL with the password; without `db`, a fresh database number."""
        if db is None:
            db = next(self._numbers) % _DATABASES
            self.flush(db)
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    def flush(self, db: int) -> None:
        """Empty one database."""
        self.command("-n", str(db), "FLUSHDB")

    def command(self, *args: str) -> str:
        """Run redis-cli against this server; its output."""
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        result = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(self.port), "--no-auth-warning",
             "-a", self.password, *args],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return result.stdout.strip()

    def start(self) -> None:
        """Start the server and wait (at most 30 s) until it answers."""
        config = self.root / "redis.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode yes\n"
            f'requirepass {self.password}\ndir {self.root}\nsave ""\nappendonly no\n'
            f"databases {_DATABASES}\nlogfile {self.root / 'redis.log'}\n"
        )
        config.chmod(0o600)
        self.process = subprocess.Popen([self.program, str(config)])  # noqa: S603
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.process.returncode}): {self.log()}")
            if _answers(self.port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} in 30 s")

    def stop(self) -> None:
        """Stop the server at once (SIGKILL: as if it crashed) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def log(self) -> str:
        path = self.root / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return bool(conn.recv(64))
    except OSError:
        return False


@contextlib.contextmanager
def start_redis() -> Iterator[RedisServer]:
    """A new server in a temporary directory, killed and removed afterwards."""
    program = binary()
    root = Path(tempfile.mkdtemp(prefix="bastion-redis-"))
    server = RedisServer(program, root, free_port(), secrets.token_urlsafe(24))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis server for the test session."""
    with start_redis() as server:
        yield server
