"""`bastion review`: access reviews of agents, grants and upstream credentials.

`bastion review` lists what deserves a decision now; `start` opens a review of those findings,
`decide FINDING keep --reason …|revoke` records a decision on one (revoke suspends the agent,
or names the config change for a grant or an upstream), `close` ends a review whose findings
are all decided, `export` writes the report for auditors. Each act is written to the audit
trail (this process appends to it as one more writer, beside any running gateway).
"""

from __future__ import annotations

import asyncio
import enum
import getpass
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bastion.audit.read import parse_time
from bastion.audit.record import AuditRecord
from bastion.audit.trail import open_trail_writer
from bastion.config import Settings
from bastion.config import load as load_config
from bastion.control.governance import reviewer
from bastion.control.governance.review import Finding
from bastion.control.governance.reviews import Review
from bastion.errors import AuditUnavailable, BastionError, ConfigError

__all__ = ["app"]

app = typer.Typer(
    name="review",
    help="Access reviews: unused agents, unexercised grants, owners, expiries, keys, secrets.",
    invoke_without_command=True,
    add_completion=False,
)


class Format(enum.StrEnum):
    """Report formats."""

    MD = "md"
    JSON = "json"


def _settings(value: Path) -> Path:
    if value.suffix not in (".yaml", ".yml"):
        raise typer.BadParameter("expected the gateway's config file (.yaml)")
    return value


ConfigPath = Annotated[
    Path,
    typer.Option("--config", "-c", help="The gateway's config file.", callback=_settings),
]
Since = Annotated[
    str, typer.Option(help="Usage period: tool calls since then (30d, 12h, or ISO 8601).")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
By = Annotated[str | None, typer.Option("--by", help="Who decides; default: the OS user.")]
ReviewId = Annotated[str | None, typer.Option("--review", help="Default: the open review.")]
_DEFAULT = Path("examples/quickstart.yaml")


@app.callback()
def review(
    ctx: typer.Context,
    config: ConfigPath = _DEFAULT,
    since: Since = "30d",
    as_json: AsJson = False,
) -> None:
    """List the findings of an access review as of now (no review is started)."""
    if ctx.invoked_subcommand is not None:
        return
    with _reported():
        settings = _load(config)
        found = reviewer.findings(settings, parse_time(since, time.time(), "--since"), time.time())
    if as_json:
        typer.echo(json.dumps({"since": since, "findings": [f.to_dict() for f in found]}, indent=2))
        return
    _print_findings(found)


@app.command()
def start(
    config: ConfigPath = _DEFAULT, since: Since = "30d", by: By = None, as_json: AsJson = False
) -> None:
    """Open a review of the findings as of now (one review is open at a time)."""
    with _reported():
        settings = _load(config)
        now = time.time()
        found = reviewer.findings(settings, parse_time(since, now, "--since"), now)
        who = by or _user()
        with reviewer.review_store(settings) as store:
            opened = store.start(found, {"since": since}, who, now)
        audited = _audit(
            settings, reviewer.record("start", opened, who, route="cli", findings=len(found))
        )
    if as_json:
        typer.echo(json.dumps({"review": opened.to_dict(), "audited": audited}, indent=2))
        return
    typer.echo(f"started review {opened.id} with {len(found)} findings{_note(audited)}")
    _print_findings(found)


@app.command()
def decide(
    finding: Annotated[str, typer.Argument(help="The finding's id (rule:kind/name).")],
    decision: Annotated[str, typer.Argument(metavar="keep|revoke", help="keep or revoke.")],
    reason: Annotated[str | None, typer.Option(help="Why; required to keep.")] = None,
    config: ConfigPath = _DEFAULT,
    by: By = None,
    review_id: ReviewId = None,
) -> None:
    """Decide on one finding: keep (with a reason) or revoke (suspend, or the config change)."""
    with _reported():
        settings = _load(config)
        who = by or _user()
        opened, found, made = reviewer.decide(
            settings, review_id, finding, decision, reason, who, time.time()
        )
        audited = _audit(settings, reviewer.decision_record(opened, found, made, who, route="cli"))
    typer.echo(f"{made.decision} {found.id}: {made.effect}{_note(audited)}")


@app.command()
def close(config: ConfigPath = _DEFAULT, by: By = None, review_id: ReviewId = None) -> None:
    """Close a review whose findings are all decided."""
    with _reported():
        settings = _load(config)
        who = by or _user()
        with reviewer.review_store(settings) as store:
            current = store.current() if review_id is None else store.get(review_id)
            closed = store.close_review(current.id, who, time.time())
        audited = _audit(
            settings,
            reviewer.record("close", closed, who, route="cli", decisions=len(closed.decisions)),
        )
    typer.echo(f"closed review {closed.id}{_note(audited)}")


@app.command()
def export(
    config: ConfigPath = _DEFAULT,
    review_id: ReviewId = None,
    format_: Annotated[Format, typer.Option("--format", help="md or json.")] = Format.MD,
    output: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """The report of a review (default: the open one) for auditors."""
    with _reported():
        settings = _load(config)
        with reviewer.review_store(settings) as store:
            found = store.current() if review_id is None else store.get(review_id)
    text = _report(found, format_)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"--output {output}: cannot write it ({exc.strerror})")
    typer.echo(f"wrote the report of review {found.id} to {output}")


def _report(found: Review, format_: Format) -> str:
    if format_ is Format.JSON:
        return json.dumps(reviewer.report_json(found), indent=2) + "\n"
    return reviewer.report_markdown(found)


# --- helpers ----------------------------------------------------------------------------------


def _load(config: Path) -> Settings:
    try:
        return load_config(config)
    except ConfigError as exc:
        _fail("; ".join(exc.problems))


def _user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli"


def _audit(settings: Settings, record: AuditRecord) -> bool:
    """Append `record` to the configured trail as a writer of its own; whether it was."""
    if not settings.audit.enabled:
        return False

    async def write() -> None:
        writer = open_trail_writer(settings)
        await writer.start()
        try:
            await writer.append(record, True)
        finally:
            await writer.stop()

    try:
        asyncio.run(write())
    except (AuditUnavailable, ConfigError) as exc:
        typer.echo(f"warning: not written to the audit trail: {exc.message}", err=True)
        return False
    return True


def _note(audited: bool) -> str:
    return "" if audited else " (not in the audit trail)"


@contextmanager
def _reported() -> Iterator[None]:
    """Bastion's errors as one line on stderr and exit status 1, never a traceback."""
    try:
        yield
    except BastionError as exc:
        _fail(exc.message)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _print_findings(found: list[Finding]) -> None:
    if not found:
        typer.echo("no findings")
        return
    table = Table("FINDING", "TENANT", "FOUND", "SUGGESTED")
    table.columns[0].no_wrap = True  # the id is what a reviewer copies into `decide`
    for item in found:
        table.add_row(Text(item.id), Text(item.tenant or "*"), Text(item.message), item.action)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    console.print(table)
