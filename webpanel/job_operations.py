"""Job actions on one job: retry, cancel, abort, run now and delete.

Each job is changed in a transaction that first locks its row and checks its
state, so an action on a job in the wrong state changes nothing and reports why.
Procrastinate does the state changes it has operations for: its job manager's
``cancel_job_by_id`` (cancel, and abort with ``abort=True``) and its ``retry_job``
query, the one ``JobManager.retry_job_by_id`` runs (``procrastinate_retry_job_v2``,
which also moves a failed job back to todo), here run on the locked transaction.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

import procrastinate.exceptions
import psycopg
from flask import current_app
from procrastinate import sql as procrastinate_sql

from webpanel import audit, db
from webpanel.auth import current_user
from webpanel.job_filters import FINISHED_STATUSES, MAX_JOB_ID
from webpanel.queries import query
from workers.recovery import RECORD_LOST_ATTEMPT
from workers.settings import Settings

logger = logging.getLogger(__name__)

ACTIONS = ("retry", "cancel", "abort", "run_now", "delete")
ACTION_LABELS = {"retry": "Retry", "cancel": "Cancel", "abort": "Abort",
                 "run_now": "Run now", "delete": "Delete"}
AUDIT_ACTIONS = {"retry": "job_retried", "cancel": "job_cancelled",
                 "abort": "job_abort_requested", "run_now": "job_run_now",
                 "delete": "job_deleted"}
PAST_TENSE = {"retry": "retried", "cancel": "cancelled",
              "abort": "requested an abort of", "run_now": "made runnable now",
              "delete": "deleted"}


@dataclasses.dataclass(frozen=True)
class ActionOutcome:
    """The result of an action on one job."""

    job_id: int
    action: str
    done: bool
    reason: str  # "done", "not_found", "wrong_state" or "queueing_lock"
    message: str
    status_before: str | None = None
    status_after: str | None = None
    conflicting_job_id: int | None = None


# The worker numbers an attempt ``attempts + 1``. A failed job's ``attempts``
# already counts its last attempt, and Procrastinate's retry adds 1 more, so this
# takes 1 back first (or keeps the highest recorded number, when that is larger).
# It runs while the job is still failed, because an update of a waiting job adds a
# 'scheduled' event. The value may be -1 until the retry, under the row lock.
UNCOUNT_FAILED_RETRY = """
UPDATE procrastinate_jobs
   SET attempts = GREATEST(attempts - 1, COALESCE(
       (SELECT max(attempt) FROM job_attempts WHERE job_id = %(job_id)s), 0)) - 1
 WHERE id = %(job_id)s AND status = 'failed'
"""


def _settings() -> Settings:
    return current_app.config["FLEET_SETTINGS"]


def refusal(action: str, job: dict[str, Any]) -> str | None:
    """Return why ``action`` does not apply to ``job`` in its state, or None."""
    job_id, status = job["id"], job["status"]
    if action == "retry":
        if status == "failed" or (status == "doing" and job["worker_dead"]):
            return None
        if status == "doing":
            return (f"job {job_id} is running on a live worker; abort it instead, "
                    "or retry it once its worker has missed heartbeats for "
                    "STALLED_JOB_THRESHOLD")
        return (f"job {job_id} is {status}; only failed jobs and running jobs of "
                "dead workers can be retried")
    if action == "cancel":
        if status == "todo":
            return None
        return f"job {job_id} is {status}; only waiting (todo) jobs can be cancelled"
    if action == "abort":
        if status == "doing" and job["abort_requested"]:
            return f"an abort of job {job_id} was already requested"
        if status == "doing":
            return None
        return (f"job {job_id} is {status}; only running (doing) jobs can be aborted"
                + ("; cancel it instead" if status == "todo" else ""))
    if action == "run_now":
        if status == "todo" and job.get("scheduled_later"):
            return None
        if status == "todo":
            return f"job {job_id} is already due and runs when a worker is free"
        return f"job {job_id} is {status}; only waiting (todo) jobs can be run now"
    if action == "delete":
        if status in FINISHED_STATUSES:
            return None
        return (f"job {job_id} is {status}; only finished jobs "
                f"({', '.join(FINISHED_STATUSES)}) can be deleted")
    raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")


def available_actions(job: dict[str, Any]) -> dict[str, str | None]:
    """Map each action to None when it applies to ``job``, else to the reason."""
    facts = dict(job)
    facts.setdefault("scheduled_later", _scheduled_later(job))
    return {action: refusal(action, facts) for action in ACTIONS}


def _scheduled_later(job: dict[str, Any]) -> bool:
    scheduled = job.get("scheduled_at")
    return scheduled is not None and scheduled > _now()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _retry(conn: psycopg.Connection[Any], job: dict[str, Any]) -> None:
    if job["status"] == "doing":
        user = current_user()
        worker = job["worker_id"] if job["worker_id"] is not None else "gone"
        conn.execute(RECORD_LOST_ATTEMPT, {
            "job_id": job["id"], "attempt": job["attempts"] + 1,
            "task_name": job["task_name"], "queue_name": job["queue_name"],
            "worker_id": job["worker_id"],
            "message": (f"worker {worker} stopped heartbeating while running this "
                        f"job; retried by {user.username if user else 'an operator'}"
                        "; the task may have run partly"),
        })
    else:
        conn.execute(UNCOUNT_FAILED_RETRY, {"job_id": job["id"]})
    connector = db.procrastinate_app().connector.get_sync_connector()
    connector.execute_query_one_with_connection(  # type: ignore[attr-defined]
        conn, query=procrastinate_sql.queries["retry_job"], job_id=job["id"],
        retry_at=_now(), new_priority=None, new_queue_name=None, new_lock=None,
    )


def _perform(conn: psycopg.Connection[Any], action: str, job: dict[str, Any]) -> None:
    manager = db.procrastinate_app().job_manager
    if action == "retry":
        _retry(conn, job)
    elif action in {"cancel", "abort"}:
        changed = manager.cancel_job_by_id(job["id"], abort=action == "abort",
                                           connection=conn)
        assert changed, f"job {job['id']} was locked in a cancellable state"
    elif action == "run_now":
        conn.execute(query("jobs", "run_now"), {"id": job["id"]})
    elif action == "delete":
        conn.execute(query("jobs", "unlink_periodic_defers"), {"id": job["id"]})
        conn.execute(query("jobs", "delete_finished_job"), {"id": job["id"]})


def apply_locked(conn: psycopg.Connection[Any], action: str, job_id: int,
                 threshold: float) -> ActionOutcome:
    """Lock one job, check its state and apply ``action`` in one transaction.

    ``threshold`` is STALLED_JOB_THRESHOLD, which decides whether a running job's
    worker is dead. Nothing is audited here; callers audit.
    """
    with conn.transaction():
        job = conn.execute(query("jobs", "lock_job"),
                           {"id": job_id, "threshold": threshold}).fetchone()
        if job is None:
            return ActionOutcome(job_id, action, False, "not_found",
                                 f"job {job_id} does not exist; it may have been "
                                 "deleted")
        reason = refusal(action, job)
        if reason is not None:
            return ActionOutcome(job_id, action, False, "wrong_state", reason,
                                 status_before=job["status"],
                                 status_after=job["status"])
        try:
            with conn.transaction():
                _perform(conn, action, job)
        except procrastinate.exceptions.UniqueViolation as exc:
            holder = conn.execute(query("jobs", "queueing_lock_holder"), {
                "queueing_lock": job["queueing_lock"], "id": job_id}).fetchone()
            holder_id = holder["id"] if holder else None
            logger.info("Retry of job %s skipped: queueing lock %r held by job %s",
                        job_id, job["queueing_lock"], holder_id,
                        extra={"action": "job_retry_conflict", "job_id": job_id,
                               "constraint": exc.constraint_name})
            return ActionOutcome(
                job_id, action, False, "queueing_lock",
                f"job {job_id} was not retried: job {holder_id} with queueing lock "
                f"{job['queueing_lock']} is already waiting",
                status_before=job["status"], status_after=job["status"],
                conflicting_job_id=holder_id,
            )
        after = conn.execute(query("jobs", "job_status"), {"id": job_id}).fetchone()
    status_after = after["status"] if after else None
    if action == "retry" and status_after == "failed":
        message = (f"job {job_id} had an abort request, so Procrastinate marked it "
                   "failed instead of retrying it; retry it again to run it")
    elif action == "delete":
        message = f"job {job_id} deleted"
    else:
        message = f"job {job_id} {PAST_TENSE[action]}; it is now {status_after}"
    return ActionOutcome(job_id, action, True, "done", message,
                         status_before=job["status"], status_after=status_after)


def apply_action(action: str, job_id: int) -> ActionOutcome:
    """Apply ``action`` to one job, or change nothing and report why; audit both."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of "
                         f"{', '.join(ACTIONS)}")
    if not 0 < job_id <= MAX_JOB_ID:
        return ActionOutcome(job_id, action, False, "not_found",
                             f"job {job_id} does not exist")
    with db.connection() as conn:
        outcome = apply_locked(conn, action, job_id,
                               _settings().stalled_job_threshold)
    result = "ok" if outcome.done else f"rejected: {outcome.message}"
    audit.record(AUDIT_ACTIONS[action], result, [job_id], {
        "status_before": outcome.status_before,
        "status_after": outcome.status_after,
        "conflicting_job_id": outcome.conflicting_job_id,
    })
    return outcome
