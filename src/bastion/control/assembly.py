"""Assembly of a gateway with its control plane: registry, keys, token service, secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bastion.app import Gateway, routes_for
from bastion.audit import AuditWriter
from bastion.audit.trail import open_trail_writer
from bastion.config import SeedAgent, Settings
from bastion.control.admin.app import PREFIX as ADMIN_PREFIX
from bastion.control.admin.app import admin_app
from bastion.control.admin.auth import admin_token
from bastion.control.approval_links import PREFIX as LINKS_PREFIX
from bastion.control.approval_links import approval_links
from bastion.control.audit.forward import open_forwarders
from bastion.control.console.app import PREFIX as CONSOLE_PREFIX
from bastion.control.console.app import console_app
from bastion.control.governance.reviewer import ReviewReminder
from bastion.control.registry.agents import Agent, AgentStatus
from bastion.control.registry.locator import RegistryLocator, locate, open_registry
from bastion.control.registry.store import SqlRegistry
from bastion.control.registry.trust import SqlTrustStore, TrustView
from bastion.control.registry.usage import UsageRecorder
from bastion.control.registry.view import RegistryView
from bastion.control.tokens.endpoints import oauth_endpoints
from bastion.control.tokens.service import TokenService
from bastion.errors import ConfigError, RegistryNotFound
from bastion.identity.keys import KeySet, SigningKey, generate
from bastion.state.keystore import FileKeyStore
from bastion.state.secrets import stored_secret, upstream_secrets
from bastion.state.shared import RedisReplays, SharedStateService
from bastion.upstream.issuers import IssuerDirectory

if TYPE_CHECKING:  # the redis client is imported only when a gateway shares its state
    from bastion.state.redis import RedisState

log = logging.getLogger("bastion.alerts")

# DPoP nonces (auth.dpop.nonce) are derived from this state-directory secret, so a restarted
# gateway and replicas sharing the directory accept each other's nonces.
NONCE_KEY_FILE = "dpop-nonce-key"
# With shared state, approval states are signed with this state-directory secret, so a state
# one replica issued verifies on another (the replicas share the directory).
APPROVAL_KEY_FILE = "approval-state-key"


@dataclass
class Identity:
    """The identity side of a gateway: who is registered and how tokens are made."""

    registry: SqlRegistry
    view: RegistryView
    keys: FileKeyStore
    service: TokenService
    state_dir: Path

    def agent_key(self, agent_id: str) -> SigningKey:
        """A seeded agent's private key from the state directory (demo and tests)."""
        path = self.state_dir / "agents" / f"{agent_id}.pem"
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError([f"no key for agent {agent_id!r} at {path}"]) from exc
        agent = self.registry.get(agent_id)
        kid = str(agent.jwks["keys"][0].get("kid", agent_id))
        return SigningKey.from_pem(pem, kid, str(agent.jwks["keys"][0].get("alg", "ES256")))


def open_identity(settings: Settings) -> Identity:
    """Open (creating on first run) the registry, the signing keys and the token service."""
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    registry = open_registry(settings, create=True)  # registry.store: sqlite or postgres
    keys = FileKeyStore(
        state / "keys", settings.auth.signing_alg, settings.auth.token_lifetime_seconds + 3600
    )
    keys.load()
    for seed in settings.auth.agents:
        _seed(registry, seed, state)
    view = RegistryView(registry)
    spiffe = {}
    for domain in settings.auth.spiffe:
        try:
            spiffe[domain.domain] = KeySet.from_jwks(json.loads(Path(domain.bundle).read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                [f"auth.spiffe: cannot read the bundle of {domain.domain}: {exc}"]
            ) from exc
    resources = frozenset(settings.base_url() + route.path for route in routes_for(settings))
    issuers = IssuerDirectory(settings.auth.trusted_issuers)  # a gateway shares its own
    service = TokenService(settings, view, keys, issuers, spiffe, resources)
    return Identity(registry, view, keys, service, state)


def _seed(registry: SqlRegistry, seed: SeedAgent, state: Path) -> None:
    """Register a configured agent once, with a key generated into the state directory."""
    try:
        registry.get(seed.id)
        return
    except RegistryNotFound:
        pass
    agents_dir = state / "agents"
    agents_dir.mkdir(exist_ok=True, mode=0o700)
    key = generate("ES256")
    fd = os.open(agents_dir / f"{seed.id}.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_pem())
    registry.add(
        Agent(
            id=seed.id,
            display_name=seed.id,
            owner=seed.owner,
            tenant=seed.tenant,
            purpose=seed.purpose,
            environment=seed.environment,
            jwks={"keys": [key.public_jwk()]},
            spiffe_id=None,
            audiences=(),
            scopes=seed.scopes,
            require_dpop=seed.require_dpop,
            expires_at=None,
            status=AgentStatus.ACTIVE,
            created_at=time.time(),
        )
    )


def open_trust(settings: Settings) -> TrustView:
    """Pins and quarantines beside the registry (`registry.store`), whatever `auth` says:
    what was pinned and who was quarantined survives restarts and is shared by every gateway
    of the registry."""
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    return TrustView(SqlTrustStore(locate(settings).database(create=True)))


def open_audit(settings: Settings) -> AuditWriter | None:
    """The audit writer of the configured store (SQLite or PostgreSQL), unless the trail is off."""
    if not settings.audit.enabled:
        return None
    return open_trail_writer(settings)


async def build_gateway(settings: Settings) -> Gateway:
    """A gateway ready to start: identity on unless `auth: none`, the audit trail on unless
    `audit.enabled: false`, the admin API under /admin unless `admin.enabled: false`."""
    secrets = await upstream_secrets(settings)
    token = await admin_token(settings) if settings.admin.enabled else None
    audit = open_audit(settings)
    registry: RegistryLocator | None = None
    trust = open_trust(settings)
    shared = await _open_shared(settings)
    approval_key = None
    if shared is not None:
        path = Path(settings.state_dir) / APPROVAL_KEY_FILE
        approval_key = stored_secret(path, "approval-state key").encode()
    if settings.auth.mode == "none":
        gateway = Gateway(
            settings,
            secrets=secrets,
            audit=audit,
            trust=trust,
            shared=shared,
            approval_key=approval_key,
        )
    else:
        identity = open_identity(settings)
        registry = locate(settings)
        nonce_key = None
        if settings.auth.dpop.nonce:
            path = identity.state_dir / NONCE_KEY_FILE
            nonce_key = stored_secret(path, "DPoP nonce key").encode()
        gateway = Gateway(
            settings,
            agents=identity.view,
            keys=identity.keys,
            secrets=secrets,
            endpoints=oauth_endpoints(identity.service),
            audit=audit,
            suspend=_suspender(identity.registry, identity.view),
            nonce_key=nonce_key,
            trust=trust,
            shared=shared,
            approval_key=approval_key,
        )
        if shared is not None:  # the token endpoint's replays are every replica's too
            identity.service.replay = RedisReplays(shared, "assertion")
            identity.service.proof_replay = RedisReplays(shared, "token-dpop")
        gateway.services.append(UsageRecorder(identity.view, identity.registry))
        # One set of issuer watchers, run by the gateway, for its MCP routes and token endpoint.
        identity.service.issuers = gateway.pipeline.authn.issuers
    if shared is not None:
        gateway.services.append(SharedStateService(shared))
    if audit is not None:
        gateway.services += await open_forwarders(settings, audit, gateway.metrics)
    # Daily: an access review due (governance.review_every_days) is an alert in the trail.
    reminder = ReviewReminder(settings, gateway.pipeline.trail.alert)
    gateway.background.add(reminder.watch.name, reminder.watch.run)
    if token is not None:
        admin = admin_app(settings, gateway.pipeline, audit, token, registry, locate(settings))
        gateway.front.mount(ADMIN_PREFIX, admin)
    gateway.front.mount(LINKS_PREFIX, approval_links(gateway.pipeline.approval.approvals))
    if settings.console.enabled:
        console = await console_app(
            settings, gateway.pipeline, audit, token, registry, locate(settings)
        )
        gateway.front.mount(CONSOLE_PREFIX, console)
    return gateway


async def _open_shared(settings: Settings) -> RedisState | None:
    """The Redis of `state.store: redis`, answering; `StateUnavailable` (the gateway does
    not start) when it cannot be reached."""
    if settings.state.store != "redis":
        return None
    from bastion.state.redis import open_shared  # the redis client only for shared state

    shared = open_shared(settings)
    if shared is not None:
        try:
            await shared.ping()
        except BaseException:
            await shared.close()
            raise
    return shared


def _suspender(registry: SqlRegistry, view: RegistryView) -> Callable[[str, str], Awaitable[None]]:
    """What an alert that suspends does: the agent's status in the registry, in force in this
    gateway before the alert is recorded (its sessions and credentials are dropped), and in
    every other gateway sharing the registry within its poll interval."""

    async def suspend(agent_id: str, reason: str) -> None:
        agent = await asyncio.to_thread(registry.get, agent_id)
        if agent.status is AgentStatus.ACTIVE:
            await asyncio.to_thread(
                registry.set_status, agent_id, AgentStatus.SUSPENDED, f"alert {reason}"[:500]
            )
            log.warning("agent %r suspended by alert: %s", agent_id, reason)
            await view.reread()

    return suspend
