"""The dashboard: job counts, the fleet at a glance, the latest health check, charts.

Counting every job with one GROUP BY reads the whole table, which takes seconds on
millions of rows. Each queue and status is therefore counted through the index
(queue_name, status), up to COUNT_CAP rows. A count that reaches the cap is replaced
by the planner's estimate and shown as "about".
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from flask import Blueprint, current_app, render_template, request

from webpanel import charts, db
from webpanel.queries import query
from workers.settings import Settings

logger = logging.getLogger(__name__)

bp = Blueprint("dashboard", __name__)

STATUSES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborted")
COUNT_CAP = 10_000  # rows counted exactly per queue and status
# The queue of the scheduler's maintenance tasks, served by no worker process.
MAINTENANCE_QUEUE = "maintenance"


@dataclasses.dataclass(frozen=True)
class Count:
    """A job count: exact, an estimate, or a lower bound when no estimate exists."""

    value: int
    kind: str = "exact"  # "exact", "estimate" or "at_least"

    @property
    def exact(self) -> bool:
        """Tell whether the value is an exact count."""
        return self.kind == "exact"

    def __add__(self, other: Count) -> Count:
        kinds = {self.kind, other.kind}
        if kinds == {"exact"}:
            kind = "exact"
        elif "estimate" in kinds:
            kind = "estimate"
        else:
            kind = "at_least"
        return Count(self.value + other.value, kind)

    def __str__(self) -> str:
        if self.kind == "exact":
            return f"{self.value:,}"
        if self.kind == "at_least":
            return f"{self.value:,} or more"
        return f"about {_round_estimate(self.value):,}"


def _round_estimate(value: int) -> int:
    """Round to two significant digits, since an estimate has no more."""
    if value < 100:
        return value
    digits = len(str(value)) - 2
    return round(value, -digits)


def settings() -> Settings:
    """Return the fleet settings of the running panel."""
    return current_app.config["FLEET_SETTINGS"]


def queue_names() -> list[str]:
    """Return the queues that have jobs, plus the configured ones, sorted."""
    rows = db.fetch_all(query("dashboard", "known_queues"))
    names = {row["queue_name"] for row in rows}
    names.update(settings().worker_queues)
    names.add(MAINTENANCE_QUEUE)
    return sorted(names)


def _estimate(queue: str, status: str) -> int | None:
    row = db.fetch_one(
        query("dashboard", "estimate_count"), {"queue": queue, "status": status}
    )
    if row is None:
        return None
    plan = next(iter(row.values()))
    try:
        return int(plan[0]["Plan"]["Plan Rows"])
    except (KeyError, IndexError, TypeError, ValueError):
        logger.warning("Unexpected EXPLAIN output for the count of %s/%s", queue,
                       status, extra={"action": "count_estimate_failed"})
        return None


def job_counts(queues: list[str]) -> dict[str, dict[str, Count]]:
    """Return the jobs of each queue by status, capped and estimated past the cap."""
    rows = db.fetch_all(
        query("dashboard", "capped_counts"),
        {"queues": queues, "statuses": list(STATUSES), "cap": COUNT_CAP},
    )
    counts = {queue: {status: Count(0) for status in STATUSES} for queue in queues}
    for row in rows:
        value = int(row["count"])
        count = Count(value)
        if value >= COUNT_CAP:
            estimate = _estimate(row["queue_name"], row["status"])
            if estimate is not None and estimate > COUNT_CAP:
                count = Count(estimate, "estimate")
            else:
                count = Count(COUNT_CAP, "at_least")
        counts[row["queue_name"]][row["status"]] = count
    return counts


def totals(counts: dict[str, dict[str, Count]]) -> dict[str, Count]:
    """Return the counts of every queue added up per status."""
    result = {status: Count(0) for status in STATUSES}
    for per_status in counts.values():
        for status, count in per_status.items():
            result[status] = result[status] + count
    return result


def oldest_waiting(queues: list[str]) -> dict[str, dict[str, Any]]:
    """Return per queue the job waiting longest since it became due, and its age."""
    rows = db.fetch_all(query("dashboard", "oldest_waiting"), {"queues": queues})
    return {row["queue_name"]: row for row in rows}


def fleet_summary(queues: list[str]) -> dict[str, Any]:
    """Return live and stale workers, stalled jobs and the oldest waiting job."""
    threshold = settings().stalled_job_threshold
    workers = db.fetch_one(query("health", "worker_counts"), {"threshold": threshold})
    stalled = db.fetch_one(query("health", "stalled_count"), {"threshold": threshold})
    oldest = oldest_waiting(queues)
    worst = max(oldest.values(), key=lambda row: row["age_s"] or -1.0, default=None)
    return {
        "workers": workers,
        "expected_workers": settings().worker_processes,
        "stalled_jobs": stalled["stalled_jobs"] if stalled else 0,
        "oldest": worst if worst and worst["age_s"] is not None else None,
        "oldest_limit_s": settings().oldest_todo_age_limit,
        "threshold": threshold,
    }


@bp.route("/")
def index() -> str:
    """Show job counts, the fleet, the latest health check and the charts."""
    queues = queue_names()
    counts = job_counts(queues)
    nonempty = {
        queue: per_status for queue, per_status in counts.items()
        if any(count.value for count in per_status.values())
    }
    health = db.fetch_one(query("health", "latest_health_check"))
    return render_template(
        "dashboard.html",
        statuses=STATUSES,
        totals=totals(counts),
        queues=nonempty,
        summary=fleet_summary(queues),
        health=health,
        silence_limit=settings().scheduler_silence_limit,
        **charts.panel_context(request.args.get("range")),
    )
