"""Result lines of the benchmarks: figures, ratios and one verdict line per target.

Every benchmark prints its figures as it goes and returns ``Target`` objects; the
run ends with one ``target`` line per goal, in the form
``target <name>: <measured> (goal <goal>) met`` or ``... missed``. A target that
could not be measured, because the page or route it needs is missing, prints
``not measured: <reason>`` as its figure and counts as missed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Sequence

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """One goal of the run, with the measured figure and whether it was met."""

    name: str
    measured: str
    goal: str
    met: bool

    def line(self) -> str:
        """Return the verdict line printed at the end of the run."""
        return format_target(self.name, self.measured, self.goal, self.met)


def format_target(name: str, measured: str, goal: str, met: bool) -> str:
    """Return ``target <name>: <measured> (goal <goal>) met`` or ``... missed``."""
    if not name or any(character.isspace() for character in name):
        raise ValueError(f"target name {name!r} is invalid; use one word such as "
                         "drain_1x10")
    verdict = "met" if met else "missed"
    return f"target {name}: {measured} (goal {goal}) {verdict}"


def unmeasured(name: str, goal: str, reason: str) -> Target:
    """Return a missed target whose figure could not be measured, saying why."""
    return Target(name, f"not measured: {reason}", goal, False)


def format_ratio(name: str, product: float, anchor: float) -> str:
    """Return the ratio line ``ratio <name> product/bare: 0.93 (x / y)``."""
    return (f"ratio {name} product/bare: {ratio(product, anchor):.2f} "
            f"({product:.1f} / {anchor:.1f})")


def ratio(value: float, reference: float) -> float:
    """Return value / reference, or 0.0 when the reference is not positive."""
    if reference <= 0:
        return 0.0
    return value / reference


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the ``fraction`` quantile (0-1) by linear interpolation between ranks.

    Raises ValueError for an empty sequence or a fraction outside 0-1.
    """
    if not values:
        raise ValueError("percentile of no values; measure at least one sample")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction!r} is outside 0-1; use 0.95 for p95")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return float(ordered[low])
    weight = position - low
    return float(ordered[low] * (1 - weight) + ordered[high] * weight)


def median(values: Sequence[float]) -> float:
    """Return the median, raising ValueError for an empty sequence."""
    if not values:
        raise ValueError("median of no values; measure at least one run")
    return float(statistics.median(values))


def format_runs(values: Sequence[float], unit: str, digits: int = 1) -> str:
    """Return the median of runs with every run listed, such as '450.2 jobs/s [..]'."""
    runs = ", ".join(f"{value:.{digits}f}" for value in values)
    return f"{median(values):.{digits}f} {unit} (median of {len(values)}: {runs})"


def section(title: str) -> None:
    """Print a section header so that each benchmark's output stands apart."""
    print(f"\n== {title}", flush=True)


def say(text: str) -> None:
    """Print one result line immediately."""
    print(text, flush=True)
