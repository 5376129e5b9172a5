"""`bastion audit ...`: verify the trail, tail it, search it, export it, print its keys.

Every command reads the trail of the config given by `--config` (its `audit.store`: SQLite in
`<state_dir>/audit/` or PostgreSQL; or that directory, or its `audit.db`, given directly) and
never writes to it; a running gateway can keep writing.
Exit status: 0 when all is well, 1 when `verify` finds the trail tampered with, 2 when the
trail cannot be read (one line on stderr, never a traceback).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bastion.audit.chain import Entry, VerifyReport
from bastion.audit.export import jsonl_line, ocsf_line
from bastion.audit.keys import DB_FILE, audit_dir
from bastion.audit.read import parse_time, report_json, verify_trail
from bastion.audit.record import AuditRecord
from bastion.audit.signer import public_jwks
from bastion.audit.store import Query, SqliteAuditStore
from bastion.audit.trail import open_trail_reader
from bastion.config import Settings
from bastion.config import load as load_config
from bastion.errors import AuditUnavailable, BastionError, ConfigError

if TYPE_CHECKING:
    from bastion.audit.postgres import PostgresAuditStore

app = typer.Typer(
    name="audit",
    help="Check, read and export the tamper-evident audit trail.",
    no_args_is_help=True,
    add_completion=False,
)

EXIT_TAMPERED, EXIT_ERROR = 1, 2


class Format(enum.StrEnum):
    """Export formats."""

    JSONL = "jsonl"
    OCSF = "ocsf"


def _checked(value: Path) -> Path:
    """`--config FILE.yaml` must parse; the trail is opened from it by `open_trail`."""
    if value.suffix in (".yaml", ".yml"):
        try:
            load_config(value)
        except ConfigError as exc:
            raise typer.BadParameter("; ".join(exc.problems)) from exc
    return value


ConfigPath = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        help="The gateway's config file (its audit.store: <state_dir>/audit/audit.db or "
        "PostgreSQL), or the audit directory or its audit.db.",
        callback=_checked,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON lines instead of text.")]
Since = Annotated[
    str | None,
    typer.Option(help="From this time: ISO 8601 (UTC unless it says) or relative (30m, 1h, 2d)."),
]
Until = Annotated[str | None, typer.Option(help="Before this time; same forms as --since.")]

DEFAULT_CONFIG = Path("examples/quickstart.yaml")


AnchorFiles = Annotated[
    list[Path] | None,
    typer.Option(
        "--anchor",
        help="An anchor file (audit.anchor) to hold the store to; repeat for several. Default: "
        "the config's audit.anchor.",
    ),
]
KeyFiles = Annotated[
    list[Path] | None,
    typer.Option(
        "--keys",
        help="A JWK Set of checkpoint public keys to trust instead of the configured signer's "
        "(`bastion audit keys` prints them); repeat for several.",
    ),
]


@app.command()
def verify(
    config: ConfigPath = DEFAULT_CONFIG,
    as_json: AsJson = False,
    anchor: AnchorFiles = None,
    keys: KeyFiles = None,
) -> None:
    """Check every hash link and signed checkpoint, and the store against the anchor: exit 1
    naming the first bad record, a truncated tail, a missing writer or re-signed history."""
    with _reported(), open_trail(config) as store:
        report = verify_trail(
            store, audit_folder(config), _settings(config), keys=keys or (), anchors=anchor or ()
        )
    if as_json:
        typer.echo(json.dumps(report_json(report), indent=2))
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(EXIT_TAMPERED)


@app.command()
def keys(config: ConfigPath = DEFAULT_CONFIG) -> None:
    """Print the checkpoint public keys (a JWK Set) of the configured signer, for --keys."""
    with _reported():
        document = public_jwks(_settings(config), audit_folder(config))
    typer.echo(json.dumps(document, indent=2))


@app.command()
def tail(
    config: ConfigPath = DEFAULT_CONFIG,
    lines: Annotated[int, typer.Option("-n", "--lines", help="How many records.")] = 20,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records (Ctrl-C stops).")
    ] = False,
    as_json: AsJson = False,
    interval: Annotated[float, typer.Option(hidden=True)] = 0.5,
) -> None:
    """Print the last records, oldest first; with --follow, new ones as they arrive."""
    with _reported(), open_trail(config) as store:
        rows = store.tail(lines)
        position = rows[-1][0] if rows else 0
        for _, entry in rows:
            _print_entry(entry, as_json)
        try:
            while follow:
                time.sleep(interval)
                fresh = store.after(position)
                for _, entry in fresh:
                    _print_entry(entry, as_json)
                if fresh:
                    position = fresh[-1][0]
        except KeyboardInterrupt:
            return


@app.command()
def query(
    config: ConfigPath = DEFAULT_CONFIG,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent.")] = None,
    tool: Annotated[str | None, typer.Option(help="Only this tool (its exposed name).")] = None,
    decision: Annotated[str | None, typer.Option(help="allow or deny.")] = None,
    phase: Annotated[str | None, typer.Option(help="decision, outcome, authn or alert.")] = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, typer.Option(help="At most this many (the newest).")] = 100,
    as_json: AsJson = False,
) -> None:
    """Search records by tenant, agent, tool, decision, phase and time."""
    with _reported():
        now = time.time()
        filters = Query(
            tenant=tenant,
            agent=agent,
            tool=tool,
            decision=decision,
            phase=phase,
            since=None if since is None else parse_time(since, now, "--since"),
            until=None if until is None else parse_time(until, now, "--until"),
            limit=limit,
        )
        with open_trail(config) as store:
            entries = store.query(filters)
    if as_json:
        for entry in entries:
            _print_entry(entry, True)
        return
    if not entries:
        typer.echo("no records match")
        return
    table = Table("TIME", "PHASE", "TENANT", "AGENT", "USER", "METHOD", "TOOL", "RESULT", "REASON")
    for entry in entries:
        record = AuditRecord.from_json(entry.record)
        table.add_row(
            *(
                Text(value or "-")
                for value in (
                    _when(record.time),
                    record.phase,
                    record.tenant,
                    record.agent,
                    record.user,
                    record.method,
                    record.tool,
                    record.outcome or record.decision,
                    record.reason,
                )
            )
        )
    _console().print(table)


@app.command()
def export(
    config: ConfigPath = DEFAULT_CONFIG,
    format_: Annotated[Format, typer.Option("--format", help="jsonl or ocsf.")] = Format.JSONL,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Write every record, in append order, as JSON lines: Bastion's own or OCSF 6003."""
    line: Callable[[Entry], bytes] = jsonl_line if format_ is Format.JSONL else ocsf_line
    with _reported(), open_trail(config) as store, _sink(output) as out:
        count = 0
        for entry in store.read():
            out.write(line(entry) + b"\n")
            count += 1
    if output is not None:
        typer.echo(f"exported {count} records to {output}", err=True)


# --- helpers ----------------------------------------------------------------------------------


@contextmanager
def _reported() -> Iterator[None]:
    """Turn Bastion's errors into one line on stderr and exit status 2, never a traceback."""
    try:
        yield
    except BastionError as exc:
        _fail(exc.message)
    except ValueError as exc:  # a record that does not parse: the trail was tampered with
        _fail(f"cannot read a record: {exc}; run `bastion audit verify`")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_ERROR)


def _settings(source: Path) -> Settings | None:
    """The settings of a config file; None for an audit directory or its db."""
    return load_config(source) if source.suffix in (".yaml", ".yml") else None


def audit_folder(source: Path) -> Path:
    """The audit directory (checkpoint keys) of a config file, or of that directory or its db."""
    if source.suffix in (".yaml", ".yml"):
        return audit_dir(load_config(source).state_dir)
    return source.parent if source.suffix == ".db" else source


def open_trail(source: Path) -> SqliteAuditStore | PostgresAuditStore:
    """The trail of a config file (in its `audit.store`), or of an audit directory or its
    audit.db, opened for reading."""
    if source.suffix in (".yaml", ".yml"):
        return open_trail_reader(load_config(source))
    return open_store(audit_folder(source))


def open_store(folder: Path) -> SqliteAuditStore:
    """The trail in an audit directory, opened for reading."""
    path = folder / DB_FILE
    if not path.is_file():
        raise AuditUnavailable(f"no audit trail at {path} (has the gateway run?)")
    return SqliteAuditStore(path, create=False)


@contextmanager
def _sink(output: Path | None) -> Iterator[BinaryIO]:
    if output is None:
        sys.stdout.flush()
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    try:
        with output.open("wb") as out:
            yield out
    except OSError as exc:
        raise AuditUnavailable(f"--output {output}: cannot write ({exc.strerror})") from exc


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _print_entry(entry: Entry, as_json: bool) -> None:
    if as_json:
        typer.echo(jsonl_line(entry).decode("utf-8"))
        return
    record = AuditRecord.from_json(entry.record)
    who = f"{record.tenant or '-'}/{record.agent or '-'}"
    if record.user:
        who += f" ({record.user})"
    parts = [
        _when(record.time),
        f"{entry.writer_id}:{entry.seq}",
        record.phase,
        who,
        record.method or "-",
        record.tool or "-",
        record.outcome or record.decision or "-",
    ]
    if record.reason:
        parts.append(f"reason={record.reason!r}")
    typer.echo("  ".join(parts))


def _print_report(report: VerifyReport) -> None:
    chains = len(report.writers)
    checkpoints = sum(s.checkpoints for s in report.writers.values())
    anchored = "" if report.anchored is None else f", {report.anchored} anchor entries"
    if report.ok:
        typer.echo(
            f"intact: {report.entries} records in {chains} chain(s), {checkpoints} "
            f"checkpoint(s){anchored}"
        )
        for writer_id, summary in sorted(report.writers.items()):
            if summary.unsealed:
                typer.echo(
                    f"  writer {writer_id}: the last {summary.unsealed} records (after seq "
                    f"{summary.sealed_seq}) await a checkpoint; hash links protect them"
                )
        _print_notes(report)
        return
    first = report.first
    assert first is not None  # noqa: S101 - not ok means a finding
    typer.echo(f"TAMPERED: {first}")
    typer.echo(
        f"{report.problem_count} problem(s) in {report.entries} records, "
        f"{chains} chain(s), {checkpoints} checkpoint(s){anchored}:"
    )
    for finding in report.findings:
        typer.echo(f"  {finding}")
    if report.problem_count > len(report.findings):
        typer.echo(f"  … and {report.problem_count - len(report.findings)} more")
    _print_notes(report)


def _print_notes(report: VerifyReport) -> None:
    """What the result does not prove (keys beside the data, no anchor)."""
    for note in report.notes:
        typer.echo(f"note: {note}")


def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    return console
