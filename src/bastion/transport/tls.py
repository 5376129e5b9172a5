"""TLS on the listener: the certificate and key files, checked, loaded and reloaded.

```
Certificates.load(tls)   check both files (a world-readable key is refused), build a context
listener                 the context the server listens with; at each handshake it hands the
                         connection the context in use now (its SNI callback), so a reload
                         reaches the next connection and never one already open
watch                    a Refresher: every `reload_seconds` it compares the files' inode,
                         size and mtime; on a change it loads the new pair into a fresh
                         context, and a broken pair keeps the one in use (logged, alerted)
```

TLS 1.2 or later; ALPN offers http/1.1 only (the server speaks nothing else).
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from bastion.background import Refresher
from bastion.config import Tls
from bastion.errors import ConfigError

__all__ = [
    "Certificates",
    "load_context",
]

log = logging.getLogger("bastion.tls")

Failed = Callable[[str], Awaitable[None]]  # told why a new pair was refused
Stamp = tuple[tuple[int, int, int], ...]  # (inode, size, mtime) of each file


def load_context(tls: Tls) -> tuple[ssl.SSLContext, int]:
    """A server context holding the pair named by `tls`, and the certificate's serial number;
    `ConfigError` naming the file and what is wrong with it."""
    key = Path(tls.key)
    cert_bytes = _read(Path(tls.cert), "listen.tls.cert")
    mode = _mode(key)
    if mode & stat.S_IROTH:
        raise ConfigError(
            [
                f"listen.tls.key: {key} is readable by every user (mode {mode & 0o777:o}); "
                f"expected it readable by the gateway's user only (chmod 600 {key})"
            ]
        )
    key_bytes = _read(key, "listen.tls.key")
    serial = _serial(cert_bytes, Path(tls.cert))
    _check_key(key_bytes, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as exc:
        raise ConfigError(
            [f"listen.tls.key: {key} does not match the certificate {tls.cert} ({exc.reason})"]
        ) from None
    except OSError as exc:  # replaced between the checks and the load
        raise ConfigError([f"listen.tls: cannot read {exc.filename}: {exc.strerror}"]) from None
    return context, serial


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{key}: cannot read {path}: {exc.strerror}"]) from None


def _mode(path: Path) -> int:
    try:
        return path.stat().st_mode
    except OSError as exc:
        raise ConfigError([f"listen.tls.key: cannot read {path}: {exc.strerror}"]) from None


def _serial(data: bytes, path: Path) -> int:
    """The leaf certificate's serial number (the first certificate of the chain)."""
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            [f"listen.tls.cert: {path} holds no PEM certificate (expected a PEM chain, leaf first)"]
        ) from None
    return int(chain[0].serial_number)


def _check_key(data: bytes, path: Path) -> None:
    try:
        load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            [f"listen.tls.key: {path} is encrypted; expected an unencrypted PEM private key"]
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError([f"listen.tls.key: {path} holds no PEM private key"]) from None


class Certificates:
    """The listener's certificate: the context in use, swapped when the files change."""

    def __init__(self, tls: Tls, failed: Failed | None = None) -> None:
        self._tls = tls
        self.failed = failed
        self._stamp = self._stamps()
        self.current, self.serial = load_context(tls)
        self.listener, _ = load_context(tls)
        # Called once per handshake, SNI or not: the connection takes the context in use now.
        self.listener.sni_callback = self._pick
        self.watch = Refresher("listener certificate", self._check, every=tls.reload_seconds)

    def _pick(self, connection: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        connection.context = self.current

    def _stamps(self) -> Stamp:
        stamps = []
        for name in (self._tls.cert, self._tls.key):
            try:
                info = os.stat(name)
            except OSError:
                stamps.append((0, 0, 0))  # missing now: a change, refused when loaded
                continue
            stamps.append((info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(stamps)

    async def _check(self) -> bool:
        """One round of the watch: True when a new pair was taken into use."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        # Remembered either way: a broken pair is retried once its files change again (a
        # rotation writes the certificate and the key one after the other).
        self._stamp = stamp
        try:
            context, serial = load_context(self._tls)
        except ConfigError as exc:
            reason = f"the new certificate or key was refused, the one in use is kept: {exc}"
            log.error("listener TLS: %s", reason)
            if self.failed is not None:
                await self.failed(reason)
            return False
        self.current, self.serial = context, serial
        log.info("listener TLS: certificate %x taken into use for new connections", serial)
        return True
