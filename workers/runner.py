"""Run one Procrastinate worker in this process until a stop signal or a failure.

Used by the worker and scheduler entry points. The process exits 0 only when a stop
signal (SIGTERM from supervisorctl, SIGINT) ended it. Any other end, such as a lost
database connection, exits 1, and supervisord starts the process again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

import procrastinate
import psycopg
import psycopg_pool
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate.worker import Worker

from workers import http
from workers.app import build_app
from workers.end_state import first_error_line
from workers.identity import host_name, process_name
from workers.middleware import JobMiddleware
from workers.settings import Settings
from workers.startup import prepare_process

logger = logging.getLogger(__name__)

REGISTER_PROCESS = """
INSERT INTO worker_processes (
    worker_id, host, pid, process_name, role, queues, concurrency
) VALUES (
    %(worker_id)s, %(host)s, %(pid)s, %(process_name)s, %(role)s, %(queues)s,
    %(concurrency)s
)
ON CONFLICT (worker_id) DO NOTHING
"""

MARK_STOPPED = """
UPDATE worker_processes SET stopped_at = now() WHERE worker_id = %(worker_id)s
"""


POOL_STATS = """
UPDATE worker_processes
   SET pool_min_size = %(pool_min)s, pool_max_size = %(pool_max)s,
       pool_size = %(pool_size)s, pool_available = %(pool_available)s,
       pool_requests_waiting = %(requests_waiting)s, pool_stats_at = now()
 WHERE worker_id = %(worker_id)s
"""


# Errors that mean the database went away. The process then exits 1, supervisord
# starts it again, and the new process waits for the database at start.
DATABASE_ERRORS = (
    procrastinate_exceptions.ConnectorException,
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
)


class SideTaskFailures(logging.Handler):
    """Log handler that keeps the error of each failed Procrastinate side task.

    A side task (listener, heartbeat, periodic deferrer, abort poll) that fails
    makes the Procrastinate worker stop itself, and only its log record carries
    the error. The runner reads it to tell a database outage from a bug.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "action", None) != "side_task_failed":
            return
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])

    def database_error(self) -> BaseException | None:
        """Return the first side task error that is a database error, if any."""
        for error in self.errors:
            if isinstance(error, DATABASE_ERRORS):
                return error
        return None


class FleetWorker:
    """A Procrastinate worker with this project's middleware, signals and records."""

    def __init__(
        self,
        settings: Settings,
        role: str,
        queues: Sequence[str],
        concurrency: int,
        shutdown_timeout: float,
        *,
        app: procrastinate.App | None = None,
    ) -> None:
        self.settings = settings
        self.role = role
        self.queues = list(queues)
        self.concurrency = concurrency
        self.shutdown_timeout = shutdown_timeout
        self.name = process_name(role)
        self.app = app
        self.stop_signal: int | None = None
        self.worker: Worker | None = None
        self.worker_id: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_signal(self, signum: int) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            logger.info(
                "Received %s: warm shutdown, waiting up to %g s for running jobs",
                signal.Signals(signum).name, self.shutdown_timeout,
                extra={"action": "warm_shutdown_requested", "process_name": self.name},
            )
        else:
            logger.warning(
                "Received %s again; still waiting for running jobs",
                signal.Signals(signum).name,
                extra={"action": "repeated_stop_signal", "process_name": self.name},
            )
        if self.worker is not None:
            self.worker.stop()

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop as a stop signal would; safe to call from another thread."""
        loop = self._loop
        if loop is None:
            self.stop_signal = signum
            return
        loop.call_soon_threadsafe(self._on_signal, signum)

    async def run(self, *, install_signal_handlers: bool = True) -> int:
        """Run until stopped; return the process exit code."""
        self._loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            return await self._run()
        except DATABASE_ERRORS as exc:
            logger.warning(
                "Worker %s lost the database (%s); exiting 1 so that supervisord "
                "starts it again", self.name, first_error_line(exc),
                extra={"action": "worker_database_lost", "process_name": self.name},
            )
            return 1
        finally:
            self._loop = None

    async def _run(self) -> int:
        app = self.app or build_app(self.settings, self.role)
        async with app.open_async():
            self.worker = Worker(
                app=app,
                queues=self.queues,
                name=self.name,
                concurrency=self.concurrency,
                # A retry scheduled for later sends no NOTIFY, so the poll
                # bounds how late it starts. Procrastinate's default is 5 s.
                fetch_job_polling_interval=self.settings.worker_poll_interval,
                shutdown_graceful_timeout=self.shutdown_timeout,
                delete_jobs="never",
                additional_context={"settings": self.settings},
                install_signal_handlers=False,
                update_heartbeat_interval=self.settings.heartbeat_interval,
                stalled_worker_timeout=self.settings.stalled_job_threshold,
                worker_middleware=[
                    JobMiddleware(self.settings.job_timeout, self.name)
                ],
            )
            if self.stop_signal is not None:
                return 0
            run_task = asyncio.create_task(self.worker.run(), name="worker run")
            stats_task: asyncio.Task[None] | None = None
            side_failures = SideTaskFailures()
            self.worker.logger.addHandler(side_failures)
            try:
                if await self._register(run_task):
                    stats_task = asyncio.create_task(
                        self._report_pool_stats(app), name="pool stats"
                    )
                await run_task
            except DATABASE_ERRORS:
                raise
            except Exception as exc:
                logger.error(
                    "Worker %s stopped on an error: %s", self.name, exc,
                    extra={"action": "worker_crashed", "process_name": self.name},
                    exc_info=exc,
                )
                return 1
            finally:
                if stats_task is not None:
                    stats_task.cancel()
                    await asyncio.gather(stats_task, return_exceptions=True)
                if not run_task.done():
                    self.worker.stop()
                    await asyncio.gather(run_task, return_exceptions=True)
                await self._mark_stopped(app)
                await http.close_client()
                self.worker.logger.removeHandler(side_failures)

        lost = side_failures.database_error()
        if self.stop_signal is None and lost is not None:
            # The database came back while running jobs were finishing, so the
            # stop raised nothing. The outage shows only in the side task's error.
            logger.warning(
                "Worker %s lost the database (%s); exiting 1 so that supervisord "
                "starts it again", self.name, first_error_line(lost),
                extra={"action": "worker_database_lost", "process_name": self.name},
            )
            return 1
        if self.stop_signal is None:
            logger.error(
                "Worker %s stopped without a stop signal; exiting 1 so that "
                "supervisord restarts it", self.name,
                extra={"action": "worker_stopped_unexpectedly", "process_name": self.name},
            )
            return 1
        logger.info("Worker %s stopped", self.name,
                    extra={"action": "worker_stopped", "process_name": self.name})
        return 0

    async def _register(self, run_task: asyncio.Task[None]) -> bool:
        """Wait for the Procrastinate worker id and record this process under it."""
        assert self.worker is not None
        while self.worker.worker_id is None and not run_task.done():
            await asyncio.sleep(0.02)
        if self.worker.worker_id is None:
            return False
        self.worker_id = self.worker.worker_id
        if self.stop_signal is not None:
            # Worker.run() clears a stop requested before it started.
            self.worker.stop()
        try:
            await self.worker.app.connector.execute_query_async(
                REGISTER_PROCESS,
                worker_id=self.worker_id,
                host=host_name(),
                pid=os.getpid(),
                process_name=self.name,
                role=self.role,
                queues=self.queues,
                concurrency=self.concurrency,
            )
        except Exception as exc:  # noqa: BLE001 - the record is informative only
            logger.warning("Could not record worker %s: %s", self.name, exc,
                           extra={"action": "worker_record_failed"})
            return False
        logger.info(
            "Worker %s registered as Procrastinate worker %s on queues %s, "
            "concurrency %d", self.name, self.worker_id,
            ",".join(self.queues), self.concurrency,
            extra={"action": "worker_registered", "process_name": self.name,
                   "worker_id": self.worker_id},
        )
        return True

    async def _report_pool_stats(self, app: procrastinate.App) -> None:
        """Store this process's pool counters every heartbeat interval."""
        interval = self.settings.heartbeat_interval
        connector = app.connector
        while True:
            stats = connector.pool.get_stats()  # type: ignore[attr-defined]
            try:
                await connector.execute_query_async(
                    POOL_STATS,
                    worker_id=self.worker_id,
                    pool_min=stats.get("pool_min"),
                    pool_max=stats.get("pool_max"),
                    pool_size=stats.get("pool_size"),
                    pool_available=stats.get("pool_available"),
                    requests_waiting=stats.get("requests_waiting", 0),
                )
            except Exception as exc:  # noqa: BLE001 - the worker notices outages
                logger.debug("Could not store pool stats: %s", exc,
                             extra={"action": "pool_stats_failed"})
            await asyncio.sleep(interval)

    async def _mark_stopped(self, app: procrastinate.App) -> None:
        if self.worker_id is None:
            return
        try:
            await app.connector.execute_query_async(
                MARK_STOPPED, worker_id=self.worker_id
            )
        except Exception as exc:  # noqa: BLE001 - the database may be gone
            logger.warning("Could not mark worker %s stopped: %s", self.name,
                           first_error_line(exc),
                           extra={"action": "worker_record_failed"})


def run_process(settings: Settings, role: str) -> None:
    """Run the worker or scheduler of a prepared process and exit with its code."""
    if role == "scheduler":
        queues: list[str] = ["maintenance"]
        concurrency = 2
        timeout = settings.scheduler_shutdown_timeout
    else:
        queues = list(settings.worker_queues)
        concurrency = settings.worker_concurrency
        timeout = settings.worker_shutdown_timeout
    fleet_worker = FleetWorker(settings, role, queues, concurrency, timeout)
    sys.exit(asyncio.run(fleet_worker.run()))


def main(role: str) -> None:
    """Entry point of the worker and scheduler processes."""
    run_process(prepare_process(role), role)
