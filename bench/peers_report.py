"""bench/peers.py's report: medians, paired ratios, the project's goals, and the Markdown.

Every ratio is computed within one repeat (the targets of a repeat ran minutes apart at most,
under the same machine load) and the median over repeats is reported. "Added p50" is a
target's p50 minus the direct p50 of the same repeat; "CPU per call" is the user + system CPU
of the target's whole process group during the measured calls ÷ calls; peak RSS is the
serving process's VmHWM at the end of the run (so it includes the 32-client phases).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from run import _f, _median, _row, ratio, times

if TYPE_CHECKING:
    from peers import PeerPlan

MODES = ("sequential", "concurrent")
SLOW = ("cf-stateless", "cf-stateful", "fastmcp")
ERA_NAMES = {"modern": "2026-07-28", "legacy": "2025-11-25"}
LABELS = {
    "direct": "direct (echo server)",
    "haproxy": "HAProxy, HTTP mode",
    "bare": "bare hop (uvicorn + aiohttp)",
    "none": "Bastion `auth: none`, audit off",
    "full": "Bastion default: Bearer + Cedar + minted credential + audit (survives kill -9)",
    "power": "Bastion, the same with audit `survives: power` (fsync per group commit)",
    "dpop": "Bastion, the same (default audit) with DPoP",
    "cf-stateless": "ContextForge 1.1.0, stateless",
    "cf-stateful": "ContextForge 1.1.0, stateful",
    "fastmcp": "FastMCP 4.2.3 proxy",
}
FAMILIES = {"ContextForge": ("cf-stateless", "cf-stateful"), "FastMCP": ("fastmcp",)}
DEFAULT = "full"
Phases = dict[str, dict[str, Any]]


def _paired(
    runs: list[dict[str, Any]], era: str, mode: str, names: tuple[str, ...], fn: Callable[..., Any]
) -> float | None:
    """Median over repeats of fn(phases by target), skipping repeats that lack one of them."""
    values = []
    for run in runs:
        block = run.get(era, {})
        if any(n not in block or "fatal" in block[n][mode] for n in names):
            continue
        try:
            values.append(fn({n: block[n][mode] for n in names}))
        except (TypeError, KeyError, ZeroDivisionError):
            continue
    median: float | None = _median(values)
    return median


def _added(p: Phases, key: str) -> float:
    return float(p[key]["p50_ms"] - p["direct"]["p50_ms"])


def _cpu(p: Phases, key: str) -> float | None:
    value = p[key]["cpu_ms_per_call"]["target"]
    return None if value is None else float(value)


def _ratios(runs: list[dict[str, Any]], era: str, key: str) -> dict[str, float | None]:
    """One target's paired figures and ratios in one era."""

    def seq(names: tuple[str, ...], fn: Callable[[Phases], float | None]) -> float | None:
        return _paired(runs, era, "sequential", names, fn)

    found = {
        "added_p50_ms": seq((key, "direct"), lambda p: _added(p, key)),
        "added_p50_x_bare": seq(
            (key, "bare", "direct"), lambda p: ratio(_added(p, key), _added(p, "bare"))
        ),
        "cpu_x_bare": seq((key, "bare"), lambda p: ratio(_cpu(p, key), _cpu(p, "bare"))),
        "c32_calls_per_s_x_bare": _paired(
            runs,
            era,
            "concurrent",
            (key, "bare"),
            lambda p: ratio(p[key]["calls_per_s"], p["bare"]["calls_per_s"]),
        ),
        "added_p50_x_default": seq(
            (key, DEFAULT, "direct"), lambda p: ratio(_added(p, key), _added(p, DEFAULT))
        ),
        "cpu_x_default": seq((key, DEFAULT), lambda p: ratio(_cpu(p, key), _cpu(p, DEFAULT))),
    }
    if key == "none":
        found["cpu_x_haproxy"] = seq(
            ("none", "haproxy"), lambda p: ratio(_cpu(p, "none"), _cpu(p, "haproxy"))
        )
    return found


def summarize(plan: PeerPlan, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per era: medians per target and mode, and each target's paired ratios."""
    summary: dict[str, Any] = {}
    for era in plan.eras:
        rows: dict[str, Any] = {}
        for key in plan.targets:
            phases = {m: [r[era][key][m] for r in runs if key in r.get(era, {})] for m in MODES}
            if phases["sequential"]:
                rows[key] = {mode: _row(phases[mode]) for mode in MODES}
        ratios = {key: _ratios(runs, era, key) for key in rows if key != "direct"}
        summary[era] = {"targets": rows, "ratios": ratios}
    return summary


def _rss(memory: dict[str, Any]) -> dict[str, float | None]:
    bare = (memory.get("bare") or {}).get("vmhwm_kib")
    return {key: ratio(m.get("vmhwm_kib"), bare) for key, m in memory.items()}


# -- goals ------------------------------------------------------------------------------------


def _goal(name: str, era: str | None, value: float | None, limit: float, at_most: bool) -> Any:
    if value is None:
        verdict = "–"
    else:
        verdict = "met" if (value <= limit if at_most else value >= limit) else "MISSED"
    sign = "≤" if at_most else "≥"
    return {"goal": f"{name} {sign} {limit:g}×", "era": era, "value": value, "verdict": verdict}


def goals(plan: PeerPlan, summary: dict[str, Any], rss: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each a ratio from this run, per era where it has one."""
    found = []
    for era in plan.eras:
        r = summary[era]["ratios"]

        def get(key: str, what: str, _r: dict[str, Any] = r) -> float | None:
            return (_r.get(key) or {}).get(what)

        found += [
            _goal(
                "default: added p50 ÷ bare hop's", era, get(DEFAULT, "added_p50_x_bare"), 1.5, True
            ),
            _goal("default: CPU per call ÷ bare hop's", era, get(DEFAULT, "cpu_x_bare"), 1.5, True),
            _goal("DPoP: added p50 ÷ bare hop's", era, get("dpop", "added_p50_x_bare"), 2, True),
            _goal("DPoP: CPU per call ÷ bare hop's", era, get("dpop", "cpu_x_bare"), 2, True),
            _goal(
                f"default: {plan.concurrency}-client calls/s ÷ bare hop's",
                era,
                get(DEFAULT, "c32_calls_per_s_x_bare"),
                1.0,
                False,
            ),
        ]
        for family, members in FAMILIES.items():
            for what, label, limit in (
                ("added_p50_x_default", "added p50", 20),
                ("cpu_x_default", "CPU per call", 25),
            ):
                # The peer's best mode: the lowest ratio among its modes that speak the era.
                values = sorted((v, m) for m in members if (v := get(m, what)) is not None)
                best, mode = values[0] if values else (None, "")
                name = f"{family} {label} ÷ default's (best mode: {LABELS.get(mode, '–')})"
                found.append(_goal(name, era, best, limit, False))
        found.append(
            _goal(
                "`auth: none` CPU per call ÷ HAProxy's", era, get("none", "cpu_x_haproxy"), 5, True
            )
        )
    found.append(
        _goal(
            f"default peak RSS ({plan.concurrency} clients) ÷ bare hop's",
            None,
            rss.get(DEFAULT),
            1.5,
            True,
        )
    )
    return found


# -- the report -------------------------------------------------------------------------------


def build(
    plan: PeerPlan, state: dict[str, Any], meta: dict[str, Any], failure: str | None
) -> dict[str, Any]:
    """The JSON document: settings, versions, configs, summary, ratios, goals, every phase."""
    runs, targets = state["runs"], state.get("targets", {})
    summary = summarize(plan, runs)
    memory = state.get("memory", {})
    rss = _rss(memory)
    errors = sum(
        row[mode]["errors"] + row[mode]["warmup_errors"] + row[mode]["failed_phases"]
        for era in summary.values()
        for row in era["targets"].values()
        for mode in MODES
    )
    if failure is None and errors:
        failure = f"{errors} failed call(s) or phase(s)"
    return {
        "ok": failure is None,
        "failure": failure,
        "meta": meta,
        "versions": {k: t.version for k, t in targets.items() if t.version},
        "configs": {k: t.config for k, t in targets.items() if t.config},
        "unavailable": state["unavailable"],
        "summary": summary,
        "memory": memory,
        "rss_x_bare": rss,
        "goals": goals(plan, summary, rss),
        "runs": runs,
    }


def _label(key: str, report: dict[str, Any]) -> str:
    version = report["versions"].get(key, "")
    if key == "haproxy" and version.startswith("HAProxy version "):
        return f"HAProxy {version.split()[2].split('-')[0]}, HTTP mode"
    return LABELS[key]


def _cell(plan: PeerPlan, report: dict[str, Any], key: str, what: str) -> str:
    """One figure per era, `modern / legacy`; n/a where the target cannot speak the era."""
    parts = []
    for era in plan.eras:
        if era in report["unavailable"].get(key, {}):
            parts.append("n/a")
            continue
        value = (report["summary"][era]["ratios"].get(key) or {}).get(what)
        parts.append(times(value))
    return " / ".join(parts)


def _absolute(plan: PeerPlan, report: dict[str, Any], key: str) -> str:
    cells: dict[str, list[str]] = {"p50": [], "added": [], "cpu": [], "c_p50": [], "c_rate": []}
    for era in plan.eras:
        row = report["summary"][era]["targets"].get(key)
        ratios = report["summary"][era]["ratios"].get(key) or {}
        if row is None:
            for values in cells.values():
                values.append("n/a")
            continue
        seq, conc = row["sequential"], row["concurrent"]
        cells["p50"].append(_f(seq["p50_ms"]))
        cells["added"].append("–" if key == "direct" else _f(ratios.get("added_p50_ms")))
        cells["cpu"].append(_f(seq["target_cpu_ms_per_call"]))
        cells["c_p50"].append(_f(conc["p50_ms"], 1))
        cells["c_rate"].append(_f(conc["calls_per_s"], 0))
    memory = report["memory"].get(key) or {}
    rss = "–" if memory.get("vmhwm_kib") is None else f"{memory['vmhwm_kib'] / 1024:.0f}"
    if memory.get("helpers"):
        rss += f" (+{memory['helpers']} helpers, {memory['helpers_pss_kib'] / 1024:.0f} PSS)"
    errors = sum(
        row[mode]["errors"] + row[mode]["warmup_errors"]
        for era in plan.eras
        if (row := report["summary"][era]["targets"].get(key))
        for mode in MODES
    )
    joined = " | ".join(" / ".join(v) for v in cells.values())
    return f"| {_label(key, report)} | {joined} | {rss} | {errors} |"


def render(plan: PeerPlan, report: dict[str, Any]) -> str:
    """The Markdown printed at the end of a run."""
    meta = report["meta"]
    eras = " / ".join(f"{ERA_NAMES[e]} era" for e in plan.eras)
    reps = plan.repeats
    out = [
        f"# Bastion and its peers — echo `tools/call`, medians of {reps} "
        f"repeat{'s' * (reps > 1)} (ratios paired within each repeat)",
        "",
        f"fast targets: {plan.calls} sequential + {plan.concurrent_calls} calls over "
        f"{plan.concurrency} workers per phase"
        + (
            f" · Python peers: {plan.peer_calls} + {plan.peer_concurrent_calls}"
            if set(plan.targets) & set(SLOW)
            else ""
        )
        + f" · load avg {meta['loadavg_before']} → {meta.get('loadavg_after')}"
        f" · {meta.get('duration_s', 0):.0f} s",
        "",
        f"## Ratios to the bare hop ({eras})",
        "",
        "| target | added p50 ÷ bare hop's | CPU per call ÷ bare hop's "
        f"| {plan.concurrency}-client calls/s ÷ bare hop's | peak RSS ÷ bare hop's |",
        "|---|--:|--:|--:|--:|",
    ]
    for key in plan.targets:
        if key == "direct":
            continue
        rss = times(report["rss_x_bare"].get(key))
        out.append(
            f"| {_label(key, report)} | {_cell(plan, report, key, 'added_p50_x_bare')} "
            f"| {_cell(plan, report, key, 'cpu_x_bare')} "
            f"| {_cell(plan, report, key, 'c32_calls_per_s_x_bare')} | {rss} |"
        )
    out += [
        "",
        f"## Each peer ÷ the Bastion default ({eras}; Python peers: goal ≥ 20× / ≥ 25×)",
        "",
        "| peer | added p50 ÷ default's | CPU per call ÷ default's |",
        "|---|--:|--:|",
    ]
    for key in ("haproxy", *FAMILIES["ContextForge"], *FAMILIES["FastMCP"]):
        if key in plan.targets:
            out.append(
                f"| {_label(key, report)} | {_cell(plan, report, key, 'added_p50_x_default')} "
                f"| {_cell(plan, report, key, 'cpu_x_default')} |"
            )
    out += [
        "",
        f"## Measured ({eras}; medians)",
        "",
        "| target | p50 ms | added p50 ms | CPU ms/call "
        f"| {plan.concurrency}-client p50 ms | {plan.concurrency}-client calls/s "
        "| peak RSS MiB | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    out += [_absolute(plan, report, key) for key in plan.targets]
    out += ["", "## Goals (issue 17; each a ratio from this run)", ""]
    for goal in report["goals"]:
        era = f"{ERA_NAMES[goal['era']]}: " if goal["era"] else ""
        out.append(f"- {era}{goal['goal']}: {times(goal['value'])} — {goal['verdict']}")
    for key, eras_na in report["unavailable"].items():
        for era, reason in eras_na.items():
            out.append(f"- n/a: {_label(key, report)} in the {ERA_NAMES[era]} era: {reason}")
    status = "OK" if report["ok"] else f"FAILED: {report['failure']}"
    out += ["", f"Result: {status} · JSON: {report['json']}"]
    return "\n".join(out)
