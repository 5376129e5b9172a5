"""The `bastion` command: one typer app that mounts the control plane's commands
(`bastion.control.cli`)."""

from __future__ import annotations

import typer

from bastion.control.cli import gateway, identity, inventory, probe
from bastion.control.cli.agents import app as agents_app
from bastion.control.cli.approvals import app as approvals_app
from bastion.control.cli.audit import app as audit_app
from bastion.control.cli.owners import app as owners_app
from bastion.control.cli.policy import app as policy_app
from bastion.control.cli.review import app as review_app
from bastion.control.cli.tools import app as tools_app
from bastion.control.cli.tools import quarantine_app

cli = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Bastion, the MCP security gateway."
)
cli.command("check-config")(gateway.check_config)
cli.command()(gateway.serve)
cli.add_typer(agents_app, name="agents", help="Agents: the non-human identities that call MCP.")
cli.add_typer(audit_app, name="audit", help="The tamper-evident audit trail.")
cli.add_typer(policy_app, name="policy", help="Cedar policy: test, explain, lint, schema.")
cli.add_typer(review_app, name="review", help="Access reviews: find, decide, close, export.")
cli.add_typer(tools_app, name="tools", help="Pinned tool definitions: list, diff, approve.")
cli.add_typer(approvals_app, name="approvals", help="Calls held for a person: approve, deny.")
cli.add_typer(quarantine_app, name="quarantine", help="Quarantined upstreams: list, release.")
cli.add_typer(identity.keys_cli, name="keys")
cli.add_typer(identity.tokens_cli, name="tokens")
cli.add_typer(identity.sessions_cli, name="sessions")
cli.command()(identity.token)
cli.command()(probe.probe)
cli.command()(inventory.inventory)
cli.add_typer(owners_app, name="owners", help="Owners of agents: list, offboard.")


def main() -> None:
    """Entry point of the `bastion` console script."""
    cli()


if __name__ == "__main__":
    main()
