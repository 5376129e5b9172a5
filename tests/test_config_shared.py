"""The `state` (Redis) and `registry` (PostgreSQL) sections: addresses are references or
password-less URLs, and a reference that cannot be read is named by its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion import config
from bastion.config.shared import read_reference
from bastion.errors import ConfigError


@pytest.mark.parametrize(
    ("section", "text", "needle"),
    [
        ("state", "store: redis\n  url: redis://:hunter2@127.0.0.1:6379/0", "literal secrets"),
        ("state", "store: redis\n  url: redis://bob:hunter2@10.0.0.1/0", "literal secrets"),
        ("state", "store: redis", "store redis needs state.url"),
        ("state", "store: redis\n  url: http://127.0.0.1:6379", "redis/rediss/unix URL"),
        ("state", "store: redis\n  url: vault:kv/redis#url", "vault: is not read here"),
        ("state", "store: valkey", "'memory' or 'redis'"),
        ("registry", "store: postgres", "store postgres needs registry.dsn"),
        ("registry", "store: postgres\n  dsn: postgresql://u:pw@db/x", "literal secrets"),
        ("registry", "store: postgres\n  dsn: host=db password=pw", "literal secrets"),
    ],
)
def test_a_store_address_with_a_secret_or_missing_is_refused(
    section: str, text: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(f"{section}:\n  {text}\n")
    problems = "\n".join(caught.value.problems)
    assert needle in problems
    assert f"{section}." in problems  # the key path is named
    assert "hunter2" not in problems and "pw@" not in problems  # never echoed back


def test_store_addresses_that_are_accepted() -> None:
    settings = config.parse(
        "state:\n  store: redis\n  url: env:BASTION_REDIS_URL\n"
        "registry:\n  store: postgres\n  dsn: postgresql://bastion@db.internal/registry\n"
    )
    assert settings.state.store == "redis"
    assert settings.registry.dsn == "postgresql://bastion@db.internal/registry"
    default = config.parse("{}\n")
    assert (default.state.store, default.registry.store) == ("memory", "sqlite")


def test_a_reference_that_cannot_be_read_is_named_by_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BASTION_TEST_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match=r"state\.url: environment variable"):
        read_reference("env:BASTION_TEST_NOT_SET", "state.url")
    with pytest.raises(ConfigError, match=r"registry\.dsn: cannot read"):
        read_reference(f"file:{tmp_path / 'absent'}", "registry.dsn")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"is empty"):
        read_reference(f"file:{tmp_path / 'empty'}", "registry.dsn")
    (tmp_path / "dsn").write_text("redis://:s3cret@127.0.0.1:1/0\n")
    assert read_reference(f"file:{tmp_path / 'dsn'}", "state.url").endswith("/0")
    monkeypatch.setenv("BASTION_TEST_URL", "redis://127.0.0.1:2/1")
    assert read_reference("env:BASTION_TEST_URL", "state.url") == "redis://127.0.0.1:2/1"
