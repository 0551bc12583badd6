"""Writing a job's end state across a short database outage.

When an attempt ends while the database is away (a restart, a failover), the worker
keeps trying to write the job's result, the attempt record and the job's new status
for up to ``END_STATE_WINDOW`` seconds. A job that succeeded during the outage is then
recorded as succeeded instead of being run again by stalled-job recovery. Past the
window the job stays ``doing``, and recovery gives it back to the queue once its
worker's heartbeat is stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from procrastinate.connector import BaseAsyncConnector
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate.jobs import Job

from workers.settings import END_STATE_WINDOW

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY = 0.5
MAX_DELAY = 4.0


class OutageWindow:
    """The time of the first failed end-state write of the current outage.

    Every write of one process shares the window, so the attempt record and the
    status written after it end together, at most END_STATE_WINDOW seconds (plus
    one pool checkout) after the first failure. A successful write ends the outage.
    """

    def __init__(self) -> None:
        self.started: float | None = None

    def deadline(self, window: float) -> float:
        """Return when retrying ends, starting the window at its first failure."""
        if self.started is None:
            self.started = time.monotonic()
        return self.started + window

    def end(self) -> None:
        """Forget the outage after a write went through."""
        self.started = None


OUTAGE = OutageWindow()


# A job's new status is written only while the job is still `doing` for the worker
# that ran it. The row lock of the sub-select orders this statement with the
# stalled-job sweep, which checks the same under the same lock. So a worker whose
# write arrives after the sweep gave the job to another worker changes nothing,
# and two runs of one job never overlap. No row means the write was skipped.
FINISH_IF_HELD = """
SELECT procrastinate_finish_job_v1(held.id, %(status)s, %(delete_job)s)
  FROM (SELECT id FROM procrastinate_jobs
         WHERE id = %(job_id)s AND status = 'doing' AND worker_id = %(worker_id)s
           FOR UPDATE) AS held
"""

RETRY_IF_HELD = """
SELECT procrastinate_retry_job_v2(held.id, %(retry_at)s, %(new_priority)s,
                                  %(new_queue_name)s, %(new_lock)s)
  FROM (SELECT id FROM procrastinate_jobs
         WHERE id = %(job_id)s AND status = 'doing' AND worker_id = %(worker_id)s
           FOR UPDATE) AS held
"""


async def write_status_if_held(
    connector: BaseAsyncConnector,
    query: str,
    job: Job,
    description: str,
    **arguments: Any,
) -> None:
    """Run FINISH_IF_HELD or RETRY_IF_HELD for ``job``, through a short outage.

    A job that another worker holds by then (given back by the stalled-job sweep
    while this worker could not reach the database) keeps its status, and a
    WARNING says so.
    """
    rows = await write_through_outage(
        lambda: connector.execute_query_all_async(
            query, job_id=job.id, worker_id=job.worker_id, **arguments
        ),
        description=description,
        extra={"job_id": job.id},
    )
    if rows:
        return
    logger.warning(
        "Did not write %s: the job is no longer doing for worker %s, because the "
        "stalled-job sweep gave it back while this worker could not reach the "
        "database", description, job.worker_id,
        extra={"action": "end_state_skipped", "job_id": job.id,
               "worker_id": job.worker_id},
    )


def is_connection_error(exc: BaseException) -> bool:
    """Tell whether ``exc`` means the database could not be reached.

    psycopg raises OperationalError (psycopg_pool's PoolTimeout is one) for a
    refused, closed or timed out connection. Procrastinate's connector wraps it in
    ConnectorException. A rejected statement (a constraint, a status check in a
    stored procedure) is not a connection error, so writing it again cannot help.
    """
    if isinstance(exc, procrastinate_exceptions.ConnectorException):
        exc = exc.__cause__ if exc.__cause__ is not None else exc
    return isinstance(exc, psycopg.OperationalError)


def first_error_line(exc: BaseException) -> str:
    """Return the first line of a database error, looking past Procrastinate's wrapper."""
    if exc.__cause__ is not None and isinstance(
        exc, procrastinate_exceptions.ConnectorException
    ):
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def write_through_outage(
    write: Callable[[], Awaitable[T]],
    *,
    description: str,
    extra: dict[str, Any] | None = None,
    window: float = END_STATE_WINDOW,
    first_delay: float = FIRST_DELAY,
    max_delay: float = MAX_DELAY,
    outage: OutageWindow = OUTAGE,
) -> T:
    """Await ``write()``, calling it again after connection errors within the window.

    ``description`` names the write in the log, for example "the status of job 12".
    The window runs ``window`` seconds from the outage's first failed write (see
    OutageWindow). The delay between calls doubles from ``first_delay`` up to
    ``max_delay``, and each call may first wait the pool's checkout timeout. The
    last connection error is raised once the window has passed, and any other
    error is raised at once.
    """
    delay = first_delay
    tries = 1
    while True:
        try:
            result = await write()
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            remaining = outage.deadline(window) - time.monotonic()
            if remaining <= 0:
                raise
            wait = min(delay, remaining)
            logger.warning(
                "Could not write %s, the database is unreachable (%s); trying "
                "again in %.1f s", description, first_error_line(exc), wait,
                extra={"action": "end_state_write_retry", "tries": tries,
                       **(extra or {})},
            )
            await asyncio.sleep(wait)
            delay = min(delay * 2, max_delay)
            tries += 1
            continue
        outage.end()
        if tries > 1:
            logger.info(
                "Wrote %s after %d tries", description, tries,
                extra={"action": "end_state_written", "tries": tries,
                       **(extra or {})},
            )
        return result
