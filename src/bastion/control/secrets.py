"""Secret references: `env:NAME`, `file:PATH`, `vault:PATH#KEY`, resolved when the gateway
starts. A literal secret never appears in the configuration (the schema refuses one).

`vault:` reads HashiCorp Vault's HTTP API at `VAULT_ADDR` with the token in `VAULT_TOKEN`
(KV version 2 first, `data.data[KEY]`; then version 1, `data[KEY]`).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson

from bastion.config import Settings
from bastion.errors import ConfigError
from bastion.upstream.wire import Pool, WireError


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
    url = f"{addr.rstrip('/')}/v1/{path.lstrip('/')}"
    pool = Pool(url, 1, 5.0, 5.0)
    try:
        async with asyncio.timeout(10):
            response = await pool.request(
                "GET", {"X-Vault-Token": token, "Accept": "application/json"}
            )
            async with response:
                body = await response.read()
    except (TimeoutError, OSError, WireError) as exc:
        raise ConfigError([f"{where}: Vault at {addr} cannot be reached: {exc}"]) from exc
    finally:
        pool.close()
    if response.status != 200:
        raise ConfigError([f"{where}: Vault answered HTTP {response.status} for {path}"])
    try:
        data = orjson.loads(body).get("data") or {}
    except (orjson.JSONDecodeError, AttributeError) as exc:
        raise ConfigError([f"{where}: Vault did not answer JSON for {path}"]) from exc
    values = data.get("data") if isinstance(data.get("data"), dict) else data
    value = values.get(key) if isinstance(values, dict) else None
    if not isinstance(value, str):
        raise ConfigError([f"{where}: Vault secret {path} has no string key {key!r}"])
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
