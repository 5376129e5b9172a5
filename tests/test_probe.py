"""`bastion probe` against real gateways: the quickstart (every case holds, and the probe's own
agents are gone afterwards), a deliberately weakened policy (the probe names the weaknesses),
and the leaky workspace demo with `--allow-writes` (the canary planted in acme never reaches
globex). Plus the pure parts: case generation and verdicts.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import yaml
from tests.conftest import BASTION, free_port, start_gateway, wait_lists_complete
from tests.test_containment import leaky_quickstart
from tests.test_policy_gateway import quickstart

from bastion.control.probe.cases import generate
from bastion.control.probe.types import Case, Listing, Observation, Surface, ToolInfo
from bastion.control.probe.verdicts import judge
from bastion.control.registry.agents import AgentStatus
from bastion.control.registry.store import SqliteRegistry


def probe(config: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASTION, "probe", "--config", str(config), "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def verdicts(run: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    document = json.loads(run.stdout)
    return {case["name"]: case for case in document["cases"]}


def started(tmp: Path, text: str, port: int) -> Any:
    gw = start_gateway(tmp, text, port)
    try:
        wait_lists_complete(gw, ("/mcp",), {"Authorization": f"Bearer {gw.token('acme-admin')}"})
    except BaseException:
        gw.stop()
        raise
    return gw


# -- the quickstart -----------------------------------------------------------------------------


def test_the_quickstart_holds_every_case_and_leaves_no_probe_agent(tmp_path: Path) -> None:
    port = free_port()
    config = yaml.safe_load(quickstart(tmp_path, port))
    config.pop("audit")  # as `make run` has it: the cross-tenant detector suspends
    gw = started(tmp_path, yaml.safe_dump(config), port)
    try:
        began = time.monotonic()
        run = probe(gw.config_path, gw.base, "--json")
        seconds = time.monotonic() - began
        table = probe(gw.config_path, gw.base)
    finally:
        gw.stop()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
    found = verdicts(run)
    assert all(case["result"] == "held" for case in found.values())
    # Every family the issue names is there, for both directions between the tenants.
    for name in (
        "tenant-argument:acme->globex:tool:workspace__get_task:task_id:zero-width",
        "tenant-argument:globex->acme:prompt:workspace__summarize_project:project_id:fullwidth",
        "tenant-resource:globex->acme:workspace:uri:user-info",
        "foreign-session:acme->globex",
        "header-mismatch:mcp-name",
        "token:expired",
        "token:other-audience",
        "token:dpop-replayed-proof",
        "token:revoked",
        "malformed:oversized",
        "token:offboarded-agent",
    ):
        assert name in found, name
    assert (
        "tenant-binding"
        in found["tenant-argument:globex->acme:tool:workspace__get_task:task_id:percent-encoded"][
            "evidence"
        ]
    )
    assert "413" in found["malformed:oversized"]["observed"]
    assert len(found) >= 60 and seconds < 60
    assert table.returncode == 0 and re.search(r"\d+ held, 0 failed", table.stdout)

    # The probe's agents: more than one per tenant (none was ever pushed over the detector's
    # threshold, or later cases would have met 401s), all offboarded now; the demo agents
    # were never touched.
    document = json.loads(run.stdout)
    with SqliteRegistry(tmp_path / "state" / "registry.db", create=False) as registry:
        agents = {a.id: a for a in registry.list()}
    probes = [agents[i] for i in document["identities"]]
    assert len(probes) > 2
    assert all(a.purpose == "bastion probe" and a.expires_at is not None for a in probes)
    assert all(a.status is AgentStatus.OFFBOARDED for a in probes)
    for seeded in ("acme-reader", "acme-admin", "globex-reader"):
        assert agents[seeded].status is AgentStatus.ACTIVE


# -- a weakened policy --------------------------------------------------------------------------


def weakened(tmp: Path, port: int) -> str:
    """The quickstart without the tenant-binding forbid, and acme's grant widened to every
    workspace resource."""
    config = yaml.safe_load(quickstart(tmp, port))
    cedar = tmp / "policies" / "workspace.cedar"
    text = cedar.read_text()
    start = text.index('@id("tenant-binding")')
    end = text.index("};", start) + 2
    cedar.write_text(text[:start] + text[end:])
    for grant in config["policy"]["grants"]:
        if grant["id"] == "acme-read":
            grant["resources"] = ["workspace://*"]
    return yaml.safe_dump(config)


def test_a_weakened_policy_is_found_out_by_name(tmp_path: Path) -> None:
    port = free_port()
    gw = started(tmp_path, weakened(tmp_path, port), port)
    try:
        run = probe(gw.config_path, gw.base, "--json")
        junit = probe(gw.config_path, gw.base, "--junit")
    finally:
        gw.stop()
    assert run.returncode == 1, run.stderr
    found = verdicts(run)
    failed = {name for name, case in found.items() if case["result"] == "failed"}
    # Without the binding, globex names acme's tasks and projects; with the widened grant,
    # acme reads globex's resources.
    for name in (
        "tenant-argument:globex->acme:tool:workspace__get_task:task_id:plain",
        "tenant-argument:globex->acme:prompt:workspace__summarize_project:project_id:plain",
        "tenant-resource:acme->globex:workspace:uri:plain",
    ):
        assert name in failed, name
    # What still stands holds: acme's own forbid on task ids, globex's narrow resource grant.
    assert (
        found["tenant-argument:acme->globex:tool:workspace__get_task:task_id:plain"]["result"]
        == "held"
    )
    assert found["tenant-resource:globex->acme:workspace:uri:plain"]["result"] == "held"
    assert not any(n.startswith(("token:", "malformed:", "header-")) for n in failed)
    # Once the plain spelling got through, the other spellings are not sent again.
    assert "tenant-argument:globex->acme:tool:workspace__get_task:task_id:zero-width" not in found
    document = json.loads(run.stdout)
    assert (
        "tenant-argument:globex->acme:tool:workspace__get_task:task_id:zero-width: the plain "
        "spelling already failed" in document["skipped"]
    )
    # The upstream was asked: its answer withheld on the way back does not count as held.
    evidence = found["tenant-resource:acme->globex:workspace:uri:plain"]
    assert "inspection.foreign_tenant" in evidence["observed"]

    suite = ElementTree.fromstring(junit.stdout)  # noqa: S314 - our own output
    assert junit.returncode == 1
    failures = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    # (The first run got the upstream quarantined: its answers named the other tenant's ids.)
    assert failed <= set(failures) and suite.get("failures") == str(len(failures))


# -- the leaky demo, with writes ----------------------------------------------------------------


def test_the_canary_planted_in_acme_never_reaches_globex(tmp_path: Path) -> None:
    port = free_port()
    gw = started(tmp_path, leaky_quickstart(tmp_path, port), port)
    try:
        agents = ("--agent", "acme-admin", "--agent", "globex-reader")
        run = probe(gw.config_path, gw.base, *agents, "--allow-writes", "--json")
    finally:
        gw.stop()
    found = verdicts(run)
    canary = found["canary:acme->globex"]
    assert canary["result"] == "held", canary
    # Contained by the inspection stage: the leaky cache did hand acme's task to globex.
    assert "inspection.foreign_tenant" in canary["observed"]
    assert "own search did not find" not in canary["evidence"]
    assert run.returncode == 0, run.stdout[-4000:]
    # Writes were allowed: hidden write tools were called by name, and refused.
    assert found["hidden-tool:globex:workspace__delete_project"]["result"] == "held"
    assert "approval-bypass:acme:workspace__send_report:forged-state" in found


def test_the_canary_leak_is_a_failure_when_inspection_is_off(tmp_path: Path) -> None:
    port = free_port()
    gw = started(tmp_path, leaky_quickstart(tmp_path, port, tenants="off"), port)
    try:
        agents = ("--agent", "acme-admin", "--agent", "globex-reader")
        run = probe(gw.config_path, gw.base, *agents, "--allow-writes", "--json")
    finally:
        gw.stop()
    canary = verdicts(run)["canary:acme->globex"]
    assert canary["result"] == "failed", canary
    assert "leaked at $.result" in canary["evidence"]
    assert "bastion-probe-canary" not in canary["evidence"]  # paths, never the data
    assert run.returncode == 1


# -- usage --------------------------------------------------------------------------------------


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bastion.yaml"
    config.write_text(quickstart(tmp_path, free_port()))
    both = probe(config, "http://127.0.0.1:9", "--json", "--junit")
    assert both.returncode == 2 and "--json or --junit" in both.stderr
    nobody = probe(config, f"http://127.0.0.1:{free_port()}")
    assert nobody.returncode == 2 and "cannot open the registry" in nobody.stderr


# -- the pure parts -----------------------------------------------------------------------------


def _surface(**changes: Any) -> Surface:
    get_task = ToolInfo(
        "workspace__get_task",
        "workspace",
        {"properties": {"task_id": {"type": "string"}}, "required": ["task_id"]},
        True,
    )
    delete = ToolInfo(
        "workspace__delete_project",
        "workspace",
        {"properties": {"project_id": {"type": "string"}}, "required": ["project_id"]},
        False,
    )
    listing = Listing(tools=("workspace__get_task",))
    base = {
        "route": "/mcp",
        "other_route": "/servers/workspace/mcp",
        "tenants": ("acme", "globex"),
        "tenant_arguments": {"workspace": {"task_id": "{tenant}-t*", "project_id": "{tenant}-p*"}},
        "catalog": {get_task.name: get_task, delete.name: delete},
        "listings": {"acme": listing, "globex": listing},
    }
    return Surface(**{**base, **changes})


def test_cases_cover_every_ordered_pair_and_never_write_by_default() -> None:
    cases, skipped = generate(_surface())
    names = {c.name for c in cases}
    for pair in ("acme->globex", "globex->acme"):
        assert f"tenant-argument:{pair}:tool:workspace__get_task:task_id:plain" in names
        assert f"foreign-session:{pair}" in names
    assert not any("delete_project" in c.name for c in cases)
    assert "hidden-tool:acme:workspace__delete_project: not read-only (--allow-writes)" in skipped
    written, _ = generate(_surface(allow_writes=True))
    assert "hidden-tool:acme:workspace__delete_project" in {c.name for c in written}
    # The victim's id in each spelling; the call's other arguments name the caller's own.
    upper = next(
        c
        for c in cases
        if c.name.endswith("acme->globex:tool:workspace__get_task:task_id:upper-case")
    )
    assert upper.spec["params"]["arguments"] == {"task_id": "GLOBEX-t1"}


@pytest.mark.parametrize(
    ("seen", "held"),
    [
        (Observation(200, {"error": {"code": -32600, "data": {"code": "policy.denied"}}}), True),
        (Observation(200, {"error": {"code": -32603, "data": {"code": "upstream.error"}}}), False),
        (Observation(200, {"result": {"content": [], "isError": True}}), False),
        (Observation(500, None), False),
        (Observation(None, note="no answer: ReadTimeout"), False),
    ],
)
def test_a_refusal_must_come_from_the_gateway(seen: Observation, held: bool) -> None:
    case = Case("c", "call", "t", "e", "acme", "globex", crossing=True)
    assert judge(case, seen).held is held
