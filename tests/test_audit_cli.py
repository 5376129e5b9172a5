"""`bastion audit ...`: verify's exit codes, query filters, tail, and the export formats."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests.test_audit_record import sample
from typer.testing import CliRunner

from bastion.audit.chain import link
from bastion.audit.keys import DB_FILE, audit_dir
from bastion.audit.record import AuditRecord
from bastion.audit.trail import open_writer
from bastion.audit.writer import WriterOptions
from bastion.control.cli.audit import app

ROOT = Path(__file__).resolve().parent.parent
NOW = time.time()

# (tenant, agent, tool, decision, outcome, age in seconds)
TRAIL = [
    ("acme", "acme-reader", "workspace__search_tasks", "allow", None, 7200),
    ("acme", "acme-reader", "workspace__search_tasks", None, "ok", 7199),
    ("acme", "acme-admin", "workspace__delete_task", "deny", None, 1800),
    ("globex", "globex-reader", "workspace__search_tasks", "allow", None, 600),
    ("globex", "globex-reader", "workspace__search_tasks", None, "upstream_error", 599),
    ("acme", "acme-reader", "workspace__list_projects", "allow", None, 30),
]


def record(
    i: int, tenant: str, agent: str, tool: str, decision: Any, outcome: Any, age: float
) -> AuditRecord:
    return sample(
        i,
        time=NOW - age,
        tenant=tenant,
        agent=agent,
        tool_exposed=tool,
        tool_original=tool.split("__")[1],
        decision=decision,
        phase="decision" if decision else "outcome",
        outcome=outcome,
        policies=("acme-readers",) if decision else (),
        reason="no policy permits delete_task" if decision == "deny" else None,
        user=None if agent == "acme-admin" else "alice@example.com",
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config whose state_dir holds a small trail (checkpoint every 4 records and at stop)."""

    async def fill() -> None:
        writer = open_writer(tmp_path / "state", WriterOptions(checkpoint_every=4, linger=0))
        await writer.start()
        for i, row in enumerate(TRAIL):
            await writer.append(record(i, *row), durable=True)
        await writer.stop()

    asyncio.run(fill())
    path = tmp_path / "bastion.yaml"
    path.write_text("state_dir: state\n")
    return path


def run(*args: str | Path) -> Any:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def db(config: Path) -> sqlite3.Connection:
    return sqlite3.connect(audit_dir(config.parent / "state") / DB_FILE, isolation_level=None)


def test_verify_exits_0_on_an_intact_trail(config: Path) -> None:
    result = run("verify", "--config", config)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("intact: 6 records in 1 chain(s), 2 checkpoint(s)")
    data = json.loads(run("verify", "--config", config, "--json").stdout)
    assert data["ok"] is True and data["first"] is None
    (summary,) = data["writers"].values()
    assert summary["last_seq"] == 6 and summary["unsealed"] == 0


def test_verify_exits_1_naming_the_first_bad_record(config: Path) -> None:
    with db(config) as conn:
        wid = conn.execute("SELECT writer_id FROM entries LIMIT 1").fetchone()[0]
        conn.execute("UPDATE entries SET record = replace(record, 'deny', 'allow') WHERE seq = 3")
        conn.execute("DELETE FROM entries WHERE seq = 5")
    result = run("verify", "--config", config)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"TAMPERED: writer {wid} seq 3: modified: the record does not match its hash: altered"
    )
    assert any(f"writer {wid} seq 5: missing" in line for line in lines[1:])
    data = json.loads(run("verify", "--config", config, "--json").stdout)
    assert data["first"] == {
        "writer": wid,
        "seq": 3,
        "problem": "modified",
        "message": "the record does not match its hash: altered",
    }
    assert data["problem_count"] == 2


def test_verify_exits_2_when_there_is_no_trail(tmp_path: Path) -> None:
    path = tmp_path / "bastion.yaml"
    path.write_text("state_dir: nowhere\n")
    result = run("verify", "--config", path)
    assert result.exit_code == 2
    assert "no audit trail at" in result.stderr


def test_the_audit_directory_can_be_named_directly(config: Path) -> None:
    folder = audit_dir(config.parent / "state")
    assert run("verify", "--config", folder).exit_code == 0
    assert run("verify", "--config", folder / DB_FILE).exit_code == 0


def query_ids(config: Path, *options: str) -> list[str]:
    result = run("query", "--config", config, "--json", *options)
    assert result.exit_code == 0, result.output
    return [json.loads(line)["record"]["request_id"] for line in result.stdout.splitlines()]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ((), [0, 1, 2, 3, 4, 5]),
        (("--tenant", "globex"), [3, 4]),
        (("--agent", "acme-reader"), [0, 1, 5]),
        (("--tool", "workspace__search_tasks"), [0, 1, 3, 4]),
        (("--decision", "deny"), [2]),
        (("--phase", "outcome"), [1, 4]),
        (("--since", "1h"), [2, 3, 4, 5]),
        (("--since", "20m", "--until", "5m"), [3, 4]),
        (("--tenant", "acme", "--decision", "allow"), [0, 5]),
        (("--limit", "2"), [4, 5]),
        (("--tenant", "initech"), []),
    ],
)
def test_query_filters(config: Path, options: tuple[str, ...], expected: list[int]) -> None:
    assert query_ids(config, *options) == [f"req-{i}" for i in expected]


def test_query_takes_iso_8601_times_and_prints_a_table(config: Path) -> None:
    since = dt.datetime.fromtimestamp(NOW - 700, dt.UTC).isoformat()
    until = dt.datetime.fromtimestamp(NOW - 100, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert query_ids(config, "--since", since, "--until", until) == ["req-3", "req-4"]
    table = run("query", "--config", config, "--decision", "deny").stdout
    assert "acme-admin" in table and "no policy permits delete_task" in table
    assert "acme-reader" not in table
    bad = run("query", "--config", config, "--since", "yesterday")
    assert bad.exit_code == 2 and "--since: expected ISO 8601" in bad.stderr


def test_tail_prints_the_last_records_oldest_first(config: Path) -> None:
    lines = run("tail", "--config", config, "-n", "2").stdout.splitlines()
    assert len(lines) == 2
    assert "globex/globex-reader (alice@example.com)" in lines[0] and "upstream_error" in lines[0]
    assert ":6  decision  acme/acme-reader" in lines[1]


def test_tail_follow_prints_new_records(config: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bastion.control.cli.audit import app; app()",
         "tail", "--config", str(config), "-n", "1", "--json", "--follow", "--interval", "0.05"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = json.loads(proc.stdout.readline())
        assert first["seq"] == 6

        async def more() -> None:
            writer = open_writer(config.parent / "state")
            await writer.start()
            await writer.append(record(6, *TRAIL[0]), durable=True)
            await writer.stop()

        asyncio.run(more())
        following = json.loads(proc.stdout.readline())
        assert following["seq"] == 7 and following["record"]["request_id"] == "req-6"
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_export_jsonl_carries_what_is_needed_to_recheck_each_hash(
    config: Path, tmp_path: Path
) -> None:
    out = tmp_path / "trail.jsonl"
    result = run("export", "--config", config, "--format", "jsonl", "--output", out)
    assert result.exit_code == 0 and "exported 6 records" in result.stderr
    lines = out.read_bytes().splitlines()
    assert len(lines) == 6
    prev = "0" * 64
    for seq, line in enumerate(lines, start=1):
        item = orjson.loads(line)
        assert set(item) == {"writer", "seq", "prev_hash", "hash", "record"}
        assert item["seq"] == seq and item["prev_hash"] == prev
        canonical = orjson.dumps(item["record"], option=orjson.OPT_SORT_KEYS)
        assert link(prev, item["writer"], seq, canonical) == item["hash"]
        assert AuditRecord.from_json(canonical).request_id == f"req-{seq - 1}"
        prev = item["hash"]
    assert run("export", "--config", config).stdout.encode() == out.read_bytes()


def test_export_ocsf_api_activity(config: Path) -> None:
    result = run("export", "--config", config, "--format", "ocsf")
    assert result.exit_code == 0
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 6
    for event in events:
        assert event["class_uid"] == 6003 and event["category_uid"] == 6
        assert event["type_uid"] == 6003 * 100 + event["activity_id"]
        assert event["metadata"]["version"].startswith("1.")
        assert event["metadata"]["product"]["name"] == "Bastion"
        assert event["api"]["operation"] == "tools/call"
        assert event["api"]["service"]["name"] == "workspace"
        assert event["src_endpoint"] == {"ip": "127.0.0.1", "port": 50123}
        assert event["cloud"]["provider"]
    allow, ok, deny, _, failed, _ = events
    assert allow["time"] == int((NOW - 7200) * 1000)
    assert allow["status"] == "Success" and allow["disposition"] == "Allowed"
    assert allow["activity_id"] == 99 and allow["activity_name"] == "tools/call"
    assert allow["actor"]["user"] == {
        "uid": "alice@example.com",
        "type_id": 1,
        "type": "User",
        "org": {"uid": "acme"},
    }
    assert allow["actor"]["app_name"] == "acme-reader"
    assert allow["actor"]["authorizations"] == [
        {"decision": "allow", "policy": {"name": "acme-readers"}}
    ]
    assert allow["resources"] == [
        {"type": "tool", "name": "workspace__search_tasks", "uid": "search_tasks"}
    ]
    assert allow["unmapped"]["chain"]["seq"] == 1
    assert allow["unmapped"]["delegation"] == ["alice@example.com"]
    assert ok["status_id"] == 1 and ok["api"]["response"] == {"code": 0}
    assert deny["status"] == "Failure" and deny["disposition"] == "Blocked"
    assert deny["disposition_id"] == 2 and deny["severity_id"] == 3
    assert deny["status_detail"] == "no policy permits delete_task"
    assert deny["actor"]["user"]["type"] == "Agent"
    assert failed["status"] == "Failure" and failed["api"]["response"]["error"] == "upstream_error"


def test_a_record_that_does_not_parse_is_an_error_not_a_traceback(config: Path) -> None:
    with db(config) as conn:
        conn.execute("UPDATE entries SET record = '[1]' WHERE seq = 2")
    result = run("export", "--config", config, "--format", "ocsf")
    assert result.exit_code == 2
    assert "bastion audit verify" in result.stderr
