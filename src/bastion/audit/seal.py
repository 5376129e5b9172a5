"""Signed heads of a chain: checkpoints (kept in the store and the anchor) and heartbeats (kept
in the anchor only); pure, no I/O.

Every `checkpoint_every` records or `checkpoint_seconds` the writer signs the head (seq, hash)
of its chain with an Ed25519 key (`EdDSA`) that only it holds, or that only Vault holds
(signer.py); every `audit.anchor.heartbeat_seconds` it signs a heartbeat of the same form,
naming its head at that moment:

```
message = tag ‖ len(w) 1 byte ‖ w ‖ seq 8 bytes big-endian ‖ hash 32 bytes
          ‖ time (IEEE 754 double, big-endian) ‖ len(kid) 1 byte ‖ kid

tag     = b"bastion.audit.checkpoint.v1\\x00"  or  b"bastion.audit.heartbeat.v1\\x00"
```

The tags differ so that one can never be passed off as the other.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.identity.keys import SigningKey

_CHECKPOINT_TAG = b"bastion.audit.checkpoint.v1\x00"
_HEARTBEAT_TAG = b"bastion.audit.heartbeat.v1\x00"
_SEQ = struct.Struct(">Q")
_TIME = struct.Struct(">d")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A writer's signature over the head of its chain at `seq`, made at `time`."""

    writer_id: str
    seq: int
    hash: str
    time: float
    kid: str
    signature: str  # base64url, no padding


class Signer(Protocol):
    """Signs checkpoint and heartbeat messages with an Ed25519 key named `kid` (signer.py)."""

    @property
    def kid(self) -> str:
        """The RFC 7638 thumbprint of the public key, as `verify` looks it up."""

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`; AuditUnavailable when it cannot sign."""


def checkpoint_message(
    writer_id: str, seq: int, hash_: str, time: float, kid: str, *, heartbeat: bool = False
) -> bytes:
    """The exact bytes a checkpoint (or heartbeat) signature covers (see the module docstring)."""
    wid, kid_bytes = writer_id.encode("ascii"), kid.encode("utf-8")
    return b"".join(
        (
            _HEARTBEAT_TAG if heartbeat else _CHECKPOINT_TAG,
            len(wid).to_bytes(1, "big"),
            wid,
            _SEQ.pack(seq),
            bytes.fromhex(hash_),
            _TIME.pack(time),
            len(kid_bytes).to_bytes(1, "big"),
            kid_bytes,
        )
    )


def sign_checkpoint(
    key: SigningKey | Signer,
    writer_id: str,
    seq: int,
    hash_: str,
    time: float,
    *,
    heartbeat: bool = False,
) -> Checkpoint:
    """Sign the head (`seq`, `hash_`) of `writer_id`'s chain with an Ed25519 key or signer."""
    message = checkpoint_message(writer_id, seq, hash_, time, key.kid, heartbeat=heartbeat)
    if isinstance(key, SigningKey):
        if not isinstance(key.private, ed25519.Ed25519PrivateKey):
            raise ValueError(f"expected an Ed25519 checkpoint key, found {key.alg}")
        signature = key.private.sign(message)
    else:
        signature = key.sign(message)
    encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")
    return Checkpoint(writer_id, seq, hash_, time, key.kid, encoded)


@dataclass(frozen=True, slots=True)
class Anchored:
    """A signed head found outside the store: a checkpoint or heartbeat at `where` (a file and
    line) of the anchor."""

    point: Checkpoint
    heartbeat: bool
    where: str

    @property
    def what(self) -> str:
        """How a message names it: `the anchor's heartbeat signed at … (FILE line N)`."""
        kind = "heartbeat" if self.heartbeat else "checkpoint"
        return f"the anchor's {kind} signed at {self.point.time:.3f} ({self.where})"
