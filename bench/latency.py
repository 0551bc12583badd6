"""Latency from defer to start, with idle workers, p50 and p95.

The defer time is taken in this process just before the defer starts, which for the
panel is before the HTTP request is sent. The start time is the ``started`` event
that PostgreSQL records when a worker fetches the job. Both clocks are this
machine's.
Each sample waits until the previous job finished and then pauses a little, so the
workers are idle when the job arrives.

- anchor: bare sync ``defer()`` to a bare worker (1 process x 10);
- product, direct: the same defer to the product's workers (default stack shape),
  which separates the worker's pick-up from the panel's own time;
- product, panel: ``POST /defer/fetch_joke`` to the same workers, with a loopback
  upstream serving the task's HTTP call.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from bench.config import BenchConfig
from bench.database import BenchServer, reset_jobs
from bench.drain import start_workers, stop_all
from bench.processes import Child, wait_until
from bench.report import Target, format_ratio, percentile, say, section, unmeasured
from bench.tasks import NOOP, deferrer_app
from bench.web import Panel
from tests.support.forms import form_fields
from tests.support.upstream import Upstream
from workers.settings import load_settings

logger = logging.getLogger(__name__)

FORM_PATH = "/defer/fetch_joke"
JOB_TIMEOUT = 30.0  # seconds one sample may wait for its job to start and end
READY_INTERVAL = 0.2  # seconds between two looks for registered workers
_JOB_LOCATION = re.compile(r"/jobs/(\d+)")


def _started_at(conn: psycopg.Connection, job_id: int) -> float | None:
    row = conn.execute(
        "SELECT extract(epoch FROM at) FROM procrastinate_events "
        "WHERE job_id = %s AND type = 'started' ORDER BY id LIMIT 1", (job_id,)
    ).fetchone()
    return float(row[0]) if row else None


def _finished(conn: psycopg.Connection, job_id: int) -> bool:
    row = conn.execute(
        "SELECT status::text FROM procrastinate_jobs WHERE id = %s", (job_id,)
    ).fetchone()
    return row is not None and row[0] in ("succeeded", "failed")


def sample_latencies(url: str, defer: Callable[[], int], samples: int,
                     workers: list[Child]) -> list[float]:
    """Defer ``samples`` jobs one at a time; return each defer-to-start in ms."""
    latencies = []
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(samples + 1):
            time.sleep(random.uniform(0.02, 0.07))
            began = time.time()
            job_id = defer()
            wait_until(lambda: _finished(conn, job_id), JOB_TIMEOUT,
                       f"job {job_id} to finish", workers)
            started = _started_at(conn, job_id)
            assert started is not None, f"job {job_id} finished without starting"
            latencies.append((started - began) * 1000)
    return latencies[1:]  # the first sample warms connections and caches up


def _workers_ready(url: str, count: int) -> Callable[[], bool]:
    def ready() -> bool:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM procrastinate_workers"
                               ).fetchone()
        return row is not None and int(row[0]) >= count

    return ready


def _show(label: str, latencies: list[float]) -> tuple[float, float]:
    p50 = percentile(latencies, 0.5)
    p95 = percentile(latencies, 0.95)
    say(f"{label}: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(latencies):.1f} ms "
        f"({len(latencies)} samples)")
    return p50, p95


def run_latency(config: BenchConfig, server: BenchServer) -> list[Target]:
    """Measure defer-to-start latencies and return the latency target."""
    section(f"latency: defer to start, {config.latency_samples} samples each")
    url = server.new_database("bench_latency")
    defaults = load_settings({})
    shape = (defaults.worker_processes, defaults.worker_concurrency)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as folder:
        run_dir = Path(folder)
        app = deferrer_app(url)
        with app.open():
            task = app.tasks[NOOP]
            anchor = _measure_workers(url, "bare", (1, 10), run_dir, config,
                                      task.defer)
            anchor_p50, _ = _show("bare defer() to bare worker 1x10", anchor)
            direct = _measure_workers(url, "product", shape, run_dir, config,
                                      task.defer)
            _show(f"bare defer() to product workers {shape[0]}x{shape[1]}", direct)
        with Upstream() as upstream:
            panel_latencies = _measure_panel(url, shape, run_dir, config,
                                             upstream.url)
    goal = "p50 < 20 ms"
    if isinstance(panel_latencies, str):
        say(f"panel: pending ({panel_latencies})")
        return [unmeasured("defer_to_start_p50", goal, panel_latencies)]
    p50, p95 = _show("panel form to product workers", panel_latencies)
    say(format_ratio("defer_to_start_p50 (lower is better)", p50, anchor_p50))
    return [Target("defer_to_start_p50", f"{p50:.1f} ms (p95 {p95:.1f} ms)", goal,
                   p50 < 20.0)]


def _measure_workers(url: str, kind: str, shape: tuple[int, int], run_dir: Path,
                     config: BenchConfig, defer: Callable[[], int]) -> list[float]:
    reset_jobs(url)
    workers = start_workers(kind, url, shape[0], shape[1], run_dir)
    try:
        wait_until(_workers_ready(url, shape[0]), 60, f"{kind} workers to start",
                   workers, interval=READY_INTERVAL)
        return sample_latencies(url, defer, config.latency_samples, workers)
    finally:
        stop_all(workers)


def _measure_panel(url: str, shape: tuple[int, int], run_dir: Path,
                   config: BenchConfig, upstream_url: str) -> list[float] | str:
    reset_jobs(url)
    with Panel(url, run_dir, API_BASE_URL=upstream_url) as panel, \
            contextlib.closing(panel.client()) as client:
        page = client.get(FORM_PATH)
        if page.status_code != 200:
            return f"GET {FORM_PATH} returned status {page.status_code}"
        fields = form_fields(page.text)

        def defer_by_form() -> int:
            response = client.post(FORM_PATH, data=fields)
            match = _JOB_LOCATION.search(response.headers.get("location", ""))
            if response.status_code not in (302, 303) or match is None:
                raise RuntimeError(f"POST {FORM_PATH} returned status "
                                   f"{response.status_code} without a job page")
            return int(match.group(1))

        workers = start_workers("product", url, shape[0], shape[1], run_dir,
                                API_BASE_URL=upstream_url)
        try:
            wait_until(_workers_ready(url, shape[0]), 60,
                       "product workers to start", workers,
                       interval=READY_INTERVAL)
            return sample_latencies(url, defer_by_form, config.latency_samples,
                                    workers)
        finally:
            stop_all(workers)
