"""The `bastion` command: serve the gateway, check a config."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import typer

from bastion import config
from bastion.app import routes_for
from bastion.app import serve as serve_gateway
from bastion.control.admin_auth import TOKEN_FILE
from bastion.control.agents_cli import app as agents_app
from bastion.control.assembly import Identity, build_gateway, open_identity
from bastion.control.audit_cli import app as audit_app
from bastion.control.discovery import announce, running_url, withdraw
from bastion.control.policy_cli import app as policy_app
from bastion.control.token_service import JWT_BEARER
from bastion.errors import BastionError, ConfigError
from bastion.identity.dpop import make_proof
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey
from bastion.pipeline.session import session_hash
from bastion.policy.build import sources_of
from bastion.policy.source import PolicyLoadError, load_policies

cli = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Bastion, the MCP security gateway."
)
log = logging.getLogger("bastion")


def _load(path: Path) -> config.Settings:
    try:
        return config.load(path)
    except ConfigError as exc:
        typer.echo(f"{path}: {len(exc.problems)} problem(s) in the configuration:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(1) from exc


@cli.command("check-config")
def check_config(file: Path = typer.Argument(..., help="The YAML configuration file.")) -> None:
    """Validate a configuration file: exit 0 when valid, else 1 with every problem and its line."""
    settings = _load(file)
    if settings.auth.mode == "none" and not settings.is_loopback():
        typer.echo(
            f"{file}: listen.host: auth: none is only allowed on a loopback address, "
            f"found {settings.listen.host!r}",
            err=True,
        )
        raise typer.Exit(1)
    try:
        policies = load_policies(sources_of(settings.policy))
    except PolicyLoadError as exc:
        typer.echo(f"{file}: {len(exc.problems)} problem(s) in the policy:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"{file}: valid ({len(settings.upstreams)} upstreams, "
        f"{len(settings.virtual_servers)} virtual servers, {len(policies)} policies; "
        "the policy is validated against the upstreams' tools when the gateway starts)"
    )


@cli.command()
def serve(
    config_file: Path = typer.Option(..., "--config", "-c", help="The YAML configuration file."),
    host: str | None = typer.Option(None, help="Listen address (overrides listen.host)."),
    port: int | None = typer.Option(None, help="Listen port (overrides listen.port)."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run the gateway."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = _load(config_file)
    listen = settings.listen.model_copy(
        update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
    )
    settings = settings.model_copy(update={"listen": listen})
    if settings.auth.mode == "none":
        if not settings.is_loopback():
            typer.echo(
                f"refusing to start: auth: none is only allowed on a loopback address, "
                f"not {settings.listen.host!r}",
                err=True,
            )
            raise typer.Exit(1)
        log.warning(
            "auth: none — every caller acts as agent %r of tenant %r; loopback only",
            settings.auth.agent,
            settings.auth.tenant,
        )

    def ready(port: int) -> None:
        listen = settings.listen.model_copy(update={"port": port})
        running = settings.model_copy(update={"listen": listen})
        try:  # for `bastion token` on this machine; the gateway runs without it
            announce(running, [route.path for route in routes_for(running)])
        except OSError as exc:
            log.warning("cannot write %s/gateway.json: %s", running.state_dir, exc)
        typer.echo(_banner(running, config_file))

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            gateway = runner.run(build_gateway(settings))
            try:
                runner.run(serve_gateway(gateway, ready))
            finally:
                withdraw(settings.state_dir)
    except OSError as exc:
        typer.echo(
            f"cannot serve on {settings.listen.host}:{settings.listen.port}: {exc}", err=True
        )
        raise typer.Exit(1) from exc
    except BastionError as exc:
        typer.echo(f"cannot start: {exc.message}", err=True)
        raise typer.Exit(1) from exc


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return None
    return uvloop.new_event_loop


keys_cli = typer.Typer(no_args_is_help=True, help="The embedded authorization server's keys.")
tokens_cli = typer.Typer(no_args_is_help=True, help="Issued access tokens.")
sessions_cli = typer.Typer(no_args_is_help=True, help="Client sessions of running gateways.")
cli.add_typer(agents_app, name="agents", help="Agents: the non-human identities that call MCP.")
cli.add_typer(audit_app, name="audit", help="The tamper-evident audit trail.")
cli.add_typer(policy_app, name="policy", help="Cedar policy: test, explain, lint, schema.")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(tokens_cli, name="tokens")
cli.add_typer(sessions_cli, name="sessions")

CONFIG_OPTION = typer.Option(
    Path("examples/quickstart.yaml"), "--config", "-c", help="Config file."
)


def _identity(config_file: Path, url: str | None = None) -> Identity:
    settings = _load(config_file)
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


@cli.command()
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
    identity = _identity(config_file, _gateway_url(_load(config_file), url, resource))
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


def _banner(settings: config.Settings, config_file: Path) -> str:
    base = f"http://{settings.listen.host}:{settings.listen.port}"
    lines = [
        "",
        f"Bastion is ready on {base}",
        "MCP endpoints (Streamable HTTP, 2025-06-18 to 2026-07-28):",
    ]
    for route in routes_for(settings):
        kind = "virtual server" if route.multiplex else "one upstream"
        lines.append(f"  {base}{route.path:<28} {kind}: {', '.join(route.upstreams)}")
    first = routes_for(settings)[0].path if routes_for(settings) else "/mcp"
    if settings.auth.mode == "oauth":
        agents = ", ".join(a.id for a in settings.auth.agents) or "none yet (bastion agents add)"
        example = settings.auth.agents[0].id if settings.auth.agents else "AGENT"
        lifetime = settings.auth.token_lifetime_seconds
        lines += [
            f"Every request needs an access token. Demo agents: {agents}. Get a token with:",
            f"  .venv/bin/bastion token --config {config_file} --agent {example}",
            f'and send it as "Authorization: Bearer <token>" to {base}{first} (it lasts '
            f"{lifetime} s; --resource /servers/<name>/mcp for another route).",
            f"Clients that do OAuth discover everything from the 401 ({base}/.well-known/"
            "oauth-protected-resource): client_credentials with private_key_jwt.",
            "",
        ]
    else:
        lines += [
            "Connect a client, for example with the Python SDK (pip install mcp):",
            f'  async with mcp.Client("{base}{first}") as client: await client.list_tools()',
            "or point MCP Inspector / your IDE at the URL above (transport: Streamable HTTP).",
            "",
        ]
    if settings.admin.enabled:
        reference = settings.admin.token
        token = f"the admin.token secret ({reference.split(':')[0]}:)" if reference else None
        path = Path(settings.state_dir) / TOKEN_FILE
        lines += [
            f"Admin API (audit trail, agents) at {base}/admin/; its token is {token or path}:",
            f'  curl -H "Authorization: Bearer {"$ADMIN_TOKEN" if token else f"$(cat {path})"}" '
            f"{base}/admin/agents",
            "",
        ]
    policy = settings.policy
    lines += [
        f"Policy: default deny; {len(policy.grants)} grants and {len(policy.files)} Cedar files. "
        "Why a call is allowed or denied:",
        f"  .venv/bin/bastion policy explain --config {config_file} --agent AGENT "
        "--tool SERVER__TOOL --arguments '{...}'",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Entry point of the `bastion` console script."""
    cli()


if __name__ == "__main__":
    main()
