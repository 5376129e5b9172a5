"""`bastion agents ...`: each command in-process (CliRunner), and across a real process boundary."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from bastion.control.cli.agents import app
from bastion.control.registry.agents import AgentStatus
from bastion.control.registry.store import SqliteRegistry
from bastion.control.registry.view import RegistryView
from bastion.identity import keys

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


def run(*args: str | Path) -> Any:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert "Traceback" not in result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def public_pem(public: Any, tmp_path: Path, name: str = "key.pem") -> Path:
    path = tmp_path / name
    path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def add(db: Path, agent_id: str, key: Path, *extra: str | Path) -> Any:
    return run(
        "add", agent_id, "--registry", db, "--tenant", "acme", "--owner", "team-payments",
        "--purpose", "Reconciles invoices", "--public-key-pem", key, *extra,
    )  # fmt: skip


def show(db: Path, agent_id: str) -> dict[str, Any]:
    result = run("show", agent_id, "--registry", db, "--json")
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture
def key_pem(tmp_path: Path) -> Path:
    return public_pem(keys.generate("ES256").private.public_key(), tmp_path)


# --- add ---


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
def test_add_builds_the_jwk_from_a_pem_public_key(db: Path, tmp_path: Path, alg: str) -> None:
    signing = keys.generate(alg)  # kid: the thumbprint, computed by the identity module
    result = add(db, "billing-bot", public_pem(signing.private.public_key(), tmp_path))
    assert result.exit_code == 0, result.stderr
    assert f"added agent 'billing-bot' to tenant 'acme' (keys: {signing.kid})" in result.stdout
    (jwk,) = show(db, "billing-bot")["jwks"]["keys"]
    expected = signing.public_jwk()
    assert jwk["kid"] == signing.kid
    assert {k: jwk[k] for k in ("kty", "crv", "x", "y", "n", "e") if k in jwk} == {
        k: expected[k] for k in ("kty", "crv", "x", "y", "n", "e") if k in expected
    }
    assert jwk["use"] == "sig" and "d" not in jwk
    assert jwk.get("alg") == (None if alg == "RS256" else alg)


def test_add_records_every_option(db: Path, key_pem: Path) -> None:
    result = add(
        db, "billing-bot", key_pem, "--display-name", "Billing bot", "--environment", "prod",
        "--audience", "https://gw.example/mcp/billing", "--audience", "https://gw.example/mcp/crm",
        "--scope", "mcp:tools", "--require-dpop", "--expires", "2099-12-31",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    agent = show(db, "billing-bot")
    expires = dt.datetime(2099, 12, 31, tzinfo=dt.UTC).timestamp()
    assert {k: agent[k] for k in agent if k not in ("jwks", "created_at")} == {
        "id": "billing-bot",
        "display_name": "Billing bot",
        "owner": "team-payments",
        "tenant": "acme",
        "purpose": "Reconciles invoices",
        "environment": "prod",
        "spiffe_id": None,
        "audiences": ["https://gw.example/mcp/billing", "https://gw.example/mcp/crm"],
        "scopes": ["mcp:tools"],
        "require_dpop": True,
        "expires_at": expires,
        "status": "active",
        "last_used_at": None,
        "status_reason": None,
    }


def test_add_defaults(db: Path, key_pem: Path) -> None:
    assert add(db, "bot", key_pem).exit_code == 0
    agent = show(db, "bot")
    assert (agent["display_name"], agent["environment"], agent["audiences"]) == ("bot", "dev", [])
    assert (agent["require_dpop"], agent["expires_at"]) == (False, None)


def test_add_with_a_jwks_file_fills_missing_kids(db: Path, tmp_path: Path) -> None:
    first, second = keys.generate("ES256"), keys.generate("EdDSA")
    anonymous = {k: v for k, v in first.public_jwk().items() if k != "kid"}
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [anonymous, second.public_jwk()]}))
    result = run(
        "add", "bot", "--registry", db, "--tenant", "acme", "--owner", "o", "--purpose", "p",
        "--jwks-file", jwks_file,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    kids = [k["kid"] for k in show(db, "bot")["jwks"]["keys"]]
    assert kids == [first.kid, second.kid]


def test_add_with_a_spiffe_id_only(db: Path) -> None:
    result = run(
        "add", "svid-bot", "--registry", db, "--tenant", "acme", "--owner", "o", "--purpose", "p",
        "--spiffe-id", "spiffe://acme.example/ns/prod/sa/bot",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "spiffe id: spiffe://acme.example/ns/prod/sa/bot" in result.stdout
    assert show(db, "svid-bot")["jwks"] == {}


def _add_error(db: Path, tmp_path: Path, case: str) -> Any:
    base: list[str | Path] = ["add", "bot", "--registry", db, "--tenant", "acme"]
    base += ["--owner", "o", "--purpose", "p"]
    pem = public_pem(keys.generate("ES256").private.public_key(), tmp_path)
    if case == "no key":
        return run(*base)
    if case == "two key sources":
        jwks = tmp_path / "jwks.json"
        jwks.write_text(json.dumps({"keys": [keys.generate().public_jwk()]}))
        return run(*base, "--public-key-pem", pem, "--jwks-file", jwks)
    if case == "private key PEM":
        private = tmp_path / "private.pem"
        private.write_bytes(keys.generate("ES256").private_pem())
        return run(*base, "--public-key-pem", private)
    if case == "P-384 key":
        p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
        return run(*base, "--public-key-pem", public_pem(p384, tmp_path, "p384.pem"))
    if case == "not a PEM":
        junk = tmp_path / "junk.pem"
        junk.write_text("hello")
        return run(*base, "--public-key-pem", junk)
    if case == "missing file":
        return run(*base, "--public-key-pem", tmp_path / "absent.pem")
    if case == "JWKS not JSON":
        junk = tmp_path / "junk.json"
        junk.write_text("{nope")
        return run(*base, "--jwks-file", junk)
    if case == "JWKS of the wrong shape":
        junk = tmp_path / "list.json"
        junk.write_text("[1, 2]")
        return run(*base, "--jwks-file", junk)
    if case == "past expiry":
        return run(*base, "--public-key-pem", pem, "--expires", "2001-01-01")
    if case == "bad expiry":
        return run(*base, "--public-key-pem", pem, "--expires", "next tuesday")
    if case == "bad tenant":
        return run(*base[:5], "Acme Corp", *base[6:], "--public-key-pem", pem)
    if case == "bad scope":
        return run(*base, "--public-key-pem", pem, "--scope", 'a"b')
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no key", "give the agent a key: --jwks-file, --public-key-pem or --spiffe-id"),
        ("two key sources", "give exactly one of --jwks-file and --public-key-pem"),
        ("private key PEM", "holds a private key; register its public half only"),
        ("P-384 key", "expected an EC P-256, Ed25519 or RSA public key"),
        ("not a PEM", "expected a PEM public key"),
        ("missing file", "absent.pem: cannot read it (No such file or directory)"),
        ("JWKS not JSON", "--jwks-file"),
        ("JWKS of the wrong shape", "expected a JWK Set"),
        ("past expiry", "--expires: 2001-01-01 is in the past"),
        ("bad expiry", "--expires: expected YYYY-MM-DD or ISO 8601"),
        ("bad tenant", "tenant: expected"),
        ("bad scope", "scopes: expected RFC 6749"),
    ],
)
def test_add_errors_exit_1_with_a_message(
    db: Path, tmp_path: Path, case: str, message: str
) -> None:
    result = _add_error(db, tmp_path, case)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "BEGIN" not in result.stderr  # never echoes key material


def test_bad_input_creates_no_registry_file(db: Path, tmp_path: Path) -> None:
    assert _add_error(db, tmp_path, "private key PEM").exit_code == 1
    assert not db.exists()


def test_adding_an_existing_id_fails(db: Path, key_pem: Path) -> None:
    assert add(db, "bot", key_pem).exit_code == 0
    result = add(db, "bot", key_pem)
    assert result.exit_code == 1
    assert "error: id: agent 'bot' already exists" in result.stderr


def test_an_unknown_environment_is_a_usage_error(db: Path, key_pem: Path) -> None:
    result = add(db, "bot", key_pem, "--environment", "production")
    assert result.exit_code == 2  # click's status for usage errors
    assert "'production' is not one of 'dev', 'staging', 'prod'" in result.stderr


# --- list and show ---


@pytest.fixture
def populated(db: Path, tmp_path: Path, key_pem: Path) -> Path:
    assert add(db, "zeta-bot", key_pem).exit_code == 0
    assert add(db, "alpha-bot", key_pem, "--expires", "2099-01-01").exit_code == 0
    other = run(
        "add", "crm-bot", "--registry", db, "--tenant", "globex", "--owner", "crm-team",
        "--purpose", "[bold]CRM[/bold] sync", "--public-key-pem", key_pem,
    )  # fmt: skip
    assert other.exit_code == 0, other.stderr
    assert run("suspend", "zeta-bot", "--registry", db, "--reason", "audit").exit_code == 0
    return db


def test_list_prints_a_table(populated: Path) -> None:
    result = run("list", "--registry", populated)
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "-bot" in line]
    assert [line.split()[1] for line in lines] == ["alpha-bot", "zeta-bot", "crm-bot"]
    assert "2099-01-01T00:00:00Z" in lines[0] and "suspended" in lines[1]


def test_list_json_and_filters(populated: Path) -> None:
    def ids(*args: str) -> list[str]:
        result = run("list", "--registry", populated, "--json", *args)
        assert result.exit_code == 0, result.stderr
        return [agent["id"] for agent in json.loads(result.stdout)]

    assert ids() == ["alpha-bot", "zeta-bot", "crm-bot"]
    assert ids("--tenant", "globex") == ["crm-bot"]
    assert ids("--status", "suspended") == ["zeta-bot"]
    assert ids("--tenant", "globex", "--status", "suspended") == []
    assert "no agents match" in run("list", "--registry", populated, "--tenant", "x").stdout


def test_show_prints_details_without_interpreting_markup(populated: Path) -> None:
    result = run("show", "crm-bot", "--registry", populated)
    assert result.exit_code == 0, result.stderr
    assert "[bold]CRM[/bold] sync" in result.stdout
    assert "any route of this gateway" in result.stdout
    kid = show(populated, "crm-bot")["jwks"]["keys"][0]["kid"]
    assert f"{kid} (EC P-256)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "ghost"], "error: no agent 'ghost'"),
        (["suspend", "ghost", "--reason", "r"], "error: no agent 'ghost'"),
        (["resume", "ghost"], "error: no agent 'ghost'"),
        (["offboard", "ghost", "--reason", "r"], "error: no agent 'ghost'"),
    ],
)
def test_unknown_agents_exit_1(populated: Path, args: list[str], message: str) -> None:
    result = run(*args, "--registry", populated)
    assert result.exit_code == 1
    assert message in result.stderr


@pytest.mark.parametrize("command", [["list"], ["show", "bot"], ["resume", "bot"]])
def test_commands_other_than_add_need_an_existing_registry(
    tmp_path: Path, command: list[str]
) -> None:
    result = run(*command, "--registry", tmp_path / "typo.db")
    assert result.exit_code == 1
    assert "error: no registry at" in result.stderr
    assert not (tmp_path / "typo.db").exists()


# --- lifecycle ---


def test_suspend_resume_offboard(populated: Path) -> None:
    result = run("suspend", "alpha-bot", "--registry", populated, "--reason", "rotating owner")
    assert result.exit_code == 0 and "suspended agent 'alpha-bot': rotating owner" in result.stdout
    assert show(populated, "alpha-bot")["status_reason"] == "rotating owner"
    assert run("resume", "alpha-bot", "--registry", populated).exit_code == 0
    assert show(populated, "alpha-bot")["status"] == "active"

    again = run("resume", "alpha-bot", "--registry", populated)
    assert again.exit_code == 1 and "already active" in again.stderr

    result = run("offboard", "alpha-bot", "--registry", populated, "--reason", "project ended")
    assert result.exit_code == 0, result.stderr
    for args in (["resume"], ["suspend", "--reason", "x"], ["offboard", "--reason", "x"]):
        refused = run(args[0], "alpha-bot", *args[1:], "--registry", populated)
        assert refused.exit_code == 1
        assert "is offboarded, which is final" in refused.stderr
    assert show(populated, "alpha-bot")["status"] == "offboarded"


def test_suspend_needs_a_reason(populated: Path) -> None:
    assert run("suspend", "alpha-bot", "--registry", populated).exit_code == 2
    blank = run("suspend", "alpha-bot", "--registry", populated, "--reason", " ")
    assert blank.exit_code == 1 and "reason: expected non-empty text" in blank.stderr


def test_rotate_key(populated: Path, tmp_path: Path) -> None:
    new = keys.generate("EdDSA")
    pem = public_pem(new.private.public_key(), tmp_path, "new.pem")
    result = run("rotate-key", "alpha-bot", "--registry", populated, "--public-key-pem", pem)
    assert result.exit_code == 0, result.stderr
    assert f"rotated the keys of agent 'alpha-bot' (keys: {new.kid})" in result.stdout
    assert [k["kid"] for k in show(populated, "alpha-bot")["jwks"]["keys"]] == [new.kid]

    both = tmp_path / "both.json"
    old = keys.generate("ES256")
    both.write_text(json.dumps({"keys": [old.public_jwk(), new.public_jwk()]}))
    assert (
        run("rotate-key", "alpha-bot", "--registry", populated, "--jwks-file", both).exit_code == 0
    )
    assert [k["kid"] for k in show(populated, "alpha-bot")["jwks"]["keys"]] == [old.kid, new.kid]


def test_rotate_key_errors(populated: Path, tmp_path: Path) -> None:
    none = run("rotate-key", "alpha-bot", "--registry", populated)
    assert none.exit_code == 1 and "exactly one of --jwks-file and --public-key-pem" in none.stderr
    private = tmp_path / "private.pem"
    private.write_bytes(keys.generate("ES256").private_pem())
    leak = run("rotate-key", "alpha-bot", "--registry", populated, "--public-key-pem", private)
    assert leak.exit_code == 1 and "holds a private key" in leak.stderr
    jwk_with_d = tmp_path / "d.json"
    jwk_with_d.write_text(json.dumps({**keys.generate().public_jwk(), "d": "AAAA"}))
    bad = run("rotate-key", "alpha-bot", "--registry", populated, "--jwks-file", jwk_with_d)
    assert bad.exit_code == 1 and "jwks.keys[0]: expected a public JWK" in bad.stderr


# --- across a real process boundary ---


def cli_process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    code = "from bastion.control.cli.agents import app; app()"
    return subprocess.run(
        [sys.executable, "-c", code, *[str(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_a_cli_process_change_reaches_the_gateway_view_on_the_next_refresh(
    populated: Path,
) -> None:
    with SqliteRegistry(populated) as gateway:
        view = RegistryView(gateway)
        assert view.refresh() is False
        done = cli_process("suspend", "alpha-bot", "--registry", populated, "--reason", "alert")
        assert done.returncode == 0, done.stderr
        assert view.refresh() is True
        agent = view.agent("alpha-bot")
        assert agent is not None and agent.status is AgentStatus.SUSPENDED
        assert agent.usable(dt.datetime.now(dt.UTC).timestamp()) == (False, "suspended")


def test_a_cli_process_error_is_one_line_without_traceback(populated: Path) -> None:
    done = cli_process("show", "ghost", "--registry", populated)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == "error: no agent 'ghost'\n"
