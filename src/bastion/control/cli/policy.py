"""`bastion policy ...`: test, explain, lint, and show the schema of a deployment's policy.

Each command loads the policy exactly as the gateway does: the files and grants of the config,
validated against the schema generated from the upstreams' tool lists. Those lists come from
the catalog the gateway saved when it last started (`<state_dir>/policy-catalog.json`), or from
`--catalog FILE` (the same JSON: `{"<upstream>": {"tools": [...], "prompts": [...]}}`).

Exit status: 0 when all is well; 1 when a test case fails, lint finds something, or explain's
request is denied; 2 when the policy or the catalog cannot be loaded (one line on stderr).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml

from bastion.config import ENVIRONMENTS
from bastion.config import load as load_config
from bastion.errors import BastionError
from bastion.methods import PROMPTS_GET, RESOURCES_READ, RESOURCES_SUBSCRIBE, TOOLS_CALL
from bastion.pipeline.authz import Authorizer
from bastion.pipeline.exchange import Exchange
from bastion.pipeline.history import history_key
from bastion.policy.lint import lint as lint_policy
from bastion.state.rates import MemoryRateCounter
from bastion.types import Era, Principal, Target

app = typer.Typer(
    name="policy",
    help="Test, explain and lint the Cedar policy of a config.",
    no_args_is_help=True,
    add_completion=False,
)

EXIT_FAILED, EXIT_ERROR = 1, 2
CONFIG = typer.Option(..., "--config", "-c", help="The gateway's YAML configuration.")
CATALOG = typer.Option(
    None, "--catalog", help="Tool lists as JSON (default: the catalog the gateway saved)."
)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_ERROR)


def _load(config_file: Path, catalog: Path | None) -> Authorizer:
    try:
        settings = load_config(config_file)
    except BastionError as exc:
        _fail(exc.message)
    source = catalog or Path(settings.state_dir) / "policy-catalog.json"
    try:
        listings = json.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(
            f"no tool catalog at {source} ({exc.strerror}): start the gateway once (it saves "
            "the upstreams' tool lists there) or pass --catalog FILE"
        )
    except ValueError as exc:
        _fail(f"{source}: not valid JSON: {exc}")
    if not isinstance(listings, dict):
        _fail(f"{source}: expected an object of upstream listings")

    async def lister(upstream: str) -> Any:
        if upstream not in listings:
            raise LookupError(f"no listing for {upstream!r} in {source}")
        return listings[upstream]

    authz = Authorizer(settings, lister, MemoryRateCounter())
    try:
        asyncio.run(authz.start(save=False))
    except BastionError as exc:
        _fail(f"the policy does not load: {exc.message}")
    return authz


def _exchange(authz: Authorizer, case: dict[str, Any]) -> Exchange:
    agent = str(case.get("agent") or "")
    if not agent:
        raise ValueError("each case names an agent")
    seeded = {a.id: a for a in authz.settings.auth.agents}
    tenant = case.get("tenant") or (seeded[agent].tenant if agent in seeded else None)
    if not tenant:
        raise ValueError(f"agent {agent!r} is not seeded in the config: give its tenant")
    # As the registry would say: the seeded agent's environment, else the gateway's.
    environment = case.get("environment") or (
        seeded[agent].environment if agent in seeded else authz.settings.environment
    )
    if environment not in ENVIRONMENTS:
        raise ValueError(f"environment: expected one of {', '.join(ENVIRONMENTS)}")
    principal = Principal(
        tenant=str(tenant),
        agent=agent,
        user=case.get("user"),
        roles=frozenset(case.get("roles") or ()),
        environment=str(environment),
    )
    method = str(case.get("method") or TOOLS_CALL)
    params: dict[str, Any]
    if method == TOOLS_CALL:
        tool = str(case.get("tool") or "")
        server, sep, name = tool.partition("__")
        if not sep:
            raise ValueError(f"tool {tool!r}: write it as <server>__<tool>")
        params = {"name": tool, "arguments": case.get("arguments") or {}}
        target = Target(server, name)
    elif method in (RESOURCES_READ, RESOURCES_SUBSCRIBE):
        uri = str(case.get("uri") or "")
        params = {"uri": uri}
        target = Target(str(case.get("server") or ""), uri)
    elif method == PROMPTS_GET:
        prompt = str(case.get("prompt") or "")
        server, _, name = prompt.partition("__")
        params = {"name": prompt, "arguments": case.get("arguments") or {}}
        target = Target(server, name)
    else:
        raise ValueError(f"method {method!r}: cases use tools/call, resources/read or prompts/get")
    message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    client = f"{case.get('client_ip', '127.0.0.1')}:1"
    exchange = Exchange(message, Era.MODERN, "2026-07-28", "policy-test", client, principal)
    exchange.target = target
    for done in case.get("history") or ():
        authz.history.add(history_key(exchange, principal), str(done), ())
    return exchange


def _decide(authz: Authorizer, exchange: Exchange) -> None:
    asyncio.run(authz.authorize(exchange))


@app.command("test")
def test(
    cases_file: Annotated[Path, typer.Argument(help="YAML file with a `cases:` list.")],
    config_file: Path = CONFIG,
    catalog: Path | None = CATALOG,
) -> None:
    """Run table-driven cases: each request's decision, deciding policies and reason."""
    authz = _load(config_file, catalog)
    try:
        document = yaml.safe_load(cases_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"{cases_file}: {exc}")
    cases = document.get("cases") if isinstance(document, dict) else None
    if not isinstance(cases, list) or not cases:
        _fail(f"{cases_file}: expected a non-empty `cases:` list")
    failed = 0
    for n, case in enumerate(cases):
        name = str(case.get("name") or f"case {n}") if isinstance(case, dict) else f"case {n}"
        try:
            if not isinstance(case, dict):
                raise ValueError("a case is a mapping")
            expect = str(case.get("expect", "")).lower()
            if expect not in ("allow", "deny"):
                raise ValueError("expect: allow or deny")
            authz.history = type(authz.history)()  # each case starts a fresh session
            exchange = _exchange(authz, case)
            _decide(authz, exchange)
        except ValueError as exc:
            failed += 1
            typer.echo(f"ERROR {name}: {exc}")
            continue
        decision = exchange.decision
        assert decision is not None  # noqa: S101 - authorize always decides
        problems = []
        got = "allow" if decision.allowed else "deny"
        if got != expect:
            problems.append(f"expected {expect}, got {got}")
        for wanted in case.get("policies") or ():
            if wanted not in decision.policies:
                problems.append(
                    f"policy {wanted!r} did not decide (deciding: {list(decision.policies)})"
                )
        reason = case.get("reason")
        said = "; ".join(decision.reasons)
        if reason and str(reason) not in said:
            problems.append(f"reason {reason!r} not in {said!r}")
        if problems:
            failed += 1
            typer.echo(f"FAIL  {name}: " + "; ".join(problems))
        else:
            typer.echo(f"ok    {name}: {got} ({', '.join(decision.policies) or 'default'})")
    typer.echo(f"{len(cases) - failed} passed, {failed} failed")
    if failed:
        raise typer.Exit(EXIT_FAILED)


@app.command("explain")
def explain(
    config_file: Path = CONFIG,
    agent: str = typer.Option(..., "--agent", help="The calling agent."),
    tool: str | None = typer.Option(None, "--tool", help="<server>__<tool> to call."),
    arguments: str = typer.Option("{}", "--arguments", help="The call's arguments, as JSON."),
    uri: str | None = typer.Option(None, "--uri", help="A resource URI to read instead."),
    server: str | None = typer.Option(None, "--server", help="The server of --uri."),
    tenant: str | None = typer.Option(None, "--tenant", help="Default: the seeded agent's."),
    user: str | None = typer.Option(None, "--user", help="The user the agent acts for."),
    environment: str | None = typer.Option(
        None, "--environment", help="The agent's (dev, staging, prod, demo); default: seeded."
    ),
    catalog: Path | None = CATALOG,
) -> None:
    """Why a request is allowed or denied: the deciding policies, their text and reasons."""
    authz = _load(config_file, catalog)
    try:
        args = json.loads(arguments)
    except ValueError as exc:
        _fail(f"--arguments is not JSON: {exc}")
    case: dict[str, Any] = {
        "agent": agent,
        "tenant": tenant,
        "user": user,
        "environment": environment,
    }
    if uri is not None:
        case.update(method=RESOURCES_READ, uri=uri, server=server)
    else:
        case.update(tool=tool, arguments=args)
    try:
        exchange = _exchange(authz, case)
    except ValueError as exc:
        _fail(str(exc))
    _decide(authz, exchange)
    decision = exchange.decision
    engine = authz.engine
    assert decision is not None and engine is not None  # noqa: S101 - decided, loaded
    verdict = "ALLOW" if decision.allowed else "DENY"
    typer.echo(f"{verdict}: " + "; ".join(decision.reasons))
    typer.echo(_environments(authz, exchange))
    for pid in decision.policies:
        doc = engine.docs.get(pid)
        if doc is None:
            continue
        typer.echo(f"\n{pid} ({doc.origin}):\n{doc.text()}")
    if decision.obligations:
        typer.echo("\nobligations: " + json.dumps(decision.obligations, sort_keys=True))
    if not decision.allowed and not decision.policies:
        target = exchange.target
        assert target is not None  # noqa: S101 - set by _exchange
        action = f"{target.upstream}__{target.name}" if uri is None else "read_resource"
        candidates = [
            engine.docs[p]
            for p in engine.policy_ids(action, exchange.principal.tenant)  # type: ignore[union-attr]
            if engine.docs[p].effect == "permit"
        ]
        if candidates:
            typer.echo("\nno permit matched; the permits for this action and tenant were:")
            for doc in candidates:
                typer.echo(f"\n{doc.id} ({doc.origin}):\n{doc.text()}")
        else:
            typer.echo("\nno permit mentions this action for this tenant.")
    if not decision.allowed:
        raise typer.Exit(EXIT_FAILED)


def _environments(authz: Authorizer, exchange: Exchange) -> str:
    """Where the caller and the upstream belong, which `environment-separation` compares."""
    principal, target = exchange.principal, exchange.target
    assert principal is not None and target is not None  # noqa: S101 - set by _exchange
    upstream = target.upstream
    where = (
        f"upstream {upstream!r} in {authz.settings.environment_of(upstream)}"
        if upstream in authz.settings.upstreams
        else f"upstream {upstream!r} not configured"
    )
    return (
        f"environments: agent {principal.agent!r} in {principal.environment}, {where} "
        f"(gateway: {authz.settings.environment}; built-in policy environment-separation)"
    )


@app.command("lint")
def lint(config_file: Path = CONFIG, catalog: Path | None = CATALOG) -> None:
    """Flag cross-tenant permits, wildcard principals, dead policies, shadowed permits."""
    authz = _load(config_file, catalog)
    assert authz.engine is not None  # noqa: S101 - loaded
    findings = lint_policy(authz.engine)
    for finding in findings:
        typer.echo(f"warning: {finding}")
    typer.echo(f"{len(authz.engine.docs)} policies, {len(findings)} findings")
    if findings:
        raise typer.Exit(EXIT_FAILED)


@app.command("schema")
def schema(config_file: Path = CONFIG, catalog: Path | None = CATALOG) -> None:
    """Print the Cedar schema policies are validated against."""
    authz = _load(config_file, catalog)
    assert authz.engine is not None  # noqa: S101 - loaded
    sys.stdout.write(authz.engine.schema.text + "\n")
