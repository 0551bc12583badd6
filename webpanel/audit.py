"""The audit trail: who did what to which jobs, when, and with what result."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from flask import Blueprint
from psycopg.types.json import Jsonb

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
) -> None:
    """Store one operator action and log it; ``action`` is a snake_case verb."""
    user = current_user()
    username = user.username if user else "anonymous"
    db.execute(
        query("audit", "insert_entry"),
        {"username": username, "action": action, "job_ids": list(job_ids),
         "details": Jsonb(details or {}), "result": result[:2000]},
    )
    level = logging.ERROR if result.startswith("failed") else logging.INFO
    logger.log(level, "%s by %s on %d jobs: %s", action, username, len(job_ids),
               result, extra={"action": action, "username": username,
                              "job_ids": list(job_ids)[:50]})


@bp.route("/audit")
def index() -> str:
    """List audit entries."""
    return "audit"
