"""`bastion approvals list|show|approve|deny|link`: held calls, decided by a person.

Unlike most commands, these talk to the running gateway (held calls live in its memory): its
URL from `<state_dir>/gateway.json` (or `--url`), its admin token from `admin.token` or
`<state_dir>/admin-token`. A decision made here is recorded with the channel `cli` and the
person `admin` (the admin token's holder).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import typer

from bastion import config
from bastion.control.admin.auth import admin_token
from bastion.control.cli.discovery import running_url
from bastion.errors import BastionError

__all__ = ["app"]

app = typer.Typer(
    name="approvals",
    help="Calls held for a person's approval: list, show, approve, deny, link.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigFile = Annotated[
    Path, typer.Option("--config", "-c", help="The running gateway's config file.")
]
Url = Annotated[str | None, typer.Option(help="The gateway's base URL (default: the running one).")]
Id = Annotated[str, typer.Argument(help="The approval's id (from `bastion approvals list`).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_DEFAULT = Path("examples/quickstart.yaml")
_TIMEOUT = 30.0


@app.command("list")
def list_approvals(
    config_file: ConfigFile = _DEFAULT,
    url: Url = None,
    status: Annotated[
        str, typer.Option(help="pending, approved, denied, expired, abandoned or all.")
    ] = "pending",
    as_json: AsJson = False,
) -> None:
    """The held calls (pending ones by default), oldest first."""
    body = _call(config_file, url, "GET", f"/admin/approvals?status={status}")
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    if not body["approvals"]:
        typer.echo(f"no {status} approvals")
    for item in body["approvals"]:
        who = item["requester"]
        user = f" for {who['user']}" if who.get("user") else ""
        typer.echo(
            f"{item['id']}  {item['status']:9}  {item['called_as']} on {item['server']}  "
            f"agent {who['agent']}{user} ({who['tenant']})  expires {_when(item['expires_at'])}"
        )


@app.command("show")
def show(
    id_: Id, config_file: ConfigFile = _DEFAULT, url: Url = None, as_json: AsJson = False
) -> None:
    """Exactly what the approver is shown, and the decision if there is one."""
    item = _call(config_file, url, "GET", f"/admin/approvals/{_quoted(id_)}")["approval"]
    if as_json:
        typer.echo(json.dumps(item, indent=2))
        return
    typer.echo(item["shown"]["text"])
    typer.echo(f"\nstatus: {item['status']}  approvers: {', '.join(item['approvers'])}")
    typer.echo(f"recently called: {', '.join(item['history'].get('tools', [])) or 'none'}")
    decision = item.get("decision")
    if decision:
        typer.echo(
            f"decided by {decision['by']} via {decision['channel']} at {_when(decision['at'])}: "
            f"{decision.get('reason') or '(no reason)'}"
        )


@app.command("approve")
def approve(
    id_: Id,
    config_file: ConfigFile = _DEFAULT,
    url: Url = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept in the audit trail).")] = None,
) -> None:
    """Release the held call, once, with exactly the arguments shown."""
    _decide(config_file, url, id_, "approve", reason)


@app.command("deny")
def deny(
    id_: Id,
    config_file: ConfigFile = _DEFAULT,
    url: Url = None,
    reason: Annotated[str | None, typer.Option(help="Why (the client is told).")] = None,
) -> None:
    """Refuse the held call; the client gets the reason."""
    _decide(config_file, url, id_, "deny", reason)


@app.command("link")
def link(
    id_: Id,
    person: Annotated[str, typer.Option("--for", help="The person the links are for.")],
    roles: Annotated[str, typer.Option(help="Their roles, comma-separated.")] = "approver",
    config_file: ConfigFile = _DEFAULT,
    url: Url = None,
) -> None:
    """Signed approve and deny links for one person (to send through chat or mail)."""
    body = _call(
        config_file,
        url,
        "POST",
        f"/admin/approvals/{_quoted(id_)}/links",
        {"for": person, "roles": roles},
    )
    for decision, address in body["links"].items():
        typer.echo(f"{decision}: {address}")


def _decide(
    config_file: Path, url: str | None, id_: str, decision: str, reason: str | None
) -> None:
    fields = {"via": "cli", **({"reason": reason} if reason else {})}
    path = f"/admin/approvals/{_quoted(id_)}/{decision}"
    item = _call(config_file, url, "POST", path, fields)["approval"]
    typer.echo(f"{item['id']}: {item['status']} ({item['called_as']} of agent "
               f"{item['requester']['agent']})")  # fmt: skip


def _call(
    config_file: Path, url: str | None, method: str, path: str, fields: dict[str, str] | None = None
) -> dict[str, Any]:
    """One admin API request to the running gateway; exits 1 naming the problem."""
    try:
        settings = config.load(config_file)
        token = asyncio.run(admin_token(settings))
    except BastionError as exc:
        _fail(f"{config_file}: {exc.message}")
    base = url or running_url(settings.state_dir)
    if base is None:
        _fail(f"no gateway is running from {settings.state_dir} (start it, or give --url)")
    if not base.startswith(("http://", "https://")):
        _fail(f"--url: expected http:// or https://, found {base[:40]!r}")
    data = json.dumps(fields).encode() if fields is not None else None
    request = urllib.request.Request(  # noqa: S310 - http(s) checked above
        base.rstrip("/") + path, data=data, method=method
    )
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as answer:  # noqa: S310
            found: dict[str, Any] = json.loads(answer.read())
            return found
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message", exc.reason)
        except ValueError:
            message = exc.reason
        _fail(f"the gateway refused ({exc.code}): {message}")
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"cannot reach the gateway at {base}: {exc}")


def _quoted(value: str) -> str:
    return quote(value, safe="")


def _when(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(1)
