"""The dashboard: job counts, the fleet at a glance, the latest health check, charts.

Counting every job with one GROUP BY reads the whole table, which takes seconds on
millions of rows. Each queue and status is therefore counted through the index
(queue_name, status), up to COUNT_CAP rows, all in one statement. The counts that
reach the cap are replaced by the planner's estimates, read for all of them with
one EXPLAIN, and shown as "about".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any

from flask import Blueprint, current_app, render_template, request

from webpanel import charts, db
from webpanel.queries import query
from workers.settings import Settings

logger = logging.getLogger(__name__)

bp = Blueprint("dashboard", __name__)

STATUSES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborted")
# Rows counted exactly per queue and status, as the job list does. Above it the
# count shown is the planner's estimate.
COUNT_CAP = 1_000
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


def _pair_rows(plan: Any, found: dict[int, int]) -> None:
    """Collect from a plan tree the estimated rows of each numbered UNION ALL arm."""
    if isinstance(plan, list):
        for item in plan:
            _pair_rows(item, found)
        return
    if not isinstance(plan, dict):
        return
    node = plan.get("Plan", plan)
    output = node.get("Output")
    if isinstance(output, list) and len(output) == 1:
        # VERBOSE shows each arm's constant, which is the pair's position.
        match = re.fullmatch(r"\(?(\d+)\)?", str(output[0]))
        if match and "Plan Rows" in node:
            found.setdefault(int(match.group(1)), int(node["Plan Rows"]))
    for child in node.get("Plans", []):
        _pair_rows(child, found)


def _pair_params(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Return the parameters of the numbered arms, one per (queue, status) pair."""
    params: dict[str, Any] = {}
    for i, (queue, status) in enumerate(pairs):
        params[f"queue_{i}"] = queue
        params[f"status_{i}"] = status
    return params


def _union(arm_name: str, count: int) -> str:
    """Return the named arm once per pair, numbered from 0 and joined by UNION ALL."""
    arm = query("dashboard", arm_name)
    return "\nUNION ALL\n".join(arm.format(index=i) for i in range(count))


def _estimates(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Return the planner's estimate of the jobs in each (queue, status) pair.

    One EXPLAIN covers every pair: an arm per pair, joined by UNION ALL, so that
    each arm is planned with its own values. Pairs whose estimate is missing from
    the plan are left out.
    """
    if not pairs:
        return {}
    sql = query("dashboard", "estimate_counts").format(
        arms=_union("estimate_count_arm", len(pairs)))
    row = db.fetch_one(sql, _pair_params(pairs))
    plan = next(iter(row.values())) if row else None
    if isinstance(plan, str):
        plan = json.loads(plan)
    found: dict[int, int] = {}
    _pair_rows(plan, found)
    if len(found) < len(pairs):
        logger.warning(
            "EXPLAIN gave estimates for %s of %s capped job counts",
            len(found), len(pairs), extra={"action": "count_estimate_failed"},
        )
    return {pairs[i]: rows for i, rows in found.items() if i < len(pairs)}


def job_counts(queues: list[str]) -> dict[str, dict[str, Count]]:
    """Return the jobs of each queue by status, capped and estimated past the cap."""
    cap = COUNT_CAP
    counts = {queue: {status: Count(0) for status in STATUSES} for queue in queues}
    pairs = [(queue, status) for queue in queues for status in STATUSES]
    if not pairs:
        return counts
    # NOTE: the statement has one arm per pair, and its planning time grows with
    # them: with 3 queues (18 arms) the whole statement took about 4 ms.
    rows = db.fetch_all(_union("capped_count_arm", len(pairs)),
                        {**_pair_params(pairs), "cap": cap})
    capped = []
    for row in rows:
        queue, status = pairs[row["pair"]]
        value = int(row["count"])
        counts[queue][status] = Count(value)
        if value >= cap:
            capped.append((queue, status))
    estimates = _estimates(capped)
    for queue, status in capped:
        estimate = estimates.get((queue, status))
        if estimate is not None and estimate > cap:
            counts[queue][status] = Count(estimate, "estimate")
        else:
            counts[queue][status] = Count(cap, "at_least")
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
