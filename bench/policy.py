"""Policy decision cost: does a decision cost the same with 10 policies or 10,000?

A synthetic deployment: one upstream with T tools (each with a string and an integer argument)
and N tenants; one permit per (tenant, tool) up to the policy count, each with an argument
condition, plus the quickstart-style tenant-binding forbid. For each policy count it measures,
in one run:

- `engine`: `PolicyEngine.decide` alone (the Cedar call with the partitioned set);
- `stage`: the whole authz stage (`Authorizer.authorize` on an exchange: context built from the
  arguments, the tenant binding, the decision);
- `scan`: for contrast, one Cedar call over the *unpartitioned* set (every policy), as a naive
  integration would do (measured up to 1,000 policies; it grows linearly).

Prints p50/p99 in microseconds. Usage: python bench/policy.py [--counts 10,1000,10000]
[--calls 5000] [--repeats 3]. The target is <= 60 us p50 for `engine` at 10,000 policies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cedarpy
import orjson
import yaml

from bastion import config
from bastion.pipeline.authz import Authorizer
from bastion.pipeline.exchange import Exchange
from bastion.policy.engine import CedarRequest, Who
from bastion.state.rates import MemoryRateCounter
from bastion.types import Era, Principal, Target

TOOLS = 100
TARGET_P50_US = 60.0


def listing() -> dict[str, Any]:
    tools = [
        {
            "name": f"tool{j}",
            "inputSchema": {
                "type": "object",
                "properties": {"item": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["item"],
            },
            "annotations": {"readOnlyHint": j % 2 == 0},
        }
        for j in range(TOOLS)
    ]
    return {"svc": {"tools": tools, "prompts": []}}


def policy_text(count: int) -> str:
    out = [
        '@id("tenant-binding") @reason("names another tenant")\n'
        "forbid (principal, action, resource)\n"
        "when { !([principal.tenant].containsAll(context.request.tenants)) };"
    ]
    for n in range(count - 1):
        tenant, tool = n // TOOLS, n % TOOLS
        out.append(
            f'@id("p{n}")\npermit (principal in Bastion::Tenant::"t{tenant}", '
            f'action == Bastion::Action::"svc__tool{tool}", resource)\n'
            f'when {{ context.input.item like "t{tenant}-*" }};'
        )
    return "\n".join(out)


def build(count: int, workdir: Path) -> Authorizer:
    (workdir / "p.cedar").write_text(policy_text(count))
    document = {
        "auth": {"mode": "none"},
        "state_dir": str(workdir / "state"),
        "upstreams": {
            "svc": {
                "transport": "http",
                "url": "http://127.0.0.1:9/mcp",
                "trusted": True,
                "tenant_arguments": {"item": "{tenant}-*"},
            }
        },
        "policy": {"files": [str(workdir / "p.cedar")]},
    }
    settings = config.parse(yaml.safe_dump(document))
    data = listing()

    async def lister(upstream: str) -> Any:
        return data[upstream]

    authz = Authorizer(settings, lister, MemoryRateCounter())
    asyncio.run(authz.start(save=False))
    return authz


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(fn: Any, calls: int) -> list[float]:
    for _ in range(min(500, calls)):
        fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def run_count(count: int, calls: int, workdir: Path) -> dict[str, list[float]]:
    authz = build(count, workdir)
    engine = authz.engine
    assert engine is not None
    tenant, tool = "t3", "svc__tool7"
    if count - 1 <= 3 * TOOLS + 7:  # small sets: the request hits the last permit there is
        last = count - 2
        tenant, tool = f"t{last // TOOLS}", f"svc__tool{last % TOOLS}"
    principal = Principal(tenant=tenant, agent="bot", user=None)
    arguments = {"item": f"{tenant}-42", "limit": 5}
    context = {
        "input": engine.schema.convert(tool, arguments),
        "request": {
            "method": "tools/call",
            "route": "/mcp",
            "environment": authz.settings.environment,
            "tenants": [{"__entity": {"type": "Bastion::Tenant", "id": tenant}}],
        },
    }
    # The gateway's own environment, as authz gives a caller without one (`auth: none`): the
    # built-in environment-separation forbid refuses any other.
    who = Who("bot", tenant, environment=authz.settings.environment)
    request = CedarRequest(who, tool, ("Tool", tool), context)
    verdict = engine.decide(request)
    assert verdict.allowed, verdict

    def stage() -> None:
        message = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": tool, "arguments": arguments},
        }
        exchange = Exchange(message, Era.MODERN, "2026-07-28", "default", "127.0.0.1:1", principal)
        exchange.target = Target("svc", tool.partition("__")[2])
        coro = authz.authorize(exchange)
        try:
            coro.send(None)
        except StopIteration:
            pass
        assert exchange.denial is None

    results = {
        "engine": measure(lambda: engine.decide(request), calls),
        "stage": measure(stage, calls),
    }
    if count <= 1000:
        everything = cedarpy.PolicySet.from_json_str(
            json.dumps(
                {
                    "staticPolicies": {pid: doc.est for pid, doc in engine.docs.items()},
                    "templates": {},
                    "templateLinks": [],
                }
            )
        )
        entities = engine._entities(request.who, ())  # noqa: SLF001 - the same entities
        native = {
            "principal": {"type": "Bastion::Agent", "id": "bot"},
            "action": {"type": "Bastion::Action", "id": tool},
            "resource": {"type": "Bastion::Tool", "id": tool},
            "context": orjson.dumps(context).decode(),
        }

        def scan() -> None:
            cedarpy._internal.is_authorized_batch(
                [native], everything, entities._inner, None, False
            )  # noqa: SLF001

        results["scan"] = measure(scan, max(200, calls // 10))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,1000,10000")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    print(f"policy decision cost ({TOOLS} tools; p50 / p99 in us; median of {args.repeats} runs)")
    header = ("policies", "engine p50", "p99", "stage p50", "p99", "scan p50")
    print("{:>9} {:>11} {:>7} {:>10} {:>7} {:>9}".format(*header))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            runs = [run_count(count, args.calls, Path(tmp)) for _ in range(args.repeats)]

            def med(key: str, q: float, runs: list[dict[str, list[float]]] = runs) -> float:
                values = [percentile(r[key], q) for r in runs if key in r]
                return statistics.median(values) if values else float("nan")

            engine_p50 = med("engine", 0.5)
            if count == max(counts):
                worst = engine_p50
            print(
                f"{count:>9} {engine_p50:>11.1f} {med('engine', 0.99):>7.1f} "
                f"{med('stage', 0.5):>10.1f} {med('stage', 0.99):>7.1f} {med('scan', 0.5):>9.1f}"
            )
    verdict = "met" if worst <= TARGET_P50_US else "MISSED"
    print(f"target: engine p50 <= {TARGET_P50_US:.0f} us at {max(counts)} policies: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
