"""Drain: jobs per second of the product's workers against bare Procrastinate.

Each run empties the job tables, seeds the jobs with ``batch_defer_async``, starts
the worker processes and waits until every job finished. The rate is the number of
jobs divided by the time from the first ``started`` event to the last ``succeeded``
or ``failed`` event in procrastinate_events, so process start-up is not counted.
Bare and product runs alternate, so that noise from other load on the machine
reaches both alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import tempfile
import time
from pathlib import Path

import psycopg

from bench.config import BenchConfig
from bench.database import BenchServer, reset_jobs
from bench.processes import (
    Child,
    bench_environment,
    bench_worker_command,
    cpu_seconds,
    start_child,
    tree_cpu_seconds,
    wait_until,
)
from bench.report import Target, format_ratio, format_runs, median, say, section
from bench.tasks import NOOP, STORE, defer_batches
from workers.settings import load_settings

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT = 600.0  # seconds one run may take before it counts as stuck
PRODUCT_TASKS = [NOOP, STORE]  # alternating batches: half store a result row
COMPARED = ((1, 10), (2, 10))  # (processes, concurrency) of bare and product
POLL_INTERVAL = 0.25  # seconds between two counts of finished jobs


@dataclasses.dataclass(frozen=True)
class DrainRun:
    """One drain: the jobs, the seconds from first start to last end, failures.

    The CPU figures are milliseconds per job, taken from /proc between the first
    tenth of the jobs and the last, so process start-up is not counted. They vary
    far less than rates when other work shares the machine.
    """

    jobs: int
    seconds: float
    failed: int
    worker_cpu_ms: float = 0.0
    database_cpu_ms: float = 0.0

    @property
    def rate(self) -> float:
        """Return the jobs per second of the run."""
        return self.jobs / self.seconds if self.seconds > 0 else 0.0


class FinishedJobs:
    """Counts finished jobs over one kept connection, so polling stays cheap."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.Connection | None = None

    def __enter__(self) -> FinishedJobs:
        self.conn = psycopg.connect(self.url, autocommit=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def count(self) -> int:
        """Return how many jobs succeeded or failed."""
        assert self.conn is not None, "use FinishedJobs as a context manager"
        row = self.conn.execute(
            "SELECT count(*) FROM procrastinate_jobs "
            "WHERE status IN ('succeeded', 'failed')"
        ).fetchone()
        assert row is not None
        return int(row[0])


def measure_span(url: str) -> tuple[float, int]:
    """Return the seconds from the first start to the last end, and the failures."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM max(at) FILTER (WHERE type IN "
            "('succeeded', 'failed')) - min(at) FILTER (WHERE type = 'started')), "
            "count(*) FILTER (WHERE type = 'failed') FROM procrastinate_events"
        ).fetchone()
    assert row is not None and row[0] is not None
    return float(row[0]), int(row[1])


def start_workers(kind: str, url: str, processes: int, concurrency: int,
                  run_dir: Path, **settings: str) -> list[Child]:
    """Start ``processes`` bench worker processes of ``kind`` (product or bare)."""
    environment = bench_environment(url, run_dir, **settings)
    return [
        start_child(f"{kind}-worker-{index}",
                    bench_worker_command(kind, concurrency=concurrency),
                    environment, run_dir)
        for index in range(processes)
    ]


def stop_all(children: list[Child]) -> None:
    """Send SIGTERM to every child, then wait for each."""
    for child in children:
        child.kill(signal.SIGTERM)
    for child in children:
        child.stop()


def drain_once(url: str, kind: str, processes: int, concurrency: int,
               jobs: int, run_dir: Path,
               server: BenchServer | None = None,
               database_pid: int | None = None) -> DrainRun:
    """Seed ``jobs`` jobs, drain them with fresh workers and measure the rate.

    With ``server``, the statements the drain ran are counted and printed per job.
    With ``database_pid``, the postmaster's CPU time per job is measured too.
    """
    reset_jobs(url)
    names = PRODUCT_TASKS if kind == "product" else [NOOP]
    asyncio.run(defer_batches(url, names, jobs))
    if server is not None:
        server.reset_statements(url)
    workers = start_workers(kind, url, processes, concurrency, run_dir)
    what = f"{kind} {processes}x{concurrency} draining {jobs} jobs"
    try:
        with FinishedJobs(url) as finished:
            wait_until(lambda: finished.count() >= jobs // 10, DRAIN_TIMEOUT, what,
                       workers, interval=POLL_INTERVAL)
            first = (finished.count(), _cpu(workers, database_pid))
            wait_until(lambda: finished.count() >= jobs, DRAIN_TIMEOUT, what,
                       workers, interval=POLL_INTERVAL)
            last = (finished.count(), _cpu(workers, database_pid))
    finally:
        stop_all(workers)
    if server is not None:
        _show_statements_per_job(server, url, kind, jobs)
    seconds, failed = measure_span(url)
    done = max(last[0] - first[0], 1)
    return DrainRun(
        jobs=jobs, seconds=seconds, failed=failed,
        worker_cpu_ms=(last[1][0] - first[1][0]) * 1000 / done,
        database_cpu_ms=(last[1][1] - first[1][1]) * 1000 / done,
    )


def _cpu(workers: list[Child], database_pid: int | None) -> tuple[float, float]:
    worker = sum(cpu_seconds(child.pid) for child in workers)
    database = tree_cpu_seconds(database_pid) if database_pid else 0.0
    return worker, database


def _show_statements_per_job(server: BenchServer, url: str, kind: str,
                             jobs: int) -> None:
    counts = server.count_statements(url)
    polling = sum(calls for text, calls in counts.calls.items()
                  if "count(*) FROM procrastinate_jobs" in text)
    say(f"  {kind} statements per job: {(counts.total - polling) / jobs:.2f} "
        f"({(counts.work - polling) / jobs:.2f} without BEGIN/COMMIT), of which:")
    for text, calls in sorted(counts.calls.items(), key=lambda item: -item[1]):
        if calls >= jobs // 10 and "count(*) FROM procrastinate_jobs" not in text:
            say(f"    {calls / jobs:.2f} x {' '.join(text.split())[:100]}")


def run_drain(config: BenchConfig, server: BenchServer) -> list[Target]:
    """Run every drain comparison and return the drain targets."""
    section(f"drain: {config.drain_jobs} no-op jobs per run, {config.runs} runs "
            "per figure, bare and product alternating")
    url = server.new_database("bench_drain")
    counted = server.has_statements
    defaults = load_settings({})
    default_shape = (defaults.worker_processes, defaults.worker_concurrency)
    rates: dict[tuple[str, int, int], list[float]] = {}
    cpu: dict[tuple[str, int, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as folder:
        run_dir = Path(folder)
        for run in range(config.runs):
            for processes, concurrency in COMPARED:
                for kind in ("bare", "product"):
                    started = time.monotonic()
                    # The last run of each shape also counts its statements.
                    last = run == config.runs - 1
                    result = drain_once(url, kind, processes, concurrency,
                                        config.drain_jobs, run_dir,
                                        server if counted and last else None,
                                        server.server_pid)
                    if result.failed:
                        say(f"warning: {result.failed} {kind} jobs failed; see "
                            "job_attempts")
                    rates.setdefault((kind, processes, concurrency), []).append(
                        result.rate)
                    say(f"run {run + 1} {kind} {processes}x{concurrency}: "
                        f"{result.rate:.1f} jobs/s ({result.jobs} jobs in "
                        f"{result.seconds:.2f} s; wall "
                        f"{time.monotonic() - started:.1f} s); CPU per job: "
                        f"workers {result.worker_cpu_ms:.2f} ms, database "
                        f"{result.database_cpu_ms:.2f} ms")
                    cpu.setdefault((kind, processes, concurrency), []).append(
                        result.worker_cpu_ms + result.database_cpu_ms)
    targets = []
    for processes, concurrency in COMPARED:
        bare = rates[("bare", processes, concurrency)]
        product = rates[("product", processes, concurrency)]
        shape = f"{processes}x{concurrency}"
        say(f"bare {shape}: {format_runs(bare, 'jobs/s')}")
        say(f"product {shape}: {format_runs(product, 'jobs/s')}")
        say(format_ratio(f"drain_{shape}", median(product), median(bare)))
        say(f"CPU per job {shape}, workers and database: bare "
            f"{median(cpu[('bare', processes, concurrency)]):.2f} ms, product "
            f"{median(cpu[('product', processes, concurrency)]):.2f} ms")
        share = median(product) / median(bare) if median(bare) else 0.0
        targets.append(Target(
            f"drain_{shape}",
            f"{share:.0%} of bare ({median(product):.0f} / {median(bare):.0f} "
            "jobs/s)",
            ">= 90% of bare", share >= 0.90,
        ))
    best_single = max(median(rates[("bare", 1, c)])
                      for p, c in COMPARED if p == 1)
    default_rate = median(rates[("product", *default_shape)]) \
        if ("product", *default_shape) in rates else 0.0
    targets.append(Target(
        "drain_default_stack",
        f"{default_rate:.0f} jobs/s (product {default_shape[0]}x"
        f"{default_shape[1]}, the default WORKER_PROCESSES x WORKER_CONCURRENCY)",
        f">= bare's best single-process figure, {best_single:.0f} jobs/s",
        default_rate >= best_single,
    ))
    return targets
