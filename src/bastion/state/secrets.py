"""Secret references: `env:NAME`, `file:PATH`, `vault:PATH#KEY`, resolved when the gateway
starts. A literal secret never appears in the configuration (the schema refuses one).

`vault:` reads HashiCorp Vault's HTTP API (or OpenBao's, which the tests run) at `VAULT_ADDR`
with the token in `VAULT_TOKEN`, trusting the PEM CA file in `VAULT_CACERT` when it is set and
sending `VAULT_NAMESPACE` as `X-Vault-Namespace`. PATH is the API path, as in Vault Agent
templates: `secret/data/NAME` for KV version 2 (`data.data[KEY]`), `MOUNT/NAME` for version 1
(`data[KEY]`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
from pathlib import Path

import orjson

from bastion.config import Settings
from bastion.errors import ConfigError, WireError
from bastion.wire import Pool

log = logging.getLogger("bastion.secrets")


async def resolve(reference: str, where: str, base: Path | None = None) -> str:
    """The secret a reference names; ConfigError naming `where` when it cannot be read."""
    kind, _, rest = reference.partition(":")
    if kind == "env":
        value = os.environ.get(rest)
        if value is None:
            raise ConfigError([f"{where}: environment variable {rest!r} is not set"])
        return value
    if kind == "file":
        path = Path(rest) if base is None else base / rest
        try:
            return path.read_text().rstrip("\n")
        except OSError as exc:
            raise ConfigError([f"{where}: cannot read {path}: {exc.strerror}"]) from exc
    if kind == "vault":
        return await _vault(rest, where)
    raise ConfigError([f"{where}: expected env:, file: or vault:, found {kind!r}"])


async def _vault(reference: str, where: str) -> str:
    path, _, key = reference.partition("#")
    addr = os.environ.get("VAULT_ADDR")
    token = os.environ.get("VAULT_TOKEN")
    if not addr or not token:
        raise ConfigError([f"{where}: vault: needs VAULT_ADDR and VAULT_TOKEN in the environment"])
    headers = {"X-Vault-Token": token, "Accept": "application/json"}
    if namespace := os.environ.get("VAULT_NAMESPACE"):
        headers["X-Vault-Namespace"] = namespace
    for name, value in (("VAULT_TOKEN", token), ("VAULT_NAMESPACE", namespace or "")):
        if not (value.isascii() and value.isprintable()):
            raise ConfigError(
                [f"{where}: {name} holds a control or non-ASCII character (a line break?)"]
            )
    url = f"{addr.rstrip('/')}/v1/{path.lstrip('/')}"
    pool = Pool(url, 1, 5.0, 5.0, _trust(where))
    try:
        async with asyncio.timeout(10):
            response = await pool.request("GET", headers)
            async with response:
                body = await response.read()
    except (TimeoutError, OSError, WireError) as exc:
        untrusted = isinstance(exc, ssl.SSLCertVerificationError)
        hint = " (VAULT_CACERT names the CA to trust)" if untrusted else ""
        problem = f"{str(exc) or 'timed out'}{hint}"
        raise ConfigError([f"{where}: Vault at {addr} cannot be reached: {problem}"]) from exc
    finally:
        pool.close()
    if response.status != 200:
        hint = _hint(response.status, path)
        raise ConfigError([f"{where}: Vault answered HTTP {response.status} for {path}{hint}"])
    return _value(body, path, key, where)


def _hint(status: int, path: str) -> str:
    """Why Vault most often answers `status` for `path`, for the error message."""
    if status == 403:
        return " (the token in VAULT_TOKEN is invalid or may not read it)"
    if status == 404 and "/data/" not in path:  # KV version 2's API path has it
        return " (a KV version 2 secret is read at MOUNT/data/NAME)"
    return ""


def _trust(where: str) -> ssl.SSLContext | None:
    """The CAs VAULT_CACERT names, or None for the system's trust store."""
    cafile = os.environ.get("VAULT_CACERT")
    if not cafile:
        return None
    try:
        return ssl.create_default_context(cafile=cafile)
    except OSError as exc:  # ssl.SSLError included: not PEM
        raise ConfigError([f"{where}: VAULT_CACERT {cafile} is not a PEM CA file: {exc}"]) from exc


def _value(body: bytes, path: str, key: str, where: str) -> str:
    """KEY of the secret in a Vault read answer: KV version 2 (`data.data`), else version 1."""
    try:
        data = orjson.loads(body).get("data") or {}
    except (orjson.JSONDecodeError, AttributeError) as exc:
        raise ConfigError([f"{where}: Vault did not answer JSON for {path}"]) from exc
    values = data.get("data") if isinstance(data.get("data"), dict) else data
    if not isinstance(values, dict) or key not in values:
        raise ConfigError([f"{where}: Vault secret {path} has no key {key!r}"])
    value = values[key]
    if not isinstance(value, str):
        kind = type(value).__name__
        raise ConfigError([f"{where}: Vault secret {path} key {key!r} is {kind}, not a string"])
    return value


async def upstream_secrets(settings: Settings) -> dict[str, str]:
    """The `secret` credential of every upstream that has one, keyed by upstream name."""
    found: dict[str, str] = {}
    for name, upstream in settings.upstreams.items():
        credential = upstream.credentials
        if credential.mode == "secret" and credential.secret is not None:
            where = f"upstreams.{name}.credentials.secret"
            found[name] = await resolve(credential.secret, where)
        if credential.mode == "token_exchange" and credential.client_secret is not None:
            where = f"upstreams.{name}.credentials.client_secret"
            found[f"{name}#client_secret"] = await resolve(credential.client_secret, where)
    return found


def stored_secret(path: Path, what: str, min_length: int = 16) -> str:
    """A random secret kept in the state directory: read it, or make it (mode 0600) on first
    use. It is written to a fresh file of its own (never through a planted link), synced, then
    linked into place, so processes starting together, even with equal PIDs in containers
    sharing the directory, never see a partial file and all end up with the same secret."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            spare = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            with os.fdopen(os.open(spare, flags, 0o600), "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(spare, path)
            except FileExistsError:
                pass  # another process made it first; use theirs
            finally:
                spare.unlink()
            log.info("generated the %s into %s", what, path)
        if path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users; chmod 600 it", path)
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError([f"{what} {path}: cannot read or write it ({exc.strerror})"]) from exc
    if len(value) < min_length:
        problem = (
            f"{what} {path}: expected at least {min_length} characters; "
            "delete the file to have a new one generated"
        )
        raise ConfigError([problem])
    return value
