"""The write-ahead of the `process` durability level: records safe from kill -9 without fsync.

The writer appends each record here, on the event loop, before the record is queued for the
store: one `write(2)` into the OS page cache, a few microseconds, no fsync. Once `write`
returns, the record survives any death of the gateway's process (kill -9, out of memory, a
crash) because the kernel holds it; it does not survive an OS crash or power loss (that is
the `power` level, which fsyncs the store instead). The store then commits the records in
large batches behind the calls, so a call waits for neither a commit nor a thread.

Two files per writer id, `ahead-<writer id>.0` and `.1` in the audit directory (0600, like the
store), one line per record: `<seq> <record JSON>\\n`, the seq being the one the record gets in
the chain. Appends go to one file; when it has grown past `rotate_bytes` and the other is
empty, appends switch to the other. A file is emptied once every record in it is committed,
so the files stay small whatever the load. At start `replay` returns the records the store
lacks (seq past its last); the writer commits them before anything else, then `open` empties
both files. A line cut short (the process killed inside a large write) was never reported
written, so it is skipped.

Whoever can write these files can put records into the chain at the next start, exactly as
whoever can write the store can; both sit in the same 0700 directory.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("bastion.audit")

__all__ = ["ROTATE_BYTES", "WriteAhead"]

ROTATE_BYTES = 1 << 20  # a write-ahead file past this size hands over to the other one


class WriteAhead:
    """The two write-ahead files of one writer id. `write` runs on the event loop and
    `committed` on the writer thread; a lock of its own keeps them apart."""

    def __init__(self, directory: Path, writer_id: str, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.paths = (directory / f"ahead-{writer_id}.0", directory / f"ahead-{writer_id}.1")
        self._rotate = rotate_bytes
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._sizes = [0, 0]
        self._last = [0, 0]  # the highest seq written to each file
        self._current = 0

    def replay(self, after: int) -> list[bytes]:
        """Records of both files with a seq past `after` (the store's last), in seq order."""
        found: dict[int, bytes] = {}
        for path in self.paths:
            try:
                content = path.read_bytes()
            except FileNotFoundError:
                continue
            for line in content.split(b"\n")[:-1]:  # the last piece lacks its newline: cut short
                seq, record = _parse(line)
                if seq > after:
                    found[seq] = record
        return [found[seq] for seq in sorted(found)]

    def open(self) -> None:
        """Empty both files (their records are committed) and take appends from now on."""
        with self._lock:
            for path in self.paths:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
                self._fds.append(fd)

    def write(self, seq: int, record: bytes) -> None:
        """Append the record that will have `seq` in the chain; OSError when it could not be
        written whole (the file is then cut back to where it was, when the kernel lets us)."""
        line = b"%d %b\n" % (seq, record)
        with self._lock:
            if not self._fds:
                raise OSError("the write-ahead is closed")
            current = self._current
            if self._sizes[current] >= self._rotate and self._sizes[1 - current] == 0:
                current = self._current = 1 - current
            fd, size = self._fds[current], self._sizes[current]
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"wrote {written} of {len(line)} bytes")
            except OSError:
                # No torn line may stay in front of later ones: cut it (a failure here leaves
                # it last, where `replay` skips it, as the caller stops writing ahead).
                os.ftruncate(fd, size)
                raise
            self._sizes[current] = size + written
            self._last[current] = seq

    def committed(self, seq: int) -> None:
        """The store holds every record up to `seq`: empty the files that hold no other (the
        current one only once it is due to rotate, to spare a syscall per batch)."""
        with self._lock:
            for index, fd in enumerate(self._fds):
                due = index != self._current or self._sizes[index] >= self._rotate
                if self._sizes[index] and due and self._last[index] <= seq:
                    os.ftruncate(fd, 0)
                    self._sizes[index] = 0

    def close(self, remove: bool) -> None:
        """Close the files; with `remove` (every record committed), delete them too."""
        with self._lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
        if remove:
            for path in self.paths:
                path.unlink(missing_ok=True)


def _parse(line: bytes) -> tuple[int, bytes]:
    """(seq, record) of one line; (0, b"") for a line that is not one (it is then skipped)."""
    head, _, record = line.partition(b" ")
    if not head.isdigit() or not record.startswith(b"{") or not record.endswith(b"}"):
        if line:
            log.warning("audit write-ahead: skipped a line that is not a record")
        return 0, b""
    return int(head), record
