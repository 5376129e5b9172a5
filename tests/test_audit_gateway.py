"""The audit trail through a real gateway: what is recorded, that tampering is found, that a
kill -9 under load loses no record of a call the client saw succeed, and that a full store
makes the gateway refuse calls rather than forward them unrecorded."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml
from tests.conftest import (
    ALLOW_ALL,
    EXAMPLES,
    GatewayProcess,
    free_port,
    modern_body,
    modern_headers,
    start_gateway,
)

from bastion.audit import digest

BASTION = [sys.executable, "-m", "bastion.cli"]


def _config(tmp: Path, port: int, echo_port: int, **audit: object) -> str:
    return yaml.safe_dump(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            "state_dir": str(tmp / "state"),
            "auth": {"mode": "none", "tenant": "acme", "agent": "auditor"},
            "audit": {"durability": "strict", "checkpoint_every": 50, **audit},
            "policy": ALLOW_ALL,
            "upstreams": {
                "echo": {"transport": "http", "url": f"http://127.0.0.1:{echo_port}/mcp"}
            },
        }
    )


def _echo_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "echo_server.py"), "--port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("echo server did not start")


def echo(gw: GatewayProcess, text: str, client: httpx.Client) -> httpx.Response:
    return client.post(
        gw.url("/servers/echo/mcp"),
        json=modern_body("tools/call", {"name": "echo", "arguments": {"text": text}}),
        headers=modern_headers("tools/call", "echo"),
        timeout=10,
    )


def audit_cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASTION, "audit", *args, "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def records(gw: GatewayProcess) -> list[dict[str, object]]:
    run = audit_cli(gw, "query", "--json", "--limit", "100000")
    assert run.returncode == 0, run.stderr
    return [json.loads(line)["record"] for line in run.stdout.splitlines() if line.strip()]


def test_calls_are_recorded_and_the_trail_verifies(tmp_path: Path) -> None:
    port, echo_port = free_port(), free_port()
    upstream = _echo_server(echo_port)
    gw = start_gateway(tmp_path, _config(tmp_path, port, echo_port), port)
    try:
        with httpx.Client() as client:
            assert echo(gw, "hello audit", client).status_code == 200
            refused = client.post(
                gw.url("/servers/echo/mcp"),
                headers=modern_headers("tools/call", "nope"),
                json=modern_body("tools/call", {"name": "nope", "arguments": {}}),
            )
            assert refused.status_code == 200
    finally:
        gw.stop()
        upstream.terminate()
    found = records(gw)
    calls = [r for r in found if r.get("args_digest") == digest({"text": "hello audit"})]
    phases = {r["phase"] for r in calls}
    assert phases == {"decision", "outcome"}
    decision = next(r for r in calls if r["phase"] == "decision")
    assert decision["tenant"] == "acme" and decision["agent"] == "auditor"
    assert decision["method"] == "tools/call" and decision["tool_original"] == "echo"
    assert decision["decision"] == "allow" and decision["server"] == "echo"
    outcome = next(r for r in calls if r["phase"] == "outcome")
    assert outcome["outcome"] == "ok" and outcome["latency_ms"] is not None
    assert outcome["request_id"] == decision["request_id"]
    assert audit_cli(gw, "verify").returncode == 0
    ocsf = audit_cli(gw, "export", "--format", "ocsf")
    first = json.loads(ocsf.stdout.splitlines()[0])
    assert first["class_uid"] == 6003


def test_tampering_is_found(tmp_path: Path) -> None:
    port, echo_port = free_port(), free_port()
    upstream = _echo_server(echo_port)
    gw = start_gateway(tmp_path, _config(tmp_path, port, echo_port), port)
    try:
        with httpx.Client() as client:
            for i in range(5):
                assert echo(gw, f"t{i}", client).status_code == 200
    finally:
        gw.stop()
        upstream.terminate()
    assert audit_cli(gw, "verify").returncode == 0
    db = tmp_path / "state" / "audit" / "audit.db"
    with sqlite3.connect(db) as conn:
        table = next(
            name
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if "entr" in name or name == "records"
        )
        column = next(
            c[1]
            for c in conn.execute(f"PRAGMA table_info({table})")  # noqa: S608
            if c[1] in ("record", "record_json", "data", "json")
        )
        conn.execute(
            f"UPDATE {table} SET {column} = replace({column}, 'auditor', 'intruder') "  # noqa: S608
            f"WHERE rowid = 3"
        )
    tampered = audit_cli(gw, "verify")
    assert tampered.returncode == 1
    assert "TAMPERED" in tampered.stdout + tampered.stderr


def test_kill_9_under_load_loses_no_acknowledged_call(tmp_path: Path) -> None:
    """Every call the client saw succeed has its decision record after a SIGKILL, and the
    trail still verifies once the gateway is back."""
    port, echo_port = free_port(), free_port()
    upstream = _echo_server(echo_port)
    config = _config(tmp_path, port, echo_port)
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
                    response = echo(gw, text, client)
                except httpx.HTTPError:
                    return
                if response.status_code == 200 and "result" in response.json():
                    acknowledged.append(text)

    workers = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 10
    while len(acknowledged) < 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait(timeout=10)
    stop.set()
    for worker in workers:
        worker.join(timeout=15)
    assert len(acknowledged) >= 200
    restarted = start_gateway(tmp_path, config, port)
    try:
        assert audit_cli(restarted, "verify").returncode == 0
        with httpx.Client() as client:
            assert echo(restarted, "after restart", client).status_code == 200
    finally:
        restarted.stop()
        upstream.terminate()
    decided = {r["args_digest"] for r in records(restarted) if r["phase"] == "decision"}
    missing = [t for t in acknowledged if digest({"text": t}) not in decided]
    assert not missing, f"{len(missing)} acknowledged calls have no record, e.g. {missing[:3]}"
    assert audit_cli(restarted, "verify").returncode == 0


def test_full_store_refuses_calls(tmp_path: Path) -> None:
    """When the trail cannot grow, calls are refused with a clear error (fail closed) and no
    call succeeds without its record."""
    port, echo_port = free_port(), free_port()
    upstream = _echo_server(echo_port)
    gw = start_gateway(tmp_path, _config(tmp_path, port, echo_port, max_bytes=200_000), port)
    succeeded: list[str] = []
    refusal: dict[str, object] | None = None
    try:
        with httpx.Client() as client:
            for i in range(3000):
                text = f"fill-{i}-" + "x" * 200
                response = echo(gw, text, client)
                if response.status_code == 200 and "result" in response.json():
                    succeeded.append(text)
                    continue
                refusal = response.json()
                break
            assert refusal is not None, "the store never filled"
            again = echo(gw, "one more", client)
            assert again.status_code == 503
    finally:
        gw.stop()
        upstream.terminate()
    assert refusal["error"]["data"]["code"] == "audit.unavailable"  # type: ignore[index]
    assert "audit trail" in refusal["error"]["message"]  # type: ignore[index]
    decided = {r["args_digest"] for r in records(gw) if r["phase"] == "decision"}
    assert all(digest({"text": t}) in decided for t in succeeded)
