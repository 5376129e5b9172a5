"""The audit writer: records in, hash-chained batches out, the event loop never waiting on disk.

`append` serializes the record on the event loop (so a record that cannot be JSON fails at its
caller) and puts it on a bounded queue; with a write-ahead (ahead.py, the `process` level) it
first appends the record there, which alone makes it survive kill -9. One dedicated thread
takes whatever has gathered, up to `batch_max` records, links them into the chain and writes
them in one transaction (group commit): under load batches grow by themselves while the
previous one syncs, and when no caller waits for the commit the thread lingers up to `linger`
seconds to gather more. A strict (`durable=True`) append returns once its record is written
ahead, or, without a write-ahead (the `power` level: the store fsyncs each commit), once its
batch committed; the thread hands that result back with one `call_soon_threadsafe` per batch,
and batches nobody waits for cost the loop nothing. Concurrent strict appends share one commit
(and one fsync).

When the store fails, the batch goes back to the front of the queue and is retried with
backoff; the writer is unhealthy until a write succeeds. Meanwhile strict appends raise
`AuditUnavailable` (their records stay queued and are written if the store recovers), and
relaxed appends queue until the queue is full and then wait at most `put_timeout`. A write
that hangs (a stalled disk) fails every strict caller after `commit_timeout`, found by a
watchdog timer on the loop. No record is dropped: `stop` reports any it could not write.

The thread also signs the checkpoints (with a key in this process or through Vault transit,
signer.py) and, with an `Anchor`, sends each committed checkpoint there and a heartbeat every
`heartbeat_seconds`. Sealing is not what a caller waits for: a signer or anchor that fails is
logged and retried with backoff while records go on being committed, linked but unsealed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from bastion.audit.ahead import WriteAhead
from bastion.audit.anchor import Anchor
from bastion.audit.chain import Chain
from bastion.audit.keys import (
    WriterClaim,
)
from bastion.audit.record import AuditRecord
from bastion.audit.seal import Signer
from bastion.audit.sealing import Sealer
from bastion.audit.store import AuditStore
from bastion.errors import AuditUnavailable
from bastion.identity.keys import SigningKey

log = logging.getLogger("bastion.audit")

_Waiter: TypeAlias = "asyncio.Future[None] | None"
_Item: TypeAlias = tuple[bytes, _Waiter]


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """How the writer batches, waits and seals; the defaults suit one gateway process."""

    batch_max: int = 512  # records per transaction at most
    linger: float = 0.005  # seconds a batch nobody waits for waits to fill
    queue_max: int = 65_536  # records queued or being written, at most
    put_timeout: float = 2.0  # seconds an append waits for room before AuditUnavailable
    commit_timeout: float = 5.0  # seconds a write may hang before strict callers fail
    checkpoint_every: int = 1000  # records between signed checkpoints, at most
    checkpoint_seconds: float = 5.0  # seconds a record stays unsealed, about
    retry_initial: float = 0.05  # seconds before retrying a failed write; doubles
    retry_max: float = 1.0


class AuditWriter:
    """One process's audit chain: append records, commit them in batches, sign checkpoints.

    Call `start()` in the event loop that will append, and `stop()` before it closes. The
    queue and the flags below are shared with the writer thread under `_cond`.
    """

    def __init__(
        self,
        store: AuditStore,
        writer_id: str,
        key: SigningKey | Signer,
        options: WriterOptions | None = None,
        *,
        claim: WriterClaim | None = None,
        clock: Callable[[], float] = time.time,
        anchor: Anchor | None = None,
        ahead: WriteAhead | None = None,
    ) -> None:
        self._store = store
        self._ahead_files = ahead
        self._ahead = ahead  # None once a write to it failed: strict appends wait for commits
        self._assigned = 0  # the chain seq of the last record queued (the loop's)
        self._options = options or WriterOptions()
        self._claim = claim
        self._clock = clock
        self._chain = Chain(writer_id)  # the thread's alone once started
        self._seals = Sealer(writer_id, key, anchor, self._options, clock)
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[_Item] = deque()
        self._inflight: list[_Item] = []
        self._durable = 0  # pending records whose caller waits for the commit
        self._idle = False  # the thread waits for records
        self._lingering = False  # the thread waits for a batch to fill
        self._stopping = False
        self._abandon = False  # stop gave up: the thread ends at its next chance
        self._write_started: float | None = None  # monotonic start of the write under way
        self._room_waiters = 0
        self._healthy = True
        self._problem = ""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room: asyncio.Event | None = None
        self._finished: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def store(self) -> AuditStore:
        """The store this writer appends to (thread-safe; for reads beside the writer)."""
        return self._store

    @property
    def writer_id(self) -> str:
        """The id of this writer's chain."""
        return self._chain.writer_id

    @property
    def anchor(self) -> Anchor | None:
        """Where this writer's checkpoints and heartbeats go besides the store (for sinks)."""
        return self._seals.anchor

    @property
    def healthy(self) -> bool:
        """Whether the writer runs and its last write succeeded; refuse calls when False."""
        return self._healthy and self._running

    @property
    def problem(self) -> str:
        """Why the writer is unhealthy (empty when it is not)."""
        return "" if self.healthy else (self._problem or "the audit writer is not running")

    @property
    def queue_depth(self) -> int:
        """Records accepted but not yet committed (queued or in the batch being written)."""
        return len(self._pending) + len(self._inflight)

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last committed entry."""
        return self._chain.seq, self._chain.head

    @property
    def _running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping

    async def start(self) -> None:
        """Continue this writer's chain from the store and start the writer thread."""
        if self._thread is not None:
            raise RuntimeError("the audit writer was started already")
        loop = self._loop = asyncio.get_running_loop()
        wid = self.writer_id
        last, mark = await asyncio.to_thread(
            lambda: (self._store.last(wid), self._store.last_checkpoint(wid))
        )
        if last is not None:
            self._chain = Chain(wid, last[0], last[1])
        if self._ahead is not None:
            await asyncio.to_thread(self._replay, self._ahead)
        self._assigned = self._chain.seq
        self._seals.start(mark)
        self._room, self._finished = asyncio.Event(), loop.create_future()
        self._thread = threading.Thread(target=self._main, name=f"bastion-audit-{wid}")
        self._thread.daemon = True  # a write hung in the kernel must not block exit
        self._thread.start()
        self._watchdog = loop.call_later(self._options.commit_timeout / 4, self._watch)
        log.info("audit writer %s continues its chain at seq %d", wid, self._chain.seq)

    async def append(self, record: AuditRecord, durable: bool) -> None:
        """Queue `record`; with `durable`, return only once it is committed to the store.

        Raises AuditUnavailable when the writer is unhealthy (strict), when no room frees up
        within `put_timeout`, or when the commit fails or hangs past `commit_timeout` (the
        record then stays queued and is written if the store recovers); TypeError when the
        record is not JSON-serializable.
        """
        if not self._running:
            raise AuditUnavailable("the audit writer is not running")
        data = record.to_json()
        if self.queue_depth >= self._options.queue_max:
            await self._wait_for_room()
        if not durable:
            self._put(data, durable=False)
            return
        if not self._healthy:
            self._put(data, durable=False)
            raise AuditUnavailable(f"the audit trail is unavailable: {self._problem}")
        done = self._put(data, durable=True)
        if done is not None:
            await done

    async def stop(self, grace: float = 10.0) -> None:
        """Write what is queued, seal the chain with a checkpoint, and release the store.

        Raises AuditUnavailable naming how many records could not be written within `grace`
        seconds.
        """
        if self._finished is None or self._stopping:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(self._finished)
        except TimeoutError:
            with self._cond:
                self._abandon = True
                self._cond.notify_all()
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self._claim is not None:
                self._claim.release()
        lost = self.queue_depth
        if lost:
            kept = " (kept in the write-ahead for the next start)" if self._ahead_files else ""
            raise AuditUnavailable(
                f"{lost} audit records could not be written before stop{kept}: {self._problem}"
            )

    # --- the event loop's side ----------------------------------------------------------------

    def _put(self, data: bytes, durable: bool) -> _Waiter:
        """Queue `data` (written ahead first, when there is a write-ahead); the future to
        await when `durable` and only the commit makes the record so."""
        with self._cond:
            seq = self._assigned + 1
            ahead = self._ahead is not None and self._write_ahead(self._ahead, seq, data)
            done: _Waiter = None
            if durable and not ahead:
                assert self._loop is not None  # noqa: S101 - append checked _running
                done = self._loop.create_future()
                self._durable += 1
            self._assigned = seq
            self._pending.append((data, done))
            if self._idle or (
                self._lingering
                and (done is not None or len(self._pending) >= self._options.batch_max)
            ):
                self._cond.notify()
        return done

    def _write_ahead(self, ahead: WriteAhead, seq: int, data: bytes) -> bool:
        """Under `_cond`: append to the write-ahead; on failure give it up for good (strict
        appends then wait for commits, which still record every call) and say False."""
        try:
            ahead.write(seq, data)
        except OSError as exc:
            log.error(
                "audit writer %s: the write-ahead failed (%s); calls now wait for the store",
                self.writer_id,
                exc,
            )
            self._ahead = None
            return False
        return True

    async def _wait_for_room(self) -> None:
        assert self._room is not None  # noqa: S101 - start() ran
        with self._cond:
            self._room_waiters += 1
        try:
            async with asyncio.timeout(self._options.put_timeout):
                while self.queue_depth >= self._options.queue_max:
                    self._room.clear()
                    await self._room.wait()
        except TimeoutError:
            raise AuditUnavailable(
                f"the audit queue is full ({self.queue_depth} records) and did not drain "
                f"within {self._options.put_timeout} s: {self._problem or 'the store is slow'}"
            ) from None
        finally:
            with self._cond:
                self._room_waiters -= 1

    def _settle(self, waiters: list[asyncio.Future[None]], error: str | None) -> None:
        """On the loop: wake the strict callers of a batch, and callers waiting for room."""
        for done in waiters:
            if not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(AuditUnavailable(error))
        if self._room is not None:
            self._room.set()

    def _watch(self) -> None:
        """On the loop, every commit_timeout/4: fail strict callers of a write that hangs."""
        started = self._write_started
        timeout = self._options.commit_timeout
        if started is not None and time.monotonic() - started > timeout:
            message = f"the audit store did not commit within {timeout} s"
            self._mark_unhealthy(message)
            with self._cond:
                items = [*self._inflight, *self._pending]
            self._settle([done for _, done in items if done is not None], message)
        if self._loop is not None and self._running:
            self._watchdog = self._loop.call_later(timeout / 4, self._watch)

    def _exited(self) -> None:
        """On the loop: the thread ended; nobody will settle what is still queued."""
        message = self._problem or "the audit writer stopped"
        with self._cond:
            items = [*self._inflight, *self._pending]
        self._settle([done for _, done in items if done is not None], message)
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback(*args)` on the loop, from the thread."""
        try:
            assert self._loop is not None  # noqa: S101 - start() ran
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            log.warning("audit writer %s: the event loop is closed", self.writer_id)

    # --- the writer thread's side -------------------------------------------------------------

    def _main(self) -> None:
        """The writer thread: take batches and write them until stopped with an empty queue."""
        retry = self._options.retry_initial
        try:
            while True:
                batch = self._take()
                if batch is None:
                    self._seals.last_anchoring()
                    return
                error = self._write(batch)
                self._seals.tend_anchor(*self.head, self._stopping)
                waiters = [done for _, done in batch if done is not None]
                if waiters or self._room_waiters:
                    self._call(self._settle, waiters, error)
                if error is None:
                    retry = self._options.retry_initial
                    continue
                with self._cond:
                    if self._abandon:
                        return
                    self._cond.wait(retry)
                retry = min(retry * 2, self._options.retry_max)
        except BaseException as exc:
            self._mark_unhealthy(f"the audit writer thread failed: {exc!r}")
            log.exception("audit writer %s: the thread failed", self.writer_id)
            raise
        finally:
            self._close_ahead()
            try:
                self._store.close()
            except Exception:
                log.exception("audit writer %s: closing the store failed", self.writer_id)
            self._call(self._exited)

    def _take(self) -> list[_Item] | None:
        """The next records to write; [] to write only a due checkpoint; None when done."""
        options = self._options
        with self._cond:
            while not self._pending:
                if self._stopping:
                    seals = self._seals
                    unsealed = self._chain.seq > seals.sealed_seq and not seals.broken
                    return [] if unsealed else None
                due = self._due_in()
                if due == 0:
                    return []
                self._idle = True
                try:
                    self._cond.wait(due)
                finally:
                    self._idle = False
            if (
                options.linger > 0
                and self._durable == 0
                and len(self._pending) < options.batch_max
                and not self._stopping
            ):
                self._lingering = True
                try:
                    self._cond.wait(options.linger)
                finally:
                    self._lingering = False
            count = min(options.batch_max, len(self._pending))
            # A batch ends where a checkpoint is due, so checkpoints fall every
            # `checkpoint_every` records however large batches grow.
            due = self._seals.sealed_seq + options.checkpoint_every - self._chain.seq
            if due > 0:
                count = min(count, due)
            batch = [self._pending.popleft() for _ in range(count)]
            self._durable -= sum(1 for _, done in batch if done is not None)
            self._inflight = batch
            self._write_started = time.monotonic()
            return batch

    def _due_in(self) -> float | None:
        """Seconds until a checkpoint, heartbeat or anchor retry is due; None when none is."""
        now, times = self._clock(), self._seals.due_times(self._chain.seq)
        return max(0.0, min(times) - now) if times else None

    def _write(self, batch: list[_Item]) -> str | None:
        """Link and store one batch, with a checkpoint when one is due; the error, if any."""
        now = self._clock()
        try:
            entries = self._chain.extend(data for data, _ in batch)
            seq, head = (entries[-1].seq, entries[-1].hash) if entries else self.head
            mark = self._seals.checkpoint(seq, head, now, self._stopping)
            if not entries and mark is None:
                return None  # a heartbeat's turn: the store was not touched, nothing to report
            self._store.append_batch(entries, [mark] if mark is not None else [])
        except Exception as exc:  # any failure of the store, expected or not, fails closed
            message = (
                exc.message
                if isinstance(exc, AuditUnavailable)
                else f"the audit store failed: {type(exc).__name__}: {exc}"
            )
            self._mark_unhealthy(message)
            with self._cond:  # back to the front, in order; the waiters are told (once)
                self._pending.extendleft((data, None) for data, _ in reversed(batch))
                self._inflight, self._write_started = [], None
            return message
        if entries:
            self._chain.advance(entries[-1])
            self._ahead_committed(entries[-1].seq)
        if mark is not None:
            self._seals.sealed(mark)
        with self._cond:
            self._inflight, self._write_started = [], None
        if not self._healthy:
            log.warning("audit writer %s: the store works again", self.writer_id)
        self._healthy, self._problem = True, ""
        return None

    def _replay(self, ahead: WriteAhead) -> None:
        """In start's thread: commit what the write-ahead holds past the store's last record
        (the calls a killed process had recorded there), then empty it for new appends."""
        records = ahead.replay(self._chain.seq)
        if records:
            entries = self._chain.extend(records)
            self._store.append_batch(entries)
            self._chain.advance(entries[-1])
            log.warning(
                "audit writer %s: committed %d records the last process had only written ahead",
                self.writer_id,
                len(records),
            )
        try:
            ahead.open()
        except OSError as exc:
            raise AuditUnavailable(f"cannot open the audit write-ahead: {exc}") from exc

    def _ahead_committed(self, seq: int) -> None:
        """In the thread, after a commit: let the write-ahead drop what the store now holds."""
        ahead = self._ahead
        if ahead is None:
            return
        try:
            ahead.committed(seq)
        except OSError as exc:  # a file that cannot shrink still holds only good lines
            log.warning("audit writer %s: cannot empty the write-ahead: %s", self.writer_id, exc)

    def _close_ahead(self) -> None:
        """In the thread, at its end: delete the write-ahead when the store holds it all."""
        ahead = self._ahead_files
        if ahead is None:
            return
        with self._cond:
            complete = not self._pending and not self._inflight
        try:
            ahead.close(remove=complete)
        except OSError as exc:
            log.warning("audit writer %s: closing the write-ahead: %s", self.writer_id, exc)

    def _mark_unhealthy(self, message: str) -> None:
        if self._healthy:
            log.error("audit writer %s: %s; refusing strict appends", self.writer_id, message)
        self._healthy, self._problem = False, message
