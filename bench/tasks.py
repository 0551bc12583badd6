"""Bench-only tasks, registered beside the product's own tasks in bench processes.

The product worker runs ``bench_noop`` (does nothing) and ``bench_store`` (stores
its idempotent result row in job_results) under every middleware; the bare
Procrastinate worker runs ``bench_noop`` with nothing around it. ``bench_hold``
holds its first attempt for an hour, so that a worker can be killed in the middle
of it, and returns at once when run again.
"""

from __future__ import annotations

import asyncio
import logging

import procrastinate
from procrastinate import JobContext

from workers.settings import Settings
from workers.tasks.catalog import TaskDescription
from workers.tasks.results import store_result

logger = logging.getLogger(__name__)

BENCH_QUEUE = "default"  # served by the product's workers with WORKER_QUEUES unset
NOOP = "bench_noop"
STORE = "bench_store"
HOLD = "bench_hold"
HOLD_SECONDS = 3600.0


async def noop(context: JobContext) -> None:
    """Do nothing, so that a run measures the queue and the middleware alone."""


async def store(context: JobContext) -> None:
    """Store this job's result row once, as the product's API tasks do."""
    await store_result(context, {"stored": True})


async def hold(context: JobContext) -> None:
    """Sleep through the first attempt; return at once on any later attempt."""
    if context.job.attempts == 0:
        await asyncio.sleep(HOLD_SECONDS)


async def bare_noop() -> None:
    """Do nothing, in the bare Procrastinate worker."""


def register_product_tasks(app: procrastinate.App, settings: Settings) -> None:
    """Register the bench tasks with the product's retry policy on ``app``."""
    from workers.app import retry_strategy

    for name, function in ((NOOP, noop), (STORE, store), (HOLD, hold)):
        description = TaskDescription(
            name=name, summary="benchmark task", queue=BENCH_QUEUE,
            user_facing=False,
        )
        app.task(
            name=name, queue=BENCH_QUEUE, pass_context=True,
            retry=retry_strategy(settings, description),
        )(function)


def register_bare_tasks(app: procrastinate.App) -> None:
    """Register the bare worker's no-op task on ``app``."""
    app.task(name=NOOP, queue=BENCH_QUEUE)(bare_noop)


def deferrer_app(url: str) -> procrastinate.App:
    """Return an unopened App that defers any bench task by name."""
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=url, min_size=1,
                                                 max_size=2)
    )
    for name in (NOOP, STORE, HOLD):
        app.task(name=name, queue=BENCH_QUEUE)(bare_noop)
    return app


async def defer_batches(url: str, names: list[str], count: int,
                        batch_size: int = 500) -> None:
    """Defer ``count`` jobs, cycling through ``names`` one batch at a time."""
    app = deferrer_app(url)
    async with app.open_async():
        done = 0
        index = 0
        while done < count:
            size = min(batch_size, count - done)
            task = app.tasks[names[index % len(names)]]
            await task.batch_defer_async(*({} for _ in range(size)))
            done += size
            index += 1
