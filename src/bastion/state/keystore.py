"""The embedded authorization server's signing keys, on disk in the state directory.

`{state_dir}/keys/index.json` lists the keys (kid, alg, created, retired); each private key is
a PEM file readable by its owner only. Rotation makes a new current key and retires the old
one, which stays in the JWKS until every token it signed has expired.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bastion.background import Refresher
from bastion.errors import ConfigError
from bastion.identity.keys import KeySet, SigningKey, generate

# How often the gateway's background work looks for a rotation made by another process
# (`bastion keys rotate`, another replica); a token signed with a key not seen yet asks for a
# look at once (`recheck`), at most once per `_RECHECK_GAP`.
POLL_SECONDS = 1.0
_RECHECK_GAP = 0.05
_RECHECK_WAIT = 1.0


@dataclass(frozen=True)
class _Entry:
    kid: str
    alg: str
    created: float
    retired: float | None


@dataclass(frozen=True)
class _Keys:
    """One published state of the key files: replaced whole, never changed."""

    entries: tuple[_Entry, ...]
    keys: Mapping[str, SigningKey]
    keyset: KeySet | None
    stamp: int | None


_NONE = _Keys((), MappingProxyType({}), None, None)


class FileKeyStore:
    """Signing keys kept as files; safe to read from the gateway while the CLI rotates.

    Readers (`current`, `keyset`, `jwks`) see one immutable state; `refresh` (blocking file
    I/O) replaces it when the index changed, run by `watch` in the background of a gateway.
    """

    def __init__(
        self, directory: str | Path, alg: str, keep_seconds: float, *, poll: float = POLL_SECONDS
    ) -> None:
        self._dir = Path(directory)
        self._alg = alg
        self._keep = keep_seconds
        self._state = _NONE
        self._lock = threading.Lock()  # the watcher's thread, the token endpoint, the CLI
        self.watch = Refresher("signing keys", self._poll, every=poll, gap=_RECHECK_GAP)

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
            entries = tuple(_Entry(**item) for item in raw["keys"])
            keys = {
                e.kid: SigningKey.from_pem((self._dir / f"{e.kid}.pem").read_bytes(), e.kid, e.alg)
                for e in entries
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError([f"{self._dir}: the signing keys cannot be read: {exc}"]) from exc
        keyset = KeySet.from_jwks(_jwks(entries, keys, self._keep, time.time()))
        self._state = _Keys(entries, MappingProxyType(keys), keyset, stamp)

    def refresh(self) -> bool:
        """Re-read the keys if another process rotated them; say whether it did. Blocking
        file I/O: the watcher runs it in a worker thread."""
        with self._lock:
            try:
                stamp = self._index.stat().st_mtime_ns
            except OSError:
                return False
            if stamp == self._state.stamp:
                return False
            self._read()
            return True

    async def _poll(self) -> bool:
        return await asyncio.to_thread(self.refresh)

    async def recheck(self) -> bool:
        """A token names a key not known here: have the watcher look for a rotation now and
        wait for it (at most a second); whether the keys changed meanwhile."""
        seen = self._state
        await self.watch.ask(_RECHECK_WAIT)
        return self._state is not seen

    def current(self) -> SigningKey:
        """The key new tokens are signed with."""
        state = self._state
        live = [e for e in state.entries if e.retired is None]
        return state.keys[live[-1].kid]

    def jwks(self, now: float | None = None) -> dict[str, Any]:
        """The public keys tokens may still be signed with: current and recently retired."""
        state = self._state
        return _jwks(state.entries, state.keys, self._keep, time.time() if now is None else now)

    def keyset(self) -> KeySet:
        """The public keys as a KeySet for verification."""
        keyset = self._state.keyset
        assert keyset is not None  # noqa: S101 - load() ran
        return keyset

    def rotate(self) -> SigningKey:
        """Make a new current key; the old one is retired but still verifies for a while."""
        with self._lock:
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
            for e in self._state.entries
            if e.retired is None or e.retired + self._keep > now  # forget long-dead keys
        ]
        entries.append(_Entry(key.kid, key.alg, now, None))
        tmp = self._index.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": [e.__dict__ for e in entries]}, indent=2))
        os.replace(tmp, self._index)


def _jwks(
    entries: tuple[_Entry, ...], keys: Mapping[str, SigningKey], keep: float, now: float
) -> dict[str, Any]:
    """The public keys of the entries not retired for longer than `keep` seconds at `now`."""
    live = [e for e in entries if e.retired is None or e.retired + keep > now]
    return {"keys": [keys[e.kid].public_jwk() for e in live]}
