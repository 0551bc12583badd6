"""Run one Procrastinate worker in this process until a stop signal or a failure.

Used by the worker and scheduler entry points. The process exits 0 only when a stop
signal (SIGTERM from supervisorctl, SIGINT) ended it; any other end, such as a lost
database connection, exits 1 so that supervisord starts it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from procrastinate.worker import Worker

from workers import http
from workers.app import build_app
from workers.errors import ConfigurationError, SchemaMismatchError
from workers.identity import host_name, process_name
from workers.logs import configure_logging
from workers.middleware import JobMiddleware
from workers.settings import Settings, load_settings
from workers.startup import (
    StopRequested,
    fail_fast,
    require_database_url,
    wait_for_database,
)

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


class FleetWorker:
    """A Procrastinate worker with this project's middleware, signals and records."""

    def __init__(
        self,
        settings: Settings,
        role: str,
        queues: Sequence[str],
        concurrency: int,
        shutdown_timeout: float,
    ) -> None:
        self.settings = settings
        self.role = role
        self.queues = list(queues)
        self.concurrency = concurrency
        self.shutdown_timeout = shutdown_timeout
        self.name = process_name(role)
        self.stop_signal: int | None = None
        self.worker: Worker | None = None

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

    async def run(self) -> int:
        """Run until stopped; return the process exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

        app = build_app(self.settings, self.role)
        async with app.open_async():
            self.worker = Worker(
                app=app,
                queues=self.queues,
                name=self.name,
                concurrency=self.concurrency,
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
            await self._register(app, run_task)
            try:
                await run_task
            except Exception as exc:
                logger.error(
                    "Worker %s stopped on an error: %s", self.name, exc,
                    extra={"action": "worker_crashed", "process_name": self.name},
                    exc_info=exc,
                )
                return 1
            finally:
                await self._mark_stopped(app)
                await http.close_client()

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

    async def _register(self, app: object, run_task: asyncio.Task[None]) -> None:
        assert self.worker is not None
        while self.worker.worker_id is None and not run_task.done():
            await asyncio.sleep(0.02)
        if self.worker.worker_id is None:
            return
        self._registered_id = self.worker.worker_id
        try:
            await self.worker.app.connector.execute_query_async(
                REGISTER_PROCESS,
                worker_id=self.worker.worker_id,
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
            return
        logger.info(
            "Worker %s registered as Procrastinate worker %s on queues %s, "
            "concurrency %d", self.name, self.worker.worker_id,
            ",".join(self.queues), self.concurrency,
            extra={"action": "worker_registered", "process_name": self.name,
                   "worker_id": self.worker.worker_id},
        )

    async def _mark_stopped(self, app: object) -> None:
        worker_id = getattr(self, "_registered_id", None)
        if worker_id is None or self.worker is None:
            return
        try:
            await self.worker.app.connector.execute_query_async(
                MARK_STOPPED, worker_id=worker_id
            )
        except Exception as exc:  # noqa: BLE001 - the database may be gone
            logger.warning("Could not mark worker %s stopped: %s", self.name, exc,
                           extra={"action": "worker_record_failed"})


def main(role: str) -> None:
    """Entry point of the worker and scheduler processes."""
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        fail_fast(exc)
        return
    configure_logging(settings, process_name=process_name(role))
    try:
        url = require_database_url(settings)
        wait_for_database(url, settings, role=role)
    except (ConfigurationError, SchemaMismatchError) as exc:
        fail_fast(exc)
        return
    except StopRequested:
        logger.info("Stopped while waiting for the database",
                    extra={"action": "stopped_during_startup"})
        sys.exit(0)

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
