"""Bench worker processes: python -m bench.worker product|bare [options].

``product`` runs the product's FleetWorker (its settings from the environment, the
JobMiddleware, its logging and records) with the bench tasks registered beside the
product's tasks. ``--role scheduler`` runs the scheduler the same way. ``bare`` runs
``procrastinate.App.run_worker_async`` with no middleware and no logging setup.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import sys

from typing import TYPE_CHECKING

import procrastinate

from bench.tasks import BENCH_QUEUE, register_bare_tasks, register_product_tasks

if TYPE_CHECKING:
    from workers.settings import Settings

logger = logging.getLogger(__name__)


def build_product_app(settings: Settings, role: str) -> procrastinate.App:
    """Build the product's App for ``role`` with the bench tasks added."""
    from workers.app import build_app

    app = build_app(settings, role)
    register_product_tasks(app, settings)
    return app


def run_product(role: str, concurrency: int | None) -> int:
    """Run the product's worker or scheduler until SIGTERM; return its exit code."""
    from workers import runner
    from workers.identity import process_name
    from workers.logs import configure_logging
    from workers.settings import load_settings

    settings = load_settings()
    configure_logging(settings, process_name=process_name(role))
    if role == "scheduler":
        queues = ["maintenance"]
        default_concurrency = 2
        timeout = settings.scheduler_shutdown_timeout
    else:
        queues = list(settings.worker_queues)
        default_concurrency = settings.worker_concurrency
        timeout = settings.worker_shutdown_timeout
    app = build_product_app(settings, role)
    arguments = (settings, role, queues, concurrency or default_concurrency,
                 timeout)
    if "app" in inspect.signature(runner.FleetWorker).parameters:
        fleet_worker = runner.FleetWorker(*arguments, app=app)
    else:
        # FleetWorker builds its own App: hand it the one with the bench tasks.
        runner.build_app = lambda settings, role, **kwargs: app  # type: ignore
        fleet_worker = runner.FleetWorker(*arguments)
    return asyncio.run(fleet_worker.run())


async def _run_bare(url: str, concurrency: int, pool_max_size: int) -> None:
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=url, min_size=1, max_size=pool_max_size
        )
    )
    register_bare_tasks(app)
    async with app.open_async():
        await app.run_worker_async(
            queues=[BENCH_QUEUE], concurrency=concurrency,
            name=f"bare-{os.getpid()}", delete_jobs="never",
            install_signal_handlers=True,
        )


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one bench worker process."""
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("kind", choices=["product", "bare"])
    parser.add_argument("--role", choices=["worker", "scheduler"], default="worker")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="jobs run at once; default WORKER_CONCURRENCY")
    args = parser.parse_args(argv)
    if args.kind == "product":
        return run_product(args.role, args.concurrency)
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        print("error: DATABASE_URL is not set; the bare worker needs it",
              file=sys.stderr)
        return 2
    pool_max_size = int(os.environ.get("DB_POOL_MAX_SIZE", "10"))
    asyncio.run(_run_bare(url, args.concurrency or 10, pool_max_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
