"""A job's page data: redacted arguments, result, one merged timeline, retry plan.

The timeline merges, by time, Procrastinate's events (procrastinate_events), the
attempt records the worker middleware writes (job_attempts) and the audit entries
naming the job (audit_log). The retry plan applies the task's retry policy to a
waiting job, as ``workers.retry.BackoffRetry.upcoming_delays`` describes it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Iterable
from typing import Any

from webpanel import db
from webpanel.queries import query
from workers.app import retry_strategy
from workers.retry import parse_retry_after
from workers.settings import Settings
from workers.tasks.catalog import TASKS, TaskDescription

logger = logging.getLogger(__name__)

EVENT_LABELS = {
    "deferred": "Deferred",
    "started": "Started by a worker",
    "deferred_for_retry": "Returned to the queue for a retry",
    "failed": "Failed",
    "succeeded": "Succeeded",
    "cancelled": "Cancelled",
    "abort_requested": "Abort requested",
    "aborted": "Aborted",
    "scheduled": "Scheduled to run at this time",
    "retried": "Retried after failing",
}
REDACTED = "[redacted]"
_UTC = datetime.timezone.utc
# Entries at the same instant: the event first, then the attempt, then the audit.
_KIND_ORDER = {"event": 0, "attempt": 1, "audit": 2}


@dataclasses.dataclass(frozen=True)
class TimelineEntry:
    """One line of a job's timeline."""

    at: datetime.datetime | None
    kind: str  # "event", "attempt" or "audit"
    title: str
    data: dict[str, Any]
    future: bool = False


@dataclasses.dataclass(frozen=True)
class PlannedAttempt:
    """A later attempt of a waiting job and the window in which it may start."""

    number: int
    earliest: datetime.datetime
    latest: datetime.datetime


@dataclasses.dataclass(frozen=True)
class RetrySchedule:
    """The attempts still ahead of a waiting job under its task's retry policy."""

    next_number: int
    next_at: datetime.datetime
    waiting_for_worker: bool  # next_at has passed: it runs when a worker is free
    later: list[PlannedAttempt]
    jitter: bool
    max_attempts: int | None
    retry_after_max: float


@dataclasses.dataclass
class JobDetail:
    """Everything the job page shows."""

    job: dict[str, Any]
    arguments: Any
    arguments_json: str
    result: Any | None
    result_json: str | None
    result_stored_at: datetime.datetime | None
    joke: str | None
    timeline: list[TimelineEntry]
    schedule: RetrySchedule | None
    actions: dict[str, str | None]  # action -> None when allowed, else the reason
    description: TaskDescription | None

    def to_dict(self) -> dict[str, Any]:
        """Return the page data as JSON-ready values, for the API."""
        return json.loads(json.dumps({
            "job": {key: value for key, value in self.job.items() if key != "args"},
            "arguments": self.arguments,
            "result": self.result,
            "result_stored_at": self.result_stored_at,
            "timeline": [dataclasses.asdict(entry) for entry in self.timeline],
            "schedule": dataclasses.asdict(self.schedule) if self.schedule else None,
            "actions": self.actions,
        }, default=json_default))


def redact(value: Any, keys: Iterable[str]) -> Any:
    """Return ``value`` with the values of ``keys`` (any case, any depth) hidden."""
    hidden = {key.lower() for key in keys}
    stack: list[tuple[Any, Any, Any]] = []
    root: list[Any] = [None]
    stack.append((value, root, 0))
    while stack:
        item, parent, slot = stack.pop()
        if isinstance(item, dict):
            copy: dict[Any, Any] = {}
            parent[slot] = copy
            for key, child in item.items():
                if isinstance(key, str) and key.lower() in hidden:
                    copy[key] = REDACTED
                else:
                    copy[key] = None
                    stack.append((child, copy, key))
        elif isinstance(item, list):
            items: list[Any] = [None] * len(item)
            parent[slot] = items
            for index, child in enumerate(item):
                stack.append((child, items, index))
        else:
            parent[slot] = item
    return root[0]


def json_default(value: Any) -> Any:
    """Encode a datetime as ISO 8601 in UTC, anything else as its text, for JSON."""
    if isinstance(value, datetime.datetime):
        return value.astimezone(_UTC).isoformat()
    return str(value)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True,
                      default=str)


def retry_schedule(job: dict[str, Any], settings: Settings,
                   now: datetime.datetime) -> RetrySchedule | None:
    """Return the attempts ahead of a waiting job, or None when it is not waiting."""
    if job["status"] != "todo":
        return None
    description = TASKS.get(job["task_name"])
    if description is None:
        return None
    strategy = retry_strategy(settings, description)
    scheduled = job["scheduled_at"]
    start = scheduled if scheduled is not None and scheduled > now else now
    earliest = latest = start
    later = []
    for number, shortest, longest in strategy.upcoming_delays(job["attempts"]):
        earliest += datetime.timedelta(seconds=shortest)
        latest += datetime.timedelta(seconds=longest)
        later.append(PlannedAttempt(number=number, earliest=earliest, latest=latest))
    return RetrySchedule(
        next_number=job["attempts"] + 1,
        next_at=start,
        waiting_for_worker=start == now,
        later=later,
        jitter=strategy.jitter,
        max_attempts=strategy.max_attempts,
        retry_after_max=strategy.retry_after_max,
    )


def _sort_key(entry: TimelineEntry) -> tuple[datetime.datetime, int, int]:
    at = entry.at or datetime.datetime.min.replace(tzinfo=_UTC)
    return at, _KIND_ORDER[entry.kind], int(entry.data.get("id") or 0)


def action_label(action: str) -> str:
    """Return an audit action name as words: ``job_retried`` gives "Job retried"."""
    return action.replace("_", " ").capitalize()


def merge_timeline(events: Iterable[dict[str, Any]],
                   attempts: Iterable[dict[str, Any]],
                   audits: Iterable[dict[str, Any]],
                   now: datetime.datetime) -> list[TimelineEntry]:
    """Merge events, attempt records and audit entries into one list by time."""
    entries = []
    for event in events:
        at = event["at"]
        entries.append(TimelineEntry(
            at=at, kind="event", title=EVENT_LABELS.get(event["type"], event["type"]),
            data=event, future=at is not None and at > now,
        ))
    for attempt in attempts:
        entries.append(TimelineEntry(
            at=attempt["started_at"], kind="attempt",
            title=f"Attempt {attempt['attempt']}: {attempt['outcome']}", data=attempt,
        ))
    for audit in audits:
        entries.append(TimelineEntry(
            at=audit["at"], kind="audit",
            title=f"{action_label(audit['action'])} by {audit['username']}",
            data=audit,
        ))
    entries.sort(key=_sort_key)
    return entries


def mark_capped_retry_after(attempts: Iterable[dict[str, Any]],
                            retry_after_max: float) -> None:
    """Set each attempt's ``retry_after_cap`` when its Retry-After exceeded the cap."""
    for attempt in attempts:
        attempt["retry_after_cap"] = None
        received_at = attempt.get("ended_at") or attempt.get("started_at")
        if not attempt.get("retry_after") or received_at is None:
            continue
        seconds = parse_retry_after(attempt["retry_after"], received_at)
        if seconds is not None and seconds > retry_after_max:
            attempt["retry_after_cap"] = retry_after_max


def build_detail(job: dict[str, Any], settings: Settings,
                 actions: dict[str, str | None]) -> JobDetail:
    """Load a job's events, attempts, audit entries and result into a JobDetail."""
    keys = settings.redacted_argument_keys
    params = {"id": job["id"]}
    with db.connection() as conn:
        events = conn.execute(query("jobs", "job_events"), params).fetchall()
        attempts = conn.execute(query("jobs", "job_attempts"), params).fetchall()
        audits = conn.execute(query("jobs", "job_audit"), params).fetchall()
        stored = conn.execute(query("jobs", "job_result"), params).fetchone()
        now = conn.execute("SELECT now() AS now").fetchone()["now"]
    for audit in audits:
        audit["details"] = redact(audit["details"], keys)
    retry_after_max = settings.retry_after_max
    description = TASKS.get(job["task_name"])
    if description is not None:
        retry_after_max = retry_strategy(settings, description).retry_after_max
    mark_capped_retry_after(attempts, retry_after_max)
    arguments = redact(job["args"], keys)
    result = redact(stored["result"], keys) if stored else None
    joke = None
    if isinstance(result, dict) and isinstance(result.get("joke"), str):
        joke = result["joke"]
    return JobDetail(
        job={**job, "args": arguments},
        arguments=arguments,
        arguments_json=_pretty(arguments),
        result=result,
        result_json=_pretty(result) if stored else None,
        result_stored_at=stored["stored_at"] if stored else None,
        joke=joke,
        timeline=merge_timeline(events, attempts, audits, now),
        schedule=retry_schedule(job, settings, now),
        actions=actions,
        description=TASKS.get(job["task_name"]),
    )
