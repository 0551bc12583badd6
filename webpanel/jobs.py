"""Jobs: the filtered job list and the job page.

The ``jobs`` blueprint also carries the job actions (``webpanel.job_actions``) and
the defer forms (``webpanel.defer``), which add their routes to it when imported at
the end of this module.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, current_app, redirect, render_template, request, url_for

from webpanel import db, job_service
from webpanel.auth import current_user
from webpanel.job_filters import FILTER_FIELDS, PAGE_SIZES, STATUSES, Position
from webpanel.job_operations import ACTION_LABELS, ACTIONS
from workers.tasks.catalog import TASKS

logger = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__)

REFRESH_SECONDS = 10  # how often the list region reloads itself


@bp.app_template_filter("job_time")
def job_time(value: datetime.datetime | None) -> str:
    """Format a time as 'YYYY-MM-DD HH:MM:SS UTC', or '' for None."""
    if value is None:
        return ""
    return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("job_duration")
def job_duration(milliseconds: float | None) -> str:
    """Format a duration in milliseconds as '850 ms', '12.3 s' or '4 min 5 s'."""
    if milliseconds is None:
        return ""
    if milliseconds < 1000:
        return f"{milliseconds:.0f} ms"
    seconds = milliseconds / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s"


def known_queues() -> list[str]:
    """Return the queues to offer: WORKER_QUEUES, then the queues of the tasks."""
    queues = list(current_app.config["FLEET_SETTINGS"].worker_queues)
    for description in TASKS.values():
        if description.queue not in queues:
            queues.append(description.queue)
    return queues


def list_url(items: list[tuple[str, str]], **position: Any) -> str:
    """Return the job list URL for filter pairs and a position."""
    pairs = list(items)
    for name, value in position.items():
        if value is not None:
            pairs.append((name, str(value)))
    query_string = urlencode(pairs)
    return url_for("jobs.list_jobs") + (f"?{query_string}" if query_string else "")


def _render_list(**context: Any) -> str:
    defaults: dict[str, Any] = {
        "statuses": STATUSES, "page_sizes": PAGE_SIZES, "queues": known_queues(),
        "tasks": sorted(TASKS), "actions": ACTIONS, "action_labels": ACTION_LABELS,
        "refresh_seconds": REFRESH_SECONDS, "filter_errors": {}, "page": None,
        "count": None, "list_error": None, "filters": job_service.JobFilters(),
        "position": Position(), "list_url": list_url, "args": request.args,
        "may_act": bool(current_user() and current_user().may("operator")),
        "search_error": None,
        "rendered_at": datetime.datetime.now(datetime.timezone.utc),
    }
    defaults.update(context)
    return render_template("jobs.html", **defaults)


@bp.route("/jobs")
def list_jobs() -> Any:
    """List jobs newest first, with filters, keyset pages and a count."""
    search = (request.args.get("q") or "").strip()
    if search:
        job_id = job_service.find_job_id(search)
        if job_id is not None:
            return redirect(url_for("jobs.job_page", job_id=job_id), code=303)
        return _render_list(search_error=(
            f"{search[:40]!r} is not a job id; enter a whole number such as 42")), 400
    try:
        filters = job_service.parse_filters(request.args,
                                            job_service.redacted_keys())
        position = job_service.parse_position(request.args)
    except job_service.FilterError as exc:
        return _render_list(filter_errors=exc.field_errors), 400
    try:
        page = job_service.list_jobs(filters, position)
        count = job_service.count_jobs(filters)
    except db.DatabaseUnavailable as exc:
        logger.warning("Job list for %s failed: %s", filters.describe(), exc,
                       extra={"action": "job_list_failed"})
        message = ("The list took too long to load. Narrow the filters, for "
                   "example by status, queue or task, and try again."
                   if exc.timed_out else
                   "The database cannot be reached, so the list cannot load. It "
                   "works again as soon as the database is back.")
        response = _render_list(filters=filters, position=position,
                                list_error=message)
        return response, 503, {"Retry-After": "5"}
    return _render_list(filters=filters, position=position, page=page, count=count)


@bp.route("/jobs/<int:job_id>")
def job_page(job_id: int) -> Any:
    """Show one job: fields, arguments, result, timeline, retry plan and actions."""
    detail = job_service.get_job(job_id)
    if detail is None:
        return render_template("job_missing.html", job_id=job_id), 404
    user = current_user()
    return render_template(
        "job.html", detail=detail, job=detail.job, action_labels=ACTION_LABELS,
        may_act=bool(user and user.may("operator")),
        filter_fields=FILTER_FIELDS,
    )


# Imported last: these modules add their routes to ``bp``.
from webpanel import defer, job_actions  # noqa: E402,F401
