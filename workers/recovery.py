"""The stalled-job sweep: jobs held by workers that stopped heartbeating.

A job is stalled when it is ``doing`` and the Procrastinate worker that fetched it
has not sent a heartbeat for STALLED_JOB_THRESHOLD seconds, or when that worker's row
is gone (its ``worker_id`` was then set to NULL). Liveness follows the worker id of
the process instance that fetched the job: a restarted process registers a new id, so
it never makes its predecessor's jobs look healthy.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging

import procrastinate
from procrastinate.jobs import Job, Status

from workers.retry import BackoffRetry

logger = logging.getLogger(__name__)

RECORD_LOST_ATTEMPT = """
INSERT INTO job_attempts (
    job_id, attempt, task_name, queue_name, started_at, ended_at, worker_id,
    outcome, error_type, error_message
)
SELECT %(job_id)s, %(attempt)s, %(task_name)s, %(queue_name)s,
       coalesce((SELECT max(at) FROM procrastinate_events
                  WHERE job_id = %(job_id)s AND type = 'started'), now()),
       now(), %(worker_id)s, 'worker_lost', 'WorkerLost', %(message)s
"""


@dataclasses.dataclass
class RecoveryReport:
    """What one sweep did."""

    retried: list[int] = dataclasses.field(default_factory=list)
    failed: list[int] = dataclasses.field(default_factory=list)


def _gives_up(app: procrastinate.App, job: Job) -> bool:
    task = app.tasks.get(job.task_name)
    strategy = task.retry_strategy if task else None
    if isinstance(strategy, BackoffRetry):
        return strategy.gives_up(job.attempts)
    return strategy is None


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
        gives_up = _gives_up(app, job)
        worker = job.worker_id if job.worker_id is not None else "gone"
        message = (
            f"worker {worker} stopped heartbeating for over {threshold:g} s while "
            "running this job; the task may have run partly"
        )
        await app.connector.execute_query_async(
            RECORD_LOST_ATTEMPT,
            job_id=job.id,
            attempt=job.attempts + 1,
            task_name=job.task_name,
            queue_name=job.queue,
            worker_id=job.worker_id,
            message=message,
        )
        if gives_up:
            await app.job_manager.finish_job_by_id_async(
                job_id=job.id, status=Status.FAILED, delete_job=False
            )
            report.failed.append(job.id)
            outcome = "failed, no attempts left"
        else:
            await app.job_manager.retry_job_by_id_async(
                job_id=job.id, retry_at=datetime.datetime.now(datetime.timezone.utc)
            )
            report.retried.append(job.id)
            outcome = "retried"
        logger.warning(
            "Stalled job %s of dead worker %s %s",
            job.id, worker, outcome,
            extra={
                "action": "stalled_job_recovered",
                "job_id": job.id,
                "task": job.task_name,
                "queue": job.queue,
                "old_worker_id": job.worker_id,
                "outcome": "failed" if gives_up else "retried",
            },
        )
    logger.info(
        "Stalled-job sweep: %d retried, %d failed",
        len(report.retried), len(report.failed),
        extra={
            "action": "stalled_jobs_swept",
            "retried": len(report.retried),
            "failed": len(report.failed),
        },
    )
    return report
