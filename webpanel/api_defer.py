"""API routes that defer jobs: one job per call, or a batch in one transaction.

A request body names the task's arguments and the job options::

    {"arguments": {...}, "queue": "api_calls", "priority": 0,
     "schedule_at": "2027-03-01T09:00:00+01:00", "lock": "k", "queueing_lock": "k"}

``schedule_at`` is RFC 3339 with an offset, or a wall-clock time
(``YYYY-MM-DDTHH:MM[:SS]``) in ``time_zone``. Every item is checked by
``defer_service.validate_defer``, the checks of the defer form. A batch is checked
whole first: one invalid item rejects it with each item's errors, and nothing is
deferred. A valid batch is inserted with one statement of Procrastinate's batch
path (``JobManager.batch_defer_jobs``) and audited once, in one transaction.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
from collections.abc import Sequence
from typing import Any

import procrastinate
import procrastinate.exceptions
import procrastinate.jobs
import psycopg
from flask import current_app, url_for
from werkzeug.wrappers import Response

from webpanel import audit, db, job_service
from webpanel.api import (
    ApiError,
    bp,
    json_response,
    json_type,
    read_json_object,
    shown_name,
)
from webpanel.api_schemas import MAX_BATCH_ITEMS
from webpanel.auth import requires
from webpanel.defer_service import PRIORITY_MAX, PRIORITY_MIN, is_time_zone
from webpanel.queries import query
from workers.settings import Settings
from workers.tasks.catalog import TaskDescription, user_facing_tasks

logger = logging.getLogger(__name__)

DEFER_FIELDS = ("arguments", "queue", "priority", "schedule_at", "time_zone", "lock",
                "queueing_lock")
OPTION_TEXT_MAX = 1000  # characters of a text option read before rejecting it
MAX_BATCH_BODY_BYTES = 8 * 1024 * 1024  # the body limit of the batch route
AUDITED_BATCH_ITEMS = 50  # items whose options the batch audit entry lists
_URL_PLACEHOLDER_ID = 918_273_645_546_372_819  # stands for the job id in job_urls
_UTC = datetime.timezone.utc
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})",
    re.ASCII)
_LOCAL_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?",
                         re.ASCII)


def task_or_404(task: str) -> TaskDescription:
    """Return a deferrable task's description, raising a 404 ApiError otherwise."""
    try:
        return job_service.deferrable_task(task)
    except job_service.UnknownTask:
        known = ", ".join(item.name for item in user_facing_tasks())
        raise ApiError(404, f"no task named {task[:80]!r} can be deferred; the "
                            f"tasks are {known}") from None


def _text_option(body: dict[str, Any], name: str,
                 errors: dict[str, str]) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        errors[name] = f"must be a string, not a {json_type(value)}"
        return None
    if len(value) > OPTION_TEXT_MAX:
        errors[name] = f"is {len(value)} characters long; the limit is " \
                       f"{OPTION_TEXT_MAX}"
        return None
    return value


def _priority(body: dict[str, Any], errors: dict[str, str]) -> int:
    value = body.get("priority")
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        errors["priority"] = (f"must be a whole number from {PRIORITY_MIN} to "
                              f"{PRIORITY_MAX}, not a {json_type(value)}")
        return 0
    return value


def _utc(value: datetime.datetime, field: str,
         errors: dict[str, str]) -> datetime.datetime | None:
    try:
        return value.astimezone(_UTC)
    except OverflowError:
        errors[field] = "is out of range once converted to UTC; pick a nearer time"
        return None


def parse_schedule(body: dict[str, Any],
                   errors: dict[str, str]) -> datetime.datetime | None:
    """Read ``schedule_at`` and ``time_zone`` into a UTC time, or record errors."""
    text = _text_option(body, "schedule_at", errors)
    zone = _text_option(body, "time_zone", errors)
    if "schedule_at" in errors or "time_zone" in errors:
        return None
    if zone is not None and not is_time_zone(zone):
        errors["time_zone"] = (f"unknown time zone {zone[:60]!r}; use an IANA name "
                               "such as Europe/Paris, or UTC")
        return None
    if text is None or not text.strip():
        if zone is not None:
            errors["time_zone"] = "is only used with schedule_at; send both or neither"
        return None
    text = text.strip()
    if zone is None:
        if not _RFC3339.fullmatch(text):
            errors["schedule_at"] = (
                f"{text[:40]!r} is not an RFC 3339 time with an offset; send "
                "2027-03-01T09:00:00+01:00 or 2027-03-01T08:00:00Z, or a local time "
                "with time_zone")
            return None
        try:
            parsed = datetime.datetime.fromisoformat(text.upper())
        except ValueError as exc:
            errors["schedule_at"] = f"{text[:40]!r} is not a valid time: {exc}"
            return None
        return _utc(parsed, "schedule_at", errors)
    if not _LOCAL_TIME.fullmatch(text):
        errors["schedule_at"] = (
            f"{text[:40]!r} is not a local time; with time_zone send "
            "YYYY-MM-DDTHH:MM or YYYY-MM-DDTHH:MM:SS, without an offset")
        return None
    try:
        return job_service.parse_local_time(text.upper(), zone)
    except ValueError as exc:
        errors["schedule_at"] = str(exc)
    except OverflowError:
        errors["schedule_at"] = "is out of range; pick a nearer time"
    return None


def _argument_field(description: TaskDescription, name: str) -> str:
    names = {argument.name for argument in description.arguments}
    return f"arguments.{name}" if name in names else name


def check_item(description: TaskDescription, body: Any,
               settings: Settings | None = None,
               queues: Sequence[str] | None = None) -> job_service.DeferRequest:
    """Check one defer request body, raising DeferRejected naming each field.

    A batch passes the panel's ``settings`` and the task's queue choices, computed
    once for all of its items.
    """
    if not isinstance(body, dict):
        raise job_service.DeferRejected(
            {"": f"must be a JSON object, not a {json_type(body)}"})
    errors: dict[str, str] = {}
    for name in body:
        if name not in DEFER_FIELDS:
            errors[shown_name(name)] = (f"is not a field of a defer request; "
                                        f"expected {', '.join(DEFER_FIELDS)}")

    raw_arguments = body.get("arguments")
    arguments: dict[str, Any] = {}
    if raw_arguments is None:
        raw_arguments = {}
    if not isinstance(raw_arguments, dict):
        errors["arguments"] = (f"must be an object of the task's arguments, not a "
                               f"{json_type(raw_arguments)}")
    else:
        known = {argument.name for argument in description.arguments}
        for name, value in raw_arguments.items():
            if name in known:
                arguments[name] = value
            else:
                errors[f"arguments.{shown_name(name)}"] = (
                    f"is not an argument of {description.name}; it accepts "
                    f"{', '.join(sorted(known)) or 'no arguments'}")

    queue = _text_option(body, "queue", errors)
    lock = _text_option(body, "lock", errors)
    queueing_lock = _text_option(body, "queueing_lock", errors)
    priority = _priority(body, errors)
    schedule_at = parse_schedule(body, errors)

    try:
        return job_service.validate_defer(
            description.name, arguments, queue=queue, priority=priority,
            schedule_at=schedule_at, lock=lock, queueing_lock=queueing_lock,
            field_errors=errors, settings=settings, queues=queues)
    except job_service.DeferRejected as exc:
        raise job_service.DeferRejected({
            _argument_field(description, name): message
            for name, message in exc.field_errors.items()}) from None


def _created_body(checked: job_service.DeferRequest, job_id: int) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "url": url_for("api.get_job", job_id=job_id),
        "task": checked.task_name,
        "queue": checked.queue,
        "priority": checked.priority,
        "schedule_at": checked.schedule_at,
        "lock": checked.lock,
        "queueing_lock": checked.queueing_lock,
    }


@bp.route("/tasks/<task>/jobs", methods=["POST"])
@requires("operator")
def defer_job(task: str) -> Response:
    """Defer one job of a task; 201 with its id, 409 when its queueing lock is busy."""
    description = task_or_404(task)
    body = read_json_object()
    try:
        checked = check_item(description, body)
    except job_service.DeferRejected as exc:
        raise ApiError(400, "the job was not deferred; fix the fields in "
                            "field_errors", exc.field_errors) from None
    try:
        job_id = job_service.defer(checked)
    except job_service.DeferRejected as exc:
        raise ApiError(409, f"the job was not deferred: "
                            f"{exc.field_errors.get('queueing_lock', exc)}",
                       exc.field_errors, queueing_lock=checked.queueing_lock,
                       queueing_locks=[checked.queueing_lock]) from None
    return json_response(_created_body(checked, job_id), 201,
                         {"Location": url_for("api.get_job", job_id=job_id)})


def _read_batch(description: TaskDescription,
                body: dict[str, Any]) -> list[job_service.DeferRequest]:
    errors: dict[str, str] = {}
    for name in body:
        if name != "jobs":
            errors[shown_name(name)] = ('is not a field of a batch; send '
                                        '{"jobs": [...]}')
    items = body.get("jobs")
    if not isinstance(items, list):
        errors["jobs"] = f"must be an array of defer requests, not a " \
                         f"{json_type(items)}"
    elif not items:
        errors["jobs"] = "is empty; send at least one defer request"
    elif len(items) > MAX_BATCH_ITEMS:
        errors["jobs"] = (f"has {len(items)} items; the limit is {MAX_BATCH_ITEMS} "
                          "per batch; split it")
    if errors:
        raise ApiError(400, "the batch is invalid; nothing was deferred", errors,
                       invalid_items=[])
    assert isinstance(items, list)
    settings: Settings = current_app.config["FLEET_SETTINGS"]
    queues = job_service.queue_choices(description, settings)
    checked: list[job_service.DeferRequest] = []
    invalid: list[int] = []
    holders: dict[str, int] = {}
    for index, item in enumerate(items):
        prefix = f"jobs[{index}]"
        try:
            checked_item = check_item(description, item, settings, queues)
        except job_service.DeferRejected as exc:
            invalid.append(index)
            for name, message in exc.field_errors.items():
                errors[f"{prefix}.{name}" if name else prefix] = message
            continue
        key = checked_item.queueing_lock
        if key is not None and key in holders:
            invalid.append(index)
            errors[f"{prefix}.queueing_lock"] = (
                f"repeats the queueing lock {key} of jobs[{holders[key]}]; a batch "
                "may use each queueing lock once")
            continue
        if key is not None:
            holders[key] = index
        checked.append(checked_item)
    if errors:
        raise ApiError(400, f"{len(invalid)} of {len(items)} items are invalid; "
                            "nothing was deferred", errors, invalid_items=invalid)
    return checked


def _busy_locks(conn: Any,
                batch: list[job_service.DeferRequest]) -> dict[str, str]:
    # Lock the keys in a fixed order, so two batches sharing keys cannot deadlock.
    keys = sorted({item.queueing_lock for item in batch
                   if item.queueing_lock is not None})
    busy: dict[str, str] = {}
    for key in keys:
        conn.execute(query("jobs", "lock_queueing_key"), {"queueing_lock": key})
        row = conn.execute(query("jobs", "queueing_lock_busy"),
                           {"queueing_lock": key}).fetchone()
        if row is not None:
            busy[key] = (f"a job with queueing lock {key} is already queued or "
                         f"running (job {row['id']} is {row['status']})")
    return busy


def _new_jobs(app: procrastinate.App,
              batch: list[job_service.DeferRequest]) -> list[procrastinate.jobs.Job]:
    # Items of a batch mostly share their options, so one deferrer serves every
    # item with the same task and options.
    deferrers: dict[tuple[Any, ...], procrastinate.jobs.JobDeferrer] = {}
    jobs = []
    for item in batch:
        options = (item.task_name, item.queue, item.priority, item.schedule_at,
                   item.lock, item.queueing_lock)
        deferrer = deferrers.get(options)
        if deferrer is None:
            deferrer = app.tasks[item.task_name].configure(
                queue=item.queue, priority=item.priority,
                schedule_at=item.schedule_at, lock=item.lock,
                queueing_lock=item.queueing_lock,
            )
            deferrers[options] = deferrer
        jobs.append(deferrer.make_new_job(**item.arguments))
    return jobs


def job_urls(job_ids: list[int]) -> list[str]:
    """Return the API URL of each job, calling url_for twice whatever the count."""
    if not job_ids:
        return []
    # Build the URL around a placeholder id whose digits appear nowhere else in it.
    head, found, tail = url_for("api.get_job", job_id=_URL_PLACEHOLDER_ID).partition(
        str(_URL_PLACEHOLDER_ID))
    first = url_for("api.get_job", job_id=job_ids[0])
    if not found or f"{head}{job_ids[0]}{tail}" != first:
        return [url_for("api.get_job", job_id=job_id) for job_id in job_ids]
    return [f"{head}{job_id}{tail}" for job_id in job_ids]


def defer_batch(task: str, batch: list[job_service.DeferRequest]) -> list[int]:
    """Insert checked requests and their audit entry in one transaction.

    Raises ApiError 409, deferring nothing, when a queueing lock is busy.
    """
    app = db.procrastinate_app()
    with db.connection() as conn:
        busy = _busy_locks(conn, batch)
        if busy:
            fields = {f"jobs[{index}].queueing_lock": busy[item.queueing_lock]
                      for index, item in enumerate(batch)
                      if item.queueing_lock in busy}
            raise ApiError(409, "nothing was deferred: queueing lock "
                                f"{', '.join(sorted(busy))} is already held by a "
                                "queued or running job", fields,
                           queueing_locks=sorted(busy))
        jobs = _new_jobs(app, batch)
        try:
            created = app.job_manager.batch_defer_jobs(jobs=jobs, connection=conn)
        except procrastinate.exceptions.AlreadyEnqueued as exc:
            raise ApiError(409, f"nothing was deferred: {exc}",
                           queueing_locks=[]) from None
        job_ids = [int(job.id) for job in created if job.id is not None]
        _audit_batch(task, batch, job_ids, conn)
    return job_ids


def _audit_batch(task: str, batch: list[job_service.DeferRequest],
                 job_ids: list[int], conn: psycopg.Connection[Any]) -> None:
    keys = job_service.redacted_keys()
    shown = [
        {**{field.name: getattr(item, field.name)
            for field in dataclasses.fields(item)
            if field.name not in {"task_name", "arguments", "schedule_at"}},
         "schedule_at": item.schedule_at.isoformat() if item.schedule_at else None,
         "arguments": job_service.redact(item.arguments, keys)}
        for item in batch[:AUDITED_BATCH_ITEMS]
    ]
    audit.record("jobs_deferred_batch", f"ok: deferred {len(job_ids)} jobs of {task}",
                 job_ids, {"task": task, "count": len(job_ids),
                           "queues": sorted({item.queue for item in batch}),
                           "items_shown": len(shown), "items": shown},
                 connection=conn)


@bp.route("/tasks/<task>/jobs/batch", methods=["POST"])
@requires("operator")
def defer_jobs_batch(task: str) -> Response:
    """Defer up to 1,000 jobs of a task, all or none, in one transaction."""
    description = task_or_404(task)
    body = read_json_object(max_bytes=MAX_BATCH_BODY_BYTES)
    batch = _read_batch(description, body)
    job_ids = defer_batch(description.name, batch)
    logger.info("Deferred a batch of %d jobs of %s", len(job_ids), description.name,
                extra={"action": "jobs_deferred_batch", "task": description.name,
                       "count": len(job_ids)})
    return json_response({
        "task": description.name,
        "count": len(job_ids),
        "job_ids": job_ids,
        "urls": job_urls(job_ids),
    }, 201)
