"""Crash recovery of the audit trail: after a gateway dies, no decision stays without an
outcome. In process against the store, then for real: a gateway under load from four clients,
with one call held open upstream, killed with SIGKILL and started again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from tests.conftest import (
    ALLOW_ALL,
    EXAMPLES,
    FIXTURES,
    GatewayProcess,
    free_port,
    modern_body,
    modern_headers,
    start_gateway,
    until,
)

from bastion.audit import AuditRecord, SqliteAuditStore, digest, open_writer
from bastion.audit.ahead import WriteAhead
from bastion.audit.recover import recover, unfinished

STOPPED = "the gateway stopped before the outcome was recorded"


def record(request_id: str, phase: str, **fields: Any) -> AuditRecord:
    return AuditRecord(time=time.time(), request_id=request_id, phase=phase, **fields)  # type: ignore[arg-type]


def test_unfinished_finds_allowed_decisions_without_outcome() -> None:
    records = [
        record("done", "decision", decision="allow"),
        record("done", "outcome", decision="allow", outcome="ok"),
        record("open", "decision", decision="allow", tool_original="t"),
        record("denied", "decision", decision="deny"),
        record("refused", "authn", decision="deny", outcome="denied"),
    ]
    assert [r.request_id for r in unfinished(records)] == ["open"]


async def test_recover_closes_what_the_last_process_left_open(tmp_path: Path) -> None:
    first = open_writer(tmp_path)
    await first.start()
    await first.append(record("done", "decision", decision="allow"), True)
    await first.append(record("done", "outcome", decision="allow", outcome="ok"), True)
    open_call = record("open", "decision", decision="allow", tenant="acme", tool_original="t")
    await first.append(open_call, True)
    await first.append(record("denied", "decision", decision="deny"), True)
    await first.stop()  # the claim is free again, as after a kill

    second = open_writer(tmp_path)
    assert second.writer_id == first.writer_id
    await second.start()
    try:
        assert await recover(second) == 1
        assert await recover(second) == 0  # closed once, not at every start
    finally:
        await second.stop()
    with SqliteAuditStore(tmp_path / "audit" / "audit.db", create=False) as store:
        found = [AuditRecord.from_json(e.record) for e in store.read()]
    closed = [r for r in found if r.phase == "outcome" and r.request_id == "open"]
    assert len(closed) == 1
    assert closed[0].outcome == "unknown" and STOPPED in (closed[0].reason or "")
    assert closed[0].tenant == "acme" and closed[0].tool_original == "t"
    assert closed[0].detail["failure"] == "gateway.stopped"
    assert not unfinished(found)


# -- a real kill -9 -----------------------------------------------------------------------------


def _config(tmp: Path, port: int, echo_port: int, bad_port: int) -> str:
    return str(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "state_dir": str(tmp / "state"),
                "auth": {"mode": "none", "tenant": "acme", "agent": "auditor"},
                "audit": {"durability": "strict", "checkpoint_every": 50},
                "policy": ALLOW_ALL,
                "upstreams": {
                    "echo": {"transport": "http", "url": f"http://127.0.0.1:{echo_port}/mcp"},
                    "bad": {
                        "transport": "http",
                        "url": f"http://127.0.0.1:{bad_port}/mcp",
                        "timeout_seconds": 120,
                    },
                },
            }
        )
    )


def _upstream(script: Path, port: int) -> subprocess.Popen[bytes]:
    """Start an upstream server and wait until it accepts connections."""
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port)], stderr=subprocess.DEVNULL
    )

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{script.name} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    until(listening, f"{script.name} listening")
    return proc


def _call(gw: GatewayProcess, server: str, tool: str, arguments: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        gw.url(f"/servers/{server}/mcp"),
        json=modern_body("tools/call", {"name": tool, "arguments": arguments}),
        headers=modern_headers("tools/call", tool),
        timeout=120,
    )


def _records(tmp: Path) -> list[AuditRecord]:
    with SqliteAuditStore(tmp / "state" / "audit" / "audit.db", create=False) as store:
        return [AuditRecord.from_json(entry.record) for entry in store.read()]


def _written_ahead(tmp: Path) -> list[AuditRecord]:
    """Records in the write-ahead files that the store does not hold yet."""
    folder = tmp / "state" / "audit"
    with SqliteAuditStore(folder / "audit.db", create=False) as store:
        found = []
        for first in folder.glob("ahead-*.0"):
            writer_id = first.name.removeprefix("ahead-").removesuffix(".0")
            last = store.last(writer_id)
            records = WriteAhead(folder, writer_id).replay(last[0] if last else 0)
            found += [AuditRecord.from_json(record.decode()) for record in records]
    return found


def _verify(gw: GatewayProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", "audit", "verify", "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_kill_9_leaves_no_decision_without_an_outcome(tmp_path: Path) -> None:
    port, echo_port, bad_port = free_port(), free_port(), free_port()
    echo = _upstream(EXAMPLES / "echo_server.py", echo_port)
    bad = _upstream(FIXTURES / "bad_http_upstream.py", bad_port)
    config = _config(tmp_path, port, echo_port, bad_port)
    gw = start_gateway(tmp_path, config, port)
    acknowledged: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client() as client:
            for i in range(10_000):
                if stop.is_set():
                    return
                text = f"w{worker}-{i}"
                try:
                    response = client.post(
                        gw.url("/servers/echo/mcp"),
                        json=modern_body(
                            "tools/call", {"name": "echo", "arguments": {"text": text}}
                        ),
                        headers=modern_headers("tools/call", "echo"),
                        timeout=10,
                    )
                except httpx.HTTPError:
                    return
                if response.status_code == 200 and "result" in response.json():
                    acknowledged.append(text)

    held = threading.Thread(target=lambda: _hold(gw), daemon=True)
    workers = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    try:
        held.start()  # a call the upstream never answers: in flight when the gateway dies
        hang = digest({"tag": "held"})
        until(
            lambda: any(r.args_digest == hang for r in _records(tmp_path)),
            "the held call's decision record",
        )
        for worker in workers:
            worker.start()
        until(lambda: len(acknowledged) >= 300, "300 acknowledged calls")
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(timeout=10)
    finally:
        stop.set()
        for worker in workers:
            if worker.is_alive():
                worker.join(timeout=15)
    # What the killed process left: its commits, and (at the default `survives: process`) the
    # records it had only written ahead, which the restart commits before closing any call.
    before = _records(tmp_path) + _written_ahead(tmp_path)
    assert unfinished(before), "the kill left no call open: nothing was tested"

    restarted = start_gateway(tmp_path, config, port)
    try:
        assert _call(restarted, "echo", "echo", {"text": "after"}).status_code == 200
    finally:
        restarted.stop()
        echo.terminate()
        bad.terminate()
    after = _records(tmp_path)
    assert not unfinished(after), f"decisions without outcome: {unfinished(after)[:3]}"
    outcomes = {r.request_id: r for r in after if r.phase == "outcome"}
    for decision in unfinished(before):
        closed = outcomes[decision.request_id]
        assert closed.outcome == "unknown" and STOPPED in (closed.reason or "")
    held_call = next(r for r in before if r.args_digest == hang and r.phase == "decision")
    assert outcomes[held_call.request_id].outcome == "unknown"
    decided = {r.args_digest for r in after if r.phase == "decision"}
    lost = [t for t in acknowledged if digest({"text": t}) not in decided]
    assert not lost, f"{len(lost)} acknowledged calls have no decision record, e.g. {lost[:3]}"
    verified = _verify(restarted)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "recorded them with outcome unknown" in restarted.log()


def _hold(gw: GatewayProcess) -> None:
    """Call the tool that never answers (it ends when the gateway is killed)."""
    try:
        _call(gw, "bad", "hang", {"tag": "held"})
    except httpx.HTTPError:
        pass


def test_outcome_reason_is_readable() -> None:
    """The reason names the stop and when the last record was written, in UTC."""
    from bastion.audit.recover import closing

    decision = record("x", "decision", decision="allow")
    closed = closing(decision, 0.0, 10.0)
    assert closed.reason is not None and "1970-01-01T00:00:00+00:00" in closed.reason
    assert json.loads(closed.to_json())["outcome"] == "unknown"
