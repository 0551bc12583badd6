"""The Procrastinate App and its connector, built per process after any fork."""

from __future__ import annotations

import datetime
from typing import Any

import procrastinate
import psycopg
import psycopg_pool
from procrastinate import manager
from procrastinate.jobs import Job, Status

from workers.end_state import FINISH_IF_HELD, RETRY_IF_HELD, write_status_if_held
from workers.identity import application_name
from workers.pool_check import RecentUseCheck
from workers.retry import BackoffRetry
from workers.settings import Settings
from workers.tasks import register_tasks
from workers.tasks.catalog import TASKS, TaskDescription, validate_arguments


def connection_kwargs(settings: Settings, role: str) -> dict[str, Any]:
    """Return psycopg connection options naming this process in pg_stat_activity."""
    return {
        "application_name": application_name(role),
        "connect_timeout": settings.db_connect_timeout,
    }


async def set_autocommit(conn: psycopg.AsyncConnection[Any]) -> None:
    """Put a new pooled connection in autocommit mode."""
    await conn.set_autocommit(True)


def worker_pool(**kwargs: Any) -> psycopg_pool.AsyncConnectionPool:
    """Create the async pool of an App, with autocommit and the cheaper check.

    Procrastinate passes ``check=AsyncConnectionPool.check_connection``, which costs
    one round trip per checkout. ``RecentUseCheck`` replaces it.
    """
    kwargs["check"] = RecentUseCheck()
    kwargs["configure"] = set_autocommit
    return psycopg_pool.AsyncConnectionPool(**kwargs)


class FleetJobManager(manager.JobManager):
    """Job manager that checks arguments at defer and outlasts outages at the end.

    The panel's form and API check arguments before they defer, and so does this
    manager for every other caller (``task.defer()`` in code, a shell), so one
    MAX_ARGUMENTS_BYTES limit and one set of argument rules apply to every defer.
    Invalid arguments raise InvalidTaskArguments and insert nothing. A job written
    to the table by other means is still checked again by the task when it runs.

    A worker writes a job's new status through ``finish_job`` or ``retry_job``.
    Both write only while the job is still doing for that worker, and call the
    database again after a connection error for up to ``END_STATE_WINDOW``
    seconds (``workers/end_state.py``).
    """

    def __init__(self, connector: procrastinate.BaseConnector, max_bytes: int
                 ) -> None:
        super().__init__(connector=connector)
        self.max_bytes = max_bytes

    def check(self, jobs: list[Job]) -> None:
        """Raise InvalidTaskArguments for the first job whose arguments are invalid."""
        for job in jobs:
            description = TASKS.get(job.task_name)
            if description is not None and description.user_facing:
                validate_arguments(job.task_name, job.task_kwargs, self.max_bytes)

    async def defer_job_async(self, job: Job, connection: Any | None = None) -> Job:
        self.check([job])
        return await super().defer_job_async(job, connection)

    def defer_job(self, job: Job, connection: Any | None = None) -> Job:
        self.check([job])
        return super().defer_job(job, connection)

    async def batch_defer_jobs_async(
        self, jobs: list[Job], connection: Any | None = None
    ) -> list[Job]:
        self.check(jobs)
        return await super().batch_defer_jobs_async(jobs, connection)

    def batch_defer_jobs(
        self, jobs: list[Job], connection: Any | None = None
    ) -> list[Job]:
        self.check(jobs)
        return super().batch_defer_jobs(jobs, connection)

    async def finish_job(self, job: Job, status: Status, delete_job: bool) -> None:
        if job.worker_id is None:
            # Not fetched by a worker, so no worker holds it.
            await super().finish_job(job=job, status=status, delete_job=delete_job)
            return
        await write_status_if_held(
            self.connector, FINISH_IF_HELD, job,
            f"the {status.value} status of job {job.id}",
            status=status.value, delete_job=delete_job,
        )

    async def retry_job(
        self,
        job: Job,
        retry_at: datetime.datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        lock: str | None = None,
    ) -> None:
        if job.worker_id is None:
            await super().retry_job(job=job, retry_at=retry_at, priority=priority,
                                    queue=queue, lock=lock)
            return
        await write_status_if_held(
            self.connector, RETRY_IF_HELD, job, f"the retry of job {job.id}",
            retry_at=retry_at or datetime.datetime.now(datetime.timezone.utc),
            new_priority=priority, new_queue_name=queue, new_lock=lock,
        )


def build_app(settings: Settings, role: str, *, pool_max_size: int | None = None
              ) -> procrastinate.App:
    """Build an unopened App with every task registered; nothing is connected yet."""
    if settings.database_url is None:
        from workers.startup import require_database_url

        require_database_url(settings)
    max_size = pool_max_size or settings.db_pool_max_size
    pool_timeout = max(settings.db_connect_timeout, 5)
    # The async pool's connections are in autocommit mode, so a query costs no
    # BEGIN and COMMIT. That changes no transaction, because the connector checks
    # out a connection per query, runs one statement and commits. Nothing in workers/
    # takes a connection itself (``pool.connection()``) or runs two statements in
    # one string, and the statements that need a lock (the sweep's FOR UPDATE)
    # take and use it within one statement.
    # ``autocommit`` goes through ``configure`` and not ``kwargs``: Procrastinate
    # opens its LISTEN connection with the pool's kwargs plus ``autocommit=True``,
    # which a second ``autocommit`` in kwargs would make a TypeError.
    # ``pool_factory`` is used by ``open_async`` only. The synchronous connector
    # (``App.open()``, or the panel's own pool) keeps psycopg's defaults.
    connector = procrastinate.PsycopgConnector(
        conninfo=settings.database_url,
        min_size=1,
        max_size=max_size,
        timeout=pool_timeout,
        # psycopg_pool retries a failed connection after 1, 2, 4, 8... s. Giving
        # up after pool_timeout lets the next checkout connect at once, so an
        # end-state write reaches a database that came back within seconds.
        reconnect_timeout=pool_timeout,
        kwargs=connection_kwargs(settings, role),
        pool_factory=worker_pool,
    )
    app = procrastinate.App(connector=connector)
    # Tasks read ``app.job_manager`` whenever they are configured, so every defer
    # through this App goes through the checked manager.
    app.job_manager = FleetJobManager(connector, settings.max_arguments_bytes)
    register_tasks(app, settings)
    return app


def retry_strategy(settings: Settings, description: TaskDescription) -> BackoffRetry:
    """Build a task's retry strategy from the settings and its own overrides."""
    return BackoffRetry(
        max_attempts=description.max_attempts or settings.retry_max_attempts,
        base_delay=(
            description.base_delay
            if description.base_delay is not None
            else settings.retry_base_delay
        ),
        max_delay=(
            description.max_delay
            if description.max_delay is not None
            else settings.retry_max_delay
        ),
        jitter=settings.retry_jitter == "full",
        retry_after_max=settings.retry_after_max,
    )
