"""Inspection cost: what checking an upstream's answer costs per call and per KiB.

Builds realistic MCP `tools/call` results of 1 KiB, 64 KiB and 1 MiB — a text content item
holding a JSON page of records (uuids, order ids, dates, prices, hashes, notes with some
non-ASCII) plus the same records as `structuredContent` — with nothing to find, and times:

- `secrets`: `SecretScanner.scan_many` (every secret and personal-data kind) over the
  answer's strings, and `secrets_each`: `scan` called on each string (the fixed cost of a
  call is ~1 us, and an answer's strings are many and short);
- `injection`: `InjectionScanner.scan_many` over the answer's strings;
- `stage`: the whole inspection stage (`bastion.pipeline.inspection.Inspection.inspect`, all
  rules on) on the answer, when that stage can be built here (skipped with the reason if not).

For contrast it times one `re` alternation of the secret seeds (`naive_re`), the
engine the decision record measured against. Prints medians of `--repeats` runs (>= 5) in
microseconds per call and per KiB, and writes bench/results/inspection.json. No network.
Usage: python bench/inspection.py [--repeats 7] [--budget 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bastion.inspect.injection import InjectionScanner
from bastion.inspect.secrets import _DETECTORS, SecretScanner

SIZES = {"1KiB": 1024, "64KiB": 64 * 1024, "1MiB": 1024 * 1024}
WORDS = (
    "the order was shipped to the customer after review of the invoice and the address "
    "was updated in the system by the team lead on request pending approval total amount"
).split()
CITIES = ["Zürich", "Paris", "Kraków", "Lisbon", "Oslo"]
RESULTS = Path(__file__).resolve().parent / "results" / "inspection.json"


def record(rng: random.Random, i: int) -> dict[str, Any]:
    return {
        "id": str(uuid.UUID(int=rng.getrandbits(128))),
        "order": f"ORD-{rng.randint(100000, 999999)}",
        "created": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:00:00Z",
        "amount": round(rng.random() * 1000, 2),
        "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
        "city": rng.choice(CITIES),
        "version": f"1.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
        "note": " ".join(rng.choice(WORDS) for _ in range(14)),
    }


def result(size: int) -> dict[str, Any]:
    """A tools/call response whose serialised form is about `size` bytes."""
    rng = random.Random(size)
    rows: list[dict[str, Any]] = []
    while len(json.dumps(rows, ensure_ascii=False)) * 2 < size:
        rows.append(record(rng, len(rows)))
    text = json.dumps(rows, ensure_ascii=False)
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "content": [{"type": "text", "text": text}],
            "structuredContent": {"rows": rows},
            "isError": False,
        },
    }


def strings(value: Any) -> Iterator[str]:
    """Every string of a decoded JSON value, keys included (as the stage walks them)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def median_seconds(call: Callable[[], object], repeats: int, budget: float) -> float:
    """Median over `repeats` runs of the time per call; each run loops for about `budget` s."""
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-7)
    loops = max(1, min(100_000, int(budget / once)))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            call()
        runs.append((time.perf_counter() - start) / loops)
    return statistics.median(runs)


def stage_timer(message: dict[str, Any]) -> Callable[[], object] | str:
    """A call that runs the whole inspection stage on `message`, or why it cannot."""
    try:
        import orjson

        from bastion import config
        from bastion.pipeline.exchange import Exchange
        from bastion.pipeline.inspection import Inspection
        from bastion.types import MODERN_VERSION, Era, Principal, Target
        from bastion.upstream.base import Answer

        settings = config.parse(
            orjson.dumps(
                {
                    "auth": {"mode": "none", "tenant": "bench"},
                    "upstreams": {
                        "svc": {
                            "transport": "http",
                            "url": "http://127.0.0.1:9/mcp",
                            "inspect": {
                                "secrets": "redact",
                                "personal_data": "flag",
                                "injection": "flag",
                            },
                        }
                    },
                }
            ).decode()
        )
        stage = Inspection(settings)
        loop = asyncio.new_event_loop()
        request = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "q"}}

        def run() -> object:
            exchange = Exchange(request, Era.MODERN, MODERN_VERSION, "default", "127.0.0.1:1")
            exchange.principal = Principal(tenant="bench", agent="bench")
            exchange.target = Target("svc", "q")
            return loop.run_until_complete(stage.inspect(exchange, Answer(message), ("svc",)))

        run()
        return run
    except Exception as exc:  # the stage is another engineer's, possibly not there yet
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per run")
    args = parser.parse_args(argv)
    repeats = max(5, args.repeats)
    secrets, injection = SecretScanner(), InjectionScanner()
    naive = re.compile("|".join(f"(?:{d.seed})" for d in _DETECTORS))
    report: dict[str, Any] = {"repeats": repeats, "sizes": {}}
    print(f"{'size':>6} {'engine':>10} {'us/call':>12} {'us/KiB':>9}")
    for label, size in SIZES.items():
        message = result(size)
        texts = list(strings(message))
        kib = len(json.dumps(message, ensure_ascii=False).encode()) / 1024
        found = [h for t in texts for h in secrets.scan(t) + injection.scan(t)]
        assert not found, f"the benign {label} answer has hits: {found[:3]}"
        timers: dict[str, Callable[[], object] | str] = {
            "secrets": lambda texts=texts: secrets.scan_many(texts),
            "injection": lambda texts=texts: injection.scan_many(texts),
            "secrets_each": lambda texts=texts: [secrets.scan(t) for t in texts],
            "naive_re": lambda texts=texts: [naive.search(t) for t in texts],
            "stage": stage_timer(message),
        }
        row: dict[str, Any] = {"kib": round(kib, 1), "strings": len(texts)}
        for name, timer in timers.items():
            if isinstance(timer, str):
                row[name] = {"skipped": timer}
                print(f"{label:>6} {name:>10} skipped ({timer})")
                continue
            if name == "naive_re" and size > 64 * 1024:
                continue  # ~0.3 s a call: the 64 KiB figure says enough
            seconds = median_seconds(timer, repeats, args.budget)
            row[name] = {"us_per_call": seconds * 1e6, "us_per_kib": seconds * 1e6 / kib}
            print(f"{label:>6} {name:>12} {seconds * 1e6:12.1f} {seconds * 1e6 / kib:9.2f}")
        report["sizes"][label] = row
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
