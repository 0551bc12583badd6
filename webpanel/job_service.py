"""Job logic shared by the HTML views and the JSON API: lists, counts and job pages.

Actions live in ``webpanel.job_operations``, bulk actions in ``webpanel.job_bulk``
and deferring in ``webpanel.defer_service``. Their public names are imported here
too, so a caller needs this module only. Every function reads the settings of the
current Flask app and must run inside an app context.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from flask import current_app

from webpanel import db
from webpanel.defer_service import (
    DeferRejected,
    DeferRequest,
    UnknownTask,
    defer,
    deferrable_task,
    parse_local_time,
    queue_choices,
    validate_defer,
)
from webpanel.job_bulk import (
    BulkReport,
    CountTooSlow,
    Selection,
    SelectionCount,
    count_selection,
    run_bulk,
    snapshot_id,
)
from webpanel.job_filters import (
    FINISHED_STATUSES,
    STATUSES,
    FilterError,
    JobFilters,
    Position,
    Where,
    parse_filters,
    parse_job_id,
    parse_position,
    where,
)
from webpanel.job_operations import (
    ACTIONS,
    ActionOutcome,
    apply_action,
    available_actions,
)
from webpanel.job_timeline import (
    REDACTED,
    JobDetail,
    build_detail,
    json_default,
    redact,
)
from webpanel.queries import query
from workers.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIONS", "FINISHED_STATUSES", "REDACTED", "STATUSES", "ActionOutcome",
    "BulkReport", "CountTooSlow", "DeferRejected", "DeferRequest", "FilterError",
    "JobCount", "JobDetail", "JobFilters", "JobPage", "Position", "Selection",
    "SelectionCount", "UnknownTask", "Where", "apply_action", "arguments_preview",
    "available_actions", "count_jobs", "count_selection", "defer",
    "deferrable_task", "find_job_id", "get_job", "list_jobs", "parse_filters",
    "parse_job_id", "parse_local_time", "parse_position", "pretty_json",
    "queue_choices", "redact", "redacted_keys", "run_bulk", "snapshot_id",
    "validate_defer", "where",
]

COUNT_CAP = 1000  # jobs counted exactly before the list shows "1,000+"
COUNT_TIMEOUT_MS = 2000  # milliseconds before the list shows the count as unknown
COUNT_BUDGET_SHARE = 0.2  # the list's count gets at most this share of the budget
PREVIEW_CHARS = 160  # characters of the arguments shown in a list row


def _settings() -> Settings:
    return current_app.config["FLEET_SETTINGS"]


def redacted_keys() -> tuple[str, ...]:
    """Return REDACTED_ARGUMENT_KEYS of the running panel."""
    return tuple(_settings().redacted_argument_keys)


def pretty_json(value: Any) -> str:
    """Return ``value`` as indented JSON, keeping non-ASCII text readable."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True,
                      default=str)


def arguments_preview(arguments: Any) -> str:
    """Return a one-line, redacted and shortened view of a job's arguments."""
    text = json.dumps(redact(arguments, redacted_keys()), ensure_ascii=False,
                      sort_keys=True, default=str)
    if len(text) > PREVIEW_CHARS:
        return text[:PREVIEW_CHARS - 1] + "…"
    return text


@dataclasses.dataclass
class JobPage:
    """One page of the newest-first job list."""

    jobs: list[dict[str, Any]]
    position: Position
    has_newer: bool
    has_older: bool

    @property
    def newest_id(self) -> int | None:
        """Return the highest id on the page."""
        return self.jobs[0]["id"] if self.jobs else None

    @property
    def oldest_id(self) -> int | None:
        """Return the lowest id on the page."""
        return self.jobs[-1]["id"] if self.jobs else None

    def to_dict(self) -> dict[str, Any]:
        """Return the page as JSON-ready values with keyset cursors, for the API."""
        return json.loads(json.dumps({
            "jobs": [{key: value for key, value in job.items()
                      if key != "args_preview"} for job in self.jobs],
            "newer": {"after": self.newest_id} if self.has_newer else None,
            "older": {"before": self.oldest_id} if self.has_older else None,
            "limit": self.position.limit,
        }, default=json_default))


@dataclasses.dataclass(frozen=True)
class JobCount:
    """How many jobs match a list's filters: exact up to a cap, else estimated."""

    value: int | None  # None when counting took longer than its timeout
    capped: bool
    estimate: int | None = None

    @property
    def label(self) -> str:
        """Return the count as shown, such as '42', '1,000+' or 'unknown'."""
        if self.value is None:
            return "unknown"
        return f"{self.value:,}+" if self.capped else f"{self.value:,}"


def _exists(clauses: Where) -> bool:
    row = db.fetch_one(query("jobs", "exists_beyond").format(where=clauses.sql()),
                       clauses.params)
    return bool(row and row["found"])


def list_jobs(filters: JobFilters, position: Position) -> JobPage:
    """Return one page of jobs matching ``filters``, newest first, by keyset."""
    base = where(filters)
    clauses, order = base, "DESC"
    if position.before is not None:
        clauses = base.add("where_before", before=position.before)
    elif position.after is not None:
        clauses, order = base.add("where_after", after=position.after), "ASC"
    sql = query("jobs", "list_page").format(where=clauses.sql(), order=order)
    rows = db.fetch_all(sql, {**clauses.params, "limit": position.limit + 1,
                              "threshold": _settings().stalled_job_threshold})
    more = len(rows) > position.limit
    rows = rows[:position.limit]
    if order == "ASC":
        rows.reverse()
    keys = redacted_keys()
    for row in rows:
        row["args"] = redact(row["args"], keys)
        row["args_preview"] = arguments_preview(row["args"])
    page = JobPage(jobs=rows, position=position, has_newer=False, has_older=False)
    if order == "ASC":
        page.has_newer = more
        page.has_older = bool(rows) and _exists(
            base.add("where_before", before=rows[-1]["id"]))
    else:
        page.has_older = more
        page.has_newer = position.before is not None and _exists(
            base.add("where_after", after=rows[0]["id"] if rows
                     else position.before - 1))
    return page


def _estimate(clauses: Where) -> int | None:
    sql = query("jobs", "count_estimate").format(where=clauses.sql())
    row = db.fetch_one(sql, clauses.params)
    if not row:
        return None
    plan = next(iter(row.values()))
    if isinstance(plan, str):
        plan = json.loads(plan)
    try:
        return int(plan[0]["Plan"]["Plan Rows"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def count_jobs(filters: JobFilters, cap: int = COUNT_CAP) -> JobCount:
    """Count the jobs matching ``filters`` up to ``cap``; beyond, add an estimate."""
    clauses = where(filters)
    sql = query("jobs", "count_capped").format(where=clauses.sql())
    budget_ms = _settings().web_request_budget * 1000 * COUNT_BUDGET_SHARE
    timeout_ms = int(min(COUNT_TIMEOUT_MS, budget_ms))
    try:
        with db.connection() as conn:
            with conn.transaction():
                conn.execute(query("jobs", "set_count_timeout"),
                             {"timeout": f"{timeout_ms}ms"})
                row = conn.execute(sql, {**clauses.params, "cap": cap + 1}).fetchone()
    except db.DatabaseUnavailable as exc:
        if not exc.timed_out:
            raise
        logger.info("Job count for %s timed out", filters.describe(),
                    extra={"action": "job_count_timed_out"})
        return JobCount(value=None, capped=False)
    assert row is not None
    value = int(row["count"])
    if value <= cap:
        return JobCount(value=value, capped=False)
    return JobCount(value=cap, capped=True, estimate=_estimate(clauses))


def get_job(job_id: int) -> JobDetail | None:
    """Return a job's page data: fields, arguments, result, timeline and schedule."""
    if not 0 < job_id < 2**63:
        return None
    settings = _settings()
    row = db.fetch_one(query("jobs", "job_by_id"),
                       {"id": job_id, "threshold": settings.stalled_job_threshold})
    if row is None:
        return None
    return build_detail(row, settings, available_actions(row))


def find_job_id(text: str) -> int | None:
    """Return the job id typed into the search box, or None when it is not one."""
    return parse_job_id(text, "q", {})
