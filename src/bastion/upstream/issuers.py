"""Trusted external issuers: discovery (OIDC, then RFC 8414) and their JWKS, cached.

A key set is fetched once and kept; a token with an unknown `kid` may ask for a fresh copy,
at most once every `min_refresh_seconds` per issuer, so a stream of forged kids cannot turn
into a stream of requests to the issuer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

import orjson

from bastion.config import TrustedIssuer
from bastion.errors import TokenError, WireError
from bastion.identity.keys import KeySet
from bastion.wire import Pool

log = logging.getLogger("bastion.issuers")


class IssuerDirectory:
    """The key sets of trusted issuers, fetched over HTTP(S) on demand."""

    def __init__(self, timeout: float = 5.0, min_refresh_seconds: float = 30.0) -> None:
        self._timeout = timeout
        self._min_refresh = min_refresh_seconds
        self._keys: dict[str, KeySet] = {}
        self._fetched: dict[str, float] = {}
        self._jwks_uri: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def keys(self, issuer: TrustedIssuer, refresh: bool = False) -> KeySet:
        """The issuer's keys; `refresh` re-fetches unless that happened very recently."""
        known = self._keys.get(issuer.issuer)
        if known is not None and not refresh:
            return known
        lock = self._locks.setdefault(issuer.issuer, asyncio.Lock())
        async with lock:
            known = self._keys.get(issuer.issuer)
            recent = time.monotonic() - self._fetched.get(issuer.issuer, -1e9) < self._min_refresh
            if known is not None and (not refresh or recent):
                return known
            keys = await self._fetch(issuer)
            self._keys[issuer.issuer] = keys
            self._fetched[issuer.issuer] = time.monotonic()
            return keys

    async def _fetch(self, issuer: TrustedIssuer) -> KeySet:
        jwks_uri = issuer.jwks_uri or self._jwks_uri.get(issuer.issuer)
        if jwks_uri is None:
            jwks_uri = await self._discover(issuer.issuer)
            self._jwks_uri[issuer.issuer] = jwks_uri
        document = await self._get_json(jwks_uri)
        keys = KeySet.from_jwks(document)
        log.info("fetched %d keys of issuer %s", len(keys), issuer.issuer)
        return keys

    async def _discover(self, issuer: str) -> str:
        base = issuer.rstrip("/")
        parts = urlsplit(base)
        candidates = [
            f"{base}/.well-known/openid-configuration",
            f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}",
        ]
        for url in candidates:
            try:
                metadata = await self._get_json(url)
            except TokenError:
                continue
            if metadata.get("issuer") != issuer:
                raise TokenError("wrong_issuer", f"{url} describes another issuer")
            jwks_uri = metadata.get("jwks_uri")
            if isinstance(jwks_uri, str):
                return jwks_uri
        raise TokenError("unknown_kid", f"no discovery document with a jwks_uri for {issuer}")

    async def _get_json(self, url: str) -> dict[str, object]:
        parts = urlsplit(url)
        pool = Pool(url, 1, self._timeout, self._timeout)
        try:
            async with asyncio.timeout(self._timeout):
                response = await pool.request("GET", {"Accept": "application/json"})
                async with response:
                    body = await response.read()
        except (TimeoutError, OSError, WireError) as exc:
            raise TokenError("unknown_kid", f"cannot reach {parts.netloc}: {exc}") from exc
        finally:
            pool.close()
        if response.status != 200:
            raise TokenError("unknown_kid", f"{url} answered HTTP {response.status}")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise TokenError("malformed", f"{url} did not answer JSON") from exc
        if not isinstance(document, dict):
            raise TokenError("malformed", f"{url} did not answer a JSON object")
        return document
