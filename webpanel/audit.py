"""The audit trail: who did what to which jobs, when, and with what result.

``record`` stores one entry per operator action. The audit page lists entries newest
first, filtered by user, action, job and time, and pages by entry id (keyset
pagination), so a page costs the same however deep it is.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from flask import Blueprint, render_template, request
from psycopg.types.json import Jsonb
from werkzeug.datastructures import MultiDict

from webpanel import db
from webpanel.auth import current_user
from webpanel.queries import query

logger = logging.getLogger(__name__)

bp = Blueprint("audit", __name__)


def record(
    action: str,
    result: str,
    job_ids: Sequence[int] = (),
    details: dict[str, Any] | None = None,
    connection: psycopg.Connection[Any] | None = None,
) -> None:
    """Store one operator action and log it; ``action`` is a snake_case verb.

    With ``connection`` the row joins that connection's transaction and is kept
    only if the caller commits it, although the log line is written at once.
    Without ``connection`` the row commits before the log line is written.
    """
    params = entry_parameters(action, result, job_ids, details)
    if connection is None:
        db.execute(query("audit", "insert_entry"), params)
    else:
        connection.execute(query("audit", "insert_entry"), params)
    log_entry(action, result, job_ids)


def entry_parameters(
    action: str,
    result: str,
    job_ids: Sequence[int] = (),
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the parameters of the insert_entry query for the current user."""
    user = current_user()
    return {"username": user.username if user else "anonymous", "action": action,
            "job_ids": list(job_ids), "details": Jsonb(details or {}),
            "result": result[:2000]}


def log_entry(action: str, result: str, job_ids: Sequence[int] = ()) -> None:
    """Log a stored action: at ERROR when it failed, else at INFO."""
    user = current_user()
    username = user.username if user else "anonymous"
    level = logging.ERROR if result.startswith("failed") else logging.INFO
    logger.log(level, "%s by %s on %d jobs: %s", action, username, len(job_ids),
               result, extra={"action": action, "username": username,
                              "job_ids": list(job_ids)[:50]})


PAGE_SIZE = 50  # entries per page
FILTER_TEXT_MAX = 150  # characters of a user or action filter
DETAILS_SHOWN_CHARS = 600


@dataclasses.dataclass(frozen=True)
class AuditFilters:
    """The filters of the audit page; None means not filtered."""

    username: str | None = None
    action: str | None = None
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    job_id: int | None = None

    def params(self) -> dict[str, Any]:
        """Return the query parameters of these filters."""
        return dataclasses.asdict(self)

    def link_args(self) -> dict[str, str]:
        """Return the filters as URL arguments, in the form the page accepts."""
        args = {}
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, datetime.datetime):
                args[name] = value.strftime("%Y-%m-%dT%H:%M")
            elif value is not None:
                args[name] = str(value)
        return args


def _parse_time(text: str) -> datetime.datetime:
    """Parse YYYY-MM-DDTHH:MM (seconds optional) as UTC unless it names an offset."""
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment


def parse_filters(args: MultiDict[str, str]) -> tuple[AuditFilters, dict[str, str]]:
    """Read the filters from URL arguments, with an error for each invalid one."""
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name in ("username", "action"):
        text = args.get(name, "").strip()
        if len(text) > FILTER_TEXT_MAX:
            errors[name] = f"is longer than {FILTER_TEXT_MAX} characters"
        elif text:
            values[name] = text
    for name in ("since", "until"):
        text = args.get(name, "").strip()
        if not text:
            continue
        try:
            values[name] = _parse_time(text)
        except ValueError:
            errors[name] = (f"{text[:40]!r} is not a time; use YYYY-MM-DDTHH:MM "
                            "in UTC")
    text = args.get("job_id", "").strip()
    if text:
        if text.isdigit() and len(text) < 19:
            values["job_id"] = int(text)
        else:
            errors["job_id"] = f"{text[:40]!r} is not a job id"
    since, until = values.get("since"), values.get("until")
    if since and until and since >= until:
        errors["until"] = "must be later than the start of the period"
    return AuditFilters(**values), errors


def _position(name: str) -> int | None:
    text = request.args.get(name, "").strip()
    return int(text) if text.isdigit() and len(text) < 19 else None


def fetch_page(
    filters: AuditFilters, before: int | None = None, after: int | None = None,
    limit: int = PAGE_SIZE,
) -> tuple[list[dict[str, Any]], bool, bool]:
    """Return one page of entries, newest first, and whether older and newer exist."""
    params = filters.params()
    if after is not None:
        rows = db.fetch_all(query("audit", "page_newer"),
                            {**params, "after": after, "limit": limit})
        rows.reverse()
    else:
        rows = db.fetch_all(query("audit", "page_older"),
                            {**params, "before": before, "limit": limit})
    if not rows:
        return rows, False, False
    older = db.fetch_all(query("audit", "page_older"),
                         {**params, "before": rows[-1]["id"], "limit": 1})
    newer = db.fetch_all(query("audit", "page_newer"),
                         {**params, "after": rows[0]["id"], "limit": 1})
    return rows, bool(older), bool(newer)


def _details_text(details: dict[str, Any]) -> str:
    text = json.dumps(details, sort_keys=True, ensure_ascii=False, default=str)
    if len(text) > DETAILS_SHOWN_CHARS:
        return text[:DETAILS_SHOWN_CHARS] + " [truncated]"
    return text


@bp.route("/audit")
def index() -> Any:
    """List audit entries, newest first, filtered by user, action, job and time."""
    filters, errors = parse_filters(request.args)
    actions = [row["action"] for row in db.fetch_all(query("audit", "actions"))]
    users = [row["username"] for row in db.fetch_all(query("audit", "usernames"))]
    rows: list[dict[str, Any]] = []
    has_older = has_newer = False
    if not errors:
        rows, has_older, has_newer = fetch_page(
            filters, before=_position("before"), after=_position("after"))
    for row in rows:
        row["details_text"] = _details_text(row["details"] or {})
    return render_template(
        "audit.html", entries=rows, filters=filters, errors=errors,
        form=request.args, actions=actions, users=users,
        link_args=filters.link_args(), has_older=has_older, has_newer=has_newer,
        page_size=PAGE_SIZE,
    ), 400 if errors else 200
