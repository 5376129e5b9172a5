"""The production listener: TLS from files, reloaded as they change (the next connection gets
the new certificate, one already open keeps working, a broken pair keeps the one in use), and
the graceful shutdown on SIGTERM (not ready at once, answers in progress finish, event streams
are told to reconnect, what is left at the deadline is cut, exit status 0).

Certificates are made here at test time: a test CA and leaf certificates it signs."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.conftest import (
    ACCEPT_BOTH,
    ALLOW_ALL_YAML,
    BASTION,
    GatewayProcess,
    free_port,
    legacy_session,
    modern_body,
    modern_headers,
    start_gateway,
    until,
    until_async,
    wait_lists_complete,
)

from bastion.asgi import Receive, Scope, Send
from bastion.background import Background
from bastion.config import Tls, parse
from bastion.errors import ConfigError
from bastion.transport.response import RECONNECT
from bastion.transport.server import HttpServer
from bastion.transport.tls import Certificates, load_context

# -- certificates made at test time -----------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Authority:
    """A test CA issuing leaf certificates for 127.0.0.1 with chosen serial numbers."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bastion test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.name = name
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, serial: int) -> tuple[bytes, bytes]:
        """A leaf certificate (PEM) and its key (PEM) for 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def client(self) -> ssl.SSLContext:
        """A client context trusting only this CA (hostname checked: 127.0.0.1)."""
        return ssl.create_default_context(cadata=self.pem.decode())


def install(folder: Path, cert: bytes, key: bytes, mode: int = 0o600) -> Tls:
    """Write the pair the way a rotation does (a new file renamed over the old one)."""
    for name, data, file_mode in (("tls.crt", cert, 0o644), ("tls.key", key, mode)):
        temporary = folder / f".{name}.new"
        temporary.write_bytes(data)
        temporary.chmod(file_mode)
        os.replace(temporary, folder / name)
    return Tls(cert=str(folder / "tls.crt"), key=str(folder / "tls.key"), reload_seconds=0.05)


# -- TLS in process -----------------------------------------------------------------------------


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every request with its path."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello " + scope["path"].encode()})


@dataclass
class Listener:
    """A TLS HttpServer whose certificate is watched, as `serve` runs it."""

    port: int
    certificates: Certificates
    refused: list[str]


@pytest.fixture
def authority() -> Authority:
    return Authority()


@pytest.fixture
async def listener(tmp_path: Path, authority: Authority) -> AsyncIterator[Listener]:
    tls = install(tmp_path, *authority.issue(1001))
    refused: list[str] = []

    async def failed(reason: str) -> None:
        refused.append(reason)

    certificates = Certificates(tls, failed)
    background = Background()
    background.add(certificates.watch.name, certificates.watch.run)
    await background.start()
    server = HttpServer(hello, max_body=100, tls=certificates.listener)
    port = await server.start("127.0.0.1", 0)
    try:
        yield Listener(port, certificates, refused)
    finally:
        await server.stop(grace=1)
        await background.stop()


async def connect(
    port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
    )


def served_serial(writer: asyncio.StreamWriter) -> int:
    """The serial number of the certificate the server presented on this connection."""
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return int(x509.load_der_x509_certificate(der).serial_number)


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One keep-alive GET on an open connection; the response body."""
    writer.write(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        assert head.startswith(b"HTTP/1.1 200"), head
        return await reader.readexactly(length)


async def test_rotated_certificate_reaches_the_next_connection_not_the_open_one(
    tmp_path: Path, authority: Authority, listener: Listener
) -> None:
    client = authority.client()
    old_reader, old_writer = await connect(listener.port, client)
    assert served_serial(old_writer) == 1001
    assert b"/hello" in await get(old_reader, old_writer)

    install(tmp_path, *authority.issue(2002))
    await until_async(lambda: listener.certificates.serial == 2002, "the new pair loaded")

    reader, writer = await connect(listener.port, client)
    assert served_serial(writer) == 2002  # the new connection presents the new certificate
    assert b"/hello" in await get(reader, writer)
    # The connection opened before the rotation kept its certificate and keeps working.
    assert b"/hello" in await get(old_reader, old_writer)
    assert served_serial(old_writer) == 1001
    for w in (old_writer, writer):
        w.close()


async def test_broken_new_pair_keeps_the_certificate_in_use(
    tmp_path: Path, authority: Authority, listener: Listener
) -> None:
    cert, _ = authority.issue(3003)
    _, other_key = authority.issue(3004)
    install(tmp_path, cert, other_key)  # a certificate with a key that is not its own
    await until_async(lambda: listener.refused, "the broken pair refused")
    assert "does not match the certificate" in listener.refused[0]
    assert str(tmp_path / "tls.key") in listener.refused[0]

    reader, writer = await connect(listener.port, authority.client())
    assert served_serial(writer) == 1001  # still the pair in use before
    assert b"/hello" in await get(reader, writer)
    writer.close()

    install(tmp_path, *authority.issue(3005))  # the rotation completed: taken into use
    await until_async(lambda: listener.certificates.serial == 3005, "the mended pair loaded")


async def test_alpn_is_http_1_1(authority: Authority, listener: Listener) -> None:
    client = authority.client()
    client.set_alpn_protocols(["h2", "http/1.1"])
    reader, writer = await connect(listener.port, client)
    # A client offering h2 first is held to HTTP/1.1, the only protocol the server speaks.
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    writer.close()


async def test_tls_below_1_2_is_refused(authority: Authority, listener: Listener) -> None:
    client = authority.client()
    client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await connect(listener.port, client)


def test_world_readable_key_is_refused_naming_it(tmp_path: Path, authority: Authority) -> None:
    tls = install(tmp_path, *authority.issue(1), mode=0o644)
    with pytest.raises(ConfigError) as caught:
        load_context(tls)
    assert caught.value.problems == [
        f"listen.tls.key: {tls.key} is readable by every user (mode 644); expected it "
        f"readable by the gateway's user only (chmod 600 {tls.key})"
    ]


@pytest.mark.parametrize(
    ("which", "content", "expected"),
    [
        ("tls.crt", b"not a certificate", "listen.tls.cert: {cert} holds no PEM certificate"),
        ("tls.key", b"not a key", "listen.tls.key: {key} holds no PEM private key"),
    ],
)
def test_unreadable_pair_names_the_file(
    tmp_path: Path, authority: Authority, which: str, content: bytes, expected: str
) -> None:
    tls = install(tmp_path, *authority.issue(1))
    (tmp_path / which).write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_context(tls)
    assert caught.value.problems[0].startswith(expected.format(cert=tls.cert, key=tls.key))


def test_tls_paths_resolve_against_the_config_file_and_urls_say_https(tmp_path: Path) -> None:
    settings = parse(
        "listen: {port: 8443, tls: {cert: certs/a.crt, key: certs/a.key}, drain_seconds: 3}\n",
        base=tmp_path,
    )
    assert settings.listen.tls is not None
    assert settings.listen.tls.cert == str(tmp_path / "certs" / "a.crt")
    assert settings.listen.tls.key == str(tmp_path / "certs" / "a.key")
    assert settings.listen.drain_seconds == 3
    assert settings.base_url() == "https://127.0.0.1:8443"


def test_serve_with_a_bad_key_exits_1_naming_it(tmp_path: Path, authority: Authority) -> None:
    tls = install(tmp_path, *authority.issue(1), mode=0o644)
    config = tmp_path / "bastion.yaml"
    config.write_text(
        f"listen: {{port: {free_port()}, tls: {{cert: tls.crt, key: tls.key}}}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    run = subprocess.run(
        [*BASTION, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert f"listen.tls.key: {tls.key} is readable by every user" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    check = subprocess.run(
        [*BASTION, "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 1
    assert f"listen.tls.key: {tls.key} is readable by every user" in check.stderr


# -- the drain, in process ------------------------------------------------------------------


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection (bounded)."""
    async with asyncio.timeout(10):
        return await reader.read()


async def test_drain_closes_idle_connections_and_every_answer_closes_its_own() -> None:
    release = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/slow":
            await hello(scope, receive, send)
            return
        # Its head (keep-alive) goes out before the drain, its end after.
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first ", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"last"})

    server = HttpServer(app, max_body=100)
    port = await server.start("127.0.0.1", 0)
    try:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        assert await get(idle_reader, idle_writer) == b"hello /hello"  # now idle, kept alive
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
        slow_writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            head = await slow_reader.readuntil(b"\r\n\r\n")
        assert b"connection: close" not in head.lower()

        draining = asyncio.create_task(server.drain(30))
        assert await read_all(idle_reader) == b""  # the idle connection closed at once
        # Still listening while draining: a new request is answered, and its connection closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await read_all(reader)
        assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()
        assert not draining.done()  # /slow is still in progress
        release.set()
        # Answered whole (the last chunk), then its connection closed, though kept alive.
        assert (await read_all(slow_reader)).endswith(b"last\r\n0\r\n\r\n")
        assert await draining == 0  # nothing had to be cut
        for w in (idle_writer, slow_writer, writer):
            w.close()
    finally:
        await server.stop(grace=1)


def test_serve_over_tls_says_https_and_answers_over_it(
    tmp_path: Path, authority: Authority
) -> None:
    install(tmp_path, *authority.issue(4004))
    port = free_port()
    config = tmp_path / "bastion.yaml"
    config.write_text(
        f"listen: {{port: {port}, tls: {{cert: tls.crt, key: tls.key}}}}\n"
        f"auth: {{mode: none, tenant: acme, agent: test-agent}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*BASTION, "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    gateway = GatewayProcess(proc, port, log, config)
    try:
        with httpx.Client(verify=authority.client(), timeout=2) as client:

            def ready() -> bool:
                assert proc.poll() is None, gateway.log()
                try:
                    return client.get(f"https://127.0.0.1:{port}/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            until(ready, "the gateway ready over TLS", seconds=60)
            with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer from a TLS port
                httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
        until(lambda: f"Bastion is ready on https://127.0.0.1:{port}" in gateway.log(), "banner")
        proc.send_signal(signal.SIGTERM)
        assert exit_status(gateway) == 0
    finally:
        gateway.stop()


# -- graceful shutdown of a real `bastion serve` -------------------------------------------------

# A stdio upstream whose one tool answers only once the test releases it.
SLOW_UPSTREAM = """
import asyncio, pathlib, sys
from mcp.server.mcpserver import Context, MCPServer

gate = pathlib.Path(sys.argv[1])
mcp = MCPServer(name="slow", version="0", log_level="WARNING")

@mcp.tool(description="Answer once the test releases the gate.", structured_output=False)
async def hold(ctx: Context) -> str:
    await ctx.report_progress(0, 1)  # sent when the call asked for progress
    (gate / "started").touch()
    while not (gate / "release").exists():
        await asyncio.sleep(0.02)  # polls a file the test writes
    return "released"

mcp.run("stdio")
"""


def slow_gateway(tmp: Path, drain_seconds: float) -> GatewayProcess:
    """A gateway before the slow upstream, drained for `drain_seconds` on SIGTERM."""
    script = tmp / "slow_upstream.py"
    script.write_text(SLOW_UPSTREAM)
    port = free_port()
    config = f"""
listen: {{host: 127.0.0.1, port: {port}, drain_seconds: {drain_seconds}}}
auth: {{mode: none, tenant: acme, agent: test-agent}}
state_dir: {tmp / "state"}
limits: {{sse_keepalive_seconds: 1}}
{ALLOW_ALL_YAML}upstreams:
  slow:
    transport: stdio
    command: ["{sys.executable}", "{script}", "{tmp}"]
    timeout_seconds: 120
virtual_servers:
  default: {{path: /mcp, upstreams: [slow]}}
"""
    gateway = start_gateway(tmp, config, port)
    wait_lists_complete(gateway, ("/mcp",))
    return gateway


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def call_hold(gateway: GatewayProcess) -> httpx.Response:
    return httpx.post(
        gateway.url("/mcp"),
        json=modern_body("tools/call", {"name": "slow__hold", "arguments": {}}),
        headers=modern_headers("tools/call", "slow__hold"),
        timeout=60,
    )


def readiness(gateway: GatewayProcess) -> int | None:
    """The status /readyz answers now; None when nothing answers."""
    try:
        return httpx.get(gateway.url("/readyz"), timeout=2).status_code
    except httpx.HTTPError:
        return None


def exit_status(gateway: GatewayProcess) -> int:
    try:
        return gateway.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        gateway.proc.kill()
        raise AssertionError("the gateway did not exit:\n" + gateway.log()) from None


def test_sigterm_lets_the_call_in_flight_finish_while_not_ready(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    gateway = slow_gateway(tmp_path, drain_seconds=60)
    try:
        answer: Future[httpx.Response] = pool.submit(call_hold, gateway)
        until(lambda: (tmp_path / "started").exists(), "the call at the upstream")
        gateway.proc.send_signal(signal.SIGTERM)
        # Draining: still listening, so the balancer's health check sees "not ready".
        until(lambda: readiness(gateway) == 503, "/readyz to answer 503 while draining")
        assert gateway.proc.poll() is None  # the call in flight holds the exit
        (tmp_path / "release").touch()
        response = answer.result(timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["result"]["content"][0]["text"] == "released"
        assert exit_status(gateway) == 0
        assert "every answer in progress was sent" in gateway.log()
    finally:
        gateway.stop()


def read_stream(response: httpx.Response, lines: list[str]) -> None:
    """Collect an event stream's lines until it ends (raising if it ends unclean)."""
    for line in response.iter_lines():
        lines.append(line)


def test_sigterm_tells_an_open_get_stream_to_reconnect(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    gateway = slow_gateway(tmp_path, drain_seconds=60)
    try:
        with httpx.Client(timeout=30) as client:
            session = legacy_session(client, gateway.url("/mcp"))
            headers = {**session, "Accept": "text/event-stream"}
            with client.stream("GET", gateway.url("/mcp"), headers=headers) as response:
                assert response.status_code == 200
                lines: list[str] = []
                reading = pool.submit(read_stream, response, lines)
                until(lambda: any(line.startswith("id:") for line in lines), "the priming event")
                gateway.proc.send_signal(signal.SIGTERM)
                reading.result(timeout=30)  # the stream ended cleanly (a whole chunked body)
        hint = RECONNECT.decode().strip()
        assert hint in lines, lines
        # The hint carries no id: the client resumes from the last event it got.
        after = lines[lines.index(hint) :]
        assert not any(line.startswith("id:") for line in after), lines
        assert exit_status(gateway) == 0
    finally:
        gateway.stop()


def test_past_the_deadline_a_call_that_never_ends_is_cut_and_the_process_exits(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    gateway = slow_gateway(tmp_path, drain_seconds=1)
    try:
        answer: Future[httpx.Response] = pool.submit(call_hold, gateway)
        until(lambda: (tmp_path / "started").exists(), "the call at the upstream")
        gateway.proc.send_signal(signal.SIGTERM)  # the gate is never released
        assert exit_status(gateway) == 0
        with pytest.raises(httpx.HTTPError):
            answer.result(timeout=30)  # its connection was cut
        log = gateway.log()
        assert "1 connection(s) with answers still in progress after 1.0 s were cut" in log, log
        assert "Traceback" not in log
    finally:
        gateway.stop()


def test_an_event_stream_cut_at_the_deadline_gets_the_hint(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    """A legacy call answered as a session's SSE stream that outlives the drain: the client
    is told to reconnect (and resume the stream with Last-Event-ID) rather than dropped."""
    gateway = slow_gateway(tmp_path, drain_seconds=1)
    try:
        with httpx.Client(timeout=30) as client:
            session = legacy_session(client, gateway.url("/mcp"))
            body = {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                # Progress before the answer: the call is answered as an event stream.
                "params": {"name": "slow__hold", "arguments": {}, "_meta": {"progressToken": 1}},
            }
            headers = {**session, "Accept": ACCEPT_BOTH}
            with client.stream("POST", gateway.url("/mcp"), json=body, headers=headers) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                lines: list[str] = []
                reading = pool.submit(read_stream, response, lines)
                until(lambda: (tmp_path / "started").exists(), "the call at the upstream")
                gateway.proc.send_signal(signal.SIGTERM)
                reading.result(timeout=30)
        assert RECONNECT.decode().strip() in lines, lines
        assert exit_status(gateway) == 0
    finally:
        gateway.stop()
