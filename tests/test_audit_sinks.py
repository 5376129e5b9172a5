"""Audit sinks against real receivers on loopback: a JSON-lines file, syslog over UDP and TCP,
an HTTPS webhook (with a certificate made here) that fails before it accepts, and an
OpenTelemetry logs endpoint decoding OTLP protobuf. Every committed record arrives once, in
order, with what is needed to check it against the trail; a receiver that is down delays
delivery but neither loses a record nor blocks the writer; a restart resumes at the cursor."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from tests.conftest import free_port

from bastion.audit.chain import link
from bastion.audit.keys import DB_FILE, audit_dir
from bastion.audit.record import AuditRecord
from bastion.audit.store import SqliteAuditStore
from bastion.audit.trail import open_writer
from bastion.audit.writer import AuditWriter, WriterOptions
from bastion.config import Sink, parse
from bastion.control.audit.forward import Forwarder, HttpDelivery, JsonlDelivery, SyslogDelivery

DEADLINE = 15.0


def record(i: int, **fields: Any) -> AuditRecord:
    base: dict[str, Any] = {
        "phase": "decision",
        "tenant": "acme",
        "agent": "acme-reader",
        "decision": "allow",
        "method": "tools/call",
        "tool_exposed": "workspace__get_task",
    }
    base.update(fields)
    return AuditRecord(time=1_800_000_000.0 + i, request_id=f"req-{i}", **base)


async def wait_for(predicate: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(
    tmp: Path, sink: Sink, delivery: Any
) -> AsyncIterator[tuple[AuditWriter, Forwarder]]:
    writer = open_writer(tmp / "state", WriterOptions(linger=0))
    await writer.start()
    reader = SqliteAuditStore(audit_dir(tmp / "state") / DB_FILE, create=False)
    forwarder = Forwarder(sink, delivery, reader, writer, tmp / "state" / "sinks")
    await forwarder.start()
    try:
        yield writer, forwarder
    finally:
        await writer.stop()
        await forwarder.stop(grace=2.0)


def check_line(line: dict[str, Any], seq: int) -> dict[str, Any]:
    """A forwarded json line carries the record as hashed and its place in the chain."""
    assert line["seq"] == seq
    raw = json.dumps(
        line["record"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    assert link(line["prev_hash"], line["writer"], seq, raw) == line["hash"]
    record: dict[str, Any] = line["record"]
    return record


# -- JSON lines -----------------------------------------------------------------------------


async def test_jsonl_sink_appends_every_record_in_order(tmp_path: Path) -> None:
    out = tmp_path / "siem" / "audit.jsonl"
    sink = Sink(name="file", type="jsonl", path=str(out))
    async with running(tmp_path, sink, JsonlDelivery(sink)) as (writer, forwarder):
        for i in range(250):
            await writer.append(record(i), durable=False)
        await wait_for(lambda: forwarder.delivered == 250, "250 records delivered")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [check_line(line, i + 1)["request_id"] for i, line in enumerate(lines)] == [
        f"req-{i}" for i in range(250)
    ]


async def test_a_restart_resumes_at_the_cursor_without_repeats(tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    sink = Sink(name="file", type="jsonl", path=str(out))
    async with running(tmp_path, sink, JsonlDelivery(sink)) as (writer, forwarder):
        for i in range(10):
            await writer.append(record(i), durable=True)
        await wait_for(lambda: forwarder.delivered == 10, "10 delivered")
    # Written while no forwarder runs (the gateway was down, or the sink was added later):
    writer = open_writer(tmp_path / "state")
    await writer.start()
    for i in range(10, 15):
        await writer.append(record(i), durable=True)
    await writer.stop()
    async with running(tmp_path, sink, JsonlDelivery(sink)) as (writer, forwarder):
        await wait_for(lambda: forwarder.delivered == 15, "the 5 written meanwhile")
    ids = [json.loads(line)["record"]["request_id"] for line in out.read_text().splitlines()]
    assert ids == [f"req-{i}" for i in range(15)]


async def test_a_new_sink_starts_at_the_head_not_the_history(tmp_path: Path) -> None:
    writer = open_writer(tmp_path / "state")
    await writer.start()
    for i in range(5):
        await writer.append(record(i), durable=True)
    await writer.stop()
    out = tmp_path / "new.jsonl"
    sink = Sink(name="new", type="jsonl", path=str(out))
    async with running(tmp_path, sink, JsonlDelivery(sink)) as (writer, forwarder):
        await writer.append(record(5), durable=True)
        await wait_for(lambda: forwarder.delivered == 6, "the new record")
    assert [json.loads(x)["seq"] for x in out.read_text().splitlines()] == [6]


async def test_a_sink_takes_only_its_phases(tmp_path: Path) -> None:
    out = tmp_path / "alerts.jsonl"
    sink = Sink(name="alerts", type="jsonl", path=str(out), phases=("alert",))
    async with running(tmp_path, sink, JsonlDelivery(sink)) as (writer, forwarder):
        await writer.append(record(0), durable=False)
        await writer.append(record(1, phase="alert", reason="cross-tenant"), durable=False)
        await writer.append(record(2), durable=False)
        await wait_for(lambda: forwarder.delivered == 3, "all three seen")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["seq"], x["record"]["phase"]) for x in lines] == [(2, "alert")]


async def test_ocsf_format(tmp_path: Path) -> None:
    out = tmp_path / "ocsf.jsonl"
    sink = Sink(name="ocsf", type="jsonl", path=str(out), format="ocsf")
    async with running(tmp_path, sink, JsonlDelivery(sink)) as (writer, forwarder):
        await writer.append(record(0, decision="deny"), durable=False)
        await wait_for(lambda: forwarder.delivered == 1, "one record")
    event = json.loads(out.read_text())
    assert event["class_uid"] == 6003 and event["disposition_id"] == 2


# -- syslog ---------------------------------------------------------------------------------


class UdpReceiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.messages.append(data)


def parse_5424(message: bytes) -> tuple[int, str, dict[str, Any]]:
    """PRI, MSGID and the JSON payload of an RFC 5424 message with empty structured data."""
    head, _, rest = message.partition(b">")
    fields = rest.split(b" ", 6)
    assert fields[0] == b"1", message[:40]  # VERSION
    dt.datetime.fromisoformat(fields[1].decode().replace("Z", "+00:00"))  # TIMESTAMP
    assert fields[3] == b"bastion" and fields[5] != b"" and fields[6].startswith(b"- ")
    return int(head[1:]), fields[5].decode(), json.loads(fields[6][2:])


async def test_syslog_over_udp(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    port = free_port()
    transport, receiver = await loop.create_datagram_endpoint(
        UdpReceiver, local_addr=("127.0.0.1", port)
    )
    sink = Sink(name="syslog", type="syslog", address=f"127.0.0.1:{port}", facility=13)
    try:
        async with running(tmp_path, sink, SyslogDelivery(sink)) as (writer, forwarder):
            await writer.append(record(0), durable=False)
            await writer.append(record(1, decision="deny"), durable=False)
            await writer.append(record(2, phase="alert", reason="spike"), durable=False)
            await wait_for(lambda: len(receiver.messages) == 3, "three datagrams")
    finally:
        transport.close()
    parsed = [parse_5424(m) for m in receiver.messages]
    # facility 13 (log audit) x 8 + severity: info 6, warning 4, alert 1
    assert [(pri, msgid) for pri, msgid, _ in parsed] == [
        (110, "decision"),
        (108, "decision"),
        (105, "alert"),
    ]
    assert [check_line(body, i + 1)["request_id"] for i, (_, _, body) in enumerate(parsed)] == [
        "req-0",
        "req-1",
        "req-2",
    ]


async def test_syslog_over_tcp_with_octet_counting_survives_a_receiver_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = await reader.readuntil(b" ")
                received.append(await reader.readexactly(int(length[:-1])))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    sink = Sink(
        name="syslog",
        type="syslog",
        address=f"127.0.0.1:{port}",
        transport="tcp",
        retry_max_seconds=0.5,
    )
    async with running(tmp_path, sink, SyslogDelivery(sink)) as (writer, forwarder):
        for i in range(3):
            await writer.append(record(i), durable=False)
        await wait_for(lambda: len(received) == 3, "three messages")
        server.close()
        await server.wait_closed()
        # The receiver is gone: the next records wait in the trail ...
        for i in range(3, 6):
            await writer.append(record(i), durable=False)
        await asyncio.sleep(0.5)
        # ... until it is back.
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        await wait_for(lambda: forwarder.delivered == 6, "all six delivered")
        await wait_for(lambda: len({parse_5424(m)[2]["seq"] for m in received}) == 6, "6 seqs")
    server.close()
    seqs = [parse_5424(m)[2]["seq"] for m in received]
    assert sorted(set(seqs)) == [1, 2, 3, 4, 5, 6]  # at least once: a retry may repeat


# -- HTTPS webhook --------------------------------------------------------------------------


def certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made now."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "hook.crt", tmp / "hook.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@asynccontextmanager
async def http_receiver(
    path: str, handler: Any, tls: tuple[Path, Path] | None = None
) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=context)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_https_webhook_retries_until_accepted_and_signs_each_delivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = hashlib.sha256(str(tmp_path).encode()).hexdigest()  # made per test run
    token = hashlib.sha256(secret.encode()).hexdigest()
    monkeypatch.setenv("HOOK_SECRET", secret)
    monkeypatch.setenv("HOOK_TOKEN", f"Bearer {token}")
    cert, key = certificate(tmp_path)
    attempts: list[int] = []
    accepted: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        attempts.append(len(attempts))
        if len(attempts) <= 2:
            return web.Response(status=503)  # down for the first two attempts
        assert request.headers["Authorization"] == f"Bearer {token}"
        stamp = request.headers["X-Bastion-Timestamp"]
        expected = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
        if request.headers["X-Bastion-Signature"] != "sha256=" + expected.hexdigest():
            return web.Response(status=401)
        accepted.extend(json.loads(body))
        return web.Response(status=204)

    async with http_receiver("/hook", hook, (cert, key)) as port:
        settings = parse(
            json.dumps(
                {
                    "audit": {
                        "sinks": [
                            {
                                "name": "hook",
                                "type": "webhook",
                                "url": f"https://127.0.0.1:{port}/hook",
                                "ca_file": str(cert),
                                "secret": "env:HOOK_SECRET",
                                "headers": {"Authorization": "env:HOOK_TOKEN"},
                                "retry_max_seconds": 0.5,
                            }
                        ]
                    }
                }
            )
        )
        sink = settings.audit.sinks[0]
        delivery = HttpDelivery(sink, {"Authorization": f"Bearer {token}"}, secret)
        async with running(tmp_path, sink, delivery) as (writer, forwarder):
            for i in range(5):
                # The writer is never held up by the sink being down.
                await writer.append(record(i), durable=True)
            await wait_for(lambda: forwarder.delivered == 5, "five accepted")
    assert len(attempts) >= 3
    assert [check_line(line, i + 1)["request_id"] for i, line in enumerate(accepted)] == [
        f"req-{i}" for i in range(5)
    ]


async def test_webhook_refuses_a_certificate_it_does_not_trust(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path)
    hits: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        hits.append(1)
        return web.Response(status=204)

    async with http_receiver("/hook", hook, (cert, key)) as port:
        sink = Sink(name="hook", type="webhook", url=f"https://127.0.0.1:{port}/hook")
        delivery = HttpDelivery(sink, {}, None)  # no ca_file: the system's trust store only
        async with running(tmp_path, sink, delivery) as (writer, forwarder):
            await writer.append(record(0), durable=True)
            await asyncio.sleep(1.0)  # a few attempts' worth
            assert forwarder.delivered == 0
    assert hits == []


@pytest.mark.parametrize(
    ("sink", "message"),
    [
        ({"type": "webhook", "url": "http://siem.example.com/hook"}, "must use https"),
        ({"type": "webhook", "url": "https://h/x", "secret": "s3cr3t"}, "secret reference"),
        ({"type": "webhook", "url": "https://h/x", "headers": {"A": "Bearer x"}}, "headers.A"),
        ({"type": "jsonl"}, "needs `path`"),
        ({"type": "syslog", "address": "localhost"}, "host:port"),
    ],
)
def test_bad_sink_settings_are_refused(sink: dict[str, Any], message: str) -> None:
    from bastion.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse(json.dumps({"audit": {"sinks": [{"name": "s", **sink}]}}))
    assert message in str(caught.value)


# -- OpenTelemetry logs ---------------------------------------------------------------------


async def test_otel_logs_reach_an_otlp_http_endpoint(tmp_path: Path) -> None:
    received: list[ExportLogsServiceRequest] = []

    async def logs(request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        message = ExportLogsServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(status=200)

    async with http_receiver("/v1/logs", logs) as port:
        sink = Sink(name="otel", type="otel_logs", url=f"http://127.0.0.1:{port}/v1/logs")
        async with running(tmp_path, sink, HttpDelivery(sink, {}, None)) as (writer, forwarder):
            await writer.append(record(0, trace_id="ab" * 16), durable=False)
            await writer.append(record(1, decision="deny"), durable=False)
            await wait_for(lambda: forwarder.delivered == 2, "two records")
    logs_out = [
        log
        for message in received
        for resource in message.resource_logs
        for scope in resource.scope_logs
        for log in scope.log_records
    ]
    resource = received[0].resource_logs[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes} == {"service.name": "bastion"}
    assert [log.severity_text for log in logs_out] == ["INFO", "WARN"]
    attributes = {a.key: a.value.string_value for a in logs_out[1].attributes}
    assert attributes["bastion.agent"] == "acme-reader"
    assert attributes["bastion.decision"] == "deny"
    assert logs_out[0].trace_id == bytes.fromhex("ab" * 16)
    assert check_line(json.loads(logs_out[0].body.string_value), 1)["request_id"] == "req-0"
