"""`bastion agents ...`: register, list, show, suspend, resume, offboard agents; rotate keys.

Every command opens the registry file given by `--registry`, makes one change or one read, and
closes it; a running gateway sees the change on its next request. Errors are one line on stderr
and exit status 1.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bastion.config import load as load_config
from bastion.control.registry.agents import Agent, AgentStatus
from bastion.control.registry.locator import RegistryLocator, locate
from bastion.errors import BastionError, ConfigError, InputError, TokenError
from bastion.identity.keys import thumbprint

app = typer.Typer(
    name="agents",
    help="Register and manage agents: the non-human identities that call Bastion.",
    no_args_is_help=True,
    add_completion=False,
)


class Environment(enum.StrEnum):
    """Where an agent runs."""

    DEV = "dev"
    STAGING = "staging"
    PROD = "prod"
    DEMO = "demo"


def _registry_file(value: Path) -> Path:
    """`--config FILE.yaml` names the registry through the config (`registry.store`): the
    config must parse and its `registry.dsn` reference resolve; `registry_at` opens it."""
    try:
        registry_at(value)
    except ConfigError as exc:
        raise typer.BadParameter("; ".join(exc.problems)) from exc
    return value


def registry_at(value: Path) -> RegistryLocator:
    """The registry `--config` names: the config's (its state_dir's SQLite file, or its
    PostgreSQL database), or the SQLite file given as `--registry`."""
    if value.suffix in (".yaml", ".yml"):
        return locate(load_config(value))
    return RegistryLocator(path=value)


RegistryPath = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        "--registry",
        help="The gateway's config file (its registry: the SQLite file of its state_dir, or "
        "its PostgreSQL database), or the registry's SQLite file.",
        callback=_registry_file,
    ),
]
AgentId = Annotated[str, typer.Argument(metavar="ID", help="The agent's id.", show_default=False)]
JwksFile = Annotated[
    Path | None, typer.Option("--jwks-file", help="A JWK Set (or one JWK) of public keys.")
]
PemFile = Annotated[
    Path | None,
    typer.Option("--public-key-pem", help="A PEM public key: EC P-256, Ed25519 or RSA ≥ 2048."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Reason = Annotated[str, typer.Option("--reason", help="Why; kept with the agent and audited.")]

_STATUS_STYLE = {"active": "green", "suspended": "yellow", "offboarded": "red"}


@app.command()
def add(
    agent_id: AgentId,
    tenant: Annotated[str, typer.Option(help="The tenant the agent acts in.")],
    owner: Annotated[str, typer.Option(help="The person or team answerable for it.")],
    purpose: Annotated[str, typer.Option(help="What the agent is for.")],
    registry: RegistryPath = Path("examples/quickstart.yaml"),
    display_name: Annotated[str | None, typer.Option(help="Default: the id.")] = None,
    environment: Annotated[Environment, typer.Option()] = Environment.DEV,
    jwks_file: JwksFile = None,
    public_key_pem: PemFile = None,
    spiffe_id: Annotated[
        str | None, typer.Option(help="spiffe://<trust-domain>/<path> of its JWT-SVIDs.")
    ] = None,
    audience: Annotated[
        list[str] | None, typer.Option(help="An allowed token audience (repeat); none = any.")
    ] = None,
    scope: Annotated[list[str] | None, typer.Option(help="A scope it may hold (repeat).")] = None,
    require_dpop: Annotated[bool, typer.Option(help="Its tokens must be DPoP-bound.")] = False,
    expires: Annotated[
        str | None, typer.Option(help="YYYY-MM-DD (00:00 UTC) or an ISO 8601 time.")
    ] = None,
) -> None:
    """Register a new agent with its public key(s) or SPIFFE ID."""
    with _reported():
        if jwks_file is None and public_key_pem is None and spiffe_id is None:
            raise InputError("give the agent a key: --jwks-file, --public-key-pem or --spiffe-id")
        jwks = _read_keys(jwks_file, public_key_pem) if jwks_file or public_key_pem else {}
        now = time.time()
        agent = Agent(
            id=agent_id,
            display_name=display_name if display_name is not None else agent_id,
            owner=owner,
            tenant=tenant,
            purpose=purpose,
            environment=str(environment),
            jwks=jwks,
            spiffe_id=spiffe_id,
            audiences=tuple(audience or ()),
            scopes=tuple(scope or ()),
            require_dpop=require_dpop,
            expires_at=None if expires is None else _parse_expiry(expires, now),
            status=AgentStatus.ACTIVE,
            created_at=now,
        )
        with registry_at(registry).registry(create=True) as store:
            store.add(agent)
    typer.echo(f"added agent {agent.id!r} to tenant {agent.tenant!r} ({_keys_summary(agent)})")


@app.command("list")
def list_(
    registry: RegistryPath = Path("examples/quickstart.yaml"),
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's agents.")] = None,
    status: Annotated[AgentStatus | None, typer.Option(help="Only agents in this state.")] = None,
    as_json: AsJson = False,
) -> None:
    """List agents, by tenant and id."""
    with _reported(), registry_at(registry).registry() as store:
        agents = store.list(tenant=tenant, status=status)
    if as_json:
        typer.echo(json.dumps([agent.to_dict() for agent in agents], indent=2))
        return
    if not agents:
        typer.echo("no agents match")
        return
    table = Table("ID", "TENANT", "ENV", "STATUS", "OWNER", "EXPIRES", "LAST USED")
    for column in table.columns[:2]:
        column.no_wrap = True  # ids are what people copy from this table
    now = time.time()
    for agent in agents:
        table.add_row(
            Text(agent.id),
            Text(agent.tenant),
            Text(agent.environment),
            _status(agent, now),
            Text(agent.owner),
            Text(_when(agent.expires_at)),
            Text(_when(agent.last_used_at)),
        )
    _console().print(table)


@app.command()
def show(
    agent_id: AgentId,
    registry: RegistryPath = Path("examples/quickstart.yaml"),
    as_json: AsJson = False,
) -> None:
    """Show one agent, keys included."""
    with _reported(), registry_at(registry).registry() as store:
        agent = store.get(agent_id)
    if as_json:
        typer.echo(json.dumps(agent.to_dict(), indent=2))
        return
    table = Table("FIELD", "VALUE", show_header=False, box=None)
    for name, value in _details(agent):
        table.add_row(Text(name), value)
    _console().print(table)


@app.command()
def suspend(
    agent_id: AgentId, reason: Reason, registry: RegistryPath = Path("examples/quickstart.yaml")
) -> None:
    """Stop an agent from calling until it is resumed; its tokens are refused at once."""
    _set_status(registry, agent_id, AgentStatus.SUSPENDED, reason)


@app.command()
def resume(agent_id: AgentId, registry: RegistryPath = Path("examples/quickstart.yaml")) -> None:
    """Let a suspended agent call again."""
    _set_status(registry, agent_id, AgentStatus.ACTIVE, None)


@app.command()
def offboard(
    agent_id: AgentId, reason: Reason, registry: RegistryPath = Path("examples/quickstart.yaml")
) -> None:
    """Retire an agent for good: it can never be resumed; its record stays for audit."""
    _set_status(registry, agent_id, AgentStatus.OFFBOARDED, reason)


@app.command("rotate-key")
def rotate_key(
    agent_id: AgentId,
    registry: RegistryPath = Path("examples/quickstart.yaml"),
    jwks_file: JwksFile = None,
    public_key_pem: PemFile = None,
) -> None:
    """Replace an agent's public keys (list the old key too in a JWKS for an overlap)."""
    with _reported():
        jwks = _read_keys(jwks_file, public_key_pem)
        with registry_at(registry).registry() as store:
            agent = store.rotate_key(agent_id, jwks)
    typer.echo(f"rotated the keys of agent {agent.id!r} ({_keys_summary(agent)})")


def _set_status(registry: Path, agent_id: str, status: AgentStatus, reason: str | None) -> None:
    with _reported(), registry_at(registry).registry() as store:
        agent = store.set_status(agent_id, status, reason)
    verb = {"active": "resumed", "suspended": "suspended", "offboarded": "offboarded"}[status]
    typer.echo(f"{verb} agent {agent.id!r}" + (f": {reason}" if reason else ""))


# --- input ------------------------------------------------------------------------------------


@contextmanager
def _reported() -> Iterator[None]:
    """Turn Bastion's errors into one line on stderr and exit status 1, never a traceback."""
    try:
        yield
    except BastionError as exc:
        _fail(exc.message)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _read_keys(jwks_file: Path | None, pem_file: Path | None) -> dict[str, Any]:
    if pem_file is not None and jwks_file is None:
        return {"keys": [jwk_from_pem(_read(pem_file, "--public-key-pem"), str(pem_file))]}
    if jwks_file is None or pem_file is not None:
        raise InputError("give exactly one of --jwks-file and --public-key-pem")
    try:
        document = json.loads(_read(jwks_file, "--jwks-file"))
    except ValueError as exc:
        raise InputError(f"--jwks-file {jwks_file}: expected JSON, found {exc}") from exc
    if isinstance(document, dict) and "kty" in document:
        document = {"keys": [document]}  # one JWK on its own
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise InputError(f'--jwks-file {jwks_file}: expected a JWK Set {{"keys": [...]}} or a JWK')
    for jwk in document["keys"]:
        if isinstance(jwk, dict) and "kid" not in jwk:
            try:
                jwk["kid"] = thumbprint(jwk)
            except TokenError:
                pass  # the registry names what is wrong with this key
    return document


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot read it ({exc.strerror})") from exc


def jwk_from_pem(pem: bytes, source: str = "the PEM") -> dict[str, Any]:
    """The public JWK (kid = RFC 7638 thumbprint, use "sig") of an EC P-256, Ed25519 or RSA key."""
    if b"PRIVATE KEY" in pem:
        raise InputError(
            f"{source} holds a private key; register its public half only "
            "(openssl pkey -in KEY -pubout)"
        )
    try:
        public = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InputError(f"{source}: expected a PEM public key, found none that loads") from exc
    jwk: dict[str, Any]
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        numbers = public.public_numbers()
        jwk = {"kty": "EC", "crv": "P-256", "x": _b64(numbers.x, 32), "y": _b64(numbers.y, 32)}
        jwk["alg"] = "ES256"
    elif isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw), "alg": "EdDSA"}
    elif isinstance(public, rsa.RSAPublicKey):
        # No "alg": an RSA key may sign RS256 or PS256.
        numbers_rsa = public.public_numbers()
        jwk = {"kty": "RSA", "n": _b64(numbers_rsa.n), "e": _b64(numbers_rsa.e)}
    else:
        raise InputError(
            f"{source}: expected an EC P-256, Ed25519 or RSA public key, "
            f"found {type(public).__name__}"
        )
    return {**jwk, "kid": thumbprint(jwk), "use": "sig"}


def _b64(value: bytes | int, size: int | None = None) -> str:
    if isinstance(value, int):
        value = value.to_bytes(size or (value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode("ascii")


def _parse_expiry(value: str, now: float) -> float:
    try:
        when = dt.datetime.fromisoformat(value)  # a bare date is its midnight
    except ValueError as exc:
        raise InputError(f"--expires: expected YYYY-MM-DD or ISO 8601, found {value!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if when.timestamp() <= now:
        raise InputError(f"--expires: {value} is in the past")
    return when.timestamp()


# --- output -----------------------------------------------------------------------------------


def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))  # piped: wider than 80, no "…" in ids
    return console


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(agent: Agent, now: float) -> Text:
    usable, reason = agent.usable(now)
    label = str(agent.status) if usable or reason != "expired" else "expired"
    return Text(label, style=_STATUS_STYLE.get(label, "red"))


def _keys_summary(agent: Agent) -> str:
    kids = [str(key.get("kid")) for key in agent.jwks.get("keys", [])]
    parts = [f"keys: {', '.join(kids)}"] if kids else []
    if agent.spiffe_id:
        parts.append(f"spiffe id: {agent.spiffe_id}")
    return "; ".join(parts)


def _details(agent: Agent) -> list[tuple[str, Text]]:
    keys = [
        f"{key.get('kid')} ({key.get('kty')}{' ' + key['crv'] if 'crv' in key else ''})"
        for key in agent.jwks.get("keys", [])
    ]
    return [
        ("id", Text(agent.id)),
        ("display name", Text(agent.display_name)),
        ("tenant", Text(agent.tenant)),
        ("owner", Text(agent.owner)),
        ("purpose", Text(agent.purpose)),
        ("environment", Text(agent.environment)),
        ("status", _status(agent, time.time())),
        ("status reason", Text(agent.status_reason or "-")),
        ("keys", Text("\n".join(keys) or "-")),
        ("spiffe id", Text(agent.spiffe_id or "-")),
        ("audiences", Text(", ".join(agent.audiences) or "any route of this gateway")),
        ("scopes", Text(" ".join(agent.scopes) or "-")),
        ("require DPoP", Text("yes" if agent.require_dpop else "no")),
        ("expires", Text(_when(agent.expires_at))),
        ("created", Text(_when(agent.created_at))),
        ("last used", Text(_when(agent.last_used_at))),
    ]
