"""Where the running gateway is: `<state_dir>/gateway.json`, for the CLI on the same machine.

`bastion serve` writes the file once it listens (`PORT=9000 make run` listens elsewhere than
the config says) and removes it when it stops cleanly; `bastion token` reads it, so the token
it prints is for the gateway actually running. It holds no secret: the public base URL, the
port, the routes and the process id, which tells a live gateway from a file a crash left.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bastion.config import Settings

FILE = "gateway.json"


def announce(settings: Settings, routes: list[str]) -> Path:
    """Write `<state_dir>/gateway.json` for a gateway now listening per `settings`."""
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    document = {
        "url": settings.base_url(),
        "port": settings.listen.port,
        "routes": routes,
        "pid": os.getpid(),
    }
    path = state / FILE
    partial = path.with_name(f".{FILE}.{os.getpid()}")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.chmod(0o644)
    partial.replace(path)  # readers never see half a file
    return path


def withdraw(state_dir: str | Path) -> None:
    """Remove `gateway.json` if this process wrote it (a replica may have written it since)."""
    path = Path(state_dir) / FILE
    document = _read(path)
    if document is not None and document.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def running_url(state_dir: str | Path) -> str | None:
    """The base URL of the gateway running from this state directory, or None when none is
    (no file, an unreadable one, or one left by a process that is gone)."""
    document = _read(Path(state_dir) / FILE)
    if document is None:
        return None
    pid, url = document.get("pid"), document.get("url")
    if not isinstance(pid, int) or not isinstance(url, str) or not _alive(pid):
        return None
    return url


def _read(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
