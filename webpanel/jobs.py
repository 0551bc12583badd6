"""Jobs: the list, the job page, job actions and the defer forms."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("jobs", __name__)


@bp.route("/jobs")
def list_jobs() -> str:
    """List jobs."""
    return "jobs"


@bp.route("/defer")
def defer_index() -> str:
    """List the tasks that can be deferred."""
    return "defer"
