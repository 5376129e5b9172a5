"""Audit sinks: committed records forwarded to files, syslog, webhooks and OpenTelemetry.

One `Forwarder` per configured sink follows this process's own chain in the store, from a
cursor kept in `<state_dir>/audit/sinks/<sink>.<writer>.cursor`: it reads what was committed
after the cursor, sends it, and moves the cursor only once the sink accepted it. Delivery is
therefore at least once and in order, survives restarts, and never touches the request path:
a sink that is down is retried with exponential backoff (up to `retry_max_seconds`) while the
gateway goes on, and the records wait in the trail, not in memory.

A sink that lists the `checkpoint` phase also gets the writer's anchor lines (signed checkpoints
and heartbeats, `bastion.audit.anchor`) from its in-memory feed: a copy of the anchor out of
reach of whoever can write the store, best effort (what a restart or a long outage drops, the
anchor file keeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import ssl
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from bastion.audit import AuditStore, AuditWriter
from bastion.audit.chain import Entry
from bastion.audit.record import AuditRecord
from bastion.audit.sinks import (
    UDP_MAX,
    octet_counted,
    otlp_anchor,
    otlp_logs,
    render,
    syslog_anchor,
    syslog_message,
    webhook_body,
    webhook_signature,
)
from bastion.audit.trail import open_trail_reader
from bastion.config import Settings, Sink
from bastion.errors import SinkError, WireError
from bastion.observe.metrics import Metrics
from bastion.state.secrets import resolve
from bastion.wire import Pool

log = logging.getLogger("bastion.audit.sinks")

_POLL = 0.2  # seconds between looks at the writer's head when caught up
_RETRY_INITIAL = 0.5


class Delivery(Protocol):
    """Sends a batch of entries somewhere; raises SinkError when it was not accepted."""

    async def send(self, items: Sequence[tuple[Entry, AuditRecord]]) -> None: ...

    async def send_anchor(self, lines: Sequence[bytes]) -> None: ...

    async def close(self) -> None: ...


class JsonlDelivery:
    """Appends one line per entry to a file, flushed and synced before the cursor moves."""

    def __init__(self, sink: Sink) -> None:
        assert sink.path is not None  # noqa: S101 - validated by the config
        self._sink = sink
        self._path = Path(sink.path)

    async def send(self, items: Sequence[tuple[Entry, AuditRecord]]) -> None:
        """Append the batch."""
        await self._write(b"".join(render(entry, self._sink.format) + b"\n" for entry, _ in items))

    async def send_anchor(self, lines: Sequence[bytes]) -> None:
        """Append anchor lines as they are."""
        await self._write(b"".join(line + b"\n" for line in lines))

    async def _write(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._append, data)
        except OSError as exc:
            raise SinkError(f"cannot append to {self._path}: {exc.strerror or exc}") from exc

    def _append(self, data: bytes) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def close(self) -> None:
        """Nothing is kept open."""


class SyslogDelivery:
    """RFC 5424 messages over UDP (one datagram each) or TCP (RFC 6587 octet counting)."""

    def __init__(self, sink: Sink) -> None:
        assert sink.address is not None  # noqa: S101 - validated by the config
        host, _, port = sink.address.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._sink = sink
        self._writer: asyncio.StreamWriter | None = None
        self._udp: asyncio.DatagramTransport | None = None

    async def send(self, items: Sequence[tuple[Entry, AuditRecord]]) -> None:
        """Send each entry as one syslog message."""
        sink = self._sink
        messages = [
            syslog_message(render(entry, sink.format), record, sink.facility)
            for entry, record in items
        ]
        await self._deliver(messages)

    async def send_anchor(self, lines: Sequence[bytes]) -> None:
        """Send each anchor line as one syslog message."""
        await self._deliver([syslog_anchor(line, self._sink.facility) for line in lines])

    async def _deliver(self, messages: list[bytes]) -> None:
        sink = self._sink
        try:
            async with asyncio.timeout(sink.timeout_seconds):
                if sink.transport == "tcp":
                    await self._send_tcp(messages)
                else:
                    await self._send_udp(messages)
        except (OSError, TimeoutError) as exc:
            await self.close()
            raise SinkError(f"syslog at {sink.address} ({sink.transport}): {exc}") from exc

    async def _send_tcp(self, messages: list[bytes]) -> None:
        if self._writer is None or self._writer.is_closing():
            _, self._writer = await asyncio.open_connection(self._host, self._port)
        self._writer.write(b"".join(octet_counted(m) for m in messages))
        await self._writer.drain()

    async def _send_udp(self, messages: list[bytes]) -> None:
        if self._udp is None or self._udp.is_closing():
            loop = asyncio.get_running_loop()
            self._udp, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=(self._host, self._port)
            )
        for message in messages:
            if len(message) > UDP_MAX:
                # Too big for one datagram: say so in one that fits, rather than block the sink.
                message = message[: UDP_MAX - 40] + b'..." [truncated; see the trail]'
            self._udp.sendto(message)

    async def close(self) -> None:
        """Close the connection or socket."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None


class HttpDelivery:
    """POSTs a batch: a JSON array to a webhook, or OTLP/HTTP protobuf logs to a collector."""

    def __init__(self, sink: Sink, headers: Mapping[str, str], secret: str | None) -> None:
        assert sink.url is not None  # noqa: S101 - validated by the config
        self._sink = sink
        self._headers = dict(headers)
        self._secret = secret
        context = None
        if sink.ca_file is not None:
            context = ssl.create_default_context()
            context.load_verify_locations(cafile=sink.ca_file)
        self._pool = Pool(sink.url, 1, sink.timeout_seconds, sink.timeout_seconds, context)

    async def send(self, items: Sequence[tuple[Entry, AuditRecord]]) -> None:
        """POST the batch; anything but a 2xx answer is a failure."""
        sink = self._sink
        headers = dict(self._headers)
        if sink.type == "otel_logs":
            lines = [(render(entry, sink.format), record) for entry, record in items]
            body = otlp_logs(lines)
            headers["Content-Type"] = "application/x-protobuf"
        else:
            body = webhook_body([render(entry, sink.format) for entry, _ in items])
            headers["Content-Type"] = "application/json"
        await self._post(body, headers)

    async def send_anchor(self, lines: Sequence[bytes]) -> None:
        """POST anchor lines: OTLP logs, or a JSON array of them."""
        if self._sink.type == "otel_logs":
            body = otlp_anchor(lines)
            headers = {**self._headers, "Content-Type": "application/x-protobuf"}
        else:
            body = webhook_body(lines)
            headers = {**self._headers, "Content-Type": "application/json"}
        await self._post(body, headers)

    async def _post(self, body: bytes, headers: dict[str, str]) -> None:
        sink = self._sink
        if sink.type == "webhook" and self._secret is not None:
            stamp = int(time.time())
            headers["X-Bastion-Timestamp"] = str(stamp)
            headers["X-Bastion-Signature"] = webhook_signature(self._secret, stamp, body)
        try:
            async with asyncio.timeout(sink.timeout_seconds):
                response = await self._pool.request("POST", headers, body)
                async with response:
                    await response.read()
        except (OSError, TimeoutError, WireError) as exc:
            raise SinkError(f"{sink.url} cannot be reached: {exc or type(exc).__name__}") from exc
        if not 200 <= response.status < 300:
            raise SinkError(f"{sink.url} answered HTTP {response.status}")

    async def close(self) -> None:
        """Drop the kept-alive connection."""
        self._pool.close()


class Forwarder:
    """Follows one writer's chain into one sink, from a cursor kept on disk. It reads with a
    store of its own (the writer's closes when the writer stops, before the last delivery),
    and closes it when it stops."""

    def __init__(
        self,
        sink: Sink,
        delivery: Delivery,
        store: AuditStore,
        writer: AuditWriter,
        folder: Path,
        metrics: Metrics | None = None,
    ) -> None:
        self.sink = sink
        self._delivery = delivery
        self._store = store
        self._writer = writer
        self._cursor_file = folder / f"{sink.name}.{writer.writer_id}.cursor"
        self._metrics = metrics
        self._phases = frozenset(sink.phases)
        self.delivered = 0  # the seq of the last entry the sink accepted
        self.anchored = 0  # the count of the last anchor line the sink accepted
        self._anchor_failing = False
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin forwarding in the background (after the writer started: a new sink begins at
        the writer's head)."""
        self.delivered = await asyncio.to_thread(self._load)
        self._task = asyncio.create_task(self._run(), name=f"bastion-sink-{self.sink.name}")

    async def stop(self, grace: float = 5.0) -> None:
        """Deliver what was committed, for at most `grace` seconds, then stop; anything left
        stays in the trail and goes out after the next start."""
        if self._task is None:
            return
        self._stopping.set()
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(self._task)
        except TimeoutError:
            log.warning(
                "sink %s: stopping with %d records undelivered (they go out after the restart)",
                self.sink.name,
                self._writer.head[0] - self.delivered,
            )
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            await self._delivery.close()
            await asyncio.to_thread(self._store.close)
            self._task = None

    async def _run(self) -> None:
        retry = _RETRY_INITIAL
        failures = 0
        while True:
            await self._forward_anchor()
            head = self._writer.head[0]
            if self._metrics is not None:
                self._metrics.sink_lag(self.sink.name, max(0, head - self.delivered))
            if head <= self.delivered:
                if self._stopping.is_set():
                    await self._forward_anchor()
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_POLL):
                        await self._stopping.wait()
                continue
            entries = await asyncio.to_thread(self._read)
            if not entries:  # committed but not readable yet: look again shortly
                await asyncio.sleep(_POLL)
                continue
            items = [(entry, AuditRecord.from_json(entry.record)) for entry in entries]
            picked = [item for item in items if not self._phases or item[1].phase in self._phases]
            try:
                if picked:
                    await self._delivery.send(picked)
            except SinkError as exc:
                failures += 1
                if self._metrics is not None:
                    self._metrics.sink_failed(self.sink.name)
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "sink %s: delivery failed (%d in a row; retrying in %.1f s): %s",
                        self.sink.name,
                        failures,
                        retry,
                        exc,
                    )
                if self._stopping.is_set():
                    return
                await asyncio.sleep(retry)
                retry = min(retry * 2, self.sink.retry_max_seconds)
                continue
            if failures:
                log.info("sink %s: delivering again after %d failures", self.sink.name, failures)
            failures, retry = 0, _RETRY_INITIAL
            self.delivered = entries[-1].seq
            await asyncio.to_thread(self._save, self.delivered)

    async def _forward_anchor(self) -> None:
        """Send the anchor lines published since the last ones sent, for `checkpoint` sinks; a
        failure is logged and retried with the next lines (the anchor file keeps them all)."""
        anchor = self._writer.anchor
        if anchor is None or "checkpoint" not in self._phases:
            return
        count, lines = anchor.since(self.anchored)
        if not lines:
            return
        try:
            await self._delivery.send_anchor(lines)
        except SinkError as exc:
            if not self._anchor_failing:
                name = self.sink.name
                log.warning("sink %s: anchor lines not delivered (retrying): %s", name, exc)
            self._anchor_failing = True
            return
        self._anchor_failing = False
        self.anchored = count

    def _read(self) -> list[Entry]:
        entries = self._store.read(self._writer.writer_id, self.delivered)
        return list(itertools.islice(entries, self.sink.batch_max))

    def _load(self) -> int:
        try:
            return int(self._cursor_file.read_text().strip() or 0)
        except FileNotFoundError:
            # A new sink starts with what this writer writes from now on, not its history
            # (`bastion audit export` is there for that).
            return self._writer.head[0]
        except (OSError, ValueError) as exc:
            raise SinkError(
                f"sink {self.sink.name}: cannot read {self._cursor_file}: {exc}"
            ) from exc

    def _save(self, seq: int) -> None:
        self._cursor_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self._cursor_file.with_suffix(".tmp")
        temporary.write_text(f"{seq}\n")
        os.replace(temporary, self._cursor_file)


async def open_forwarders(
    settings: Settings, writer: AuditWriter, metrics: Metrics | None
) -> list[Forwarder]:
    """A forwarder for each configured sink (secrets resolved now), each reading the trail
    through its own connection to the store."""
    folder = Path(settings.state_dir) / "audit" / "sinks"
    forwarders = []
    for index, sink in enumerate(settings.audit.sinks):
        where = f"audit.sinks[{index}]"
        delivery: Delivery
        if sink.type == "jsonl":
            delivery = JsonlDelivery(sink)
        elif sink.type == "syslog":
            delivery = SyslogDelivery(sink)
        else:
            headers = {
                name: await resolve(ref, f"{where}.headers.{name}")
                for name, ref in sink.headers.items()
            }
            secret = await resolve(sink.secret, f"{where}.secret") if sink.secret else None
            delivery = HttpDelivery(sink, headers, secret)
        store = open_trail_reader(settings)
        forwarders.append(Forwarder(sink, delivery, store, writer, folder, metrics))
    return forwarders
