"""The trail cannot be cut or re-signed unnoticed: checkpoints and heartbeats anchored outside
the store, a signing key outside the state directory (a file, or OpenBao transit for real).

Each attack is done to the SQLite file directly, as whoever can write the store would. The
store alone still verifies after it (the weakness the anchor closes, kept visible here); held to
the anchor, or to keys from outside the state directory, `verify` names what was done.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from tests.conftest import free_port, until_async
from tests.test_audit_record import sample
from tests.test_audit_sinks import UdpReceiver, parse_5424
from tests.test_secrets_vault import Bao, start_bao
from typer.testing import CliRunner

from bastion.audit.anchor import Anchor, anchor_line
from bastion.audit.chain import link
from bastion.audit.keys import DB_FILE, audit_dir, load_checkpoint_key
from bastion.audit.seal import sign_checkpoint
from bastion.audit.store import SqliteAuditStore
from bastion.audit.trail import open_trail_writer, open_writer
from bastion.audit.writer import AuditWriter, WriterOptions
from bastion.config import load
from bastion.control.audit.forward import open_forwarders
from bastion.control.cli.audit import app
from bastion.errors import AuditUnavailable, ConfigError
from bastion.identity.keys import b64url, generate, thumbprint

TRANSIT_KEY = "bastion-audit"


# --- building a trail ----------------------------------------------------------------------


def write_config(tmp: Path, audit: dict[str, Any] | None = None) -> Path:
    """A config with its state in tmp/state and the anchor in tmp/outside (another volume in a
    real deployment); checkpoints every 10 records and at stop, none by time."""
    section: dict[str, Any] = {
        "checkpoint_every": 10,
        "checkpoint_seconds": 3600,
        "anchor": {"path": "outside/anchor.jsonl"},
        **(audit or {}),
    }
    (tmp / "outside").mkdir(exist_ok=True)
    path = tmp / "bastion.yaml"
    path.write_text(json.dumps({"state_dir": "state", "audit": section}))
    return path


async def fill(writer: AuditWriter, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        await writer.append(sample(i), durable=True)


async def build(config: Path, count: int = 25) -> str:
    """`count` records by one writer (checkpoints at 10, 20 and at stop); its id."""
    writer = open_trail_writer(load(config))
    await writer.start()
    await fill(writer, count)
    await writer.stop()
    return writer.writer_id


def store_of(config: Path) -> sqlite3.Connection:
    return sqlite3.connect(audit_dir(config.parent / "state") / DB_FILE, isolation_level=None)


def run(*args: str | Path) -> Any:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def alone(config: Path) -> Any:
    """`verify` of the store by itself: the audit directory, its keys, no anchor."""
    return run("verify", "--config", audit_dir(config.parent / "state"))


def anchored(config: Path) -> Any:
    """`verify` as configured: the signer's keys and the anchor the config names."""
    return run("verify", "--config", config, "--json")


def problems(result: Any) -> list[tuple[str, int, str]]:
    data = json.loads(result.stdout)
    return [(p["problem"], p["seq"], p["writer"]) for p in data["problems"]]


# --- the attacks -----------------------------------------------------------------------------


def cut_tail(db: sqlite3.Connection) -> None:
    """(a) Delete the last checkpoint and every record after the one before it."""
    last, before = (
        row[0] for row in db.execute("SELECT seq FROM checkpoints ORDER BY seq DESC LIMIT 2")
    )
    db.execute("DELETE FROM checkpoints WHERE seq = ?", (last,))
    db.execute("DELETE FROM entries WHERE seq > ?", (before,))


def delete_writer(db: sqlite3.Connection, wid: str) -> None:
    """(b) Delete a whole writer's chain."""
    db.execute("DELETE FROM entries WHERE writer_id = ?", (wid,))
    db.execute("DELETE FROM checkpoints WHERE writer_id = ?", (wid,))


def rewrite_and_resign(db: sqlite3.Connection, wid: str, folder: Path) -> None:
    """(c) Change record 7, relink every hash after it and re-sign every checkpoint with the
    key in the state directory (made there when the gateway signs elsewhere, and listed in
    checkpoint-keys.json beside it, as an attacker would)."""
    key = load_checkpoint_key(folder)
    db.execute(
        'UPDATE entries SET record = replace(record, \'"tenant":"acme"\', \'"tenant":"evil"\')'
        " WHERE seq = 7"
    )
    head = db.execute("SELECT hash FROM entries WHERE seq = 6").fetchone()[0]
    for seq, record in db.execute("SELECT seq, record FROM entries WHERE seq >= 7 ORDER BY seq"):
        new = link(head, wid, seq, record.encode())
        db.execute("UPDATE entries SET prev_hash = ?, hash = ? WHERE seq = ?", (head, new, seq))
        head = new
    for seq, when in db.execute("SELECT seq, time FROM checkpoints").fetchall():
        stored = db.execute("SELECT hash FROM entries WHERE seq = ?", (seq,)).fetchone()[0]
        cp = sign_checkpoint(key, wid, seq, stored, when)
        db.execute(
            "UPDATE checkpoints SET hash = ?, kid = ?, signature = ? WHERE seq = ?",
            (cp.hash, cp.kid, cp.signature, seq),
        )


# --- (a), (b), (c) against the anchor ----------------------------------------------------------


async def test_a_cut_tail_passes_alone_and_is_named_by_the_anchor(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    wid = await build(config)
    assert json.loads(anchored(config).stdout)["ok"] is True
    with store_of(config) as db:
        cut_tail(db)
    assert alone(config).exit_code == 0  # the old weakness: the store alone looks whole
    result = anchored(config)
    assert result.exit_code == 1
    assert problems(result) == [("truncated", 21, wid)]
    text = run("verify", "--config", config).stdout
    assert text.startswith(
        f"TAMPERED: writer {wid} seq 21: truncated: truncated tail: the store ends at seq 20 "
        "but the anchor's checkpoint signed at "
    )
    assert "(anchor.jsonl line " in text and "names seq 25: seqs 21–25 were cut off" in text


async def test_b_a_deleted_writer_passes_alone_and_is_named_by_the_anchor(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    settings = load(config)
    one, two = open_trail_writer(settings), open_trail_writer(settings)
    await one.start()
    await two.start()
    await fill(one, 12)
    await fill(two, 12, start=100)
    await one.stop()
    await two.stop()
    with store_of(config) as db:
        delete_writer(db, two.writer_id)
    assert alone(config).exit_code == 0  # the old weakness: one intact chain is all there is
    result = anchored(config)
    assert result.exit_code == 1
    assert problems(result) == [("missing_writer", 1, two.writer_id)]
    message = json.loads(result.stdout)["first"]["message"]
    assert message.startswith("missing writer: the anchor's checkpoint signed at ")
    assert message.endswith(
        "names its chain up to seq 12, the store has no record of it: the whole chain was deleted"
    )


async def test_c_rewritten_history_resigned_with_the_state_dir_key_is_named_by_the_anchor(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)
    wid = await build(config)
    with store_of(config) as db:
        rewrite_and_resign(db, wid, audit_dir(tmp_path / "state"))
    assert alone(config).exit_code == 0  # the old weakness: the key beside the data re-signs
    result = anchored(config)
    assert result.exit_code == 1
    assert problems(result) == [
        ("rewritten", 10, wid),
        ("rewritten", 20, wid),
        ("rewritten", 25, wid),
    ]
    message = json.loads(result.stdout)["first"]["message"]
    assert message.startswith("re-signed or rewritten history: the anchor's checkpoint signed at ")


async def test_an_intact_trail_verifies_against_its_anchor(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    wid = await build(config, count=25)
    await build(config, count=5)  # restarted: the same writer goes on
    result = anchored(config)
    assert result.exit_code == 0, result.stdout
    data = json.loads(result.stdout)
    summary = data["writers"][wid]
    assert (summary["last_seq"], summary["anchored_seq"]) == (30, 30)
    # two heartbeats at the starts, checkpoints at 10, 20, 25 and 30
    assert data["anchor_entries"] == 6
    assert not any("no anchor" in note for note in data["notes"])
    lines = (tmp_path / "outside" / "anchor.jsonl").read_bytes().splitlines()
    kinds = [orjson.loads(line)["kind"] for line in lines]
    assert kinds == [
        "heartbeat",
        "checkpoint",
        "checkpoint",
        "checkpoint",
        "heartbeat",
        "checkpoint",
    ]


async def test_the_anchor_itself_is_held_to_the_keys(tmp_path: Path) -> None:
    """An anchor line added with another key, or altered, is refused, not trusted."""
    config = write_config(tmp_path)
    wid = await build(config, count=10)
    anchor = tmp_path / "outside" / "anchor.jsonl"
    lines = anchor.read_bytes().splitlines()
    last = orjson.loads(lines[-1])
    forged = sign_checkpoint(generate("EdDSA"), wid, 40, "ab" * 32, time.time())
    altered = {**last, "seq": 5}
    heartbeat = orjson.loads(lines[0])
    assert heartbeat["kind"] == "heartbeat"
    relabelled = {**heartbeat, "kind": "checkpoint"}  # one can never pass for the other
    extra = [anchor_line(forged, False), orjson.dumps(altered), orjson.dumps(relabelled), b"{oops"]
    anchor.write_bytes(b"\n".join([*lines, *extra]) + b"\n")
    result = anchored(config)
    assert result.exit_code == 1
    found = problems(result)
    assert ("anchor_invalid", 40, wid) in found  # unknown key: not a truncation at 40
    assert ("anchor_invalid", 5, wid) in found  # bad signature
    assert ("anchor_invalid", 0, wid) in found  # a heartbeat relabelled a checkpoint
    assert ("anchor_invalid", 0, "-") in found  # not JSON
    assert not any(problem == "truncated" for problem, _, _ in found)


async def test_verify_without_an_anchor_says_what_it_cannot_see(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    await build(config, count=3)
    text = alone(config).stdout
    assert text.startswith("intact: 3 records")
    assert "note: the checkpoint keys come from " in text and "beside the data" in text
    assert "note: no anchor was checked: a cut tail or a deleted writer's chain" in text


@pytest.mark.parametrize(
    ("option", "content", "message"),
    [
        ("--anchor", None, "anchor {path}: cannot read it (No such file or directory)"),
        ("--keys", b"not json", "--keys {path}: not a readable JWK Set"),
    ],
    ids=["missing-anchor", "garbage-keys"],
)
async def test_unreadable_anchor_or_keys_exit_2_naming_them(
    tmp_path: Path, option: str, content: bytes | None, message: str
) -> None:
    config = write_config(tmp_path)
    await build(config, count=1)
    path = tmp_path / "given"
    if content is not None:
        path.write_bytes(content)
    result = run("verify", "--config", config, option, path)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: " + message.format(path=path))
    assert "not json" not in result.stderr


# --- heartbeats ------------------------------------------------------------------------------


async def test_an_idle_writer_heartbeats_its_unsealed_head_into_the_anchor(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"anchor": {"path": "outside/anchor.jsonl", "heartbeat_seconds": 0.05}}
    )
    anchor = tmp_path / "outside" / "anchor.jsonl"
    writer = open_trail_writer(load(config))
    await writer.start()
    try:
        await fill(writer, 3)  # no checkpoint is due: 10 records or an hour
        beat = await heartbeat_naming(anchor, writer.writer_id, 3)
        assert beat["hash"] == writer.head[1]
        with store_of(config) as db:
            assert db.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 0
        assert anchored(config).exit_code == 0
        with store_of(config) as db:
            db.execute("DELETE FROM entries WHERE seq = 3")  # unsealed, yet anchored
        result = anchored(config)
        assert result.exit_code == 1
        assert problems(result) == [("truncated", 3, writer.writer_id)]
        assert "the anchor's heartbeat signed at" in json.loads(result.stdout)["first"]["message"]
    finally:
        await writer.stop()


async def heartbeat_naming(anchor: Path, wid: str, seq: int) -> dict[str, Any]:
    """The first heartbeat line naming `wid` at `seq`, polled for up to 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if anchor.exists():
            for line in anchor.read_bytes().splitlines():
                entry = orjson.loads(line)
                if (entry["kind"], entry["writer"], entry["seq"]) == ("heartbeat", wid, seq):
                    return dict(entry)
        await asyncio.sleep(0.02)
    raise AssertionError(f"no heartbeat of {wid} at seq {seq} within 10 s")


# --- a signer or anchor that fails ---------------------------------------------------------------


class FlakySigner:
    """A key that refuses to sign (as an unreachable Vault would) until `working` is set."""

    def __init__(self) -> None:
        self._key = generate("EdDSA")
        self.kid = self._key.kid
        self.working = False
        self.refused = 0

    def sign(self, message: bytes) -> bytes:
        if not self.working:
            self.refused += 1
            raise AuditUnavailable("Vault transit key transit/audit cannot be reached: refused")
        signature: bytes = self._key.private.sign(message)
        return signature


async def test_a_failing_signer_delays_the_seal_but_never_a_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    signer = FlakySigner()
    anchor_path = tmp_path / "outside" / "anchor.jsonl"
    anchor_path.parent.mkdir()
    writer = open_writer(
        tmp_path / "state",
        WriterOptions(checkpoint_every=2, linger=0, retry_initial=0.01, retry_max=0.05),
        signer=signer,
        anchor=Anchor(anchor_path, heartbeat_seconds=3600),
    )
    await writer.start()
    try:
        await fill(writer, 5)  # strict appends: every one committed although nothing is signed
        assert writer.healthy and writer.head[0] == 5
        assert signer.refused >= 1 and "cannot sign: Vault transit key" in caplog.text
        folder = audit_dir(tmp_path / "state")
        with SqliteAuditStore(folder / DB_FILE, create=False) as store:
            assert store.checkpoints() == []
        signer.working = True
        await fill(writer, 1, start=5)
        await until_async(lambda: anchor_path.exists() and b'"seq":6' in anchor_path.read_bytes())
    finally:
        await writer.stop()
    with SqliteAuditStore(folder / DB_FILE, create=False) as store:
        assert [cp.seq for cp in store.checkpoints()] == [6]


async def test_an_anchor_that_refuses_keeps_its_lines_until_it_works(tmp_path: Path) -> None:
    """The anchor's folder is missing (an unmounted volume): lines wait, in order, and are
    written once it is there; the records meanwhile are committed as usual."""
    missing = tmp_path / "volume"
    anchor = Anchor(missing / "anchor.jsonl", heartbeat_seconds=3600)
    writer = open_writer(
        tmp_path / "state",
        WriterOptions(checkpoint_every=2, linger=0, retry_max=0.05),
        anchor=anchor,
    )
    await writer.start()
    try:
        await fill(writer, 4)  # checkpoints at 2 and 4, after the start's heartbeat
        assert writer.healthy and anchor.pending == 3
        missing.mkdir()
        await until_async(lambda: anchor.pending == 0)
    finally:
        await writer.stop()
    lines = (missing / "anchor.jsonl").read_bytes().splitlines()
    assert [(e["kind"], e["seq"]) for e in map(orjson.loads, lines)] == [
        ("heartbeat", 0),
        ("checkpoint", 2),
        ("checkpoint", 4),
    ]


# --- sinks taking the checkpoint phase ------------------------------------------------------------


async def test_checkpoint_sinks_receive_the_anchor_and_can_serve_as_one(tmp_path: Path) -> None:
    """A jsonl sink and a syslog receiver listing `checkpoint` get every signed checkpoint and
    heartbeat (a copy of the anchor the store's writers cannot reach); a sink without it gets
    records only, as before."""
    loop = asyncio.get_running_loop()
    port = free_port()
    transport, receiver = await loop.create_datagram_endpoint(
        UdpReceiver, local_addr=("127.0.0.1", port)
    )
    sinks = [
        {"name": "copy", "type": "jsonl", "path": "outside/copy.jsonl", "phases": ["checkpoint"]},
        {"name": "records", "type": "jsonl", "path": "outside/records.jsonl"},
        {
            "name": "syslog",
            "type": "syslog",
            "address": f"127.0.0.1:{port}",
            "phases": ["checkpoint"],
        },
    ]
    config = write_config(tmp_path, {"sinks": sinks, "anchor": None})
    settings = load(config)
    writer = open_trail_writer(settings)
    await writer.start()
    forwarders = await open_forwarders(settings, writer, None)
    try:
        for forwarder in forwarders:
            await forwarder.start()
        await fill(writer, 12)  # a checkpoint at 10, another at stop (12)
    finally:
        await writer.stop()
        for forwarder in forwarders:
            await forwarder.stop(grace=5.0)
        transport.close()
    copy = tmp_path / "outside" / "copy.jsonl"
    kinds = [(e["kind"], e["seq"]) for e in map(orjson.loads, copy.read_bytes().splitlines())]
    assert kinds == [("heartbeat", 0), ("checkpoint", 10), ("checkpoint", 12)]
    records = (tmp_path / "outside" / "records.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["seq"] for line in records] == list(range(1, 13))
    assert [parse_5424(m)[1] for m in receiver.messages] == [
        "heartbeat",
        "checkpoint",
        "checkpoint",
    ]
    assert parse_5424(receiver.messages[1])[2] == orjson.loads(copy.read_bytes().splitlines()[1])
    assert run("verify", "--config", config, "--anchor", copy).exit_code == 0
    with store_of(config) as db:
        cut_tail(db)
    result = run("verify", "--config", config, "--anchor", copy, "--json")
    assert result.exit_code == 1 and problems(result) == [("truncated", 11, writer.writer_id)]


# --- a key outside the state directory ---------------------------------------------------------


async def test_an_external_key_file_cannot_be_replaced_from_the_state_dir(tmp_path: Path) -> None:
    """With the key outside, re-signing with a key of one's own (even listed in the state
    directory's checkpoint-keys.json) is refused: verify trusts the signer's key only."""
    keyfile = tmp_path / "keys" / "checkpoint.pem"
    config = write_config(
        tmp_path, {"signer": {"type": "file", "path": str(keyfile)}, "anchor": None}
    )
    wid = await build(config)
    assert keyfile.stat().st_mode & 0o777 == 0o600
    assert not (audit_dir(tmp_path / "state") / "checkpoint-key.pem").exists()
    assert run("verify", "--config", config).exit_code == 0
    with store_of(config) as db:
        rewrite_and_resign(db, wid, audit_dir(tmp_path / "state"))
    assert alone(config).exit_code == 0  # what the attacker made of the state directory
    result = anchored(config)
    assert result.exit_code == 1
    assert problems(result) == [
        ("unknown_key", 10, wid),
        ("unknown_key", 20, wid),
        ("unknown_key", 25, wid),
    ]
    # the public keys can be handed to someone who may not read the key file
    jwks = tmp_path / "public.jwks"
    jwks.write_text(run("keys", "--config", config).stdout)
    given = run("verify", "--config", audit_dir(tmp_path / "state"), "--keys", jwks)
    assert given.exit_code == 1 and "unknown_key" in given.stdout


@pytest.mark.parametrize("key", ["signer", "anchor"])
def test_a_key_file_or_anchor_inside_the_state_dir_is_refused(tmp_path: Path, key: str) -> None:
    inside = {
        "signer": {"type": "file", "path": "state/k.pem"},
        "anchor": {"path": "state/a.jsonl"},
    }
    config = write_config(tmp_path, {key: inside[key]})
    with pytest.raises(ConfigError) as caught:
        load(config)
    (problem,) = caught.value.problems
    assert problem.startswith(f"audit.{key}.path (line 1): ")
    assert "lies inside state_dir" in problem


async def test_a_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys" / "checkpoint.pem"
    config = write_config(tmp_path, {"signer": {"type": "file", "path": str(keyfile)}})
    await build(config, count=1)
    keyfile.chmod(0o640)
    with pytest.raises(ConfigError, match=r"group or others may read it \(mode 640\); chmod 600"):
        open_trail_writer(load(config))


# --- OpenBao transit, for real -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """A dev server with transit mounted and an ed25519 key that never leaves it."""
    with start_bao(tmp_path_factory.mktemp("bao"), tls=False) as server:
        server.write("sys/mounts/transit", {"type": "transit"})
        server.write(f"transit/keys/{TRANSIT_KEY}", {"type": "ed25519"})
        server.write("transit/keys/not-ed25519", {"type": "aes256-gcm96"})
        policy = (
            f'path "transit/sign/{TRANSIT_KEY}" {{ capabilities = ["update"] }}\n'
            f'path "transit/keys/{TRANSIT_KEY}" {{ capabilities = ["read"] }}\n'
        )
        server.write("sys/policies/acl/audit-signer", {"policy": policy})
        yield server


def signer_token(server: Bao) -> str:
    """A token that may sign with the transit key and read its public half, nothing else."""
    with server.client() as client:
        response = client.post(
            "auth/token/create", json={"policies": ["audit-signer"], "ttl": "1h"}
        )
    response.raise_for_status()
    return str(response.json()["auth"]["client_token"])


@pytest.fixture
def transit_env(bao: Bao, monkeypatch: pytest.MonkeyPatch) -> str:
    for name in ("VAULT_CACERT", "VAULT_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    token = signer_token(bao)
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", token)
    return token


async def test_transit_signs_checkpoints_and_the_state_dir_cannot_resign(
    tmp_path: Path, bao: Bao, transit_env: str
) -> None:
    config = write_config(tmp_path, {"signer": {"type": "vault_transit", "key": TRANSIT_KEY}})
    wid = await build(config)
    with bao.client() as client:
        public = client.get(f"transit/keys/{TRANSIT_KEY}").json()["data"]["keys"]["1"]["public_key"]
    expected_kid = thumbprint_of(public)
    with store_of(config) as db:
        kids = {row[0] for row in db.execute("SELECT kid FROM checkpoints")}
    assert kids == {expected_kid}
    for line in (tmp_path / "outside" / "anchor.jsonl").read_bytes().splitlines():
        assert orjson.loads(line)["kid"] == expected_kid
    good = anchored(config)
    assert good.exit_code == 0, good.stdout
    assert json.loads(good.stdout)["notes"] == []
    # the gateway's token signs, but cannot take the key away
    headers = {"X-Vault-Token": transit_env}
    answer = httpx.get(f"{bao.addr}/v1/transit/export/signing-key/{TRANSIT_KEY}", headers=headers)
    assert answer.status_code == 403
    with store_of(config) as db:
        rewrite_and_resign(db, wid, audit_dir(tmp_path / "state"))
    result = anchored(config)
    assert result.exit_code == 1
    found = problems(result)
    assert ("unknown_key", 10, wid) in found and ("rewritten", 10, wid) in found


def test_a_transit_key_that_is_not_ed25519_is_refused(
    tmp_path: Path, bao: Bao, transit_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", bao.token)  # the signer's token may not even read it
    config = write_config(tmp_path, {"signer": {"type": "vault_transit", "key": "not-ed25519"}})
    with pytest.raises(ConfigError, match="checkpoints need an ed25519 key"):
        open_trail_writer(load(config))


def test_a_token_that_may_not_sign_is_refused_at_open(
    tmp_path: Path, bao: Bao, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wrong-" + secrets.token_urlsafe(16)
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", wrong)
    config = write_config(tmp_path, {"signer": {"type": "vault_transit", "key": TRANSIT_KEY}})
    with pytest.raises(AuditUnavailable) as caught:
        open_trail_writer(load(config))
    assert str(caught.value) == (
        f"Vault transit key transit/{TRANSIT_KEY} at {bao.addr} answered HTTP 403 to GET "
        f"transit/keys/{TRANSIT_KEY} (the token in VAULT_TOKEN is invalid or may not use it)"
    )


def thumbprint_of(public_key_b64: str) -> str:
    raw = base64.b64decode(public_key_b64)
    return thumbprint({"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)})
