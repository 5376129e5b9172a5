"""What the audit writer's thread does besides committing: sealing the chain and anchoring it.

A checkpoint (a signed chain head) is due every `checkpoint_every` records or
`checkpoint_seconds`, whichever comes first; with an anchor, each checkpoint is also sent there,
and a heartbeat (a signed head, even when nothing was written) every `heartbeat_seconds`. A
signer that fails is retried with a backoff (doubling up to `SEAL_BACKOFF_MAX`), and an anchor
that refuses lines is retried after `retry_max`: sealing never holds up a record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from bastion.audit.seal import Checkpoint, Signer, sign_checkpoint
from bastion.errors import AuditUnavailable
from bastion.identity.keys import SigningKey

if TYPE_CHECKING:
    from bastion.audit.anchor import Anchor
    from bastion.audit.writer import WriterOptions

__all__ = ["SEAL_BACKOFF_MAX", "Sealer"]

log = logging.getLogger("bastion.audit")

SEAL_BACKOFF_MAX = 30.0  # seconds between attempts to sign, at most, while the signer fails


class Sealer:
    """One writer's checkpoints and heartbeats; used by the writer thread alone (after
    `start`, which the loop calls before the thread runs)."""

    def __init__(
        self,
        writer_id: str,
        key: SigningKey | Signer,
        anchor: Anchor | None,
        options: WriterOptions,
        clock: Callable[[], float],
    ) -> None:
        self.writer_id = writer_id
        self.anchor = anchor
        self._key = key
        self._options = options
        self._clock = clock
        self.sealed_seq = 0  # the seq the last checkpoint names
        self.sealed_at = 0.0
        self.retry_at = 0.0  # after a signer failure, no new attempt before this
        self.broken = False  # the signer failed while stopping: stop without a seal
        self._backoff = 0.0
        self._next_beat = 0.0  # when the next heartbeat is due: at once, naming the writer live
        self._anchor_retry_at = 0.0  # when to try again lines the anchor file refused

    def start(self, last: Checkpoint | None) -> None:
        """Continue from the store's last checkpoint of this writer (None: there is none)."""
        self.sealed_seq = last.seq if last is not None else 0
        self.sealed_at = self._clock()

    def due_times(self, seq: int) -> list[float]:
        """When a checkpoint, a heartbeat or an anchor retry is next due, for a chain at `seq`."""
        options, anchor = self._options, self.anchor
        times = []
        if seq > self.sealed_seq:
            times.append(max(self.sealed_at + options.checkpoint_seconds, self.retry_at))
        if anchor is not None:
            times.append(max(self._next_beat, self.retry_at))
            if anchor.pending:
                times.append(self._anchor_retry_at)
        return times

    def checkpoint(self, seq: int, head: str, now: float, stopping: bool) -> Checkpoint | None:
        """A checkpoint of the chain at (seq, head) when one is due, else None."""
        options = self._options
        due = (
            seq - self.sealed_seq >= options.checkpoint_every
            or now - self.sealed_at >= options.checkpoint_seconds
            or stopping
        )
        # After a signer failure, wait out the backoff; at stop, one last try at once.
        retry = now >= self.retry_at or stopping
        if seq > self.sealed_seq and due and retry:
            return self._sign(seq, head, now, heartbeat=False, stopping=stopping)
        return None

    def sealed(self, mark: Checkpoint) -> None:
        """`mark` is committed with the records it seals: sent to the anchor too."""
        self.sealed_seq, self.sealed_at = mark.seq, mark.time
        if self.anchor is not None:
            self._anchored(self.anchor.publish(mark, heartbeat=False))

    def tend_anchor(self, seq: int, head: str, stopping: bool) -> None:
        """A heartbeat when one is due, and a retry of what the anchor refused."""
        anchor = self.anchor
        if anchor is None:
            return
        now = self._clock()
        if now >= self._next_beat and now >= self.retry_at and not stopping:
            beat = self._sign(seq, head, now, heartbeat=True, stopping=stopping)
            if beat is not None:
                self._anchored(anchor.publish(beat, heartbeat=True))
                self._next_beat = now + anchor.heartbeat_seconds
        elif anchor.pending and now >= self._anchor_retry_at:
            self._anchored(anchor.flush())

    def last_anchoring(self) -> None:
        """At stop: one more try for anchor entries the file refused."""
        anchor = self.anchor
        if anchor is not None and anchor.pending and not anchor.flush():
            log.error(
                "audit writer %s: %d anchor entries could not be written to %s",
                self.writer_id,
                anchor.pending,
                anchor.path,
            )

    def _sign(
        self, seq: int, head: str, now: float, *, heartbeat: bool, stopping: bool
    ) -> Checkpoint | None:
        """A signed head; None (logged, retried after a backoff) when the signer fails."""
        try:
            mark = sign_checkpoint(self._key, self.writer_id, seq, head, now, heartbeat=heartbeat)
        except Exception as exc:  # whatever the signer's trouble, the records go on
            if not self._backoff:
                problem = exc.message if isinstance(exc, AuditUnavailable) else repr(exc)
                log.error("audit writer %s: cannot sign: %s", self.writer_id, problem)
            # A signer that hangs (a blackholed Vault) holds up the batch it seals: rarely.
            initial = self._options.retry_initial
            self._backoff = min(max(self._backoff * 2, initial), SEAL_BACKOFF_MAX)
            self.retry_at = self._clock() + self._backoff
            self.broken = stopping
            return None
        if self._backoff:
            log.warning("audit writer %s: signing works again", self.writer_id)
        self._backoff = 0.0
        return mark

    def _anchored(self, written: bool) -> None:
        """After the anchor file took (or refused) lines: when to try again."""
        if not written:
            self._anchor_retry_at = self._clock() + self._options.retry_max
