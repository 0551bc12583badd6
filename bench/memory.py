"""Memory: resident size of each process kind while the fleet drains many jobs.

BENCH_MEMORY_JOBS jobs (half store a result row) are seeded, then two product
workers (the default stack shape), the product scheduler and gunicorn (default
WEB_WORKERS) run while two clients browse the panel. VmRSS of every process is read
from /proc/PID/status after each tenth of the jobs finished. The figure that counts
is the growth from the sample at 10,000 finished jobs to the end. "Flat" means that
growth stays within the noise allowance: max(FLAT_ALLOWANCE_KIB, FLAT_ALLOWANCE
of the first sample).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
from pathlib import Path

import httpx

from bench.config import BenchConfig
from bench.database import BenchServer, reset_jobs
from bench.drain import POLL_INTERVAL, PRODUCT_TASKS, FinishedJobs, stop_all
from bench.processes import (
    Child,
    bench_environment,
    bench_worker_command,
    rss_kib,
    start_child,
    wait_until,
)
from bench.report import Target, say, section
from bench.tasks import defer_batches
from bench.web import Panel
from workers.settings import load_settings

logger = logging.getLogger(__name__)

FLAT_ALLOWANCE_KIB = 3 * 1024  # absolute part of the noise allowance
FLAT_ALLOWANCE = 0.05  # relative part, of the first sample
DRAIN_TIMEOUT = 1800.0  # seconds for the whole drain
BROWSE_PAUSE = 0.2  # seconds between two page requests of one client
BROWSED = ("/", "/jobs", "/jobs?status=succeeded", "/queues", "/workers", "/jobs/1")


def _browse(panel: Panel, stop: threading.Event) -> None:
    with contextlib.closing(panel.client()) as client:
        while not stop.is_set():
            for path in BROWSED:
                try:
                    client.get(path)
                except httpx.HTTPError as exc:
                    logger.warning("panel request %s failed: %s", path, exc)
                if stop.wait(BROWSE_PAUSE):
                    return


def _sample(kinds: dict[str, list[int]]) -> dict[str, list[int]]:
    return {kind: [rss_kib(pid) for pid in pids] for kind, pids in kinds.items()}


def start_fleet(url: str, run_dir: Path) -> list[Child]:
    """Start the default number of product workers, then the scheduler (last)."""
    defaults = load_settings({})
    environment = bench_environment(url, run_dir)
    children = [
        start_child(f"worker-{index}", bench_worker_command("product"),
                    environment, run_dir)
        for index in range(defaults.worker_processes)
    ]
    children.append(start_child(
        "scheduler", bench_worker_command("product", "scheduler"),
        environment, run_dir))
    return children


def run_memory(config: BenchConfig, server: BenchServer) -> list[Target]:
    """Drain BENCH_MEMORY_JOBS jobs while sampling RSS; return the memory target."""
    jobs = config.memory_jobs
    first_at = config.memory_first_sample
    section(f"memory: VmRSS while draining {jobs} jobs, first sample at "
            f"{first_at} finished")
    url = server.new_database("bench_memory")
    reset_jobs(url)
    asyncio.run(defer_batches(url, PRODUCT_TASKS, jobs))
    marks = sorted({first_at, *range(first_at, jobs + 1, max(jobs // 10, 1)),
                    jobs})
    samples: list[tuple[int, dict[str, list[int]]]] = []

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder, \
            Panel(url, Path(folder)) as panel:
        children = start_fleet(url, Path(folder))
        stop = threading.Event()
        browsers = [threading.Thread(target=_browse, args=(panel, stop),
                                     daemon=True) for _ in range(2)]
        for thread in browsers:
            thread.start()
        kinds = {"worker": [child.pid for child in children[:-1]],
                 "scheduler": [children[-1].pid],
                 "gunicorn worker": panel.worker_pids()}

        try:
            with FinishedJobs(url) as finished:
                for mark in marks:
                    wait_until(lambda: finished.count() >= mark, DRAIN_TIMEOUT,
                               f"{mark} finished jobs", children,
                               interval=POLL_INTERVAL)
                    samples.append((mark, _sample(kinds)))
                    say(f"at {mark} jobs: " + "; ".join(
                        f"{kind} " + ", ".join(f"{kib / 1024:.1f}" for kib in values)
                        + " MiB" for kind, values in samples[-1][1].items()))
        finally:
            stop.set()
            for thread in browsers:
                thread.join(10)
            stop_all(children)

    return [_target(samples, first_at)]


def _target(samples: list[tuple[int, dict[str, list[int]]]],
            first_at: int) -> Target:
    first = next(values for mark, values in samples if mark == first_at)
    last = samples[-1][1]
    growths = []
    flat = True
    for kind, values in first.items():
        for index, start in enumerate(values):
            growth = last[kind][index] - start
            allowance = max(FLAT_ALLOWANCE_KIB, start * FLAT_ALLOWANCE)
            flat = flat and growth <= allowance
            growths.append(f"{kind} {growth / 1024:+.1f} MiB")
    return Target(
        "memory_flat",
        f"growth from {first_at} to {samples[-1][0]} jobs: " + ", ".join(growths),
        f"each process within max({FLAT_ALLOWANCE_KIB // 1024} MiB, "
        f"{FLAT_ALLOWANCE:.0%}) of its size at {first_at} jobs", flat,
    )
