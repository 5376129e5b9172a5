"""The anchor: every signed checkpoint, and a heartbeat every few seconds, kept outside the store.

The store's own checkpoints cannot tell a cut tail from a trail that ended there, nor notice a
writer whose chain was deleted whole, nor a chain rewritten and re-signed by whoever holds the
key. So the writer thread also appends each checkpoint it commits, and every
`audit.anchor.heartbeat_seconds` a heartbeat signing its head (seq, hash) at that moment, to
an append-only file of JSON lines that the store's writers cannot reach (a separate volume, a
log shipper's spool, a WORM bucket's upload directory):

```
{"hash":"…","kind":"checkpoint","kid":"…","seq":20,"sig":"…","time":1767225600.5,"v":1,"writer":"…"}
{"hash":"…","kind":"heartbeat","kid":"…","seq":25,"sig":"…","time":1767225660.5,"v":1,"writer":"…"}
```

Each process heartbeats for its own writer, so the anchor names every live writer. The file
is opened with O_APPEND for every batch of lines and synced before the writer goes on; lines
the file refused (a full disk) wait in memory and are written first when it works again.
Sinks that list the `checkpoint` phase receive the same lines (`since`).
`bastion audit verify --anchor FILE` reads them back with `read_anchor`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bastion.audit.chain import WRITER_ID, Finding, Problem
from bastion.audit.seal import Anchored, Checkpoint
from bastion.errors import AuditUnavailable

log = logging.getLogger("bastion.audit")

VERSION = 1
PENDING_MAX = 10_000  # lines kept while the file refuses them; the oldest go first
FEED_MAX = 4096  # lines kept for sinks that lag
_HEX64 = frozenset("0123456789abcdef")


def anchor_line(point: Checkpoint, heartbeat: bool) -> bytes:
    """One anchor entry as a JSON line (no newline), keys sorted."""
    entry = {
        "v": VERSION,
        "kind": "heartbeat" if heartbeat else "checkpoint",
        "writer": point.writer_id,
        "seq": point.seq,
        "hash": point.hash,
        "time": point.time,
        "kid": point.kid,
        "sig": point.signature,
    }
    return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)


def parse_line(line: bytes, where: str) -> Anchored:
    """An anchor entry back from its line; ValueError saying what is wrong with it."""
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        raise ValueError(f"expected a JSON object with v {VERSION}")
    kind = raw.get("kind")
    if kind not in ("checkpoint", "heartbeat"):
        raise ValueError("expected kind checkpoint or heartbeat")
    writer, seq, hash_ = raw.get("writer"), raw.get("seq"), raw.get("hash")
    time, kid, sig = raw.get("time"), raw.get("kid"), raw.get("sig")
    if not isinstance(writer, str) or not WRITER_ID.fullmatch(writer):
        raise ValueError("expected a writer id")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 1 << 63:
        raise ValueError("expected seq as a non-negative integer")
    if not isinstance(hash_, str) or len(hash_) != 64 or not _HEX64.issuperset(hash_):
        raise ValueError("expected hash as 64 lowercase hex digits")
    if not isinstance(time, (int, float)) or isinstance(time, bool):
        raise ValueError("expected time as a number")
    if not isinstance(kid, str) or not isinstance(sig, str) or len(kid) > 255:
        raise ValueError("expected kid and sig as strings")
    point = Checkpoint(writer, seq, hash_, float(time), kid, sig)
    return Anchored(point, kind == "heartbeat", where)


class Anchor:
    """Where the writer thread sends signed heads: the anchor file (when configured) and a
    bounded feed that sinks read with `since`. Thread-safe."""

    def __init__(self, path: str | os.PathLike[str] | None, heartbeat_seconds: float) -> None:
        self.path = None if path is None else Path(path)
        self.heartbeat_seconds = heartbeat_seconds
        self._lock = threading.Lock()
        self._pending: deque[bytes] = deque(maxlen=PENDING_MAX)
        self._feed: deque[tuple[int, bytes]] = deque(maxlen=FEED_MAX)
        self._count = 0
        self._failing = False

    @property
    def pending(self) -> int:
        """Lines the file has not taken yet."""
        return len(self._pending)

    def publish(self, point: Checkpoint, heartbeat: bool) -> bool:
        """Send one signed head to the feed and the file; False when the file refused it (it
        is kept and written first next time)."""
        line = anchor_line(point, heartbeat)
        with self._lock:
            self._count += 1
            self._feed.append((self._count, line))
            if self.path is not None:
                if len(self._pending) == PENDING_MAX:
                    log.error("audit anchor %s: dropping the oldest unwritten entry", self.path)
                self._pending.append(line)
        return self.flush()

    def flush(self) -> bool:
        """Append what is pending to the file and sync it; False when that failed (logged)."""
        with self._lock:
            if self.path is None or not self._pending:
                return True
            data = b"".join(line + b"\n" for line in self._pending)
            try:
                _append(self.path, data)
            except OSError as exc:
                if not self._failing:
                    log.error(
                        "audit anchor %s: cannot append (%s); %d entries wait",
                        self.path,
                        exc.strerror or exc,
                        len(self._pending),
                    )
                self._failing = True
                return False
            self._pending.clear()
            if self._failing:
                log.warning("audit anchor %s: writing again", self.path)
            self._failing = False
            return True

    def since(self, count: int) -> tuple[int, list[bytes]]:
        """The lines published after the `count`th, and the count of the last one. Lines that
        fell out of the bounded feed are skipped (the file has them)."""
        with self._lock:
            lines = [line for number, line in self._feed if number > count]
            return self._count, lines


def _append(path: Path, data: bytes) -> None:
    """Append `data` with O_APPEND (never through a planted link) and sync it to disk."""
    created = not path.exists()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:  # the new name must survive a crash too
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def read_anchor(paths: Sequence[Path]) -> tuple[list[Anchored], list[Finding], list[str]]:
    """The entries of anchor files, the lines that do not parse (as findings), and notes.

    A last line without its newline is a write cut short by a crash: noted, not a finding.
    """
    entries: list[Anchored] = []
    findings: list[Finding] = []
    notes: list[str] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AuditUnavailable(f"anchor {path}: cannot read it ({exc.strerror})") from exc
        lines = data.split(b"\n")
        torn = lines.pop()  # empty when the file ends with a newline
        for number, line in enumerate(lines, start=1):
            where = f"{path.name} line {number}"
            try:
                entries.append(parse_line(line, where))
            except ValueError as exc:
                findings.append(_unreadable(line, where, str(exc)))
        if torn:
            notes.append(f"{path.name} ends in a partial line (a write cut short); ignored")
    return entries, findings, notes


def _unreadable(line: bytes, where: str, why: str) -> Finding:
    writer = "-"
    try:
        raw: Any = orjson.loads(line)
        if isinstance(raw, dict) and isinstance(raw.get("writer"), str):
            writer = raw["writer"][:64]
    except orjson.JSONDecodeError:
        pass
    return Finding(writer, 0, Problem.ANCHOR_INVALID, f"{where} cannot be used: {why}")
