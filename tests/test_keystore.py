"""The signing-key store: a rotation by another process (the CLI, another replica) reaches a
gateway through its background watcher; a token naming a key not seen yet asks the watcher to
look now; the request path itself never touches the key files."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import until_async

from bastion.background import Background
from bastion.state.keystore import FileKeyStore


def store(path: Path, poll: float = 1.0) -> FileKeyStore:
    keys = FileKeyStore(path, "ES256", 3600, poll=poll)
    keys.load()
    return keys


@asynccontextmanager
async def watched(keys: FileKeyStore) -> AsyncIterator[None]:
    background = Background()
    background.add(keys.watch.name, keys.watch.run)
    await background.start()
    try:
        yield
    finally:
        await background.stop()


async def test_a_rotation_by_another_process_reaches_the_gateway(tmp_path: Path) -> None:
    gateway = store(tmp_path / "keys")
    old = gateway.current().kid
    async with watched(gateway):
        new = store(tmp_path / "keys").rotate().kid  # `bastion keys rotate`
        await until_async(lambda: gateway.current().kid == new)  # within the 1 s poll
    kids = {key["kid"] for key in gateway.jwks()["keys"]}
    assert kids == {old, new}  # the retired key still verifies its tokens
    assert gateway.keyset().get(new) is not None


async def test_an_unknown_key_asks_the_watcher_to_look_now(tmp_path: Path) -> None:
    gateway = store(tmp_path / "keys", poll=3600.0)  # no poll but the first during the test
    async with watched(gateway):
        await until_async(lambda: gateway.watch.rounds == 1)
        new = store(tmp_path / "keys").rotate().kid
        started = time.monotonic()
        assert await gateway.recheck() is True
        assert gateway.current().kid == new
        assert time.monotonic() - started < 1.0  # not the next poll: a look at once
        assert await gateway.recheck() is False  # nothing new since


async def test_the_request_path_never_reads_the_key_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = store(tmp_path / "keys")
    store(tmp_path / "keys").rotate()
    touched: list[str] = []
    real_stat = os.stat

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(tmp_path) in str(path):
            touched.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    # No watcher runs: a token naming an unknown key is refused rather than read for.
    assert await gateway.recheck() is False
    gateway.current()
    gateway.keyset()
    assert touched == []
    # The watcher's round is where the files are read.
    async with watched(gateway):
        await gateway.recheck()
    assert touched
