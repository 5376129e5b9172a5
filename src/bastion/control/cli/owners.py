"""`bastion owners list|offboard`: the people answerable for agents, and their departure.

`offboard OWNER` suspends every agent OWNER owns (or, with `--reassign NEW_OWNER`, hands
each to NEW_OWNER), and writes one audit record per agent changed. A running gateway sees a
suspension within its registry poll (0.2 s), refuses the agent's tokens, ends its sessions
and drops its cached upstream credentials. Exit status 1 when the change cannot be made, or
was made but could not be written to the audit trail (the message says which).
"""

from __future__ import annotations

import asyncio
import getpass
import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from bastion.config import load as load_config
from bastion.control.cli.inventory import registry_agents
from bastion.control.governance.offboard import offboard_owner, records, write_records
from bastion.control.registry.agents import AgentStatus
from bastion.control.registry.locator import open_registry
from bastion.errors import BastionError, InputError

__all__ = ["app"]

app = typer.Typer(
    name="owners",
    help="The people answerable for agents: list them, offboard one.",
    no_args_is_help=True,
    add_completion=False,
)

Config = Annotated[Path, typer.Option("--config", "-c", help="The gateway's YAML configuration.")]
_DEFAULT = Path("examples/quickstart.yaml")


@app.command("list")
def list_owners(
    config_file: Config = _DEFAULT,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Each owner with their agents, by status."""
    try:
        agents = registry_agents(load_config(config_file))
    except BastionError as exc:
        _fail(exc.message)
    owners: dict[str, dict[str, list[str]]] = {}
    for agent in agents:
        owners.setdefault(agent.owner, {}).setdefault(str(agent.status), []).append(agent.id)
    if as_json:
        typer.echo(json.dumps(owners, indent=2, sort_keys=True))
        return
    for owner in sorted(owners):
        counts = ", ".join(f"{status}: {' '.join(ids)}" for status, ids in owners[owner].items())
        typer.echo(f"{owner}  {counts}")
    if not owners:
        typer.echo("no agents registered")


@app.command()
def offboard(
    owner: Annotated[str, typer.Argument(metavar="OWNER", help="The departing owner.")],
    config_file: Config = _DEFAULT,
    reassign: Annotated[
        str | None,
        typer.Option("--reassign", metavar="NEW_OWNER", help="Hand every agent to NEW_OWNER."),
    ] = None,
    suspend: Annotated[
        bool, typer.Option("--suspend", help="Suspend every agent (the default).")
    ] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Why; audited.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Suspend (or reassign) every agent OWNER owns, and record it in the audit trail."""
    try:
        if suspend and reassign is not None:
            raise InputError("give --suspend or --reassign NEW_OWNER, not both")
        settings = load_config(config_file)
        if settings.auth.mode == "none":
            raise InputError(f"{config_file}: auth.mode is 'none'; there are no agents")
        with open_registry(settings) as store:
            done = offboard_owner(store, owner, new_owner=reassign, reason=reason)
    except BastionError as exc:
        _fail(exc.message)
    if as_json:
        typer.echo(json.dumps(done.to_dict(), indent=2))
    else:
        verb = "suspended" if done.action == "suspend" else f"reassigned to {done.new_owner}"
        for agent in done.changed:
            typer.echo(f"{verb}: agent {agent.id!r} of tenant {agent.tenant!r}")
        for agent in done.unchanged:
            typer.echo(f"left as it is: agent {agent.id!r} ({agent.status})")
        if done.action == "suspend" and any(
            a.status is AgentStatus.SUSPENDED for a in done.changed
        ):
            typer.echo("running gateways end their sessions within a second")
    if not settings.audit.enabled:
        typer.echo("warning: not audited: the audit trail is off", err=True)
        return
    try:
        asyncio.run(write_records(settings, records(done, f"cli:{_operator()}")))
    except BastionError as exc:
        _fail(f"the registry was changed, but NOT recorded in the audit trail: {exc.message}")


def _operator() -> str:
    """Who ran the command, as the operating system says (for the record)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
