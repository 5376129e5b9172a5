"""The probe's verdicts for people (a table), for programs (JSON) and for CI (JUnit XML)."""

from __future__ import annotations

import json
from typing import Any
from xml.etree import ElementTree

from bastion.control.probe.run import Result

__all__ = ["as_json", "as_junit", "as_table"]


def as_table(result: Result) -> str:
    """One line per case: held or FAILED, the case, what was observed, the evidence."""
    width = max((len(v.case.name) for v in result.verdicts), default=4)
    lines = [f"{'RESULT':<7} {'CASE':<{width}}  OBSERVED"]
    for v in result.verdicts:
        mark = "held" if v.held else "FAILED"
        lines.append(f"{mark:<7} {v.case.name:<{width}}  {v.observed}")
        if not v.held:
            lines.append(f"{'':<7} {'':<{width}}  tried: {v.case.tried}")
            lines.append(f"{'':<7} {'':<{width}}  expected: {v.case.expected}")
            if v.evidence:
                lines.append(f"{'':<7} {'':<{width}}  evidence: {v.evidence}")
    lines += [f"skipped: {s}" for s in result.skipped]
    lines.append(_summary(result))
    return "\n".join(lines)


def _summary(result: Result) -> str:
    failed = len(result.failed)
    return (
        f"{len(result.verdicts) - failed} held, {failed} failed, {len(result.skipped)} skipped "
        f"in {result.seconds:.1f} s (run {result.run_id}, as {len(result.identities)} agents)"
    )


def as_json(result: Result) -> str:
    """The whole run as one JSON document."""
    document: dict[str, Any] = {
        "run": result.run_id,
        "held": len(result.verdicts) - len(result.failed),
        "failed": len(result.failed),
        "seconds": round(result.seconds, 3),
        "identities": result.identities,
        "cases": [
            {
                "name": v.case.name,
                "kind": v.case.kind,
                "tenant": v.case.tenant,
                "victim": v.case.victim,
                "tried": v.case.tried,
                "expected": v.case.expected,
                "observed": v.observed,
                "result": "held" if v.held else "failed",
                "evidence": v.evidence,
            }
            for v in result.verdicts
        ],
        "skipped": result.skipped,
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def as_junit(result: Result) -> str:
    """JUnit XML: one testcase per case, a failure element for each that did not hold."""
    suite = ElementTree.Element(
        "testsuite",
        name="bastion probe",
        tests=str(len(result.verdicts)),
        failures=str(len(result.failed)),
        skipped=str(len(result.skipped)),
        time=f"{result.seconds:.3f}",
    )
    for v in result.verdicts:
        case = ElementTree.SubElement(
            suite, "testcase", classname=f"probe.{v.case.kind}", name=v.case.name
        )
        if not v.held:
            failure = ElementTree.SubElement(case, "failure", message=v.observed)
            failure.text = f"tried: {v.case.tried}\nexpected: {v.case.expected}\n"
            failure.text += f"evidence: {v.evidence}"
    for reason in result.skipped:
        case = ElementTree.SubElement(suite, "testcase", classname="probe.skipped", name=reason)
        ElementTree.SubElement(case, "skipped", message=reason)
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True)
