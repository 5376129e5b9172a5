"""`bastion probe`: attack a running deployment with its own probe identities and report
each case as held or failed; exit 0 only when every case held, 1 otherwise, 2 on usage errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from bastion import config
from bastion.control.cli.discovery import running_url
from bastion.control.probe.report import as_json, as_junit, as_table
from bastion.control.probe.run import Probe
from bastion.errors import BastionError, InputError

__all__ = ["probe"]

USAGE = 2


def probe(
    config_file: Path = typer.Option(..., "--config", "-c", help="The gateway's config file."),
    url: str | None = typer.Option(
        None, help="The gateway's base URL (default: the running gateway's, from gateway.json)."
    ),
    agent: list[str] = typer.Option(  # noqa: B008 - typer's way to declare a repeated option
        [], "--agent", help="Act as this registered agent (repeat); default: probe agents."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the verdicts as JSON."),
    junit: bool = typer.Option(False, "--junit", help="Print the verdicts as JUnit XML."),
    allow_writes: bool = typer.Option(
        False, "--allow-writes", help="Also call tools that are not read-only (the canary)."
    ),
    max_cases: int = typer.Option(300, min=1, help="Run at most this many cases."),
    timeout: float = typer.Option(10.0, min=0.1, help="Seconds to wait for each answer."),
) -> None:
    """Attack a running deployment with its own probe identities; exit 1 on any failure."""
    if json_out and junit:
        _usage("give --json or --junit, not both")
    try:
        settings = config.load(config_file)
    except BastionError as exc:
        _usage(f"{config_file}: {exc.message}")
    if settings.auth.mode != "oauth":
        _usage(f"{config_file}: auth.mode is {settings.auth.mode!r}; the probe needs oauth")
    base = url or running_url(settings.state_dir) or settings.base_url()
    try:
        result = Probe(
            settings, base, agent, allow_writes=allow_writes, max_cases=max_cases, timeout=timeout
        ).run()
    except InputError as exc:
        _usage(exc.message)
    render = as_json if json_out else as_junit if junit else as_table
    typer.echo(render(result))
    raise typer.Exit(1 if result.failed else 0)


def _usage(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(USAGE)
