"""`bastion check-config` and `bastion serve`: validate a configuration, run the gateway.

`serve` announces the running gateway in `<state_dir>/gateway.json` (discovery.py) once it
listens, and prints where to connect and how to get a token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import typer

from bastion import config
from bastion.app import routes_for
from bastion.app import serve as serve_gateway
from bastion.control.admin.auth import TOKEN_FILE
from bastion.control.assembly import build_gateway
from bastion.control.cli.discovery import announce, withdraw
from bastion.errors import BastionError, ConfigError, PolicyLoadError
from bastion.policy.build import sources_of
from bastion.policy.source import load_policies
from bastion.transport.tls import load_context

log = logging.getLogger("bastion")


def load_settings(path: Path) -> config.Settings:
    """The settings of `path`; every problem on stderr and exit status 1 when invalid."""
    try:
        return config.load(path)
    except ConfigError as exc:
        typer.echo(f"{path}: {len(exc.problems)} problem(s) in the configuration:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(1) from exc


def check_tls(settings: config.Settings, path: Path) -> None:
    """Load the listener's certificate and key once, so a bad file stops `serve` and
    `check-config` with its name before anything starts; exit status 1 when invalid."""
    if settings.listen.tls is None:
        return
    try:
        load_context(settings.listen.tls)
    except ConfigError as exc:
        typer.echo(f"{path}: {len(exc.problems)} problem(s) in the configuration:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(1) from exc


def check_config(file: Path = typer.Argument(..., help="The YAML configuration file.")) -> None:
    """Validate a configuration file: exit 0 when valid, else 1 with every problem and its line."""
    settings = load_settings(file)
    check_tls(settings, file)
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
    settings = load_settings(config_file)
    listen = settings.listen.model_copy(
        update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
    )
    settings = settings.model_copy(update={"listen": listen})
    check_tls(settings, config_file)
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


def _banner(settings: config.Settings, config_file: Path) -> str:
    scheme = "https" if settings.listen.tls is not None else "http"
    base = f"{scheme}://{settings.listen.host}:{settings.listen.port}"
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
    lines += _console_lines(settings, base)
    policy = settings.policy
    lines += [
        f"Policy: default deny; {len(policy.grants)} grants and {len(policy.files)} Cedar files. "
        "Why a call is allowed or denied:",
        f"  .venv/bin/bastion policy explain --config {config_file} --agent AGENT "
        "--tool SERVER__TOOL --arguments '{...}'",
        "",
    ]
    return "\n".join(lines + _inspection_lines(settings))


def _console_lines(settings: config.Settings, base: str) -> list[str]:
    """What the banner says about the console: where, and how to log in."""
    console = settings.console
    if not console.enabled:
        return []
    ways = []
    if console.issuer is not None:
        ways.append(f"through {console.issuer} (OIDC)")
    if settings.admin.enabled:
        ways.append("with the admin token above (pasted once, exchanged for a session)")
    how = " or ".join(ways) or "nobody: set console.issuer or enable admin"
    return [f"Console (agents, approvals, audit, policy) at {base}/console/", f"  log in {how}", ""]


def _inspection_lines(settings: config.Settings) -> list[str]:
    """What the banner says about the inspection of answers."""
    if not settings.inspection.enabled:
        return ["Inspection of answers: off (inspection.enabled: false).", ""]
    guarded = [
        f"{name} ({upstream.inspect.tenants})"
        for name, upstream in settings.upstreams.items()
        if upstream.tenant_arguments and upstream.inspect.tenants != "off"
    ]
    tenants = ", ".join(guarded) if guarded else "none: no upstream declares tenant_arguments"
    return [
        "Inspection: every answer is checked before a client sees it. Another tenant's objects",
        f"are contained on {tenants}; secrets redacted, injected instructions flagged; a",
        "changed tool definition waits for an operator (bastion tools diff|approve).",
        "",
    ]
