"""`bastion keys`, `bastion tokens`, `bastion sessions` and `bastion token`: the identity state
of a deployment (signing keys, issued tokens, client sessions) and a fresh token for an agent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import typer

from bastion import config
from bastion.app import routes_for
from bastion.control.assembly import Identity, open_identity
from bastion.control.cli.discovery import running_url
from bastion.control.cli.gateway import load_settings
from bastion.control.tokens.service import JWT_BEARER
from bastion.errors import BastionError
from bastion.identity.dpop import make_proof
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey
from bastion.pipeline.session import session_hash

keys_cli = typer.Typer(no_args_is_help=True, help="The embedded authorization server's keys.")
tokens_cli = typer.Typer(no_args_is_help=True, help="Issued access tokens.")
sessions_cli = typer.Typer(no_args_is_help=True, help="Client sessions of running gateways.")

CONFIG_OPTION = typer.Option(
    Path("examples/quickstart.yaml"), "--config", "-c", help="Config file."
)


def _identity(config_file: Path, url: str | None = None) -> Identity:
    settings = load_settings(config_file)
    if url is not None:  # the gateway runs elsewhere than the file says (e.g. PORT=…)
        auth = settings.auth.model_copy(update={"public_url": url.rstrip("/")})
        settings = settings.model_copy(update={"auth": auth})
    if settings.auth.mode != "oauth":
        typer.echo(f"{config_file}: auth.mode is {settings.auth.mode!r}; identity is off", err=True)
        raise typer.Exit(1)
    try:
        return open_identity(settings)
    except BastionError as exc:
        typer.echo(f"cannot open the identity state: {exc.message}", err=True)
        raise typer.Exit(1) from exc


@keys_cli.command("rotate")
def keys_rotate(config_file: Path = CONFIG_OPTION) -> None:
    """Make a new signing key; the old one keeps verifying until its tokens have expired."""
    identity = _identity(config_file)
    key = identity.keys.rotate()
    typer.echo(f"new signing key {key.kid} ({key.alg}); running gateways pick it up on their own")


@tokens_cli.command("revoke")
def tokens_revoke(
    jti: str = typer.Argument(..., help="The token's jti claim."),
    reason: str = typer.Option(..., help="Why (kept in the registry)."),
    config_file: Path = CONFIG_OPTION,
) -> None:
    """Revoke one token; it is refused from the next request on."""
    identity = _identity(config_file)
    lifetime = identity.service.settings.auth.token_lifetime_seconds
    identity.registry.revoke_token(jti, time.time() + lifetime + 3600, reason)
    typer.echo(f"revoked token {jti}")


@sessions_cli.command("kill")
def sessions_kill(
    session_id: str = typer.Argument(..., help="The Mcp-Session-Id to end."),
    config_file: Path = CONFIG_OPTION,
) -> None:
    """End a client session; its next request gets 404 and the gateway forgets it."""
    identity = _identity(config_file)
    identity.registry.kill_session(session_hash(session_id))
    typer.echo("session killed")


def token(
    agent: str = typer.Option(
        ..., "--agent", help="A registered agent whose key is in the state dir."
    ),
    config_file: Path = CONFIG_OPTION,
    resource: str | None = typer.Option(
        None,
        help="The MCP endpoint the token is for: a full URL or a route path such as "
        "/servers/echo/mcp (default: the first route).",
    ),
    scope: str | None = typer.Option(None, help="Space-separated scopes (default: all granted)."),
    dpop_key: Path | None = typer.Option(None, help="PEM private key to bind the token to (DPoP)."),
    url: str | None = typer.Option(
        None,
        help="The gateway's base URL (default: the running gateway's, from "
        "<state_dir>/gateway.json, else the config's).",
    ),
) -> None:
    """Print a fresh access token for an agent, alone on stdout."""
    identity = _identity(config_file, _gateway_url(load_settings(config_file), url, resource))
    settings = identity.service.settings
    now = time.time()
    try:
        key = identity.agent_key(agent)
        assertion = mint(
            key,
            {
                "iss": agent,
                "sub": agent,
                "aud": identity.service.issuer,
                "iat": int(now),
                "exp": int(now) + 60,
                "jti": uuid.uuid4().hex,
            },
            typ="JWT",
        )
        form = {
            "grant_type": "client_credentials",
            "client_assertion": assertion,
            "client_assertion_type": JWT_BEARER,
        }
        form["resource"] = _resource(settings, resource)
        if scope:
            form["scope"] = scope
        proof = None
        if dpop_key is not None:
            holder = SigningKey.from_pem(dpop_key.read_bytes(), "dpop", _alg_of(dpop_key))
            proof = make_proof(holder, "POST", identity.service.token_endpoint, now)
        body = asyncio.run(identity.service.token(form, proof, now))
    except (BastionError, OSError) as exc:
        typer.echo(f"cannot issue a token for {agent!r}: {getattr(exc, 'message', exc)}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(body["access_token"])


def _gateway_url(settings: config.Settings, url: str | None, resource: str | None) -> str | None:
    """The base URL `bastion token` mints for: --url, else the one a full --resource URL names,
    else the running gateway's (`gateway.json`); None: the config's."""
    if url is not None:
        return url
    if resource is not None and "://" in resource:
        target = resource.rstrip("/")
        paths = sorted((route.path for route in routes_for(settings)), key=len, reverse=True)
        for path in paths:
            if target.endswith(path) and len(target) > len(path):
                return target[: -len(path)]
    return running_url(settings.state_dir)


def _resource(settings: config.Settings, resource: str | None) -> str:
    """The token's audience: a full URL as given, a path on this gateway, or the first route."""
    if resource is None:
        return settings.base_url() + routes_for(settings)[0].path
    if resource.startswith("/"):
        return settings.base_url() + resource
    return resource


def _alg_of(path: Path) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    raise BastionError(f"{path}: expected an EC P-256, Ed25519 or RSA private key")
