"""False positives of the poisoning and shadowing rules on the tool lists of real MCP servers.

Installs the official reference servers and a few others from the registries into scratch
directories (npm into .bench-venvs/poisoning-npm, PyPI into the venv .bench-venvs/poisoning),
runs each over stdio with the official `mcp` client, lists its tools, prompts and resource
templates, and runs `bastion.inspect.poisoning` over them as Bastion does at listing: every
server on one virtual server (in the order below), so other servers' names count for the
reference and shadowing rules. Prints counts only (items, flagged, by kind and by server,
the flagged names) — never the descriptions.

    .venv/bin/python bench/poisoning_fp.py [--no-install] [--json FILE]

Servers that need an API key are given a dummy one (listing needs none). A server that does
not start or list within 60 s is reported as unavailable, not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from bastion.inspect.pins import Kind, item_name
from bastion.inspect.poisoning import description_hits, invisible, shadowed

ROOT = Path(__file__).resolve().parent.parent
NPM_DIR = ROOT / ".bench-venvs" / "poisoning-npm"
VENV = ROOT / ".bench-venvs" / "poisoning"
DUMMY = "dummy-key-for-listing-only"
NPM = {
    "everything": ("@modelcontextprotocol/server-everything", [], {}),
    "filesystem": ("@modelcontextprotocol/server-filesystem", ["{tmp}"], {}),
    "memory": ("@modelcontextprotocol/server-memory", [], {}),
    "thinking": ("@modelcontextprotocol/server-sequential-thinking", [], {}),
    "github": ("@modelcontextprotocol/server-github", [], {"GITHUB_PERSONAL_ACCESS_TOKEN": DUMMY}),
    "gitlab": ("@modelcontextprotocol/server-gitlab", [], {"GITLAB_PERSONAL_ACCESS_TOKEN": DUMMY}),
    "brave": ("@modelcontextprotocol/server-brave-search", [], {"BRAVE_API_KEY": DUMMY}),
    "maps": ("@modelcontextprotocol/server-google-maps", [], {"GOOGLE_MAPS_API_KEY": DUMMY}),
}
PYPI = {
    "fetch": ("mcp-server-fetch", "mcp-server-fetch", []),
    "git": ("mcp-server-git", "mcp-server-git", ["--repository", str(ROOT)]),
    "time": ("mcp-server-time", "mcp-server-time", []),
    "sqlite": ("mcp-server-sqlite", "mcp-server-sqlite", ["--db-path", "{tmp}/bench.db"]),
    "duckduckgo": ("duckduckgo-mcp-server", "duckduckgo-mcp-server", []),
    "calculator": ("mcp-server-calculator", "mcp-server-calculator", []),
}
_LISTS: tuple[tuple[str, str, Kind], ...] = (
    ("list_tools", "tools", "tool"),
    ("list_prompts", "prompts", "prompt"),
    ("list_resource_templates", "resource_templates", "template"),
)


@dataclass
class Server:
    name: str
    items: dict[Kind, list[dict[str, Any]]] = field(default_factory=dict)
    problem: str | None = None


def install() -> None:
    """npm and PyPI packages into the scratch directories (idempotent)."""
    NPM_DIR.mkdir(parents=True, exist_ok=True)
    packages = [package for package, _, _ in NPM.values()]
    subprocess.run(  # noqa: S603 - fixed arguments
        ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NPM_DIR), *packages],  # noqa: S607
        check=True,
        stdout=sys.stderr,
    )
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)  # noqa: S603
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *(p for p, _, _ in PYPI.values())], check=True, stdout=sys.stderr)  # noqa: S603


def commands(tmp: str) -> dict[str, StdioServerParameters]:
    """How to start each installed server."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    out: dict[str, StdioServerParameters] = {}
    for name, (package, args, extra) in NPM.items():
        main = NPM_DIR / "node_modules" / ".bin" / f"mcp-{package.split('/')[-1]}"
        out[name] = StdioServerParameters(
            command=str(main), args=[a.format(tmp=tmp) for a in args], env={**env, **extra}
        )
    for name, (_, script, args) in PYPI.items():
        out[name] = StdioServerParameters(
            command=str(VENV / "bin" / script), args=[a.format(tmp=tmp) for a in args], env=env
        )
    return out


async def listing(name: str, params: StdioServerParameters) -> Server:
    """Every tool, prompt and template the server offers (first pages up to 20)."""
    server = Server(name)
    try:
        async with asyncio.timeout(60):
            async with stdio_client(params, errlog=open(os.devnull, "w")) as (read, write):  # noqa: SIM117, ASYNC230
                async with ClientSession(read, write) as session:
                    hello = await session.initialize()
                    for method, key, kind in _LISTS:
                        capability = {"tool": "tools", "prompt": "prompts"}.get(kind, "resources")
                        if getattr(hello.capabilities, capability, None) is None:
                            continue
                        found = await getattr(session, method)()
                        dump = [i.model_dump(by_alias=True, exclude_none=True, mode="json")
                                for i in getattr(found, key)]  # fmt: skip
                        server.items[kind] = dump
    except Exception as exc:  # noqa: BLE001 - reported, not counted
        while isinstance(exc, ExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        server.problem = f"{type(exc).__name__}: {str(exc)[:120]}"
    return server


def judge(servers: list[Server]) -> dict[str, Any]:
    """The poisoning and shadowing rules over every item, all servers on one virtual server."""
    names = {s.name: {item_name(k, i) or "" for k in ("tool", "prompt") for i in s.items.get(k, [])}
             for s in servers}  # fmt: skip
    totals: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    flagged: list[dict[str, Any]] = []
    for index, server in enumerate(servers):
        others = {n: v for n, v in names.items() if n != server.name}
        earlier = {s.name: names[s.name] for s in servers[:index]}
        for kind, items in server.items.items():
            for item in items:
                name = item_name(kind, item) or ""
                totals[kind] += 1
                text = item.get("description")
                hits = description_hits(text, others, server.name) if isinstance(text, str) else []
                found = {hit.kind for hit in [*hits, *invisible(name)]}
                shadow = shadowed(name, earlier) if kind != "template" else None
                if shadow is not None:
                    found.add(f"shadowing:{shadow[0]}__{shadow[1]}")
                if found:
                    kinds.update("shadowing" if f.startswith("shadowing") else f for f in found)
                    flagged.append({"server": server.name, "kind": kind, "name": name,
                                    "found": sorted(found)})  # fmt: skip
    return {"items": dict(totals), "flagged": len(flagged), "by_kind": dict(kinds),
            "flagged_items": flagged}  # fmt: skip


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-install", action="store_true")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    if not options.no_install:
        if shutil.which("npm") is None:
            print("npm is needed", file=sys.stderr)
            return 2
        install()
    with tempfile.TemporaryDirectory() as tmp:
        servers = [await listing(n, p) for n, p in commands(tmp).items()]
    live = [s for s in servers if s.problem is None]
    report = judge(live)
    report["servers"] = {s.name: {k: len(v) for k, v in s.items.items()} for s in live}
    report["unavailable"] = {s.name: s.problem for s in servers if s.problem is not None}
    print("| server | tools | prompts | templates |\n|---|--:|--:|--:|")
    for name, counts in report["servers"].items():
        row = " | ".join(str(counts.get(k, 0)) for k in ("tool", "prompt", "template"))
        print(f"| {name} | {row} |")
    print(f"\nitems: {report['items']}  flagged: {report['flagged']}  by kind: {report['by_kind']}")
    for item in report["flagged_items"]:
        print(f"  {item['server']} {item['kind']} {item['name']}: {', '.join(item['found'])}")
    for name, problem in report["unavailable"].items():
        print(f"  unavailable: {name} ({problem})")
    if options.json:
        options.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
