"""The agent registry in SQLite and the gateway's in-memory view of it."""

from __future__ import annotations

import base64
import dataclasses
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from tests import pg
from tests.conftest import until_async

from bastion.background import Background
from bastion.control.registry.agents import Agent, AgentStatus, RegistrySnapshot
from bastion.control.registry.store import PostgresRegistry, SqliteRegistry, SqlRegistry
from bastion.control.registry.view import RegistryView
from bastion.errors import RegistryConflict, RegistryInvalid, RegistryNotFound, RegistryUnavailable
from bastion.identity import keys

NOW = 1_900_000_000.0


def public_jwk(alg: str = "ES256") -> dict[str, Any]:
    return keys.generate(alg).public_jwk()


def make_agent(**changes: Any) -> Agent:
    agent = Agent(
        id="billing-bot",
        display_name="Billing bot",
        owner="team-payments",
        tenant="acme",
        purpose="Reconciles invoices",
        environment="prod",
        jwks={"keys": [public_jwk()]},
        spiffe_id=None,
        audiences=("https://gw.example/mcp/billing",),
        scopes=("mcp:tools",),
        require_dpop=True,
        expires_at=None,
        status=AgentStatus.ACTIVE,
        created_at=NOW,
    )
    return dataclasses.replace(agent, **changes)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


postgres = pg.postgres  # the session's PostgreSQL server (a fixture), for the postgres params


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, path: Path) -> Callable[[], SqlRegistry]:
    """Opens one more registry on one store, as another process would: the contract below
    holds for both adapters (SQLite's own behaviour is tested by path)."""
    if request.param == "sqlite":
        return lambda: SqliteRegistry(path)
    dsn = request.getfixturevalue("postgres").database()
    return lambda: PostgresRegistry(dsn)


@pytest.fixture
def registry(store: Callable[[], SqlRegistry]) -> Any:
    with store() as reg:
        yield reg


# --- CRUD ---


def test_add_then_get_returns_the_same_agent(registry: SqlRegistry) -> None:
    agent = make_agent()
    assert registry.add(agent) == agent
    assert registry.get("billing-bot") == agent


def test_an_agent_survives_reopening_the_file(path: Path) -> None:
    agent = make_agent(expires_at=NOW + 3600, spiffe_id="spiffe://acme.example/billing")
    with SqliteRegistry(path) as first:
        first.add(agent)
    with SqliteRegistry(path, create=False) as second:
        assert second.get(agent.id) == agent


def test_list_orders_by_tenant_then_id_and_filters(registry: SqlRegistry) -> None:
    registry.add(make_agent(id="zed", tenant="acme"))
    registry.add(make_agent(id="alpha", tenant="zeta"))
    registry.add(make_agent(id="beta", tenant="acme"))
    registry.set_status("beta", AgentStatus.SUSPENDED, "investigating")
    assert [a.id for a in registry.list()] == ["beta", "zed", "alpha"]
    assert [a.id for a in registry.list(tenant="acme")] == ["beta", "zed"]
    assert [a.id for a in registry.list(status=AgentStatus.ACTIVE)] == ["zed", "alpha"]
    assert [a.id for a in registry.list("acme", AgentStatus.SUSPENDED)] == ["beta"]
    assert registry.list(tenant="nobody") == []


def test_adding_an_existing_id_is_a_conflict(registry: SqlRegistry) -> None:
    registry.add(make_agent())
    with pytest.raises(RegistryConflict, match="'billing-bot' already exists") as info:
        registry.add(make_agent(owner="someone-else"))
    assert info.value.code == "registry.conflict"
    assert registry.get("billing-bot").owner == "team-payments"


def test_getting_an_unknown_agent_is_not_found(registry: SqlRegistry) -> None:
    with pytest.raises(RegistryNotFound, match="no agent 'ghost'") as info:
        registry.get("ghost")
    assert info.value.code == "registry.not_found"


# --- validation ---


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _rsa_1024_jwk() -> dict[str, Any]:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused
    key = weak.public_key()
    numbers = key.public_numbers()
    return {
        "kty": "RSA",
        "kid": "small",
        "n": _b64(numbers.n.to_bytes(128, "big")),
        "e": _b64(numbers.e.to_bytes(3, "big")),
    }


def _private_jwk() -> dict[str, Any]:
    return {**public_jwk(), "d": "c2VjcmV0LXNjYWxhci12YWx1ZS1ub3QtdG8tYmUtZWNob2Vk"}


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("uppercase id", {"id": "Billing"}, "id: expected"),
    ("id starting with a dash", {"id": "-bot"}, "id: expected"),
    ("id of 64 characters", {"id": "a" * 64}, "id: expected"),
    ("tenant with a capital", {"tenant": "Acme"}, "tenant: expected"),
    ("tenant with a trailing dash", {"tenant": "acme-"}, "tenant: expected"),
    ("the gateway's own tenant", {"tenant": "bastion"}, "tenant: 'bastion' is reserved"),
    ("empty display name", {"display_name": ""}, "display_name: expected non-empty"),
    ("blank owner", {"owner": "   "}, "owner: expected non-empty"),
    ("control character", {"purpose": "pay\x1b[31m"}, "purpose: control characters"),
    ("purpose too long", {"purpose": "x" * 2001}, "purpose: expected at most 2000"),
    ("unknown environment", {"environment": "production"}, "environment: expected one of"),
    ("no key and no SPIFFE ID", {"jwks": {}}, "jwks: expected at least one public key"),
    ("empty key list", {"jwks": {"keys": []}}, "jwks: expected at least one public key"),
    ("keys not a list", {"jwks": {"keys": "abc"}}, "jwks: expected a JWK Set"),
    ("a JWK instead of a set", {"jwks": {"kty": "EC"}}, "jwks: expected a JWK Set"),
    ("key not an object", {"jwks": {"keys": ["k"]}}, r"jwks.keys\[0\]: expected a JWK object"),
    ("private key", {"jwks": {"keys": [_private_jwk()]}}, r"jwks.keys\[0\]: .*private"),
    (
        "symmetric key",
        {"jwks": {"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}},
        r"jwks.keys\[0\]: expected an asymmetric JWK",
    ),
    (
        "key without kid",
        {"jwks": {"keys": [{k: v for k, v in public_jwk().items() if k != "kid"}]}},
        r"jwks.keys\[0\].kid: expected a non-empty string",
    ),
    (
        "duplicate kid",
        {"jwks": {"keys": [{**public_jwk(), "kid": "k"}, {**public_jwk(), "kid": "k"}]}},
        r"jwks.keys\[1\].kid: 'k' appears twice",
    ),
    ("RSA key of 1024 bits", {"jwks": {"keys": [_rsa_1024_jwk()]}}, "RSA modulus of 2048"),
    (
        "alg that does not fit the key",
        {"jwks": {"keys": [{**public_jwk("ES256"), "alg": "RS256"}]}},
        r"jwks.keys\[0\].alg: 'RS256' does not fit a EC key",
    ),
    (
        "encryption key",
        {"jwks": {"keys": [{**public_jwk(), "use": "enc"}]}},
        r"jwks.keys\[0\].use: expected 'sig'",
    ),
    (
        "key_ops without verify",
        {"jwks": {"keys": [{**public_jwk(), "key_ops": ["sign"]}]}},
        r"jwks.keys\[0\].key_ops",
    ),
    ("http URI as SPIFFE ID", {"spiffe_id": "https://acme.example/bot"}, "spiffe_id: expected"),
    ("SPIFFE ID without path", {"spiffe_id": "spiffe://acme.example"}, "spiffe_id: expected"),
    ("SPIFFE ID with ..", {"spiffe_id": "spiffe://acme.example/../x"}, "spiffe_id: expected"),
    ("SPIFFE ID with a port", {"spiffe_id": "spiffe://acme.example:8/x"}, "spiffe_id: expected"),
    ("audiences as a list", {"audiences": ["https://a"]}, "audiences: expected a tuple"),
    ("audience with a space", {"audiences": ("https://a b",)}, "audiences: expected printable"),
    ("empty audience", {"audiences": ("",)}, "audiences: expected printable"),
    ("duplicate audience", {"audiences": ("https://a", "https://a")}, "audiences: duplicate"),
    ("scope with a quote", {"scopes": ('mcp:"tools"',)}, "scopes: expected RFC 6749"),
    ("scope with a space", {"scopes": ("mcp tools",)}, "scopes: expected RFC 6749"),
    ("require_dpop as text", {"require_dpop": "yes"}, "require_dpop: expected a bool"),
    ("expiry NaN", {"expires_at": math.nan}, "expires_at: expected epoch seconds"),
    ("negative expiry", {"expires_at": -1.0}, "expires_at: expected epoch seconds ≥ 0"),
    ("created_at a bool", {"created_at": True}, "created_at: expected epoch seconds"),
    ("last_used_at infinite", {"last_used_at": math.inf}, "last_used_at: expected epoch"),
    ("status as plain text", {"status": "active"}, "status: expected an AgentStatus"),
    (
        "suspended without reason",
        {"status": AgentStatus.SUSPENDED},
        "status_reason: expected non-empty",
    ),
]


@pytest.mark.parametrize(
    ("change", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_fields_are_refused_by_name(
    registry: SqlRegistry, change: dict[str, Any], expected: str
) -> None:
    with pytest.raises(RegistryInvalid, match=expected) as info:
        registry.add(make_agent(**change))
    assert info.value.code == "registry.invalid"
    assert "c2VjcmV0" not in info.value.message  # never echoes key material
    assert registry.list() == []


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
def test_each_supported_key_type_is_accepted(registry: SqlRegistry, alg: str) -> None:
    agent = registry.add(make_agent(jwks={"keys": [public_jwk(alg)]}))
    assert registry.get(agent.id).jwks == agent.jwks


def test_a_spiffe_id_belongs_to_one_agent(registry: SqlRegistry) -> None:
    registry.add(make_agent(spiffe_id="spiffe://acme.example/bot"))
    with pytest.raises(RegistryConflict, match="is already agent 'billing-bot'"):
        registry.add(make_agent(id="twin", spiffe_id="spiffe://acme.example/bot"))
    registry.add(make_agent(id="other", spiffe_id="spiffe://acme.example/other"))
    view = RegistryView(registry)
    found = view.agent_by_spiffe_id("spiffe://acme.example/other")
    assert found is not None and found.id == "other"
    assert view.agent_by_spiffe_id("spiffe://acme.example/nobody") is None
    assert sorted(a.id for a in view.agents()) == ["billing-bot", "other"]


def test_a_spiffe_agent_needs_no_keys(registry: SqlRegistry) -> None:
    agent = make_agent(jwks={}, spiffe_id="spiffe://acme.example/ns/billing/sa/bot")
    registry.add(agent)
    assert registry.get(agent.id).jwks == {}


# --- lifecycle ---


def test_suspend_and_resume(registry: SqlRegistry) -> None:
    registry.add(make_agent())
    suspended = registry.set_status("billing-bot", AgentStatus.SUSPENDED, "key leaked in CI log")
    assert suspended.usable(NOW) == (False, "suspended")
    assert registry.get("billing-bot").status_reason == "key leaked in CI log"
    resumed = registry.set_status("billing-bot", AgentStatus.ACTIVE, None)
    assert resumed.usable(NOW) == (True, "ok")
    assert registry.get("billing-bot") == resumed


def test_suspending_needs_a_reason(registry: SqlRegistry) -> None:
    registry.add(make_agent())
    with pytest.raises(RegistryInvalid, match="reason: expected non-empty"):
        registry.set_status("billing-bot", AgentStatus.SUSPENDED, " ")
    assert registry.get("billing-bot").status is AgentStatus.ACTIVE


def test_setting_the_current_status_again_is_a_conflict(registry: SqlRegistry) -> None:
    registry.add(make_agent())
    with pytest.raises(RegistryConflict, match="already active"):
        registry.set_status("billing-bot", AgentStatus.ACTIVE, None)


@pytest.mark.parametrize(
    "attempt",
    [
        lambda r: r.set_status("billing-bot", AgentStatus.ACTIVE, None),
        lambda r: r.set_status("billing-bot", AgentStatus.SUSPENDED, "again"),
        lambda r: r.set_status("billing-bot", AgentStatus.OFFBOARDED, "again"),
        lambda r: r.rotate_key("billing-bot", {"keys": [public_jwk()]}),
    ],
    ids=["resume", "suspend", "offboard", "rotate-key"],
)
def test_offboarded_is_final(registry: SqlRegistry, attempt: Any) -> None:
    registry.add(make_agent())
    registry.set_status("billing-bot", AgentStatus.OFFBOARDED, "project ended")
    with pytest.raises(RegistryConflict, match="offboarded, which is final"):
        attempt(registry)
    agent = registry.get("billing-bot")
    assert agent.status is AgentStatus.OFFBOARDED
    assert agent.status_reason == "project ended"
    assert agent.usable(NOW) == (False, "offboarded")


def test_an_agent_is_unusable_from_its_expiry_on(registry: SqlRegistry) -> None:
    agent = registry.add(make_agent(expires_at=NOW + 60))
    assert agent.usable(NOW + 59.9) == (True, "ok")
    assert agent.usable(NOW + 60) == (False, "expired")
    assert registry.get(agent.id).usable(NOW + 61) == (False, "expired")


def test_suspension_is_reported_before_expiry() -> None:
    agent = make_agent(expires_at=NOW, status=AgentStatus.SUSPENDED, status_reason="r")
    assert agent.usable(NOW + 1) == (False, "suspended")


def test_status_changes_of_unknown_agents_are_not_found(registry: SqlRegistry) -> None:
    with pytest.raises(RegistryNotFound):
        registry.set_status("ghost", AgentStatus.SUSPENDED, "why")
    with pytest.raises(RegistryNotFound):
        registry.rotate_key("ghost", {"keys": [public_jwk()]})


def test_rotate_key_replaces_the_key_set(registry: SqlRegistry) -> None:
    old = make_agent()
    registry.add(old)
    new_jwks = {"keys": [old.jwks["keys"][0], public_jwk("EdDSA")]}
    assert registry.rotate_key(old.id, new_jwks).jwks == new_jwks
    assert registry.get(old.id).jwks == new_jwks
    newest = {"keys": [public_jwk("RS256")]}
    registry.rotate_key(old.id, newest)
    assert registry.get(old.id).jwks == newest


def test_rotate_key_refuses_a_bad_set_and_keeps_the_old_one(registry: SqlRegistry) -> None:
    agent = registry.add(make_agent())
    with pytest.raises(RegistryInvalid, match=r"jwks.keys\[0\]: .*private"):
        registry.rotate_key(agent.id, {"keys": [_private_jwk()]})
    with pytest.raises(RegistryInvalid, match="jwks: expected at least one"):
        registry.rotate_key(agent.id, {"keys": []})
    assert registry.get(agent.id).jwks == agent.jwks


# --- last use ---


def test_touch_is_buffered_and_keeps_the_latest_time(store: Any) -> None:
    with store() as gateway, store() as cli:
        gateway.add(make_agent())
        gateway.touch("billing-bot", NOW + 5)
        gateway.touch("billing-bot", NOW + 2)  # an older, late-arriving request
        assert cli.get("billing-bot").last_used_at is None  # not written yet
        assert gateway.get("billing-bot").last_used_at == NOW + 5  # reads flush first
        assert cli.get("billing-bot").last_used_at == NOW + 5


def test_touch_only_notes_and_flush_writes_without_moving_the_version(store: Any) -> None:
    with store() as gateway, store() as cli:
        gateway.add(make_agent())
        before = cli.version()
        gateway.touch("billing-bot", NOW + 7)
        gateway.touch("ghost", NOW + 7)  # unknown ids are ignored
        assert cli.get("billing-bot").last_used_at is None  # touch never writes
        assert gateway.flush_touches() == 2
        assert cli.get("billing-bot").last_used_at == NOW + 7
        assert cli.version() == before
        assert gateway.flush_touches() == 0  # nothing left


def test_flush_never_waits_for_another_writer(path: Path) -> None:
    with SqliteRegistry(path, busy_timeout=10) as gateway:
        gateway.add(make_agent())
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # a CLI in the middle of a write
        try:
            started = time.monotonic()
            gateway.touch("billing-bot", NOW + 3)
            assert gateway.flush_touches() == 0  # busy: kept for the next round
            assert time.monotonic() - started < 5  # did not wait out the 10 s busy timeout
        finally:
            other.execute("ROLLBACK")
            other.close()
        gateway.touch("billing-bot", NOW + 1)  # older than the kept time
        assert gateway.flush_touches() == 1
        with SqliteRegistry(path) as cli:
            assert cli.get("billing-bot").last_used_at == NOW + 3


def test_close_writes_pending_touches(store: Any) -> None:
    gateway = store()
    gateway.add(make_agent())
    gateway.touch("billing-bot", NOW + 9)
    gateway.close()
    with store() as cli:
        assert cli.get("billing-bot").last_used_at == NOW + 9


def test_the_view_notes_uses_in_memory_until_taken(path: Path) -> None:
    with SqliteRegistry(path) as registry:
        registry.add(make_agent())
        view = RegistryView(registry)
        view.note_use("billing-bot", NOW + 4)
        view.note_use("billing-bot", NOW + 1)
        assert registry.get("billing-bot").last_used_at is None
        assert view.take_uses() == {"billing-bot": NOW + 4}
        assert view.take_uses() == {}


# --- revocations and sessions ---


def test_revoked_tokens(registry: SqlRegistry) -> None:
    assert not registry.is_token_revoked("jti-1")
    registry.revoke_token("jti-1", time.time() + 300, "stolen laptop")
    assert registry.is_token_revoked("jti-1")
    assert not registry.is_token_revoked("jti-2")
    registry.revoke_token("jti-1", time.time() + 600, "again")  # idempotent
    assert registry.is_token_revoked("jti-1")


def test_long_expired_revocations_are_pruned(registry: SqlRegistry) -> None:
    registry.revoke_token("old", time.time() - 7200, "expired long ago")
    registry.revoke_token("new", time.time() + 300, "fresh")  # prunes on write
    assert not registry.is_token_revoked("old")
    assert registry.is_token_revoked("new")


@pytest.mark.parametrize(
    ("jti", "expires_at", "reason", "expected"),
    [
        ("", 1.0, "r", "jti: expected 1 to 256"),
        ("x" * 257, 1.0, "r", "jti: expected 1 to 256"),
        ("j", math.inf, "r", "expires_at: expected epoch seconds"),
        ("j", 1.0, "", "reason: expected non-empty"),
    ],
)
def test_invalid_revocations_are_refused(
    registry: SqlRegistry, jti: str, expires_at: float, reason: str, expected: str
) -> None:
    with pytest.raises(RegistryInvalid, match=expected):
        registry.revoke_token(jti, expires_at, reason)


def test_killed_sessions(registry: SqlRegistry) -> None:
    assert registry.killed_sessions() == set()
    registry.kill_session("a" * 64)
    registry.kill_session("a" * 64)
    registry.kill_session("b" * 64)
    assert registry.killed_sessions() == {"a" * 64, "b" * 64}
    with pytest.raises(RegistryInvalid, match="session_id_hash"):
        registry.kill_session("has space")


# --- change detection across processes (two connections to one file) ---


@pytest.fixture
def pair(store: Callable[[], SqlRegistry]) -> Any:
    """(cli, gateway): two registries on one store, as two processes would hold them."""
    with store() as cli, store() as gateway:
        yield cli, gateway


def test_the_version_stays_put_when_nothing_changes(pair: Any) -> None:
    cli, gateway = pair
    cli.add(make_agent())
    versions = {gateway.version() for _ in range(100)} | {cli.version()}
    assert len(versions) == 1
    cli.get("billing-bot")
    cli.list()
    cli.is_token_revoked("x")
    cli.killed_sessions()
    assert gateway.version() in versions


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.add(make_agent(id="second")),
        lambda r: r.set_status("billing-bot", AgentStatus.SUSPENDED, "why"),
        lambda r: r.rotate_key("billing-bot", {"keys": [public_jwk()]}),
        lambda r: r.revoke_token("jti", time.time() + 60, "why"),
        lambda r: r.kill_session("s" * 64),
    ],
    ids=["add", "set_status", "rotate_key", "revoke_token", "kill_session"],
)
def test_every_change_moves_the_version_for_the_other_process(pair: Any, change: Any) -> None:
    cli, gateway = pair
    cli.add(make_agent())
    before = gateway.version()
    change(cli)
    assert gateway.version() != before
    assert cli.version() == gateway.version()


def test_a_refused_change_does_not_move_the_version(pair: Any) -> None:
    cli, gateway = pair
    cli.add(make_agent())
    before = gateway.version()
    with pytest.raises(RegistryConflict):
        cli.add(make_agent())
    with pytest.raises(RegistryInvalid):
        cli.rotate_key("billing-bot", {"keys": []})
    assert gateway.version() == before


def test_the_view_sees_another_process_change_on_the_next_refresh(pair: Any) -> None:
    cli, gateway = pair
    cli.add(make_agent())
    view = RegistryView(gateway)
    assert view.agent("billing-bot") is not None
    assert view.refresh() is False

    cli.set_status("billing-bot", AgentStatus.SUSPENDED, "anomalous calls")
    assert view.refresh() is True
    agent = view.agent("billing-bot")
    assert agent is not None and agent.usable(NOW) == (False, "suspended")
    assert view.refresh() is False

    cli.revoke_token("jti-9", time.time() + 300, "leaked")
    cli.kill_session("f" * 64)
    assert not view.revoked("jti-9") and not view.session_killed("f" * 64)  # until refresh
    assert view.refresh() is True
    assert view.revoked("jti-9") and view.session_killed("f" * 64)
    assert not view.revoked("jti-8") and not view.session_killed("e" * 64)
    assert view.agent("ghost") is None


def test_the_view_ignores_last_use_updates(pair: Any) -> None:
    cli, gateway = pair
    cli.add(make_agent())
    view = RegistryView(gateway)
    gateway.touch("billing-bot", NOW)
    assert gateway.flush_touches() == 1
    assert view.refresh() is False


class CountingRegistry:
    """A registry that counts snapshots, to see when the view reloads."""

    def __init__(self, inner: SqlRegistry) -> None:
        self.inner = inner
        self.snapshots = 0

    def version(self) -> int:
        return self.inner.version()

    def snapshot(self) -> RegistrySnapshot:
        self.snapshots += 1
        return self.inner.snapshot()


def test_refresh_reloads_only_when_the_version_moved(pair: Any) -> None:
    cli, gateway = pair
    cli.add(make_agent())
    counting = CountingRegistry(gateway)
    view = RegistryView(counting)  # type: ignore[arg-type]
    for _ in range(1000):
        view.refresh()
    assert counting.snapshots == 1
    cli.kill_session("k" * 64)
    for _ in range(1000):
        view.refresh()
    assert counting.snapshots == 2


# --- the file ---


def test_the_file_is_in_wal_mode_with_a_schema_version(path: Path) -> None:
    SqliteRegistry(path).close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # 1: agents, revocations, killed sessions; 2: upstream trust (pins, quarantines);
        # 3: access reviews (agents' key and status times, reviews, decisions).
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
    finally:
        db.close()


def test_a_newer_schema_is_refused(path: Path) -> None:
    SqliteRegistry(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(RegistryUnavailable, match="schema version 99; this Bastion knows up to 3"):
        SqliteRegistry(path)


def test_opening_a_missing_file_without_create_fails(tmp_path: Path) -> None:
    with pytest.raises(RegistryUnavailable, match="no registry at"):
        SqliteRegistry(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()


def test_a_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryUnavailable, match="cannot open the registry"):
        SqliteRegistry(bogus)


# --- the view's watcher ---


async def test_the_watcher_sees_another_process_change_and_runs_the_hooks(pair: Any) -> None:
    cli, gateway = pair
    cli.add(make_agent())
    view = RegistryView(gateway, poll=0.05)
    ended: list[int] = []

    async def reconcile() -> None:
        ended.append(view.version)

    view.watch.after_change(reconcile)
    background = Background()
    background.add(view.watch.name, view.watch.run)
    await background.start()
    try:
        cli.set_status("billing-bot", AgentStatus.SUSPENDED, "anomalous calls")  # as the CLI
        await until_async(lambda: ended)
        agent = view.agent("billing-bot")
        assert agent is not None and agent.status is AgentStatus.SUSPENDED
        # A change another reader took in first (the token endpoint's refresh) still counts
        # as a change for the hooks: the sessions of a revoked agent must end either way.
        cli.revoke_token("jti-1", time.time() + 300, "leaked")
        assert view.refresh() is True
        await view.reread()
        assert ended[-1] == view.version and len(ended) == 2
        # Nothing changed: an ask runs no hook.
        await view.reread()
        assert len(ended) == 2
    finally:
        await background.stop()


class BrokenRegistry:
    """A registry whose file became unreadable after the view's first load."""

    def __init__(self, inner: SqlRegistry) -> None:
        self.inner = inner
        self.broken = False

    def version(self) -> int:
        if self.broken:
            raise RegistryUnavailable("registry: disk I/O error")
        return self.inner.version()

    def snapshot(self) -> RegistrySnapshot:
        return self.inner.snapshot()


def test_a_view_the_watcher_cannot_refresh_fails_closed(pair: Any) -> None:
    cli, gateway = pair
    cli.add(make_agent())
    now = [100.0]
    broken = BrokenRegistry(gateway)
    view = RegistryView(broken, stale_after=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    view.require_current()
    now[0] += 4.0
    view.require_current()  # young enough
    now[0] += 2.0
    view.refresh()  # the watcher's round: read again, so current again
    view.require_current()
    # The file breaks, and meanwhile the agent is suspended: serving from the old copy would
    # let a suspended agent in. The view refuses instead, once it is older than allowed.
    broken.broken = True
    cli.set_status("billing-bot", AgentStatus.SUSPENDED, "compromised")
    with pytest.raises(RegistryUnavailable):
        view.refresh()
    now[0] += 5.5
    with pytest.raises(RegistryUnavailable) as raised:
        view.require_current()
    assert raised.value.http_status == 503
    assert "last read 6 s ago" in raised.value.message
    broken.broken = False
    assert view.refresh() is True  # the registry is back: current again, and suspended
    view.require_current()
    agent = view.agent("billing-bot")
    assert agent is not None and agent.status is AgentStatus.SUSPENDED
