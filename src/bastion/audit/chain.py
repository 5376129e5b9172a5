"""The hash chain and its signed checkpoints; pure functions over values, no I/O.

Every writer (one gateway process) keeps its own chain. Entry `seq` (1, 2, 3, …) of writer `w`
holding the canonical record JSON `r` is linked to the entry before it by

```
hash(seq) = SHA-256( prev_hash      32 bytes: the hash of entry seq-1, or 32 zero bytes for seq 1
                   ‖ len(w)         1 byte
                   ‖ w              the writer id, ASCII [A-Za-z0-9._-]{1,64}
                   ‖ seq            8 bytes, unsigned big-endian
                   ‖ r )            the record's canonical JSON, UTF-8, to the end
```

and stored as lowercase hex. Changing, removing, inserting or reordering an entry breaks the
links after it. Anyone can recompute a chain, so every `checkpoint_every` records or
`checkpoint_seconds` the writer signs its head (seal.py): a rewritten chain then disagrees with
a signed checkpoint, and a cut tail leaves a checkpoint that names records the store no longer
has. What no checkpoint covers yet (at most one interval of records at the end of a chain,
reported as `unsealed`) is protected by the links alone.

All of that is only as good as the store's own copy of the checkpoints: whoever can write the
store can delete a checkpoint with the records under it, or, holding the key, rewrite and
re-sign. So `verify(..., anchored=...)` also holds the store to the signed heads an anchor kept
elsewhere saw (anchor.py): a head the store no longer reaches (a truncated tail), a writer it no
longer has, a hash it now has differently (rewritten, whatever signs it now).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.audit.seal import Anchored, Checkpoint, checkpoint_message
from bastion.errors import TokenError
from bastion.identity.keys import KeySet

GENESIS = "0" * 64
WRITER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SEQ = struct.Struct(">Q")
MAX_PROBLEMS = 1000  # past this, a report counts problems instead of listing them


def link(prev_hash: str, writer_id: str, seq: int, record: bytes) -> str:
    """The hash of entry `seq` of `writer_id` holding `record`, after `prev_hash` (see above)."""
    wid = writer_id.encode("ascii")
    h = hashlib.sha256(bytes.fromhex(prev_hash))
    h.update(len(wid).to_bytes(1, "big"))
    h.update(wid)
    h.update(_SEQ.pack(seq))
    h.update(record)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored link of a chain: a record's canonical JSON and where it sits."""

    writer_id: str
    seq: int
    record: str
    prev_hash: str
    hash: str


@dataclass(slots=True)
class Chain:
    """The head of one writer's chain; `extend` makes the next entries without changing it.

    The writer commits a batch and only then `advance`s, so a failed write leaves the head
    where the store's chain ends.
    """

    writer_id: str
    seq: int = 0
    head: str = GENESIS

    def __post_init__(self) -> None:
        if not WRITER_ID.fullmatch(self.writer_id):
            raise ValueError(f"expected a writer id matching {WRITER_ID.pattern}, found other")

    def extend(self, records: Iterable[bytes]) -> list[Entry]:
        """The entries that append `records` after the head, in order."""
        entries, seq, head, wid = [], self.seq, self.head, self.writer_id
        for record in records:
            seq += 1
            new = link(head, wid, seq, record)
            entries.append(Entry(wid, seq, record.decode("utf-8"), head, new))
            head = new
        return entries

    def advance(self, last: Entry) -> None:
        """Move the head to `last`, an entry `extend` made and the store committed."""
        self.seq, self.head = last.seq, last.hash


class Problem(enum.StrEnum):
    """What `verify` found wrong, at one writer's seq."""

    MODIFIED = "modified"  # the record's content does not match its hash
    CHAIN_BREAK = "chain_break"  # prev_hash is not the hash of the record before (inserted)
    MISSING = "missing"  # a seq is absent (deleted)
    DUPLICATE = "duplicate"  # a seq is stored twice (inserted)
    REORDERED = "reordered"  # a seq is stored after a later one
    TRUNCATED = "truncated"  # a signed checkpoint names records past the stored end
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"  # the chain was rewritten under a checkpoint
    BAD_SIGNATURE = "bad_signature"  # a checkpoint's signature does not verify (forged)
    UNKNOWN_KEY = "unknown_key"  # a checkpoint names a key the key file does not list
    MISSING_WRITER = "missing_writer"  # the anchor names a writer the store has no record of
    REWRITTEN = "rewritten"  # the store's hash differs from the anchored one: re-signed history
    ANCHOR_INVALID = "anchor_invalid"  # an anchor line is unreadable, forged or of an unknown key


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem at one place: writer, seq (the first seq concerned), what and why."""

    writer_id: str
    seq: int
    problem: Problem
    message: str

    def __str__(self) -> str:
        return f"writer {self.writer_id} seq {self.seq}: {self.problem}: {self.message}"


@dataclass(slots=True)
class WriterSummary:
    """What one writer's chain holds: its range, and how much of it a checkpoint covers."""

    entries: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    checkpoints: int = 0
    sealed_seq: int = 0  # seq of the last valid checkpoint that matches the store
    anchored_seq: int = 0  # seq of the last anchored head that matches the store

    @property
    def unsealed(self) -> int:
        """Records after the last valid checkpoint: protected by the links alone."""
        return max(0, self.last_seq - self.sealed_seq)


@dataclass(slots=True)
class VerifyReport:
    """The result of `verify`: intact or not, every problem found (up to MAX_PROBLEMS)."""

    findings: list[Finding] = field(default_factory=list)
    writers: dict[str, WriterSummary] = field(default_factory=dict)
    problem_count: int = 0
    anchored: int | None = None  # anchor entries checked; None: no anchor was given
    notes: list[str] = field(default_factory=list)  # what the result does not prove

    @property
    def ok(self) -> bool:
        """Whether the trail is intact."""
        return self.problem_count == 0

    @property
    def first(self) -> Finding | None:
        """The first problem, by writer and seq; None when intact."""
        return self.findings[0] if self.findings else None

    @property
    def entries(self) -> int:
        """How many entries were read."""
        return sum(summary.entries for summary in self.writers.values())


@dataclass(slots=True)
class _Walk:
    """The verifier's state for one writer while its entries stream past."""

    summary: WriterSummary
    head: str = GENESIS
    gaps: list[tuple[int, int]] = field(default_factory=list)  # missing [start, end]
    late: set[int] = field(default_factory=set)  # seqs found after a later seq (in a gap)


def verify(
    entries: Iterable[Entry],
    checkpoints: Iterable[Checkpoint],
    public_keys: KeySet,
    anchored: Iterable[Anchored] | None = None,
) -> VerifyReport:
    """Check every link and checkpoint, and the store against the `anchored` heads when given;
    entries come in stored (append) order.

    Entries stream through (one writer's state at a time in memory, plus the checkpoints and
    anchored heads), so a large trail needs no more memory than a small one.
    """
    report = VerifyReport()
    found: list[Finding] = []
    by_seq: dict[tuple[str, int], list[Checkpoint]] = {}
    for cp in checkpoints:
        summary = report.writers.setdefault(cp.writer_id, WriterSummary())
        summary.checkpoints += 1
        problem = _signature_problem(cp, public_keys)
        if problem is not None:
            found.append(problem)
        else:
            by_seq.setdefault((cp.writer_id, cp.seq), []).append(cp)
    pinned = _pinned(anchored, public_keys, report, found)
    walks: dict[str, _Walk] = {}
    for entry in entries:
        walk = walks.get(entry.writer_id)
        if walk is None:
            summary = report.writers.setdefault(entry.writer_id, WriterSummary())
            walk = walks[entry.writer_id] = _Walk(summary)
        _step(walk, entry, found)
        for cp in by_seq.get((entry.writer_id, entry.seq), ()):
            if cp.hash != entry.hash:
                found.append(
                    Finding(
                        entry.writer_id,
                        entry.seq,
                        Problem.CHECKPOINT_MISMATCH,
                        f"the checkpoint signed at {cp.time:.3f} names hash {cp.hash[:16]}…, "
                        f"the store has {entry.hash[:16]}…: the chain was rewritten",
                    )
                )
            else:
                walk.summary.sealed_seq = max(walk.summary.sealed_seq, cp.seq)
        _hold_to_anchor(walk, entry, pinned.get((entry.writer_id, entry.seq), ()), found)
    for writer_id, summary in report.writers.items():
        walk = walks.get(writer_id) or _Walk(summary)
        found.extend(_gap_findings(writer_id, walk))
        found.extend(_tail_findings(writer_id, summary, by_seq))
    found.extend(_anchor_tail_findings(pinned, walks))
    found.sort(key=lambda f: (f.writer_id, f.seq, list(Problem).index(f.problem)))
    report.problem_count = len(found)
    report.findings = found[:MAX_PROBLEMS]
    return report


def _pinned(
    anchored: Iterable[Anchored] | None,
    public_keys: KeySet,
    report: VerifyReport,
    found: list[Finding],
) -> dict[tuple[str, int], list[Anchored]]:
    """The anchored heads whose signature verifies, by (writer, seq); the others are findings."""
    pinned: dict[tuple[str, int], list[Anchored]] = {}
    if anchored is None:
        return pinned
    report.anchored = 0
    for item in anchored:
        report.anchored += 1
        problem = _signature_problem(item.point, public_keys, item)
        if problem is not None:
            found.append(problem)
        else:
            pinned.setdefault((item.point.writer_id, item.point.seq), []).append(item)
    return pinned


def _hold_to_anchor(
    walk: _Walk, entry: Entry, pinned: Iterable[Anchored], found: list[Finding]
) -> None:
    """An anchored head at this entry's seq must name this entry's hash."""
    for item in pinned:
        if item.point.hash == entry.hash:
            walk.summary.anchored_seq = max(walk.summary.anchored_seq, entry.seq)
            continue
        found.append(
            Finding(
                entry.writer_id,
                entry.seq,
                Problem.REWRITTEN,
                f"re-signed or rewritten history: {item.what} names hash "
                f"{item.point.hash[:16]}…, the store has {entry.hash[:16]}…",
            )
        )


def _anchor_tail_findings(
    pinned: dict[tuple[str, int], list[Anchored]], walks: dict[str, _Walk]
) -> list[Finding]:
    """A writer the anchor saw reach a seq the store does not: a missing writer or a cut tail."""
    furthest: dict[str, Anchored] = {}
    for (writer_id, seq), items in pinned.items():
        best = furthest.get(writer_id)
        if seq > 0 and (best is None or seq > best.point.seq):
            furthest[writer_id] = items[0]
    findings = []
    for writer_id, item in sorted(furthest.items()):
        walk = walks.get(writer_id)
        seq = item.point.seq
        if walk is None:
            message = (
                f"missing writer: {item.what} names its chain up to seq {seq}, the store has "
                "no record of it: the whole chain was deleted"
            )
            findings.append(Finding(writer_id, 1, Problem.MISSING_WRITER, message))
        elif walk.summary.last_seq < seq:
            last = walk.summary.last_seq
            message = (
                f"truncated tail: the store ends at seq {last} but {item.what} names seq "
                f"{seq}: seqs {last + 1}–{seq} were cut off"
            )
            findings.append(Finding(writer_id, last + 1, Problem.TRUNCATED, message))
    return findings


def _step(walk: _Walk, entry: Entry, found: list[Finding]) -> None:
    summary, wid, seq = walk.summary, entry.writer_id, entry.seq
    summary.entries += 1
    if summary.first_seq is None:
        summary.first_seq = seq
    if _recompute(entry) != entry.hash:
        found.append(
            Finding(wid, seq, Problem.MODIFIED, "the record does not match its hash: altered")
        )
    expected = summary.last_seq + 1
    if seq < expected:
        if seq not in walk.late and any(start <= seq <= end for start, end in walk.gaps):
            walk.late.add(seq)
            message = f"stored after seq {summary.last_seq}: records were reordered"
            found.append(Finding(wid, seq, Problem.REORDERED, message))
        else:
            found.append(Finding(wid, seq, Problem.DUPLICATE, "seq stored twice: inserted"))
        return  # the chain goes on from the highest seq seen
    if seq > expected:
        walk.gaps.append((expected, seq - 1))
    elif entry.prev_hash != walk.head:
        message = (
            f"prev_hash is not the hash of seq {seq - 1}: a record before it was inserted "
            "or replaced"
        )
        found.append(Finding(wid, seq, Problem.CHAIN_BREAK, message))
    summary.last_seq, walk.head = seq, entry.hash


def _recompute(entry: Entry) -> str | None:
    """The hash the entry should have; None when its fields cannot even be hashed."""
    try:
        return link(entry.prev_hash, entry.writer_id, entry.seq, entry.record.encode("utf-8"))
    except (ValueError, OverflowError):
        return None


def _gap_findings(writer_id: str, walk: _Walk) -> list[Finding]:
    """One finding per run of seqs that never appeared (the late ones are not missing)."""
    findings = []
    for start, end in walk.gaps:
        runs, begin = [], start
        for seq in sorted(s for s in walk.late if start <= s <= end):
            if seq > begin:
                runs.append((begin, seq - 1))
            begin = seq + 1
        if begin <= end:
            runs.append((begin, end))
        for first, last in runs:
            what = f"seq {first}" if first == last else f"seqs {first}–{last}"
            findings.append(Finding(writer_id, first, Problem.MISSING, f"{what} absent: deleted"))
    return findings


def _tail_findings(
    writer_id: str, summary: WriterSummary, by_seq: dict[tuple[str, int], list[Checkpoint]]
) -> list[Finding]:
    """A valid checkpoint past the last stored seq means the tail was cut off."""
    beyond = [
        cp
        for (wid, seq), cps in by_seq.items()
        if wid == writer_id and seq > summary.last_seq
        for cp in cps
    ]
    if not beyond:
        return []
    furthest = max(beyond, key=lambda cp: cp.seq)
    return [
        Finding(
            writer_id,
            summary.last_seq + 1,
            Problem.TRUNCATED,
            f"the store ends at seq {summary.last_seq} but a checkpoint signed at "
            f"{furthest.time:.3f} names seq {furthest.seq}: the tail was cut off",
        )
    ]


def _signature_problem(
    cp: Checkpoint, public_keys: KeySet, anchored: Anchored | None = None
) -> Finding | None:
    """Why the signature of a checkpoint (or an anchored head) does not hold; None when it does."""
    if anchored is None:
        names, signature_of = "the checkpoint names", "the checkpoint's signature"
        unknown, bad = Problem.UNKNOWN_KEY, Problem.BAD_SIGNATURE
    else:
        names, signature_of = f"{anchored.what} names", f"the signature of {anchored.what}"
        unknown = bad = Problem.ANCHOR_INVALID
    try:
        public, _ = public_keys.get(cp.kid)
    except TokenError:
        message = f"{names} key {cp.kid[:64]!r}, which the trusted checkpoint keys do not list"
        return Finding(cp.writer_id, cp.seq, unknown, message)
    heartbeat = anchored is not None and anchored.heartbeat
    try:
        signature = base64.urlsafe_b64decode(cp.signature + "=" * (-len(cp.signature) % 4))
        if not isinstance(public, ed25519.Ed25519PublicKey):
            raise InvalidSignature
        signed = checkpoint_message(
            cp.writer_id, cp.seq, cp.hash, cp.time, cp.kid, heartbeat=heartbeat
        )
        public.verify(signature, signed)
    except (InvalidSignature, ValueError, OverflowError, UnicodeError):
        message = f"{signature_of} does not verify: it was forged or altered"
        return Finding(cp.writer_id, cp.seq, bad, message)
    return None
