"""Who signs the audit checkpoints and anchor entries, and which public keys `verify` trusts.

```
audit.signer    signs with                                  verify trusts
(none)          <state_dir>/audit/checkpoint-key.pem        <state_dir>/audit/checkpoint-keys.json
file            an Ed25519 PEM file outside the state dir   that file's public key
vault_transit   an ed25519 key in Vault/OpenBao transit     every version of that key
```

With no signer configured the key sits beside the data it seals: whoever can write the state
directory can rewrite the trail and re-sign it, and `verify` says so. A key file outside the
state directory (0600, refused when group or others may read it) keeps the key from whoever
can only write the store (a PostgreSQL administrator, a backup, another account with the
state directory); a transit key never leaves Vault at all, so the gateway's token can ask for
signatures but nobody can take the key away. Signing happens in the audit writer's thread,
never on the request path, so the transit client here is synchronous (`http.client`).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import secrets
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.audit.keys import KEYS_FILE, load_checkpoint_key
from bastion.config import AuditSigner, Settings
from bastion.errors import AuditUnavailable, BastionError, ConfigError
from bastion.identity.keys import KeySet, SigningKey, b64url, generate, thumbprint

log = logging.getLogger("bastion.audit")

_TIMEOUT = 3.0  # seconds for one Vault request (the writer thread waits for it)
_MAX_ANSWER = 1 << 20  # bytes of a Vault answer read, at most


class KeySigner:
    """Signs with an Ed25519 key held in this process (the state directory's, or a file's)."""

    def __init__(self, key: SigningKey, source: str) -> None:
        if not isinstance(key.private, ed25519.Ed25519PrivateKey):
            raise ConfigError([f"{source}: expected an Ed25519 key, found {key.alg}"])
        self._key = key
        self.source = source

    @property
    def kid(self) -> str:
        """The key's RFC 7638 thumbprint."""
        return self._key.kid

    def sign(self, message: bytes) -> bytes:
        """The Ed25519 signature of `message`."""
        signature: bytes = self._key.private.sign(message)
        return signature

    def public_jwks(self) -> dict[str, Any]:
        """The public key as a JWK Set."""
        return {"keys": [self._key.public_jwk()]}


def load_key_file(path: str | os.PathLike[str], *, create: bool) -> SigningKey:
    """The Ed25519 key in a PEM file outside the state directory; made (0600) when missing and
    `create`. ConfigError when it cannot be read, is not Ed25519, or others may read it."""
    file = Path(path)
    where = f"audit.signer.path {file}"
    try:
        if create and not file.exists():
            _create_key_file(file)
        mode = file.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                [f"{where}: group or others may read it (mode {mode & 0o777:o}); chmod 600 it"]
            )
        pem = file.read_bytes()
    except OSError as exc:
        hint = "" if create else "; pass its public keys with --keys (`bastion audit keys`)"
        raise ConfigError([f"{where}: cannot read it ({exc.strerror}){hint}"]) from exc
    try:
        probe = SigningKey.from_pem(pem, "-", "EdDSA")
    except BastionError as exc:
        raise ConfigError([f"{where}: expected an Ed25519 PEM private key ({exc})"]) from exc
    return SigningKey(thumbprint(probe.public_jwk()), "EdDSA", probe.private)


def _create_key_file(file: Path) -> None:
    """A fresh key written to a file of its own and linked into place (never over another)."""
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    spare = file.with_name(f".{file.name}.{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with os.fdopen(os.open(spare, flags, 0o600), "wb") as out:
        out.write(generate("EdDSA").private_pem())
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(spare, file)
        log.info("generated the audit checkpoint key into %s", file)
    except FileExistsError:
        pass  # another process made it first
    finally:
        spare.unlink()


class TransitSigner:
    """Signs with an ed25519 key in Vault's (or OpenBao's) transit engine, which keeps it.

    The newest version at `open` signs (its kid the thumbprint of its public key); every
    version's public key is listed for `verify`. The token needs `update` on
    `<mount>/sign/<key>` and `read` on `<mount>/keys/<key>`, nothing more.
    """

    def __init__(self, settings: AuditSigner) -> None:
        assert settings.key is not None  # noqa: S101 - validated by the config
        self._key, self._mount = settings.key, settings.mount
        addr = os.environ.get("VAULT_ADDR")
        token = os.environ.get("VAULT_TOKEN")
        if not addr or not token:
            raise ConfigError(["audit.signer: vault_transit needs VAULT_ADDR and VAULT_TOKEN"])
        self._headers = {"X-Vault-Token": token, "Content-Type": "application/json"}
        if namespace := os.environ.get("VAULT_NAMESPACE"):
            self._headers["X-Vault-Namespace"] = namespace
        for name, value in self._headers.items():
            if not (value.isascii() and value.isprintable()):
                raise ConfigError([f"audit.signer: {name} holds a control or non-ASCII character"])
        url = urlsplit(addr)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(["audit.signer: VAULT_ADDR must be an http(s) URL"])
        self.source = f"Vault transit key {self._mount}/{self._key} at {url.scheme}://{url.netloc}"
        self._url = url
        self._context = _trust() if url.scheme == "https" else None
        self._version = 0
        self._public: dict[int, ed25519.Ed25519PublicKey] = {}
        self.kid = ""

    def open(self) -> TransitSigner:
        """Read the key's public versions; pick the newest to sign with."""
        data = self._call("GET", f"keys/{quote(self._key, safe='')}")
        if data.get("type") != "ed25519":
            raise ConfigError(
                [
                    f"audit.signer: {self.source} is of type {str(data.get('type'))[:20]!r}; "
                    "checkpoints need an ed25519 key (create it with type=ed25519)"
                ]
            )
        self._public = _versions(data.get("keys"), self.source)
        self._version = max(self._public)
        self.kid = thumbprint(_jwk(self._public[self._version]))
        return self

    def sign(self, message: bytes) -> bytes:
        """The signature of `message` by the chosen version, checked before it is used."""
        body = {"input": base64.b64encode(message).decode("ascii"), "key_version": self._version}
        data = self._call("POST", f"sign/{quote(self._key, safe='')}", body)
        text = data.get("signature")
        prefix = f"vault:v{self._version}:"
        try:
            if not isinstance(text, str) or not text.startswith(prefix):
                raise ValueError
            signature = base64.b64decode(text[len(prefix) :], validate=True)
            self._public[self._version].verify(signature, message)
        except (ValueError, InvalidSignature):
            raise AuditUnavailable(
                f"{self.source} answered a signature that does not verify"
            ) from None
        return signature

    def public_jwks(self) -> dict[str, Any]:
        """Every version's public key as a JWK Set (as Vault listed them at `open`)."""
        if not self._public:
            self.open()
        keys = [{**_jwk(public), "alg": "EdDSA", "use": "sig"} for public in self._public.values()]
        return {"keys": [{**jwk, "kid": thumbprint(jwk)} for jwk in keys]}

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One transit request; its `data` object, or AuditUnavailable saying what failed."""
        url = self._url
        target = f"{url.path.rstrip('/')}/v1/{self._mount}/{path}"
        connection: http.client.HTTPConnection
        if url.scheme == "https":
            connection = http.client.HTTPSConnection(
                url.hostname or "", url.port, timeout=_TIMEOUT, context=self._context
            )
        else:
            connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=_TIMEOUT)
        payload = None if body is None else json.dumps(body).encode()
        try:
            connection.request(method, target, body=payload, headers=self._headers)
            response = connection.getresponse()
            answer = response.read(_MAX_ANSWER)
        except (OSError, http.client.HTTPException) as exc:
            hint = " (VAULT_CACERT names the CA to trust)" if isinstance(exc, ssl.SSLError) else ""
            raise AuditUnavailable(
                f"{self.source} cannot be reached: {exc or type(exc).__name__}{hint}"
            ) from exc
        finally:
            connection.close()
        if response.status != 200:
            hint = " (the token in VAULT_TOKEN is invalid or may not use it)"
            raise AuditUnavailable(
                f"{self.source} answered HTTP {response.status} to {method} {self._mount}/{path}"
                + (hint if response.status == 403 else "")
            )
        try:
            data = json.loads(answer).get("data")
        except (ValueError, AttributeError):
            data = None
        if not isinstance(data, dict):
            raise AuditUnavailable(f"{self.source} did not answer a JSON object with data")
        return data


def _trust() -> ssl.SSLContext | None:
    """The CAs VAULT_CACERT names, or None for the system's trust store."""
    cafile = os.environ.get("VAULT_CACERT")
    if not cafile:
        return None
    try:
        return ssl.create_default_context(cafile=cafile)
    except OSError as exc:
        raise ConfigError([f"audit.signer: VAULT_CACERT {cafile} is not a PEM CA file"]) from exc


def _versions(keys: Any, source: str) -> dict[int, ed25519.Ed25519PublicKey]:
    """Version -> public key, from a transit key's `keys` object."""
    found: dict[int, ed25519.Ed25519PublicKey] = {}
    for version, value in keys.items() if isinstance(keys, dict) else ():
        try:
            raw = base64.b64decode(value["public_key"], validate=True)
            found[int(version)] = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        except (KeyError, TypeError, ValueError):
            continue
    if not found:
        raise AuditUnavailable(f"{source}: Vault listed no ed25519 public key")
    return found


def _jwk(public: ed25519.Ed25519PublicKey) -> dict[str, str]:
    raw = public.public_bytes_raw()
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}


def open_signer(settings: AuditSigner | None, folder: Path) -> KeySigner | TransitSigner:
    """The configured signer, ready to sign; the state directory's key when none is."""
    if settings is None:
        return KeySigner(load_checkpoint_key(folder), str(folder / "checkpoint-key.pem"))
    if settings.type == "file":
        assert settings.path is not None  # noqa: S101 - validated by the config
        inside = Path(settings.path).resolve().is_relative_to(folder.parent.resolve())
        if inside:  # the config refuses this too; a state dir given otherwise must not slip by
            raise ConfigError([f"audit.signer.path {settings.path}: lies inside the state dir"])
        return KeySigner(load_key_file(settings.path, create=True), settings.path)
    return TransitSigner(settings).open()


def public_jwks(settings: Settings | None, folder: Path) -> dict[str, Any]:
    """The public keys of the configured signer as a JWK Set (`bastion audit keys`); of the
    state directory's key file when none is configured."""
    signer = settings.audit.signer if settings is not None else None
    if signer is None:
        path = folder / KEYS_FILE
        try:
            document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"keys": []}
        except (OSError, ValueError) as exc:
            problem = f"{path}: cannot read the checkpoint public keys: {exc}"
            raise AuditUnavailable(problem) from exc
        return document
    if signer.type == "file":
        assert signer.path is not None  # noqa: S101 - validated by the config
        key = load_key_file(signer.path, create=False)
        return KeySigner(key, signer.path).public_jwks()
    return TransitSigner(signer).public_jwks()


def trusted_keys(
    settings: Settings | None, folder: Path, given: Sequence[Path] = ()
) -> tuple[KeySet, str | None]:
    """The public keys `verify` holds checkpoints to, and a note when they prove little.

    `given` JWKS files (`--keys`) win; else the configured signer's; else the state
    directory's, with a note that whoever can write there can also re-sign.
    """
    if given:
        keys: list[Any] = []
        for path in given:
            try:
                keys += json.loads(path.read_text(encoding="utf-8"))["keys"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AuditUnavailable(f"--keys {path}: not a readable JWK Set ({exc})") from exc
        return KeySet.from_jwks({"keys": keys}), None
    note = None
    if settings is None or settings.audit.signer is None:
        note = (
            f"the checkpoint keys come from {folder / KEYS_FILE}, beside the data: whoever can "
            "write the state directory can rewrite the trail and re-sign it, so this proves "
            "only that the trail is consistent; configure audit.signer and audit.anchor"
        )
    try:
        return KeySet.from_jwks(public_jwks(settings, folder)), note
    except BastionError as exc:
        raise AuditUnavailable(f"the checkpoint public keys cannot be read: {exc}") from exc
