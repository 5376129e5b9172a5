"""The embedded authorization server's signing keys, on disk in the state directory.

`{state_dir}/keys/index.json` lists the keys (kid, alg, created, retired); each private key is
a PEM file readable by its owner only. Rotation makes a new current key and retires the old
one, which stays in the JWKS until every token it signed has expired.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError
from bastion.identity.keys import KeySet, SigningKey, generate


@dataclass(frozen=True)
class _Entry:
    kid: str
    alg: str
    created: float
    retired: float | None


class FileKeyStore:
    """Signing keys kept as files; safe to read from the gateway while the CLI rotates."""

    def __init__(self, directory: str | Path, alg: str, keep_seconds: float) -> None:
        self._dir = Path(directory)
        self._alg = alg
        self._keep = keep_seconds
        self._entries: list[_Entry] = []
        self._keys: dict[str, SigningKey] = {}
        self._stamp: float | None = None
        self._keyset: KeySet | None = None

    @property
    def _index(self) -> Path:
        return self._dir / "index.json"

    def load(self) -> None:
        """Read the keys, creating the first one when there is none."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self._index.exists():
            self._add(generate(self._alg), retire_current=False)
        self._read()

    def _read(self) -> None:
        try:
            stamp = self._index.stat().st_mtime_ns
            raw = json.loads(self._index.read_text())
            entries = [_Entry(**item) for item in raw["keys"]]
            keys = {
                e.kid: SigningKey.from_pem((self._dir / f"{e.kid}.pem").read_bytes(), e.kid, e.alg)
                for e in entries
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError([f"{self._dir}: the signing keys cannot be read: {exc}"]) from exc
        self._entries, self._keys, self._stamp = entries, keys, stamp
        self._keyset = KeySet.from_jwks(self.jwks())

    def refresh(self) -> bool:
        """Re-read the keys if another process rotated them; say whether it did."""
        try:
            stamp = self._index.stat().st_mtime_ns
        except OSError:
            return False
        if stamp == self._stamp:
            return False
        self._read()
        return True

    def current(self) -> SigningKey:
        """The key new tokens are signed with."""
        live = [e for e in self._entries if e.retired is None]
        return self._keys[live[-1].kid]

    def jwks(self, now: float | None = None) -> dict[str, Any]:
        """The public keys tokens may still be signed with: current and recently retired."""
        now = time.time() if now is None else now
        keep = [e for e in self._entries if e.retired is None or e.retired + self._keep > now]
        return {"keys": [self._keys[e.kid].public_jwk() for e in keep]}

    def keyset(self) -> KeySet:
        """The public keys as a KeySet for verification."""
        assert self._keyset is not None  # noqa: S101 - load() ran
        return self._keyset

    def rotate(self) -> SigningKey:
        """Make a new current key; the old one is retired but still verifies for a while."""
        self._read()
        key = generate(self._alg)
        self._add(key, retire_current=True)
        self._read()
        return key

    def _add(self, key: SigningKey, retire_current: bool) -> None:
        now = time.time()
        pem = self._dir / f"{key.kid}.pem"
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.private_pem())
        entries = [
            _Entry(
                e.kid, e.alg, e.created, now if retire_current and e.retired is None else e.retired
            )
            for e in self._entries
            if e.retired is None or e.retired + self._keep > now  # forget long-dead keys
        ]
        entries.append(_Entry(key.kid, key.alg, now, None))
        tmp = self._index.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": [e.__dict__ for e in entries]}, indent=2))
        os.replace(tmp, self._index)
        self._entries = entries
