"""The Redis connection every shared-state adapter uses: it fails closed, names the server
but never its password, and works again once Redis is back."""

from __future__ import annotations

import pytest
from tests.redis_server import start_redis

from bastion import config
from bastion.errors import StateUnavailable
from bastion.state.redis import RedisState, open_shared


async def test_an_unreachable_redis_is_state_unavailable_until_it_returns() -> None:
    with start_redis() as server:
        state = RedisState(server.url(0), prefix="t:", timeout=0.5)
        try:
            await state.run("write", state.client.set(state.key("a", "b"), b"1"))
            assert await state.client.get("t:a:b") == b"1"
            server.stop()
            with pytest.raises(StateUnavailable) as caught:
                await state.run("read a replay id", state.client.get(state.key("a", "b")))
            error = caught.value
            assert (error.code, error.http_status, error.rpc_code) == (
                "state.unavailable",
                503,
                -32603,
            )
            assert "could not read a replay id" in error.message
            assert f"127.0.0.1:{server.port}" in error.message
            assert server.password not in error.message
            server.start()
            await state.ping()  # the client reconnects by itself
        finally:
            await state.close()


async def test_a_redis_that_does_not_answer_in_time_is_refused_not_waited_for() -> None:
    with start_redis() as server:
        state = RedisState(server.url(0), timeout=0.3)
        try:
            assert server.process is not None
            server.process.send_signal(19)  # SIGSTOP: the server holds the connection, mute
            with pytest.raises(StateUnavailable, match="could not answer a ping"):
                await state.ping()
        finally:
            if server.process is not None:
                server.process.send_signal(18)  # SIGCONT
            await state.close()


def test_open_shared_follows_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_shared(config.parse("{}\n")) is None
    monkeypatch.setenv("BASTION_TEST_REDIS", "redis://:pw@127.0.0.1:1/3")
    settings = config.parse(
        "state:\n  store: redis\n  url: env:BASTION_TEST_REDIS\n  prefix: 'x:'\n"
    )
    state = open_shared(settings)
    assert state is not None
    assert (state.prefix, state.where) == ("x:", "redis://127.0.0.1:1")
