"""`bastion inventory`: every agent of a deployment, owner → agent → credential → upstream.

Reads the config, the registry in its state directory, the tool catalog the gateway saved
there (for what policy lets each agent reach) and the audit trail (for what each agent used
in the last `--days`). Text by default, grouped by owner; `--json` is the admin API's
`GET /admin/inventory` body; `--csv` is one row per agent and tool it can reach. Secrets
are shown by where they live, never by value. Exit status 2 when something cannot be read.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from bastion.config import Settings
from bastion.config import load as load_config
from bastion.control.governance.inventory import (
    AgentEntry,
    Inventory,
    build_inventory,
    load_engine,
    read_usage,
)
from bastion.control.registry.agents import Agent
from bastion.control.registry.locator import open_registry
from bastion.errors import BastionError, InputError
from bastion.policy.engine import PolicyEngine

__all__ = ["inventory", "registry_agents"]

EXIT_ERROR = 2
DAY_S = 86400.0
_CSV_COLUMNS = (
    "owner", "tenant", "agent", "status", "environment", "purpose", "created", "last_used",
    "expires", "keys", "spiffe_id", "upstream", "upstream_environment", "credential",
    "secret_location", "tool", "access", "permits", "forbids", "calls_allowed",
    "calls_denied", "last_call",
)  # fmt: skip


def inventory(
    config_file: Annotated[
        Path, typer.Option("--config", "-c", help="The gateway's YAML configuration.")
    ] = Path("examples/quickstart.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV, a row per tool.")] = False,
    days: Annotated[
        int, typer.Option("--days", min=1, max=3650, help="Usage window, in days.")
    ] = 30,
    catalog: Annotated[
        Path | None,
        typer.Option("--catalog", help="Tool lists as JSON (default: the gateway's saved one)."),
    ] = None,
) -> None:
    """Every agent: owner, tenant, status, keys, what policy lets it reach, how each upstream
    is credentialed, and what it used in the last --days."""
    if as_json and as_csv:
        _fail("give at most one of --json and --csv")
    try:
        settings = load_config(config_file)
        agents = registry_agents(settings)
        engine = _engine(settings, catalog)
        now = time.time()
        usage = read_usage(settings, now - days * DAY_S)
    except BastionError as exc:
        _fail(exc.message)
    found = build_inventory(settings, agents, engine, usage, now, days)
    if as_json:
        typer.echo(json.dumps(found.to_dict(), indent=2))
    elif as_csv:
        typer.echo(to_csv(found), nl=False)
    else:
        typer.echo(to_text(found, str(config_file)))


def registry_agents(settings: Settings) -> list[Agent]:
    """Every agent in the config's registry; none under `auth: none` (no identities)."""
    if settings.auth.mode == "none":
        return []
    with open_registry(settings) as registry:
        return registry.list()


def _engine(settings: Settings, catalog: Path | None) -> PolicyEngine | None:
    try:
        return load_engine(settings, catalog)
    except InputError as exc:
        if catalog is not None:
            raise
        # The agents, owners and credentials are worth listing before the gateway ever ran.
        typer.echo(f"warning: reach not derived: {exc.message}", err=True)
        return None


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_ERROR)


# --- text -------------------------------------------------------------------------------------


def to_text(found: Inventory, source: str) -> str:
    """Owner → agent → keys → upstream (environment, credential) → tools, then usage."""
    lines = [
        f"inventory of {source} at {_when(found.generated_at)} (usage: last {found.days} days)",
    ]
    if found.usage_note:
        lines.append(f"usage unknown: {found.usage_note}")
    if not found.reach_known:
        lines.append("reach unknown: no tool catalog (start the gateway once)")
    for owner, entries in found.by_owner().items():
        lines.append("")
        lines.append(f"owner {owner}")
        for entry in entries:
            lines.extend(_agent_lines(entry, found.reach_known))
    if not found.agents:
        lines.append("\nno agents registered")
    lines.append("\nupstreams")
    for up in found.upstreams:
        listed = "" if up.listed or not found.reach_known else "  (tools not listed yet)"
        lines.append(
            f"  {up.name}  [{up.environment}]  {up.transport}  {up.credential.summary()}{listed}"
        )
    return "\n".join(lines)


def _agent_lines(entry: AgentEntry, reach_known: bool) -> list[str]:
    status = entry.status + (f" ({entry.status_reason})" if entry.status_reason else "")
    lines = [
        f"  agent {entry.id}  tenant {entry.tenant}  [{entry.environment}]  {status}",
        f"    purpose   {entry.purpose}",
        f"    created {_when(entry.created_at)}  last used {_when(entry.last_used_at)}  "
        f"expires {_when(entry.expires_at)}",
    ]
    proofs = [f"key {k.kid} ({k.algorithm}, {k.age_s / DAY_S:.0f} d)" for k in entry.keys]
    if entry.spiffe_id:
        proofs.append(f"SPIFFE ID {entry.spiffe_id}")
    lines.append(f"    proves    {'; '.join(proofs) or '-'}")
    if not reach_known:
        lines.append("    reaches   (unknown)")
    elif not entry.reach:
        lines.append("    reaches   nothing")
    for n, up in enumerate(entry.reach):
        head = "    reaches   " if n == 0 else "              "
        lines.append(f"{head}{up.upstream} [{up.environment}] via {up.credential.summary()}")
        for tool in up.tools:
            why = f"permit {', '.join(tool.permits)}"
            if tool.forbids:
                why += f"; unless forbid {', '.join(tool.forbids)}"
            approval = "; approval" if tool.approval else ""
            lines.append(f"                {tool.tool}  {tool.access}  ({why}{approval})")
    for n, used in enumerate(entry.used):
        head = "    used      " if n == 0 else "              "
        lines.append(
            f"{head}{used.upstream}/{used.tool}  {used.allowed} allowed, {used.denied} denied, "
            f"last {_when(used.last_at)}"
        )
    if not entry.used:
        lines.append("    used      nothing")
    return lines


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- CSV --------------------------------------------------------------------------------------


def to_csv(found: Inventory) -> str:
    """One row per agent and tool it can reach (one row for an agent that reaches none)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for entry in found.agents:
        base = [
            entry.owner, entry.tenant, entry.id, entry.status, entry.environment, entry.purpose,
            _when(entry.created_at), _when(entry.last_used_at), _when(entry.expires_at),
            " ".join(f"{k.kid}:{k.algorithm}" for k in entry.keys), entry.spiffe_id or "",
        ]  # fmt: skip
        used = {(u.upstream, u.tool): u for u in entry.used}
        rows = 0
        for up in entry.reach:
            credential = up.credential
            for tool in up.tools:
                use = used.get((up.upstream, tool.tool))
                writer.writerow(
                    [
                        *base,
                        up.upstream,
                        up.environment,
                        credential.mode,
                        credential.secret_ref or credential.client_secret_ref or "",
                        tool.tool,
                        tool.access,
                        " ".join(tool.permits),
                        " ".join(tool.forbids),
                        use.allowed if use else 0,
                        use.denied if use else 0,
                        _when(use.last_at) if use else "",
                    ]  # fmt: skip
                )
                rows += 1
        if not rows:
            writer.writerow([*base, *[""] * (len(_CSV_COLUMNS) - len(base))])
    return out.getvalue()
