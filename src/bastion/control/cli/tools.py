"""`bastion tools list|diff|approve` and `bastion quarantine list|release`: upstream trust.

Tool, prompt and template definitions are pinned when a gateway first sees them; a changed
one is withheld until approved here (or through the admin API). An upstream quarantined for
leaking across tenants stays out of service until released here. Each command opens the
registry file (`--config` names it through the state directory), makes one change or one
read, and closes it; running gateways sharing the file see the change within 0.2 s and write
it to their audit trail (`pin_approved`, `quarantine_released` alerts).
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from bastion.control.cli.agents import RegistryPath, registry_at
from bastion.control.registry.trust import SqlTrustStore
from bastion.errors import BastionError
from bastion.inspect.pins import KINDS

__all__ = ["app", "quarantine_app"]

app = typer.Typer(
    name="tools",
    help="Pinned tool, prompt and template definitions: list, diff, approve changes.",
    no_args_is_help=True,
    add_completion=False,
)
quarantine_app = typer.Typer(
    name="quarantine",
    help="Upstreams out of service for every tenant: list, release.",
    no_args_is_help=True,
    add_completion=False,
)

Upstream = Annotated[str, typer.Argument(help="The upstream's configured name.")]
KindArg = Annotated[str, typer.Argument(help="tool, prompt or template.")]
Name = Annotated[str, typer.Argument(help="Its name (a template's URI template).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_DEFAULT = Path("examples/quickstart.yaml")


@app.command("list")
def list_pins(
    registry: RegistryPath = _DEFAULT,
    state: Annotated[
        str | None, typer.Option(help="approved or pending (changed, waiting for approval).")
    ] = None,
    upstream: Annotated[str | None, typer.Option(help="Of one upstream only.")] = None,
    as_json: AsJson = False,
) -> None:
    """Pinned definitions and pending versions."""
    with _reported():
        if state not in (None, "approved", "pending"):
            raise typer.BadParameter("expected approved or pending", param_hint="--state")
        with SqlTrustStore(registry_at(registry).database()) as store:
            pins = store.pins(state, upstream)
    if as_json:
        typer.echo(json.dumps([pin.to_dict() for pin in pins], indent=2))
        return
    if not pins:
        typer.echo("no pins match")
        return
    table = Table("upstream", "kind", "name", "state", "digest", "first seen", "approved by")
    for pin in pins:
        style = "yellow" if pin.state == "pending" else "green"
        table.add_row(
            pin.upstream,
            pin.kind,
            pin.name,
            f"[{style}]{pin.state}[/]",
            pin.digest[:19],
            _when(pin.first_seen),
            pin.approved_by or "",
        )
    Console().print(table)


@app.command()
def diff(
    upstream: Upstream,
    kind: KindArg,
    name: Name,
    registry: RegistryPath = _DEFAULT,
    as_json: AsJson = False,
) -> None:
    """What changed: the pin against each pending version, field by field."""
    with _reported(), SqlTrustStore(registry_at(registry).database()) as store:
        _check_kind(kind)
        versions = store.versions(upstream, kind, name)
    if as_json:
        typer.echo(json.dumps(versions, indent=2))
        return
    pin = versions["pinned"]
    typer.echo(f"{kind} {name!r} of upstream {upstream!r}")
    typer.echo(f"  pinned: {pin['digest'] if pin else '(none)'}")
    if not versions["pending"]:
        typer.echo("  no pending version")
    for version in versions["pending"]:
        typer.echo(f"  pending: {version['digest']} (seen {_when(version['first_seen'])})")
        for field, change in version["diff"].items():
            typer.echo(f"    {field}:")
            for line in _change_lines(change):
                typer.echo(f"      {line}")


@app.command()
def approve(
    upstream: Upstream,
    kind: KindArg,
    name: Name,
    registry: RegistryPath = _DEFAULT,
    digest: Annotated[
        str | None, typer.Option(help="The pending version (needed when there are several).")
    ] = None,
    by: Annotated[str | None, typer.Option(help="Who approves (default: your login).")] = None,
) -> None:
    """Make the pending version the pin: listed and callable again on every gateway."""
    with _reported(), SqlTrustStore(registry_at(registry).database()) as store:
        _check_kind(kind)
        pin = store.approve(upstream, kind, name, digest, by or _operator())
    typer.echo(f"approved {kind} {name!r} of upstream {upstream!r}: {pin.digest}")


@quarantine_app.command("list")
def list_quarantines(
    registry: RegistryPath = _DEFAULT,
    every: Annotated[bool, typer.Option("--all", help="Released ones too.")] = False,
    as_json: AsJson = False,
) -> None:
    """Quarantined upstreams: why and since when."""
    with _reported(), SqlTrustStore(registry_at(registry).database()) as store:
        found = store.quarantines(active=not every)
    if as_json:
        typer.echo(json.dumps([q.to_dict() for q in found], indent=2))
        return
    if not found:
        typer.echo("no upstream is quarantined")
        return
    table = Table("upstream", "since", "reason", "released")
    for q in found:
        released = f"{_when(q.released_at)} by {q.released_by}" if q.released_at else ""
        table.add_row(q.upstream, _when(q.since), q.reason, released)
    Console().print(table)


@quarantine_app.command()
def release(
    upstream: Upstream,
    registry: RegistryPath = _DEFAULT,
    by: Annotated[str | None, typer.Option(help="Who releases (default: your login).")] = None,
) -> None:
    """Put a quarantined upstream back in service for every tenant."""
    with _reported(), SqlTrustStore(registry_at(registry).database()) as store:
        released = store.release(upstream, by or _operator())
    typer.echo(f"released upstream {upstream!r} (quarantined for: {released.reason})")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise typer.BadParameter(f"expected one of {', '.join(KINDS)}", param_hint="KIND")


def _change_lines(change: dict[str, Any]) -> list[str]:
    if "diff" in change:
        lines = str(change["diff"]).splitlines()
        return [*lines, "(cut)"] if change.get("cut") else lines
    return [f"- {json.dumps(change['old'])}", f"+ {json.dumps(change['new'])}"]


def _operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name in a bare container
        return "cli"


def _when(value: float | None) -> str:
    if value is None:
        return ""
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@contextmanager
def _reported() -> Iterator[None]:
    """Bastion's errors as one line on stderr and exit status 1, never a traceback."""
    try:
        yield
    except BastionError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
