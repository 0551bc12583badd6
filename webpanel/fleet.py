"""The fleet: workers, stalled jobs, supervisord processes, queues, periodic tasks."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("fleet", __name__)


@bp.route("/workers")
def workers() -> str:
    """List workers."""
    return "workers"


@bp.route("/stalled")
def stalled() -> str:
    """List stalled jobs."""
    return "stalled"


@bp.route("/processes")
def processes() -> str:
    """List processes."""
    return "processes"


@bp.route("/queues")
def queues() -> str:
    """List queues."""
    return "queues"


@bp.route("/periodic")
def periodic() -> str:
    """List periodic tasks."""
    return "periodic"
