"""The `bastion` command: serve the gateway, check a config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import typer

from bastion import config
from bastion.app import serve as serve_gateway
from bastion.errors import BastionError, ConfigError

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
    typer.echo(
        f"{file}: valid ({len(settings.upstreams)} upstreams, "
        f"{len(settings.virtual_servers)} virtual servers)"
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
        typer.echo(_banner(settings.model_copy(update={"listen": listen})))

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve_gateway(settings, ready))
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


def _banner(settings: config.Settings) -> str:
    from bastion.app import routes_for

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
    lines += [
        "Connect a client, for example with the Python SDK (pip install mcp):",
        f'  async with mcp.Client("{base}{first}") as client: await client.list_tools()',
        "or point MCP Inspector / your IDE at the URL above (transport: Streamable HTTP).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Entry point of the `bastion` console script."""
    cli()


if __name__ == "__main__":
    main()
