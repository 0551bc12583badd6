"""The dashboard: job counts by status and queue."""

from __future__ import annotations

from flask import Blueprint, render_template

from webpanel import db
from webpanel.queries import query

bp = Blueprint("dashboard", __name__)


@bp.route("/")
def index() -> str:
    """Show job counts by status and queue."""
    rows = db.fetch_all(query("dashboard", "counts_by_queue_and_status"))
    statuses = ["todo", "doing", "succeeded", "failed", "cancelled", "aborted"]
    totals = {status: 0 for status in statuses}
    queues: dict[str, dict[str, int]] = {}
    for row in rows:
        totals[row["status"]] = totals.get(row["status"], 0) + row["count"]
        queues.setdefault(row["queue_name"], {s: 0 for s in statuses})[
            row["status"]] = row["count"]
    return render_template("dashboard.html", totals=totals, queues=queues,
                           statuses=statuses)
