"""The audit trail's files in the state directory: checkpoint keys and the writer's identity.

```
<state_dir>/audit/
    audit.db               the SQLite store (store.py)
    checkpoint-key.pem     the Ed25519 key checkpoints are signed with (0600)
    checkpoint-keys.json   a JWK Set of every checkpoint public key ever used, for `verify`
    writer-id              this process's writer id; `writer-id.1`, `.2`, … for more processes
```

The checkpoint key here sits beside the data it seals, so whoever can write the state directory
can also re-sign; `audit.signer` (signer.py) moves the key outside it (a file, or Vault
transit), and then neither key file here is made or trusted.

A process claims a writer id by holding an exclusive `flock` on its file for as long as it
writes, so two processes that share a state directory never extend the same chain; a
restarted process finds its old id free again and continues its own chain. The lock dies with
the process, kill -9 included. When processes on several machines append to one database, the
store adds a claim of its own inside the database (`claim_writer_id(..., hold=...)`): a slot
whose id another machine holds is skipped as if its file were locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bastion.audit.chain import WRITER_ID
from bastion.errors import AuditUnavailable, BastionError
from bastion.identity.keys import KeySet, SigningKey, generate, thumbprint

DB_FILE = "audit.db"
KEY_FILE = "checkpoint-key.pem"
KEYS_FILE = "checkpoint-keys.json"
WRITER_FILE = "writer-id"
MAX_WRITERS = 64  # writer-id slots per state directory


def audit_dir(state_dir: str | os.PathLike[str]) -> Path:
    """Where the audit files of a state directory live."""
    return Path(state_dir) / "audit"


def load_checkpoint_key(directory: str | os.PathLike[str]) -> SigningKey:
    """The checkpoint key, created on first use; its public half is always in the key file."""
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(folder / ".keys.lock"):
            pem = folder / KEY_FILE
            if pem.exists():
                key = _read_key(pem.read_bytes())
            else:
                key = generate("EdDSA")
                _write_private(pem, key.private_pem())
            _remember(folder, key)
    except (OSError, ValueError, KeyError, TypeError, BastionError) as exc:
        raise AuditUnavailable(f"{folder}: cannot read or write the checkpoint key: {exc}") from exc
    return key


def rotate_checkpoint_key(directory: str | os.PathLike[str]) -> SigningKey:
    """Replace the checkpoint key; the old public key stays listed so old checkpoints verify.

    A running writer keeps signing with the key it loaded until it restarts.
    """
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(folder / ".keys.lock"):
            key = generate("EdDSA")
            _remember(folder, key)  # listed before it can sign anything
            tmp = folder / f"{KEY_FILE}.tmp"
            _write_private(tmp, key.private_pem())
            os.replace(tmp, folder / KEY_FILE)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditUnavailable(f"{folder}: cannot rotate the checkpoint key: {exc}") from exc
    return key


def load_public_keys(directory: str | os.PathLike[str]) -> KeySet:
    """Every checkpoint public key ever used, from the key file (empty when there is none)."""
    path = Path(directory) / KEYS_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return KeySet.from_jwks(document)
    except FileNotFoundError:
        return KeySet({})
    except (OSError, ValueError, BastionError) as exc:
        raise AuditUnavailable(f"{path}: cannot read the checkpoint public keys: {exc}") from exc


class Hold(Protocol):
    """A claim on a writer id held outside the state directory (in a shared database)."""

    def release(self) -> None:
        """Give the id up."""


@dataclass
class WriterClaim:
    """A writer id this process holds (by a lock on its file) until `release`."""

    writer_id: str
    path: Path
    _fd: int
    _hold: Hold | None = None

    def release(self) -> None:
        """Let another process (or a later writer of this one) take the id."""
        if self._hold is not None:
            self._hold.release()
            self._hold = None
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def claim_writer_id(
    directory: str | os.PathLike[str], hold: Callable[[str], Hold | None] | None = None
) -> WriterClaim:
    """Take the first writer-id slot no live process holds; make up an id for a new slot.

    With `hold`, a slot counts as free only when `hold(writer_id)` also claims its id (None:
    another process, maybe on another machine, holds it).
    """
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for slot in range(MAX_WRITERS):
            path = folder / (WRITER_FILE if slot == 0 else f"{WRITER_FILE}.{slot}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                writer_id = _writer_id(fd)
                held = None if hold is None else hold(writer_id)
            except BaseException:
                os.close(fd)
                raise
            if hold is not None and held is None:
                os.close(fd)
                continue
            return WriterClaim(writer_id, path, fd, held)
    except OSError as exc:
        raise AuditUnavailable(f"{folder}: cannot claim an audit writer id: {exc}") from exc
    raise AuditUnavailable(
        f"{folder}: all {MAX_WRITERS} audit writer ids are held by running processes"
    )


def _writer_id(fd: int) -> str:
    current = os.read(fd, 128).decode("ascii", "replace").strip()
    if WRITER_ID.fullmatch(current):
        return current
    new = secrets.token_hex(8)
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, f"{new}\n".encode("ascii"))
    os.fsync(fd)
    return new


def _read_key(pem: bytes) -> SigningKey:
    probe = SigningKey.from_pem(pem, "-", "EdDSA")
    return SigningKey(thumbprint(probe.public_jwk()), "EdDSA", probe.private)


def _write_private(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
        out.flush()
        os.fsync(out.fileno())


def _remember(folder: Path, key: SigningKey) -> None:
    """Add the key's public JWK to the key file unless it is there already."""
    path = folder / KEYS_FILE
    document: dict[str, Any] = {"keys": []}
    if path.exists():
        document = json.loads(path.read_text(encoding="utf-8"))
    if any(jwk.get("kid") == key.kid for jwk in document["keys"]):
        return
    document["keys"].append(key.public_jwk())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _locked:
    """An exclusive flock on `path` for the duration of a `with` block."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        os.close(self._fd)
