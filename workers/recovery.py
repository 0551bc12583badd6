"""The stalled-job sweep: jobs held by workers that stopped heartbeating.

A job is stalled when it is ``doing`` and the Procrastinate worker that fetched it
has not sent a heartbeat for STALLED_JOB_THRESHOLD seconds, or when that worker's row
is gone (its ``worker_id`` was then set to NULL). Liveness follows the worker id of
the process instance that fetched the job: a restarted process registers a new id, so
it never makes its predecessor's jobs look healthy.

Each job is given back (or failed) by one statement that checks again, under a row
lock, that the job is still ``doing`` for the same dead worker. Two sweeps running at
once, or a slow worker that finishes the job meanwhile, therefore never make a job
run twice at the same time.

Procrastinate's trigger notifies workers when a job is inserted, not when one goes
back to ``todo``. The statement that gives a job back therefore sends the same
``job_inserted`` notification itself, so an idle worker fetches it at once instead
of at its next poll.
"""

from __future__ import annotations

import dataclasses
import logging

import procrastinate
from procrastinate.jobs import Job

from workers.retry import BackoffRetry

logger = logging.getLogger(__name__)

# The job, locked, if it is still doing for the same worker and that worker is
# still dead; the outer statement then retries or fails it.
_STILL_STALLED = """
WITH stalled AS (
    SELECT j.id, j.queue_name FROM procrastinate_jobs j
     WHERE j.id = %(job_id)s
       AND j.status = 'doing'
       AND j.worker_id IS NOT DISTINCT FROM %(worker_id)s
       AND NOT EXISTS (
           SELECT 1 FROM procrastinate_workers w
            WHERE w.id = j.worker_id
              AND w.last_heartbeat >= now() - make_interval(secs => %(threshold)s))
       FOR UPDATE OF j
)
"""

# The notification has the channels and payload of Procrastinate 3.10's
# procrastinate_notify_queue_job_inserted_v1 trigger. PostgreSQL delivers it when
# the statement commits, so only a job actually given back is announced.
RETRY_STALLED_JOB = _STILL_STALLED + """
SELECT s.id,
       procrastinate_retry_job_v2(s.id, now(), NULL, NULL, NULL),
       pg_notify('procrastinate_queue_v1#' || s.queue_name, n.payload),
       pg_notify('procrastinate_any_queue_v1', n.payload)
  FROM stalled s,
       LATERAL (SELECT json_build_object('type', 'job_inserted', 'job_id', s.id)::text
                    AS payload) n
"""

FAIL_STALLED_JOB = _STILL_STALLED + """
SELECT id, procrastinate_finish_job_v1(id, 'failed'::procrastinate_job_status, false)
  FROM stalled
"""

# The dead process's host, pid and supervisord name come from its own record,
# when it wrote one before it died.
RECORD_LOST_ATTEMPT = """
INSERT INTO job_attempts (
    job_id, attempt, task_name, queue_name, started_at, ended_at, worker_id,
    host, pid, process_name, outcome, error_type, error_message
)
SELECT %(job_id)s, %(attempt)s, %(task_name)s, %(queue_name)s,
       coalesce((SELECT max(at) FROM procrastinate_events
                  WHERE job_id = %(job_id)s AND type = 'started'), now()),
       now(), %(worker_id)s, p.host, p.pid, p.process_name,
       'worker_lost', 'WorkerLost', %(message)s
  FROM (SELECT 1) AS one
  LEFT JOIN worker_processes p ON p.worker_id = %(worker_id)s
"""


@dataclasses.dataclass
class RecoveryReport:
    """The jobs one sweep retried and failed."""

    retried: list[int] = dataclasses.field(default_factory=list)
    failed: list[int] = dataclasses.field(default_factory=list)
    skipped: list[int] = dataclasses.field(default_factory=list)


def _gives_up(app: procrastinate.App, job: Job) -> bool:
    task = app.tasks.get(job.task_name)
    strategy = task.retry_strategy if task else None
    if isinstance(strategy, BackoffRetry):
        return strategy.gives_up(job.attempts)
    return strategy is None


async def _recover_one(
    app: procrastinate.App, job: Job, threshold: float
) -> str | None:
    """Retry or fail one stalled job; return the outcome, or None if it moved on."""
    assert job.id is not None
    gives_up = _gives_up(app, job)
    rows = await app.connector.execute_query_all_async(
        FAIL_STALLED_JOB if gives_up else RETRY_STALLED_JOB,
        job_id=job.id,
        worker_id=job.worker_id,
        threshold=threshold,
    )
    if not rows:
        return None
    worker = job.worker_id if job.worker_id is not None else "gone"
    await app.connector.execute_query_async(
        RECORD_LOST_ATTEMPT,
        job_id=job.id,
        attempt=job.attempts + 1,
        task_name=job.task_name,
        queue_name=job.queue,
        worker_id=job.worker_id,
        message=(
            f"worker {worker} stopped heartbeating for over {threshold:g} s while "
            "running this job; the task may have run partly"
        ),
    )
    return "failed" if gives_up else "retried"


async def recover_stalled_jobs(
    app: procrastinate.App, threshold: float
) -> RecoveryReport:
    """Retry, or fail when out of attempts, every job held by a dead worker."""
    report = RecoveryReport()
    stalled = await app.job_manager.get_stalled_jobs(
        seconds_since_heartbeat=threshold
    )
    for job in stalled:
        assert job.id is not None
        worker = job.worker_id if job.worker_id is not None else "gone"
        fields = {
            "job_id": job.id,
            "task": job.task_name,
            "queue": job.queue,
            "old_worker_id": job.worker_id,
        }
        outcome = await _recover_one(app, job, threshold)
        if outcome is None:
            report.skipped.append(job.id)
            logger.info(
                "Stalled job %s of worker %s moved on before the sweep reached it; "
                "left alone", job.id, worker,
                extra={"action": "stalled_job_skipped", **fields},
            )
            continue
        if outcome == "failed":
            report.failed.append(job.id)
            text = "failed, no attempts left"
        else:
            report.retried.append(job.id)
            text = "retried"
        logger.warning(
            "Stalled job %s of dead worker %s %s",
            job.id, worker, text,
            extra={"action": "stalled_job_recovered", "outcome": outcome, **fields},
        )
    # A sweep that found nothing runs every STALLED_JOB_CHECK_INTERVAL; its
    # summary is DEBUG so that it does not flood the log.
    found = report.retried or report.failed or report.skipped
    logger.log(
        logging.INFO if found else logging.DEBUG,
        "Stalled-job sweep: %d retried, %d failed, %d skipped",
        len(report.retried), len(report.failed), len(report.skipped),
        extra={
            "action": "stalled_jobs_swept",
            "retried": len(report.retried),
            "failed": len(report.failed),
            "skipped": len(report.skipped),
        },
    )
    return report
