"""Background work: refreshers run on a period and when asked, never two rounds at once; keyed
jobs run once for every asker at the same time; the owner stops everything it started."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import pytest
from tests.conftest import until_async

from bastion.background import Background, Jobs, Refresher


def owned(*jobs: tuple[str, Callable[[], Awaitable[None]]]) -> Background:
    background = Background()
    for name, run in jobs:
        background.add(name, run)  # type: ignore[arg-type]
    return background


async def test_a_periodic_refresher_runs_at_once_then_every_period() -> None:
    rounds: list[float] = []

    async def work() -> bool:
        rounds.append(time.monotonic())
        return False

    refresher = Refresher("clock", work, every=0.05)
    background = owned((refresher.name, refresher.run))
    await background.start()
    try:
        assert refresher.running
        await until_async(lambda: len(rounds) >= 3)
    finally:
        await background.stop()
    assert not refresher.running
    count = len(rounds)
    # stop() awaited every task, so nothing is left to run a round: let the loop turn (no
    # clock involved) and see that none came.
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(rounds) == count


async def test_an_ask_waits_for_a_round_that_started_after_it() -> None:
    value = {"published": 0, "source": 0}

    async def work() -> bool:
        value["published"] = value["source"]
        return False

    refresher = Refresher("copy", work)  # on demand only
    background = owned((refresher.name, refresher.run))
    await background.start()
    try:
        value["source"] = 1
        assert await refresher.ask(5.0) is True
        assert value["published"] == 1
        value["source"] = 2
        assert value["published"] == 1  # nothing runs unless asked
        assert await refresher.ask(5.0) is True
        assert value["published"] == 2
    finally:
        await background.stop()


async def test_a_refresher_nobody_runs_answers_at_once() -> None:
    async def work() -> bool:
        raise AssertionError("never runs")

    refresher = Refresher("idle", work)
    started = time.monotonic()
    assert await refresher.ask(10.0) is False
    assert time.monotonic() - started < 1.0


async def test_rounds_never_overlap_and_a_flood_of_asks_costs_few_rounds() -> None:
    active = {"now": 0, "most": 0, "rounds": 0}

    async def work() -> bool:
        active["now"] += 1
        active["most"] = max(active["most"], active["now"])
        await asyncio.sleep(0.01)
        active["now"] -= 1
        active["rounds"] += 1
        return False

    refresher = Refresher("busy", work, gap=0.05)
    background = owned((refresher.name, refresher.run))
    await background.start()
    try:
        answers = await asyncio.gather(*(refresher.ask(5.0) for _ in range(200)))
    finally:
        await background.stop()
    assert all(answers)
    assert active["most"] == 1
    assert active["rounds"] <= 3  # the 200 asks shared the rounds


async def test_hooks_run_after_a_change_before_the_ask_returns() -> None:
    changed = {"next": True}
    seen: list[str] = []

    async def work() -> bool:
        result, changed["next"] = changed["next"], False
        return result

    async def hook() -> None:
        seen.append("reconciled")

    refresher = Refresher("registry", work)
    refresher.after_change(hook)
    background = owned((refresher.name, refresher.run))
    await background.start()
    try:
        await refresher.ask(5.0)
        assert seen == ["reconciled"]
        await refresher.ask(5.0)  # nothing changed: no hook
        assert seen == ["reconciled"]
    finally:
        await background.stop()


async def test_a_failing_round_is_logged_once_and_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "bastion.background")
    attempts = {"n": 0}

    async def work() -> bool:
        attempts["n"] += 1
        if attempts["n"] <= 3:
            raise OSError("registry unreachable")
        return False

    refresher = Refresher("flaky", work, every=0.01)
    background = owned((refresher.name, refresher.run))
    await background.start()
    try:
        await until_async(lambda: attempts["n"] >= 5)
    finally:
        await background.stop()
    failed = [r for r in caplog.records if "background flaky failed" in r.getMessage()]
    assert len(failed) == 1 and "registry unreachable" in failed[0].getMessage()
    assert any("background flaky works again" in r.getMessage() for r in caplog.records)


async def test_jobs_run_once_per_key_for_every_asker_in_flight() -> None:
    runs: list[str] = []
    release = asyncio.Event()

    def job(key: str) -> Callable[[], Awaitable[None]]:
        async def work() -> None:
            runs.append(key)
            await release.wait()

        return work

    jobs = Jobs("catalog")
    background = owned((jobs.name, jobs.run))
    await background.start()
    try:
        asks = [asyncio.create_task(jobs.ask("list:a", job("a"), 5.0)) for _ in range(20)]
        other = asyncio.create_task(jobs.ask("list:b", job("b"), 5.0))
        await until_async(lambda: sorted(runs) == ["a", "b"])  # keys run side by side
        release.set()
        assert all(await asyncio.gather(*asks)) and await other
    finally:
        await background.stop()
    assert sorted(runs) == ["a", "b"]


async def test_a_failing_job_leaves_the_runner_working() -> None:
    async def broken() -> None:
        raise RuntimeError("upstream gone")

    done: list[str] = []

    async def fine() -> None:
        done.append("ok")

    jobs = Jobs("catalog")
    background = owned((jobs.name, jobs.run))
    await background.start()
    try:
        assert await jobs.ask("list:a", broken, 5.0) is True  # it ended, having failed
        assert await jobs.ask("list:b", fine, 5.0) is True
    finally:
        await background.stop()
    assert done == ["ok"]


async def test_jobs_refuse_beyond_their_limit_and_when_not_running() -> None:
    release = asyncio.Event()

    async def slow() -> None:
        await release.wait()

    jobs = Jobs("catalog", limit=2)
    assert await jobs.ask("x", slow, 5.0) is False  # nothing runs the jobs
    background = owned((jobs.name, jobs.run))
    await background.start()
    try:
        first = asyncio.create_task(jobs.ask("a", slow, 5.0))
        second = asyncio.create_task(jobs.ask("b", slow, 5.0))
        await until_async(lambda: len(jobs._inflight) == 2, "both jobs in flight")
        assert await jobs.ask("c", slow, 5.0) is False
        assert await jobs.ask("a", slow, 0.05) is False  # joins "a", which outlasts the wait
        release.set()
        assert await first and await second
    finally:
        await background.stop()


async def test_the_owner_restarts_a_job_that_fails_and_stops_every_task() -> None:
    starts = {"n": 0}

    async def crashing() -> None:
        starts["n"] += 1
        raise RuntimeError("bug")

    async def forever() -> None:
        await asyncio.Event().wait()

    background = owned(("crashing", crashing), ("forever", forever))
    before = asyncio.all_tasks()
    await background.start()
    await until_async(lambda: starts["n"] >= 2, seconds=10)  # started again after a pause
    assert background.names == ["crashing", "forever"]
    await background.stop()
    assert asyncio.all_tasks() == before  # nothing outlives stop
