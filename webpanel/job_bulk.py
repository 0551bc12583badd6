"""Bulk job actions: an exact count for the confirmation, then batches in a budget.

A selection is explicit job ids or a filter, cut at a snapshot id so that jobs
created after the operator looked are left alone. ``run_bulk`` changes the jobs
highest id first, one transaction per job, and stops at a time budget well inside
the web worker's timeout. Its report gives the id to continue from.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from time import monotonic
from typing import Any

from flask import current_app

from webpanel import audit, db
from webpanel.job_filters import JobFilters, Where, where
from webpanel.job_operations import (
    ACTION_LABELS,
    ACTIONS,
    PAST_TENSE,
    ActionOutcome,
    apply_locked,
    refusal,
)
from webpanel.queries import query
from workers.settings import Settings

logger = logging.getLogger(__name__)

BATCH_SIZE = 100  # job ids read per query in a bulk action
MAX_SELECTED = 1000  # job ids one bulk request may name
COUNT_TIMEOUT_MS = 4000  # milliseconds before a bulk confirmation's count gives up
COUNT_BUDGET_SHARE = 0.4  # the count gets at most this share of WEB_REQUEST_BUDGET


class CountTooSlow(Exception):
    """Counting a bulk selection took longer than its timeout."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """The jobs of a bulk action: explicit ids or a filter, up to a snapshot id."""

    scope: str  # "selected" or "filter"
    job_ids: tuple[int, ...] = ()
    filters: JobFilters = JobFilters()
    at_most: int | None = None  # ignore jobs created after the operator looked

    def where(self) -> Where:
        """Return the SQL conditions of the selection."""
        if self.scope == "selected":
            clauses = Where().add("where_ids", ids=list(self.job_ids))
        else:
            clauses = where(self.filters)
        if self.at_most is not None:
            clauses = clauses.add("where_at_most", at_most=self.at_most)
        return clauses


@dataclasses.dataclass(frozen=True)
class SelectionCount:
    """The exact size of a bulk selection and how many jobs the action applies to."""

    matched: int
    applicable: int
    by_status: dict[str, int]


@dataclasses.dataclass
class BulkReport:
    """The result of a bulk action, and where it stopped when it ran out of time."""

    action: str
    done: list[int] = dataclasses.field(default_factory=list)
    wrong_state: list[int] = dataclasses.field(default_factory=list)
    missing: list[int] = dataclasses.field(default_factory=list)
    conflicts: list[ActionOutcome] = dataclasses.field(default_factory=list)
    complete: bool = False
    resume_at_most: int | None = None  # the snapshot id to continue from
    elapsed: float = 0.0

    @property
    def processed(self) -> int:
        """Return how many jobs were looked at."""
        return (len(self.done) + len(self.wrong_state) + len(self.missing)
                + len(self.conflicts))

    def summary(self) -> str:
        """Return one sentence on what was done and skipped."""
        verb = PAST_TENSE[self.action]
        parts = [f"{verb} {len(self.done):,} job{'s' if len(self.done) != 1 else ''}"]
        if self.wrong_state:
            parts.append(f"skipped {len(self.wrong_state):,} in a state that does "
                         f"not allow {ACTION_LABELS[self.action].lower()}")
        if self.conflicts:
            parts.append(f"skipped {len(self.conflicts):,} whose queueing lock "
                         "another waiting job holds")
        if self.missing:
            parts.append(f"skipped {len(self.missing):,} that no longer exist")
        text = "; ".join(parts) + "."
        if self.conflicts:
            shown = ", ".join(
                f"job {item.job_id} (held by job {item.conflicting_job_id})"
                for item in self.conflicts[:10])
            more = len(self.conflicts) - 10
            text += (" Queueing lock held by another waiting job: " + shown
                     + (f" and {more:,} more" if more > 0 else "") + ".")
        if not self.complete:
            text += (f" Stopped after {self.elapsed:.1f} s to stay within the "
                     "request time limit; the remaining jobs were not changed.")
        return text[0].upper() + text[1:]


def _settings() -> Settings:
    return current_app.config["FLEET_SETTINGS"]


def _timed_count(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    budget_ms = _settings().web_request_budget * 1000 * COUNT_BUDGET_SHARE
    timeout_ms = int(min(COUNT_TIMEOUT_MS, budget_ms))
    try:
        with db.connection() as conn:
            with conn.transaction():
                conn.execute(query("jobs", "set_count_timeout"),
                             {"timeout": f"{timeout_ms}ms"})
                return conn.execute(sql, params).fetchall()
    except db.DatabaseUnavailable as exc:
        if exc.timed_out:
            raise CountTooSlow(
                f"counting the jobs took longer than {timeout_ms / 1000:g} s; "
                "narrow the filter, for example by status or queue") from exc
        raise


def count_selection(action: str, selection: Selection) -> SelectionCount:
    """Count a selection exactly, by status, and the jobs ``action`` applies to."""
    clauses = selection.where()
    sql = query("jobs", "count_by_status").format(where=clauses.sql())
    rows = _timed_count(sql, {**clauses.params,
                              "threshold": _settings().stalled_job_threshold})
    matched = applicable = 0
    by_status: dict[str, int] = {}
    for row in rows:
        count = int(row["count"])
        matched += count
        by_status[row["status"]] = by_status.get(row["status"], 0) + count
        facts = {**row, "id": 0, "worker_id": None}
        if refusal(action, facts) is None:
            applicable += count
    return SelectionCount(matched=matched, applicable=applicable,
                          by_status=by_status)


def snapshot_id() -> int:
    """Return the highest job id now, so a bulk action ignores jobs created later."""
    row = db.fetch_one(query("jobs", "max_job_id"))
    return int(row["id"]) if row else 0


def bulk_time_budget(settings: Settings) -> float:
    """Return the seconds a bulk request may spend changing jobs."""
    return max(0.5, min(settings.web_request_budget * 0.5, settings.web_timeout * 0.3))


def _record(report: BulkReport, outcome: ActionOutcome) -> None:
    if outcome.done:
        report.done.append(outcome.job_id)
    elif outcome.reason == "queueing_lock":
        report.conflicts.append(outcome)
    elif outcome.reason == "not_found":
        report.missing.append(outcome.job_id)
    else:
        report.wrong_state.append(outcome.job_id)


def run_bulk(action: str, selection: Selection,
             budget: float | None = None) -> BulkReport:
    """Apply ``action`` to a selection, highest id first, within a time budget."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of "
                         f"{', '.join(ACTIONS)}")
    settings = _settings()
    budget = bulk_time_budget(settings) if budget is None else budget
    started = monotonic()
    deadline = started + budget
    report = BulkReport(action=action)
    cursor = selection.at_most
    base = dataclasses.replace(selection, at_most=None).where()
    finished = False
    while not finished and monotonic() < deadline:
        clauses = base if cursor is None else base.add("where_at_most",
                                                       at_most=cursor)
        sql = query("jobs", "ids_page").format(where=clauses.sql())
        ids = [row["id"] for row in db.fetch_all(sql, {**clauses.params,
                                                       "limit": BATCH_SIZE})]
        if not ids:
            finished = True
            break
        with db.connection() as conn:
            for job_id in ids:
                _record(report, apply_locked(conn, action, job_id,
                                       settings.stalled_job_threshold))
                cursor = job_id - 1
                if monotonic() >= deadline:
                    break
        if len(ids) < BATCH_SIZE and cursor == ids[-1] - 1:
            finished = True
    report.complete = finished
    report.resume_at_most = None if finished else cursor
    report.elapsed = monotonic() - started
    _audit_bulk(report, selection)
    return report


def _audit_bulk(report: BulkReport, selection: Selection) -> None:
    details: dict[str, Any] = {
        "scope": selection.scope,
        "filters": dict(_group(selection.filters.query_items())),
        "selected": len(selection.job_ids),
        "snapshot_id": selection.at_most,
        "wrong_state": len(report.wrong_state),
        "missing": len(report.missing),
        "queueing_lock_conflicts": [
            {"job_id": item.job_id, "held_by": item.conflicting_job_id}
            for item in report.conflicts[:50]
        ],
        "complete": report.complete,
        "resume_at_most": report.resume_at_most,
    }
    result = "ok: " + report.summary()
    audit.record(f"jobs_bulk_{report.action}", result, report.done, details)


def _group(items: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, value in items:
        grouped.setdefault(name, []).append(value)
    return grouped
