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
from procrastinate import exceptions as procrastinate_exceptions

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds during which a failed end-state write is tried again. supervisord's
# stopwaitsecs still bounds a stop that arrives meanwhile.
END_STATE_WINDOW = 30.0
FIRST_DELAY = 0.5
MAX_DELAY = 4.0


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
) -> T:
    """Await ``write()``, calling it again after connection errors for ``window`` s.

    ``description`` names the write in the log, for example "the status of job 12". The
    delay between calls doubles from ``first_delay`` up to ``max_delay``. The last
    connection error is raised once the window has passed, and any other error is
    raised at once.
    """
    deadline = time.monotonic() + window
    delay = first_delay
    tries = 1
    while True:
        try:
            result = await write()
        except Exception as exc:
            remaining = deadline - time.monotonic()
            if not is_connection_error(exc) or remaining <= 0:
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
        if tries > 1:
            logger.info(
                "Wrote %s after %d tries", description, tries,
                extra={"action": "end_state_written", "tries": tries,
                       **(extra or {})},
            )
        return result
