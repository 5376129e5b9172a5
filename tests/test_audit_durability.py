"""The durability levels as configured: `audit.survives` (process by default, power), the older
`synchronous` read as the level it meant, and what each level opens: a write-ahead and commits
without fsync, or an fsync per (group) commit and no write-ahead."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.test_audit_record import sample

from bastion.audit.keys import audit_dir
from bastion.audit.store import SqliteAuditStore
from bastion.audit.trail import open_trail_writer
from bastion.config import Settings, parse
from bastion.errors import ConfigError

FULL, NORMAL = 2, 1  # PRAGMA synchronous values


def settings(tmp_path: Path, audit: str = "") -> Settings:
    return parse(f"state_dir: state\naudit: {{{audit}}}\n", base=tmp_path)


@pytest.mark.parametrize(
    ("audit", "survives"),
    [
        ("", "process"),
        ("survives: power", "power"),
        ("synchronous: FULL", "power"),
        ("synchronous: NORMAL", "process"),
        ("synchronous: FULL, survives: power", "power"),
    ],
)
def test_the_level_and_the_older_synchronous(tmp_path: Path, audit: str, survives: str) -> None:
    assert settings(tmp_path, audit).audit.survives == survives


def test_a_synchronous_that_contradicts_survives_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="synchronous FULL means survives power") as raised:
        settings(tmp_path, "synchronous: FULL, survives: process")
    assert "audit" in str(raised.value)


@pytest.mark.parametrize(
    ("audit", "pragma", "ahead"),
    [
        ("", NORMAL, True),  # the default: kill -9 safe, no fsync per call
        ("survives: power", FULL, False),
        ("max_bytes: 1000000", NORMAL, False),  # a capped store: calls wait for its commits
    ],
)
async def test_what_each_level_opens(tmp_path: Path, audit: str, pragma: int, ahead: bool) -> None:
    writer = open_trail_writer(settings(tmp_path, audit))
    await writer.start()
    try:
        store = writer.store
        assert isinstance(store, SqliteAuditStore)
        assert store._db.execute("PRAGMA synchronous").fetchone() == (pragma,)
        await writer.append(sample(0), durable=True)
        files = list(audit_dir(tmp_path / "state").glob(f"ahead-{writer.writer_id}.*"))
        assert bool(files) == ahead
    finally:
        await writer.stop()
