"""`bastion policy test|explain|lint|schema` on the quickstart config, with the demo servers'
real tool lists as the catalog; lint against policies written to be flagged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.conftest import EXAMPLES, demo_listings

BASTION = [sys.executable, "-m", "bastion.cli", "policy"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("policy-cli")
    catalog = tmp / "catalog.json"
    catalog.write_text(json.dumps(demo_listings()))
    return EXAMPLES / "quickstart.yaml", catalog


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BASTION, *args], capture_output=True, text=True, timeout=120)


def test_the_quickstart_cases_pass(setup: tuple[Path, Path]) -> None:
    config, catalog = setup
    done = run(
        "test",
        str(EXAMPLES / "policies" / "cases.yaml"),
        "-c",
        str(config),
        "--catalog",
        str(catalog),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 passed, 0 failed" in done.stdout


def test_a_wrong_expectation_fails(setup: tuple[Path, Path], tmp_path: Path) -> None:
    config, catalog = setup
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        yaml.safe_dump(
            {
                "cases": [
                    {
                        "name": "reader deletes",
                        "agent": "acme-reader",
                        "tool": "workspace__delete_project",
                        "arguments": {"project_id": "acme-p1"},
                        "expect": "allow",
                    },
                    {"name": "no agent", "tool": "workspace__get_task", "expect": "deny"},
                ]
            }
        )
    )
    done = run("test", str(cases), "-c", str(config), "--catalog", str(catalog))
    assert done.returncode == 1
    assert "FAIL  reader deletes: expected allow, got deny" in done.stdout
    assert "ERROR no agent: each case names an agent" in done.stdout
    assert "0 passed, 2 failed" in done.stdout


def test_explain_names_the_deciding_policy_and_its_text(setup: tuple[Path, Path]) -> None:
    config, catalog = setup

    def explain(agent: str, tool: str, arguments: str) -> subprocess.CompletedProcess[str]:
        return run(
            *("explain", "-c", str(config), "--catalog", str(catalog), "--agent", agent),
            *("--tool", tool, "--arguments", arguments),
        )

    done = explain("acme-admin", "workspace__delete_project", '{"project_id": "globex-p1"}')
    assert done.returncode == 1
    assert done.stdout.startswith("DENY: an argument names another tenant's")
    assert "tenant-binding (" in done.stdout and "forbid" in done.stdout
    allowed = explain("acme-reader", "workspace__get_task", '{"task_id": "acme-t1"}')
    assert allowed.returncode == 0
    assert allowed.stdout.startswith("ALLOW: acme agents read their workspace")
    default = explain(
        "acme-reader", "workspace__create_task", '{"project_id": "acme-p1", "title": "t"}'
    )
    assert "default deny" in default.stdout
    assert "no permit matched; the permits for this action and tenant were:" in default.stdout
    assert "grant:acme-admin-write" in default.stdout


def test_schema_shows_typed_tool_arguments(setup: tuple[Path, Path]) -> None:
    config, catalog = setup
    done = run("schema", "-c", str(config), "--catalog", str(catalog))
    assert done.returncode == 0, done.stderr
    assert 'action "workspace__get_task" in [Action::"call_tool"]' in done.stdout
    assert "task_id: String" in done.stdout


def test_lint_is_quiet_on_the_quickstart(setup: tuple[Path, Path]) -> None:
    config, catalog = setup
    done = run("lint", "-c", str(config), "--catalog", str(catalog))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 findings" in done.stdout


def test_lint_flags_what_it_should(setup: tuple[Path, Path], tmp_path: Path) -> None:
    _, catalog = setup
    shutil.copy(EXAMPLES / "quickstart.yaml", tmp_path / "bastion.yaml")
    (tmp_path / "policies").mkdir()
    ws, echo = 'Bastion::Action::"workspace__get_task"', 'Bastion::Action::"echo__echo"'
    acme = 'principal in Bastion::Tenant::"acme"'
    (tmp_path / "policies" / "workspace.cedar").write_text(
        f'@id("everyone") permit (principal, action == {ws}, resource);\n'
        f'@id("never") permit ({acme}, action == {ws}, resource) when {{ false }};\n'
        f'@id("wrong-type") permit ({acme}, action == {ws}, resource is Bastion::Prompt);\n'
        f'@id("shadowed") permit (principal in Bastion::Tenant::"globex", action == {echo},'
        " resource);\n"
        f'@id("no-echo") forbid (principal, action == {echo}, resource);\n'
        f'@id("scoped") permit ({acme}, action == {ws}, resource);\n'
    )
    done = run("lint", "-c", str(tmp_path / "bastion.yaml"), "--catalog", str(catalog))
    assert done.returncode == 1
    out = done.stdout
    assert "everyone (" in out and "cross-tenant" in out and "wildcard-principal" in out
    assert "never (" in out and "never-matches: its conditions are false" in out
    assert "wrong-type (" in out and "never take a resource of type Bastion::Prompt" in out
    assert "shadowed (" in out and "the unconditional forbid no-echo" in out
    assert "scoped (" not in out
    # Grants with tenant "*" are flagged as cross-tenant too (acme-echo and globex-echo are not).
    assert "grant:acme-echo" not in out


def test_missing_catalog_and_broken_policy_are_one_line_errors(tmp_path: Path) -> None:
    config = tmp_path / "bastion.yaml"
    config.write_text("state_dir: st\nauth: {mode: none}\n")
    done = run("lint", "-c", str(config))
    assert done.returncode == 2
    assert "no tool catalog at" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "bad.cedar").write_text("permit (principal, action, resource")
    (tmp_path / "catalog.json").write_text("{}")
    config.write_text("state_dir: st\nauth: {mode: none}\npolicy: {files: [bad.cedar]}\n")
    done = run("lint", "-c", str(config), "--catalog", str(tmp_path / "catalog.json"))
    assert done.returncode == 2
    assert "bad.cedar: not valid Cedar" in done.stderr and "Traceback" not in done.stderr


def test_check_config_reads_the_policy_files(tmp_path: Path) -> None:
    (tmp_path / "p.cedar").write_text('@rate("often") permit (principal, action, resource);\n')
    config = tmp_path / "bastion.yaml"
    config.write_text("auth: {mode: none}\npolicy: {files: [p.cedar]}\n")
    done = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "p.cedar policy 0: @rate: expected a rate like '10/minute', found 'often'" in done.stderr
