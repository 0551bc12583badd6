"""The one place every job passes through: timeout, attempt record and job logs.

``JobMiddleware`` is a Procrastinate worker middleware. Around each attempt it

1. applies the task's timeout (JOB_TIMEOUT unless the task sets its own) with
   ``asyncio.timeout``, and treats an attempt that outlived its timeout as timed out
   even when the task swallowed the cancellation;
2. gets the task's retry decision for a failure, so that the decision is logged
   and recorded. The strategy caches it, so Procrastinate reads the same one.
3. writes one ``job_attempts`` row when the attempt ends, shielded from cancellation
   and tried again through a short database outage;
4. logs the start and the outcome once, at a level that follows the outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import os
import time
import traceback
from typing import Any

from procrastinate import JobContext, RetryDecision, exceptions, job_context
from procrastinate.middleware import AsyncCallNext
from procrastinate.worker import Worker

from workers.attempts import AttemptNotes, current_attempt
from workers.end_state import write_through_outage
from workers.identity import host_name
from workers.retry import (
    BackoffRetry,
    JobTimeout,
    UpstreamHTTPError,
    describe_failure,
    is_retryable,
)
from workers.tasks.catalog import TASKS

logger = logging.getLogger(__name__)

TRACEBACK_MAX_CHARS = 8000  # the end of a longer traceback is kept
MESSAGE_MAX_CHARS = 2000

# wait_ms runs from the job's latest due event (deferred, given back for a retry,
# retried by hand, or its scheduled time) to this attempt's started event. Both
# times come from the database clock, and the lookups use the events' job_id index.
RECORD_ATTEMPT = """
INSERT INTO job_attempts (
    job_id, attempt, task_name, queue_name, started_at, ended_at, duration_ms,
    host, pid, process_name, worker_id, outcome, error_type, error_message,
    traceback, http_status, retry_after, next_attempt_at, wait_ms
) VALUES (
    %(job_id)s, %(attempt)s, %(task_name)s, %(queue_name)s, %(started_at)s,
    %(ended_at)s, %(duration_ms)s, %(host)s, %(pid)s, %(process_name)s,
    %(worker_id)s, %(outcome)s, %(error_type)s, %(error_message)s, %(traceback)s,
    %(http_status)s, %(retry_after)s, %(next_attempt_at)s,
    (SELECT greatest(extract(epoch FROM started.at - max(due.at)) * 1000, 0)
       FROM (SELECT max(at) AS at FROM procrastinate_events
              WHERE job_id = %(job_id)s AND type = 'started') AS started
       JOIN procrastinate_events due
         ON due.job_id = %(job_id)s AND due.at <= started.at
        AND due.type IN ('deferred', 'deferred_for_retry', 'retried', 'scheduled')
      GROUP BY started.at)
)
"""


@dataclasses.dataclass
class Outcome:
    """The end state of one attempt, as recorded and logged."""

    name: str
    level: int
    message: str
    error: BaseException | None = None
    next_attempt_at: datetime.datetime | None = None


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)


def _truncate_traceback(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    if len(text) <= TRACEBACK_MAX_CHARS:
        return text
    return "[truncated]\n" + text[-TRACEBACK_MAX_CHARS:]


def mark_interrupted(exc: BaseException, context: JobContext) -> bool:
    """Mark a cancellation as an interruption, retried at once, unless a user aborted.

    Only a user's abort request ends a job as ``aborted``. A cancellation from a
    stopping worker or from event loop teardown is not the job's fault, so the job
    goes back to the queue.
    """
    if context.abort_reason() == job_context.AbortReason.USER_REQUEST:
        return False
    exc.fleet_shutdown_abort = True  # type: ignore[attr-defined]
    return True


class JobMiddleware:
    """Worker middleware applying the timeout, the attempt record and job logs."""

    def __init__(self, job_timeout: float, process_name: str) -> None:
        self.job_timeout = job_timeout
        self.process_name = process_name
        self.host = host_name()
        self.pid = os.getpid()

    def timeout_for(self, task_name: str) -> float:
        """Return the timeout in seconds of one attempt of ``task_name``."""
        description = TASKS.get(task_name)
        if description is not None and description.timeout is not None:
            return description.timeout
        return self.job_timeout

    def _log_fields(self, context: JobContext, worker: Worker) -> dict[str, Any]:
        job = context.job
        return {
            "job_id": job.id,
            "task": job.task_name,
            "queue": job.queue,
            "attempt": job.attempts + 1,
            "process_name": self.process_name,
            "worker_id": worker.worker_id,
        }

    async def __call__(
        self, call_next: AsyncCallNext, context: JobContext, worker: Worker
    ) -> Any:
        job = context.job
        fields = self._log_fields(context, worker)
        timeout = self.timeout_for(job.task_name)
        notes = AttemptNotes()
        token = current_attempt.set(notes)
        started = time.time()
        logger.info(
            "Job %s (%s) attempt %s started", job.id, job.task_name,
            job.attempts + 1, extra={"action": "job_started", **fields},
        )
        try:
            try:
                result = await self._run_with_timeout(call_next, timeout)
            except BaseException as exc:
                outcome = self._failure_outcome(exc, context, worker)
                await self._finish(context, worker, started, notes, outcome, fields)
                raise
            outcome = Outcome("succeeded", logging.INFO, "")
            await self._finish(context, worker, started, notes, outcome, fields)
            return result
        except (asyncio.CancelledError, exceptions.JobAborted) as exc:
            # A stop can arrive at any point of the attempt, including while its
            # record is being written. The job goes back to the queue in every case.
            mark_interrupted(exc, context)
            raise
        finally:
            current_attempt.reset(token)

    async def _run_with_timeout(self, call_next: AsyncCallNext, timeout: float) -> Any:
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                result = await call_next()
        except asyncio.CancelledError:
            # asyncio.timeout turns its own cancellation into TimeoutError, so a
            # CancelledError here comes from the worker (abort or shutdown).
            raise
        except Exception as exc:
            if deadline.expired():
                # Whatever the task raised once it was cancelled, the attempt
                # ended because it outlived its timeout.
                raise JobTimeout(
                    f"job timed out after {timeout:g} s (job timeout)"
                ) from exc
            raise
        if deadline.expired():
            # The task caught the cancellation and returned: still a timeout.
            raise JobTimeout(
                f"job timed out after {timeout:g} s (job timeout); the task "
                "ignored its cancellation"
            )
        return result

    def _failure_outcome(
        self, exc: BaseException, context: JobContext, worker: Worker
    ) -> Outcome:
        job = context.job
        if isinstance(exc, (asyncio.CancelledError, exceptions.JobAborted)):
            if mark_interrupted(exc, context):
                self._decide(exc, context, worker)
                return Outcome(
                    "interrupted", logging.WARNING,
                    "worker stopping; the job goes back to the queue", exc,
                )
            return Outcome("aborted", logging.WARNING, "aborted on request", exc)

        description = describe_failure(exc)
        decision = self._decide(exc, context, worker)
        timed_out = isinstance(exc, JobTimeout)
        name = "timeout" if timed_out else "error"
        if decision is not None:
            return Outcome(name, logging.WARNING, description, exc, decision.retry_at)
        attempts = job.attempts + 1
        if is_retryable(exc):
            message = f"gave up after {attempts} attempts; last error: {description}"
        else:
            message = f"not retryable: {description}"
        return Outcome("failed", logging.ERROR, message, exc)

    def _decide(
        self, exc: BaseException, context: JobContext, worker: Worker
    ) -> RetryDecision | None:
        task = worker.app.tasks.get(context.job.task_name)
        strategy = task.retry_strategy if task else None
        if not isinstance(strategy, BackoffRetry):
            return None
        return strategy.get_retry_decision(exception=exc, job=context.job)

    async def _finish(
        self,
        context: JobContext,
        worker: Worker,
        started: float,
        notes: AttemptNotes,
        outcome: Outcome,
        fields: dict[str, Any],
    ) -> None:
        ended = time.time()
        self._log_outcome(context, outcome, ended - started, fields)
        row = self._attempt_row(context, worker, started, ended, notes, outcome)
        connector = worker.app.connector
        write = asyncio.ensure_future(write_through_outage(
            lambda: connector.execute_query_async(RECORD_ATTEMPT, **row),
            description=f"attempt {row['attempt']} of job {row['job_id']}",
            extra=fields,
        ))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await write
            raise
        except Exception as exc:  # noqa: BLE001 - the job's outcome matters more
            logger.warning(
                "Could not record attempt %s of job %s: %s",
                row["attempt"], row["job_id"], exc,
                extra={"action": "attempt_record_failed", **fields},
            )

    def _attempt_row(
        self,
        context: JobContext,
        worker: Worker,
        started: float,
        ended: float,
        notes: AttemptNotes,
        outcome: Outcome,
    ) -> dict[str, Any]:
        job = context.job
        exc = outcome.error
        http_status = notes.http_status
        retry_after = notes.retry_after
        if isinstance(exc, UpstreamHTTPError):
            http_status, retry_after = exc.status, exc.retry_after
        error_type = None
        if exc is not None:
            error_type = (
                "TimeoutError" if isinstance(exc, JobTimeout) else type(exc).__name__
            )
        return {
            "job_id": job.id,
            "attempt": job.attempts + 1,
            "task_name": job.task_name,
            "queue_name": job.queue,
            "started_at": _utc(started),
            "ended_at": _utc(ended),
            "duration_ms": round((ended - started) * 1000, 3),
            "host": self.host,
            "pid": self.pid,
            "process_name": self.process_name,
            "worker_id": worker.worker_id,
            "outcome": outcome.name,
            "error_type": error_type,
            "error_message": outcome.message[:MESSAGE_MAX_CHARS] or None,
            "traceback": _truncate_traceback(exc)
            if exc is not None and outcome.name in {"error", "failed", "timeout"}
            else None,
            "http_status": http_status,
            "retry_after": retry_after[:200] if retry_after else None,
            "next_attempt_at": outcome.next_attempt_at,
        }

    def _log_outcome(
        self, context: JobContext, outcome: Outcome, duration: float,
        fields: dict[str, Any],
    ) -> None:
        job = context.job
        extra = {"action": f"job_{outcome.name}", "duration_s": round(duration, 3),
                 **fields}
        if outcome.name == "succeeded":
            text = "Job %s (%s) succeeded in %.3f s"
            logger.info(text, job.id, job.task_name, duration, extra=extra)
            return
        if outcome.next_attempt_at is not None:
            delay = (
                outcome.next_attempt_at - datetime.datetime.now(datetime.timezone.utc)
            ).total_seconds()
            extra["retry_in_s"] = round(max(delay, 0.0), 3)
            verb = "timed out" if outcome.name == "timeout" else "failed"
            logger.warning(
                "Job %s (%s) attempt %s %s after %.3f s, retrying in %.1f s: %s",
                job.id, job.task_name, job.attempts + 1, verb, duration,
                max(delay, 0.0), outcome.message, extra=extra,
            )
            return
        logger.log(
            outcome.level, "Job %s (%s) %s after %.3f s: %s",
            job.id, job.task_name, outcome.name, duration, outcome.message,
            extra=extra,
        )
