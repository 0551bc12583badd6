"""Throughput and latency charts, drawn on the server as inline SVG.

The SVG carries no script and no style attribute: colours and strokes come from
classes in static/app.css, positions from SVG presentation attributes, and every
bar and point has a <title> that browsers show on hover. Times are in UTC.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
from collections.abc import Sequence
from typing import Any

from markupsafe import Markup, escape

from webpanel import db
from webpanel.queries import query

logger = logging.getLogger(__name__)

EMPTY_MESSAGE = "no jobs finished in this period"
WIDTH = 760  # SVG user units
HEIGHT = 220
MARGIN_LEFT = 56
MARGIN_RIGHT = 12
MARGIN_TOP = 12
MARGIN_BOTTOM = 28
Y_TICKS = 4


@dataclasses.dataclass(frozen=True)
class ChartRange:
    """A chart window: how many buckets of how many seconds, and its x labels."""

    name: str
    label: str
    bucket: int  # seconds
    buckets: int
    label_every: int  # buckets between two x-axis labels
    bucket_label: str


RANGES = {
    "hour": ChartRange("hour", "Last hour", 60, 60, 10, "per minute"),
    "day": ChartRange("day", "Last day", 900, 96, 12, "per 15 minutes"),
}
DEFAULT_RANGE = "hour"


@dataclasses.dataclass
class ChartData:
    """The series of one window, one value per bucket, oldest first."""

    range: ChartRange
    starts: list[datetime.datetime]
    succeeded: list[int]
    failed: list[int]
    wait_p50: list[float | None]
    wait_p95: list[float | None]
    run_p50: list[float | None]
    run_p95: list[float | None]

    @property
    def finished(self) -> int:
        """Return the jobs that succeeded or failed in the window."""
        return sum(self.succeeded) + sum(self.failed)

    @property
    def empty(self) -> bool:
        """Tell whether nothing finished and no attempt was measured."""
        measured = any(
            value is not None
            for series in (self.wait_p50, self.run_p50)
            for value in series
        )
        return self.finished == 0 and not measured


def range_for(name: str | None) -> ChartRange:
    """Return the named chart range, or the default one for unknown names."""
    return RANGES.get(name or "", RANGES[DEFAULT_RANGE])


def panel_context(range_name: str | None) -> dict[str, Any]:
    """Load one window and return what templates/charts_panel.html expects."""
    data = load(range_for(range_name))
    return {
        "chart_data": data,
        "chart_range": data.range,
        "chart_ranges": list(RANGES.values()),
        "throughput_chart": throughput_svg(data),
        "latency_chart": latency_svg(data),
        "chart_empty_message": EMPTY_MESSAGE,
    }


def load(chart_range: ChartRange) -> ChartData:
    """Read the throughput and latency series of one window from the database."""
    params = {"bucket": chart_range.bucket, "buckets": chart_range.buckets}
    with db.connection() as conn:
        window = conn.execute(query("charts", "window_start"), params).fetchone()
        assert window is not None
        params["since"] = window["since"]
        throughput = conn.execute(query("charts", "throughput"), params).fetchall()
        latency = conn.execute(query("charts", "latency"), params).fetchall()

    first = int(window["since"].timestamp())
    keys = [first + i * chart_range.bucket for i in range(chart_range.buckets)]
    by_key = {key: i for i, key in enumerate(keys)}
    size = len(keys)
    data = ChartData(
        range=chart_range,
        starts=[datetime.datetime.fromtimestamp(k, datetime.timezone.utc)
                for k in keys],
        succeeded=[0] * size, failed=[0] * size,
        wait_p50=[None] * size, wait_p95=[None] * size,
        run_p50=[None] * size, run_p95=[None] * size,
    )
    for row in throughput:
        if (i := by_key.get(int(row["bucket"]))) is not None:
            data.succeeded[i] = row["succeeded"]
            data.failed[i] = row["failed"]
    for row in latency:
        if (i := by_key.get(int(row["bucket"]))) is not None:
            data.run_p50[i] = _seconds(row["run_p50_s"])
            data.run_p95[i] = _seconds(row["run_p95_s"])
            data.wait_p50[i] = _seconds(row["wait_p50_s"])
            data.wait_p95[i] = _seconds(row["wait_p95_s"])
    return data


def _seconds(value: Any) -> float | None:
    """Return a percentile as a float, or None when no attempt of the bucket had one."""
    return None if value is None else float(value)


def nice_step(maximum: float, ticks: int = Y_TICKS) -> float:
    """Return a round tick step (1, 2 or 5 times a power of ten) covering maximum."""
    if maximum <= 0:
        return 1.0
    raw = maximum / ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def duration_unit(maximum_s: float) -> tuple[str, float]:
    """Return the unit name and divisor that suit durations up to maximum_s."""
    if maximum_s < 1:
        return "ms", 0.001
    if maximum_s < 120:
        return "s", 1.0
    if maximum_s < 7200:
        return "min", 60.0
    return "h", 3600.0


def _number(value: float) -> str:
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.3g}"


def _time(moment: datetime.datetime) -> str:
    return moment.strftime("%H:%M")


class _Canvas:
    """Geometry and the shared frame (grid, axes, labels) of one chart."""

    def __init__(self, data: ChartData, top: float) -> None:
        self.data = data
        self.top = top
        self.plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
        self.plot_height = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
        self.slot = self.plot_width / len(data.starts)

    def x(self, index: int) -> float:
        return MARGIN_LEFT + index * self.slot

    def y(self, value: float) -> float:
        share = value / self.top if self.top else 0.0
        return MARGIN_TOP + self.plot_height * (1 - share)

    def frame(self, tick_label: str) -> list[str]:
        parts = []
        step = self.top / Y_TICKS
        for i in range(Y_TICKS + 1):
            value = step * i
            y = self.y(value)
            parts.append(
                f'<line class="chart-grid" x1="{MARGIN_LEFT}" y1="{y:.1f}" '
                f'x2="{WIDTH - MARGIN_RIGHT}" y2="{y:.1f}"/>'
                f'<text class="chart-label" x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" '
                f'text-anchor="end">{escape(_number(value))}{escape(tick_label)}'
                "</text>"
            )
        every = self.data.range.label_every
        for index in range(0, len(self.data.starts), every):
            x = self.x(index)
            parts.append(
                f'<line class="chart-tick" x1="{x:.1f}" y1="{HEIGHT - MARGIN_BOTTOM}" '
                f'x2="{x:.1f}" y2="{HEIGHT - MARGIN_BOTTOM + 4}"/>'
                f'<text class="chart-label" x="{x:.1f}" y="{HEIGHT - 8}" '
                f'text-anchor="middle">{_time(self.data.starts[index])}</text>'
            )
        return parts


def _svg(chart_id: str, title: str, summary: str, parts: Sequence[str]) -> Markup:
    head = (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" '
        'xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{chart_id}-title">{escape(title)}</title>'
        f'<desc id="{chart_id}-desc">{escape(summary)}</desc>'
    )
    return Markup(head + "".join(parts) + "</svg>")


def throughput_svg(data: ChartData) -> Markup:
    """Draw jobs that succeeded and failed per bucket as stacked bars."""
    peak = max(s + f for s, f in zip(data.succeeded, data.failed))
    # Counts are whole numbers, so a tick step is at least 1.
    canvas = _Canvas(data, max(nice_step(peak), 1.0) * Y_TICKS)
    gap = 1.0 if canvas.slot > 3 else 0.0
    parts = canvas.frame("")
    for index, (succeeded, failed) in enumerate(zip(data.succeeded, data.failed)):
        if succeeded + failed == 0:
            continue
        x = canvas.x(index) + gap / 2
        width = canvas.slot - gap
        base = canvas.y(0)
        ok_top = canvas.y(succeeded)
        all_top = canvas.y(succeeded + failed)
        label = (f"{_time(data.starts[index])} UTC: {succeeded} succeeded, "
                 f"{failed} failed")
        parts.append(f"<g><title>{escape(label)}</title>")
        if succeeded:
            parts.append(
                f'<rect class="chart-succeeded" x="{x:.1f}" y="{ok_top:.1f}" '
                f'width="{width:.1f}" height="{base - ok_top:.1f}"/>'
            )
        if failed:
            parts.append(
                f'<rect class="chart-failed" x="{x:.1f}" y="{all_top:.1f}" '
                f'width="{width:.1f}" height="{ok_top - all_top:.1f}"/>'
            )
        parts.append("</g>")
    summary = (
        f"{data.range.label}: {sum(data.succeeded)} succeeded and "
        f"{sum(data.failed)} failed, {data.range.bucket_label}."
    )
    chart_id = f"chart-throughput-{data.range.name}"
    return _svg(chart_id, f"Throughput, {data.range.label.lower()}", summary, parts)


LATENCY_SERIES = (
    ("wait_p50", "chart-wait", "waiting time, median"),
    ("wait_p95", "chart-wait chart-p95", "waiting time, 95th percentile"),
    ("run_p50", "chart-run", "run time, median"),
    ("run_p95", "chart-run chart-p95", "run time, 95th percentile"),
)


def latency_svg(data: ChartData) -> Markup:
    """Draw waiting and run times per bucket as lines, medians and 95th percentiles."""
    values = [
        value
        for field, _, _ in LATENCY_SERIES
        for value in getattr(data, field)
        if value is not None
    ]
    unit, divisor = duration_unit(max(values, default=0.0))
    peak = max(values, default=0.0) / divisor
    canvas = _Canvas(data, nice_step(peak) * Y_TICKS)
    parts = canvas.frame(f" {unit}")
    for field, css, name in LATENCY_SERIES:
        series: list[float | None] = getattr(data, field)
        parts.extend(_line(canvas, series, css, name, unit, divisor))
    medians = [v for v in data.wait_p50 if v is not None]
    runs = [v for v in data.run_p50 if v is not None]
    summary = f"{data.range.label}, {data.range.bucket_label}: "
    summary += (
        f"median waiting time up to {_number(max(medians) / divisor)} {unit}; "
        if medians else "no measured waiting time; "
    )
    summary += (
        f"median run time up to {_number(max(runs) / divisor)} {unit}."
        if runs else "no measured run time."
    )
    chart_id = f"chart-latency-{data.range.name}"
    return _svg(chart_id, f"Latency, {data.range.label.lower()}", summary, parts)


def _line(
    canvas: _Canvas,
    series: Sequence[float | None],
    css: str,
    name: str,
    unit: str,
    divisor: float,
) -> list[str]:
    """Draw one series as polylines broken at missing buckets, with hover points."""
    parts: list[str] = []
    segment: list[str] = []
    centre = canvas.slot / 2
    for index, value in enumerate([*series, None]):
        if value is None:
            if len(segment) > 1:
                parts.append(
                    f'<polyline class="chart-line {css}" points="{" ".join(segment)}"/>'
                )
            segment = []
            continue
        x = canvas.x(index) + centre
        y = canvas.y(value / divisor)
        segment.append(f"{x:.1f},{y:.1f}")
        label = (f"{_time(canvas.data.starts[index])} UTC, {name}: "
                 f"{_number(value / divisor)} {unit}")
        parts.append(
            f'<circle class="chart-point {css}" cx="{x:.1f}" cy="{y:.1f}" r="2">'
            f"<title>{escape(label)}</title></circle>"
        )
    return parts
