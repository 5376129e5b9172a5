"""The overview's charts: what the trail holds, counted per hour, drawn as inline SVG.

Pure: records in, counts and SVG text out. The SVG uses presentation attributes only (no
inline style), so the console's Content-Security-Policy needs no `unsafe-inline`; each chart
has a title and a text description for screen readers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from html import escape

from bastion.audit.record import AuditRecord
from bastion.methods import TOOLS_CALL

__all__ = ["SERIES", "Hourly", "bar_chart", "count_hourly"]

# (key, label, colour): what the overview counts.
SERIES: tuple[tuple[str, str, str], ...] = (
    ("calls", "Calls allowed", "#2f6fb0"),
    ("denials", "Calls denied", "#b5452f"),
    ("contained", "Answers blocked or contained", "#8a5ab8"),
    ("alerts", "Alerts", "#c28a16"),
)
_WIDTH, _HEIGHT, _PAD = 480, 140, 24


@dataclass
class Hourly:
    """Counts per series and hour, the last `hours` hours up to `now`."""

    start: float  # the first hour's start
    hours: int
    counts: dict[str, list[int]] = field(default_factory=dict)

    def total(self, key: str) -> int:
        """The series' count over the whole window."""
        return sum(self.counts.get(key, ()))


def _series(record: AuditRecord) -> str | None:
    """Which series a record counts in; operators' acts count in none."""
    method = record.method or ""
    if method.startswith(("admin/", "console/", "approvals/")):
        return None
    if record.phase == "alert":
        return "alerts"
    if record.phase == "outcome" and record.outcome in ("blocked", "denied"):
        return "contained"
    if record.phase == "decision" and record.decision == "deny":
        return "denials"
    if record.phase == "decision" and record.decision == "allow" and method == TOOLS_CALL:
        return "calls"
    if record.phase == "authn":
        return "denials"
    return None


def count_hourly(records: Iterable[AuditRecord], now: float, hours: int = 24) -> Hourly:
    """The records of the last `hours` hours counted per series and hour."""
    current = now - now % 3600
    start = current - (hours - 1) * 3600
    found = Hourly(start, hours, {key: [0] * hours for key, _, _ in SERIES})
    for record in records:
        key = _series(record)
        index = int((record.time - start) // 3600)
        if key is not None and 0 <= index < hours:
            found.counts[key][index] += 1
    return found


def bar_chart(hourly: Hourly, key: str, label: str, colour: str) -> str:
    """One series as an SVG bar chart with hour ticks, its total and its peak."""
    values = hourly.counts.get(key, [])
    peak = max(values, default=0)
    inner_w, inner_h = _WIDTH - 2 * _PAD, _HEIGHT - 2 * _PAD
    step = inner_w / max(1, len(values))
    ident = f"chart-{key}"
    total = sum(values)
    described = f"{label}: {total} in the last {hourly.hours} hours, at most {peak} in one hour."
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {_WIDTH} {_HEIGHT}" '
        f'width="{_WIDTH}" height="{_HEIGHT}" aria-labelledby="{ident}-t {ident}-d">',
        f'<title id="{ident}-t">{escape(label)}</title>',
        f'<desc id="{ident}-d">{escape(described)}</desc>',
        f'<line x1="{_PAD}" y1="{_PAD + inner_h}" x2="{_PAD + inner_w}" y2="{_PAD + inner_h}" '
        'stroke="#999" stroke-width="1"/>',
    ]
    for index, value in enumerate(values):
        height = 0.0 if peak == 0 else inner_h * value / peak
        x = _PAD + index * step + 1
        y = _PAD + inner_h - height
        hour = time.strftime("%H:00", time.gmtime(hourly.start + index * 3600))
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(1.0, step - 2):.1f}" '
            f'height="{height:.1f}" fill="{colour}"><title>{hour} UTC: {value}</title></rect>'
        )
        if index % 6 == 0:
            parts.append(
                f'<text x="{x:.1f}" y="{_HEIGHT - 6}" font-size="10" fill="#555">{hour}</text>'
            )
    parts.append(
        f'<text x="{_PAD}" y="{_PAD - 8}" font-size="12" fill="#222">'
        f"{escape(label)} — {total} (peak {peak}/h)</text>"
    )
    parts.append("</svg>")
    return "".join(parts)
