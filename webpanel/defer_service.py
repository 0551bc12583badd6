"""Deferring a job from the panel or the API: one set of checks, one defer path.

Arguments are checked by ``workers.tasks.catalog.validate_arguments``, the rules
the task itself applies, and the job options (queue, priority, schedule time,
lock, queueing lock) by ``validate_defer``. ``defer`` then inserts the job through
Procrastinate's synchronous defer, in a transaction that first makes sure no job
with the same queueing lock is waiting or running and that also inserts the job's
audit row.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from typing import Any

import procrastinate.exceptions
from flask import current_app
from psycopg.types.json import Jsonb

from webpanel import audit, db
from webpanel.job_timeline import redact
from webpanel.queries import query
from workers.errors import InvalidTaskArguments
from workers.settings import Settings
from workers.tasks.catalog import TASKS, TaskDescription, validate_arguments

logger = logging.getLogger(__name__)

PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
LOCK_MAX_LENGTH = 128  # characters of a lock or queueing lock
PAST_TOLERANCE = datetime.timedelta(minutes=5)
MAX_AHEAD = datetime.timedelta(days=365)
MAX_JSON_DEPTH = 64  # levels of nesting accepted in a JSON argument
_UTC = datetime.timezone.utc
_INTEGER = re.compile(r"[+-]?[0-9]{1,7}")


class UnknownTask(LookupError):
    """No user-facing task has this name."""


class DeferRejected(ValueError):
    """A defer request is invalid; ``field_errors`` maps each field to its message."""

    def __init__(self, field_errors: Mapping[str, str]) -> None:
        self.field_errors = dict(field_errors)
        super().__init__("; ".join(f"{name} {message}"
                                   for name, message in self.field_errors.items()))


@dataclasses.dataclass(frozen=True)
class DeferRequest:
    """A checked request to defer one job."""

    task_name: str
    arguments: dict[str, Any]
    queue: str
    priority: int
    schedule_at: datetime.datetime | None
    lock: str | None
    queueing_lock: str | None


def _settings() -> Settings:
    return current_app.config["FLEET_SETTINGS"]


def deferrable_task(name: str) -> TaskDescription:
    """Return the description of a user-facing task, or raise UnknownTask."""
    description = TASKS.get(name)
    if description is None or not description.user_facing:
        raise UnknownTask(f"no task named {name[:80]!r} can be deferred")
    return description


def queue_choices(description: TaskDescription, settings: Settings) -> list[str]:
    """Return the queues a job of this task may go to: its own, then WORKER_QUEUES."""
    queues = [description.queue]
    for queue in settings.worker_queues:
        if queue not in queues:
            queues.append(queue)
    return queues


@functools.cache
def time_zones() -> tuple[str, ...]:
    """Return the IANA time zone names, UTC first."""
    names = sorted(zoneinfo.available_timezones() - {"UTC"})
    return ("UTC", *names)


@functools.cache
def _time_zone_names() -> frozenset[str]:
    return frozenset(time_zones())


def is_time_zone(name: str) -> bool:
    """Return whether ``name`` is one of ``time_zones()``."""
    return name in _time_zone_names()


def parse_priority(raw: str | None) -> int:
    """Parse a priority from text, raising ValueError with the accepted range."""
    text = (raw or "").strip()
    if not text:
        return 0
    if not _INTEGER.fullmatch(text) or not PRIORITY_MIN <= int(text) <= PRIORITY_MAX:
        raise ValueError(f"{text[:20]!r} is invalid; expected a whole number from "
                         f"{PRIORITY_MIN} to {PRIORITY_MAX}")
    return int(text)


def parse_local_time(text: str, zone_name: str) -> datetime.datetime:
    """Turn a wall-clock time in ``zone_name`` into UTC, or raise ValueError.

    A time the clocks skip (a daylight saving gap) or show twice (the hour repeated
    when they go back) is rejected, since it names no single instant.
    """
    try:
        zone = zoneinfo.ZoneInfo(zone_name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {zone_name[:60]!r}") from None
    try:
        local = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text.strip()[:40]!r} is not a date and time; use "
                         "YYYY-MM-DDTHH:MM") from None
    try:
        if local.tzinfo is not None:
            return local.astimezone(_UTC)
        first = local.replace(tzinfo=zone, fold=0)
        second = local.replace(tzinfo=zone, fold=1)
        if first.utcoffset() != second.utcoffset():
            back = first.astimezone(_UTC).astimezone(zone).replace(tzinfo=None)
            if back != local:
                raise ValueError(
                    f"{local:%Y-%m-%d %H:%M} does not exist in {zone_name}: the "
                    "clocks skip it when daylight saving time starts; pick another "
                    "time")
            raise ValueError(
                f"{local:%Y-%m-%d %H:%M} is ambiguous in {zone_name}: it happens "
                "twice when the clocks go back; pick a time outside that hour or "
                "enter it in UTC")
        return first.astimezone(_UTC)
    except OverflowError:
        raise ValueError(f"{text.strip()[:40]!r} is out of range") from None


def check_schedule(when: datetime.datetime, now: datetime.datetime) -> str | None:
    """Return why a schedule time is not accepted, or None."""
    if when < now - PAST_TOLERANCE:
        return (f"{when:%Y-%m-%d %H:%M} UTC is in the past; pick a time at most "
                "5 minutes ago, or leave it empty to run the job now")
    if when > now + MAX_AHEAD:
        return (f"{when:%Y-%m-%d %H:%M} UTC is more than 365 days ahead; pick an "
                "earlier time")
    return None


def _check_lock(value: str | None) -> tuple[str | None, str | None]:
    if value is None or not value.strip():
        return None, None
    text = value.strip()
    if len(text) > LOCK_MAX_LENGTH:
        return None, f"is {len(text)} characters long; the limit is {LOCK_MAX_LENGTH}"
    if not text.isprintable():
        bad = next(character for character in text if not character.isprintable())
        return None, (f"contains the unprintable character U+{ord(bad):04X}; use "
                      "printable characters only")
    return text, None


def _json_depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def validate_defer(
    task_name: str,
    arguments: Mapping[str, Any],
    *,
    queue: str | None = None,
    priority: int = 0,
    schedule_at: datetime.datetime | None = None,
    lock: str | None = None,
    queueing_lock: str | None = None,
    field_errors: Mapping[str, str] | None = None,
    settings: Settings | None = None,
    queues: Sequence[str] | None = None,
) -> DeferRequest:
    """Check a defer request, raising DeferRejected with every field's problem.

    ``field_errors`` carries problems the caller found while parsing its input,
    such as invalid JSON, so that one response lists them all. A caller that checks
    many requests of one task may pass the panel's ``settings`` and the task's
    ``queue_choices`` once computed. Raises UnknownTask for a name that is not a
    user-facing task.
    """
    if settings is None:
        settings = _settings()
    description = deferrable_task(task_name)
    errors = dict(field_errors or {})
    raw = {name: value for name, value in arguments.items() if name not in errors}
    for name, value in raw.items():
        if _json_depth(value) > MAX_JSON_DEPTH:
            errors[name] = f"is nested more than {MAX_JSON_DEPTH} levels deep"
    cleaned: dict[str, Any] = {}
    try:
        cleaned = validate_arguments(
            task_name, {name: value for name, value in raw.items()
                        if name not in errors}, settings.max_arguments_bytes)
    except InvalidTaskArguments as exc:
        for name, message in getattr(exc, "field_errors", {"task": str(exc)}).items():
            errors.setdefault(name, message)
    if queues is None:
        queues = queue_choices(description, settings)
    chosen_queue = queue or description.queue
    if chosen_queue not in queues:
        errors["queue"] = (f"{chosen_queue[:60]!r} is not a known queue; expected one "
                           f"of {', '.join(queues)}")
    if not isinstance(priority, int) or isinstance(priority, bool) \
            or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        errors.setdefault("priority", f"must be a whole number from {PRIORITY_MIN} "
                                      f"to {PRIORITY_MAX}")
    if schedule_at is not None:
        if schedule_at.tzinfo is None:
            errors.setdefault("schedule_at", "must carry a time zone")
        else:
            problem = check_schedule(schedule_at.astimezone(_UTC),
                                     datetime.datetime.now(_UTC))
            if problem:
                errors.setdefault("schedule_at", problem)
    clean_lock, problem = _check_lock(lock)
    if problem:
        errors.setdefault("lock", problem)
    clean_queueing_lock, problem = _check_lock(queueing_lock)
    if problem:
        errors.setdefault("queueing_lock", problem)
    if errors:
        raise DeferRejected(errors)
    return DeferRequest(
        task_name=task_name,
        arguments=cleaned,
        queue=chosen_queue,
        priority=priority,
        schedule_at=schedule_at.astimezone(_UTC) if schedule_at else None,
        # A queueing lock alone also locks, so two jobs with the key never overlap.
        lock=clean_lock or clean_queueing_lock,
        queueing_lock=clean_queueing_lock,
    )


def _busy_message(key: str) -> str:
    return f"a job with queueing lock {key} is already queued or running"


def _defer_in_one_statement(request: DeferRequest, details: dict[str, Any]) -> int:
    """Defer a job without a queueing lock and audit it, in one statement."""
    params = audit.entry_parameters("job_deferred", "ok", (), details)
    params.update(
        queue=request.queue, task_name=request.task_name, priority=request.priority,
        lock=request.lock, args=Jsonb(request.arguments),
        scheduled_at=request.schedule_at,
    )
    row = db.fetch_one(query("audit", "defer_with_entry"), params)
    assert row is not None
    job_id = int(row["id"])
    audit.log_entry("job_deferred", "ok", [job_id])
    _log_deferred(job_id, request)
    return job_id


def _log_deferred(job_id: int, request: DeferRequest) -> None:
    logger.info("Deferred job %s of %s on %s", job_id, request.task_name,
                request.queue, extra={"action": "job_deferred_from_panel",
                                      "job_id": job_id, "task": request.task_name})


def defer(request: DeferRequest) -> int:
    """Defer a checked request, returning the job id; audited as job_deferred.

    The job and its audit entry are written in one transaction: a defer that
    fails leaves no audit entry, and an audit INSERT that fails rolls the job
    back. Raises DeferRejected on ``queueing_lock`` when a job with the same
    queueing lock is waiting or running.
    """
    task = db.procrastinate_app().tasks[request.task_name]
    details = {
        "task": request.task_name,
        "queue": request.queue,
        "priority": request.priority,
        "schedule_at": request.schedule_at.isoformat() if request.schedule_at
        else None,
        "lock": request.lock,
        "queueing_lock": request.queueing_lock,
        "arguments": redact(request.arguments,
                            _settings().redacted_argument_keys),
    }
    if request.queueing_lock is None:
        return _defer_in_one_statement(request, details)
    with db.connection() as conn:
        if request.queueing_lock is not None:
            key = {"queueing_lock": request.queueing_lock}
            conn.execute(query("jobs", "lock_queueing_key"), key)
            busy = conn.execute(query("jobs", "queueing_lock_busy"), key).fetchone()
            if busy is not None:
                raise DeferRejected({"queueing_lock": (
                    f"{_busy_message(request.queueing_lock)} (job {busy['id']} is "
                    f"{busy['status']})")})
        try:
            job_id = task.configure(
                queue=request.queue, priority=request.priority,
                schedule_at=request.schedule_at, lock=request.lock,
                queueing_lock=request.queueing_lock, connection=conn,
            ).defer(**request.arguments)
        except procrastinate.exceptions.AlreadyEnqueued:
            raise DeferRejected({"queueing_lock": _busy_message(
                request.queueing_lock or "")}) from None
        audit.record("job_deferred", "ok", [job_id], details, connection=conn)
    _log_deferred(job_id, request)
    return job_id
