"""Configuration: every problem reported at once, each with its key path and line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bastion import config
from bastion.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BASTION = [sys.executable, "-m", "bastion.cli"]

BAD = """\
listen:
  host: 127.0.0.1
  port: 99999
upstreams:
  work_space:
    transport: http
    url: ftp://nowhere
  files:
    transport: stdio
    command: []
    colour: blue
virtual_servers:
  main:
    path: /mcp
    upstreams: [nothere]
"""


def test_quickstart_is_valid() -> None:
    settings = config.load(ROOT / "examples" / "quickstart.yaml")
    assert settings.auth.mode == "oauth" and settings.is_loopback()
    assert {a.id for a in settings.auth.agents} == {"acme-reader", "acme-admin", "globex-reader"}
    assert set(settings.upstreams) == {"workspace", "echo"}
    assert settings.upstreams["workspace"].credentials.mode == "mint"


def test_every_problem_with_path_and_line() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(BAD)
    problems = caught.value.problems
    text = "\n".join(problems)
    assert "listen.port (line 3)" in text
    assert "upstreams.work_space.url (line 7)" in text and "ftp://nowhere" in text
    assert "upstreams.files.command (line 10)" in text
    assert "upstreams.files.colour (line 11): unknown key" in text
    assert len(problems) >= 4


def test_references_are_checked() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(
            "upstreams:\n  a_b: {transport: http, url: 'http://127.0.0.1:1/mcp'}\n"
            "virtual_servers:\n  v: {path: /servers/x, upstreams: [zzz]}\n"
        )
    text = str(caught.value)
    assert "unknown upstream 'zzz'" in text
    assert "upstream name 'a_b'" in text
    assert "is reserved" in text


@pytest.mark.parametrize(
    ("text", "needle"),
    [("listen: [1, 2", "not valid YAML"), ("- just\n- a list\n", "expected a mapping")],
)
def test_not_yaml_or_not_a_mapping(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        config.parse(text)


def test_check_config_cli(tmp_path: Path) -> None:
    ok = subprocess.run(
        [*BASTION, "check-config", str(ROOT / "examples" / "quickstart.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    run = subprocess.run(
        [*BASTION, "check-config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 1
    assert "listen.port (line 3)" in run.stderr and "colour (line 11)" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "auth:\n  agents:\n    - {id: a, tenant: bastion, owner: o, purpose: p}\n",
            "auth.agents.0.tenant (line 3): tenant 'bastion' is reserved for the gateway itself",
        ),
        ("auth: {mode: none, tenant: bastion}\n", "tenant 'bastion' is reserved"),
    ],
    ids=["seed agent", "auth none"],
)
def test_the_gateways_own_tenant_is_reserved(text: str, needle: str) -> None:
    # The gateway lists upstreams as tenant 'bastion'; a real tenant of that name would share
    # its stdio processes and minted identity.
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config.parse(text)


def test_token_exchange_is_refused_under_auth_none() -> None:
    text = (
        "auth: {mode: none}\n"
        "upstreams:\n"
        "  crm:\n"
        "    transport: http\n"
        "    url: http://127.0.0.1:9/mcp\n"
        "    credentials: {mode: token_exchange, token_endpoint: 'http://127.0.0.1:9/token',"
        " client_id: bastion}\n"
    )
    with pytest.raises(ConfigError, match="upstream 'crm': credentials mode token_exchange needs"):
        config.parse(text)
    config.parse(text.replace("mode: none", "mode: oauth"))  # the same upstream is fine there


def test_auth_none_refused_off_loopback(tmp_path: Path) -> None:
    exposed = tmp_path / "exposed.yaml"
    exposed.write_text("listen: {host: 0.0.0.0, port: 0}\nauth: {mode: none}\n")
    check = subprocess.run(
        [*BASTION, "check-config", str(exposed)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 1 and "loopback" in check.stderr
    serve = subprocess.run(
        [*BASTION, "serve", "--config", str(exposed)], capture_output=True, text=True, timeout=30
    )
    assert serve.returncode == 1 and "refusing to start" in serve.stderr


def test_serve_warns_about_auth_none(tmp_path: Path) -> None:
    from tests.conftest import start_gateway

    gw = start_gateway(tmp_path, "listen: {host: 127.0.0.1, port: 0}\nauth: {mode: none}\n")
    try:
        assert "auth: none" in gw.log() and "loopback only" in gw.log()
    finally:
        gw.stop()


def test_launch_onto_a_busy_port_refuses_to_start(tmp_path: Path) -> None:
    """A launched upstream's port already held by something else: the gateway must not talk
    to whatever that is."""
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        cfg = tmp_path / "busy.yaml"
        cfg.write_text(
            "listen: {host: 127.0.0.1, port: 0}\n"
            "auth: {mode: none}\n"
            "upstreams:\n"
            f"  demo: {{transport: http, url: 'http://127.0.0.1:{port}/mcp',"
            f" launch: ['{sys.executable}', '-c', 'pass']}}\n"
        )
        run = subprocess.run(
            [*BASTION, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30
        )
    assert run.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("credentials", "needle"),
    [
        ("{mode: secret, secret: hunter2}", "literal secrets are refused"),
        (
            "{mode: token_exchange, token_endpoint: 'http://127.0.0.1:1/token', client_id: b,"
            " client_secret: plaintext}",
            "literal secrets are refused",
        ),
        ("{mode: secret}", "mode secret needs `secret`"),
        ("{mode: token_exchange}", "needs `token_endpoint` and `client_id`"),
    ],
)
def test_credentials_are_references_never_literals(credentials: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(
            "upstreams:\n  api:\n    transport: http\n    url: http://127.0.0.1:1/mcp\n"
            f"    credentials: {credentials}\n"
        )
    text = str(caught.value)
    assert "upstreams.api.credentials" in text and needle in text
    assert "hunter2" not in text and "plaintext" not in text


@pytest.mark.parametrize(
    "limits, named",
    [
        ({"max_sessions": 50}, "max_sessions_per_tenant (1000) exceeds max_sessions (50)"),
        (
            {"max_sessions_per_agent": 200, "max_sessions_per_tenant": 150},
            "max_sessions_per_agent (200) exceeds max_sessions_per_tenant (150)",
        ),
    ],
)
def test_session_quotas_must_nest(limits: dict[str, int], named: str) -> None:
    """A total below the per-tenant quota let one tenant hold every session there is."""
    from bastion.config import Limits

    with pytest.raises(ValueError, match=re.escape(named)):
        Limits.model_validate(limits)
    Limits.model_validate(
        {"max_sessions": 50, "max_sessions_per_tenant": 50, "max_sessions_per_agent": 5}
    )
