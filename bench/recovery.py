"""Recovery: seconds from SIGKILL of a worker in the middle of a job to its rerun.

Two product workers and the product's scheduler run as bench processes (the
scheduler's stalled-job sweep is the one under test). One ``bench_hold`` job is
deferred. Once it started, the worker holding it (found through worker_processes)
gets SIGKILL. The time runs until the job's second ``started`` event, which the
surviving worker records after the sweep gave the job back to the queue.
The default settings need up to STALLED_JOB_THRESHOLD + STALLED_JOB_CHECK_INTERVAL
(two minutes), so that case runs once; the tightest settings run BENCH_RUNS times.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
import time
from pathlib import Path

import psycopg

from bench.config import BenchConfig
from bench.database import BenchServer, reset_jobs
from bench.drain import stop_all
from bench.processes import (
    Child,
    bench_environment,
    bench_worker_command,
    start_child,
    wait_until,
)
from bench.report import Target, format_runs, median, say, section
from bench.tasks import HOLD, defer_batches
from workers.settings import load_settings

logger = logging.getLogger(__name__)

TIGHTEST = {"HEARTBEAT_INTERVAL": "1", "STALLED_JOB_THRESHOLD": "3",
            "STALLED_JOB_CHECK_INTERVAL": "1", "WORKER_SHUTDOWN_TIMEOUT": "1",
            "SCHEDULER_SHUTDOWN_TIMEOUT": "1"}
TIGHT_GOAL_S = 30.0
START_TIMEOUT = 60.0  # seconds for the processes to register
MARGIN_S = 60.0  # seconds beyond the expected bound before a run is abandoned


POLL_INTERVAL = 0.1  # seconds between two looks at the job's events


def _query(conn: psycopg.Connection, sql: str,
           *params: object) -> tuple[object, ...] | None:
    return conn.execute(sql, params).fetchone()


def _count(conn: psycopg.Connection, sql: str, *params: object) -> int:
    row = _query(conn, sql, *params)
    return int(row[0]) if row and row[0] is not None else 0


def recover_once(url: str, run_dir: Path, settings: dict[str, str]) -> float:
    """Kill the worker running a held job; return the seconds until it reruns."""
    reset_jobs(url)
    environment = bench_environment(url, run_dir, **settings)
    scheduler = start_child("scheduler", bench_worker_command("product",
                                                              "scheduler"),
                            environment, run_dir)
    workers = [start_child(f"worker-{index}", bench_worker_command("product"),
                           environment, run_dir) for index in range(2)]
    children = [scheduler, *workers]
    conn = psycopg.connect(url, autocommit=True)
    try:
        wait_until(lambda: _count(conn, "SELECT count(*) FROM worker_processes")
                   >= 3, START_TIMEOUT, "the workers and scheduler to register",
                   children, interval=POLL_INTERVAL)
        asyncio.run(defer_batches(url, [HOLD], 1))
        job = _query(conn, "SELECT id FROM procrastinate_jobs WHERE task_name = %s",
                     HOLD)
        assert job is not None
        job_id = job[0]

        def starts() -> int:
            return _count(conn, "SELECT count(*) FROM procrastinate_events "
                               "WHERE job_id = %s AND type = 'started'", job_id)

        wait_until(lambda: starts() >= 1, START_TIMEOUT, "the held job to start",
                   children, interval=POLL_INTERVAL)
        row = _query(conn, "SELECT w.pid FROM procrastinate_jobs j JOIN "
                          "worker_processes w ON w.worker_id = j.worker_id "
                          "WHERE j.id = %s", job_id)
        holders = [child for child in workers
                   if row is not None and child.pid == row[0]]
        if not holders:
            raise RuntimeError(f"job {job_id} is held by no bench worker "
                               f"(worker_processes pid {row})")
        holder = holders[0]
        killed_at = time.time()
        holder.kill(signal.SIGKILL)
        survivors = [child for child in children if child is not holder]
        bound = _bound(settings)
        wait_until(lambda: starts() >= 2, bound + MARGIN_S,
                   "the killed job to run again", survivors, interval=POLL_INTERVAL)
        started = _query(conn, "SELECT extract(epoch FROM max(at)) FROM "
                              "procrastinate_events WHERE job_id = %s AND "
                              "type = 'started'", job_id)
        assert started is not None
        return float(started[0]) - killed_at  # type: ignore[arg-type]
    finally:
        conn.close()
        stop_all(children)


def _bound(settings: dict[str, str]) -> float:
    values = load_settings(settings)
    return values.stalled_job_threshold + values.stalled_job_check_interval


def run_recovery(config: BenchConfig, server: BenchServer) -> list[Target]:
    """Measure recovery with default and tightest settings; return the targets."""
    section("recovery: SIGKILL of the worker running a job, until the job runs "
            "again")
    url = server.new_database("bench_recovery")
    targets = []
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as folder:
        run_dir = Path(folder)
        for name, settings, runs in (("recovery_default", {}, 1),
                                     ("recovery_tightest", TIGHTEST, config.runs)):
            bound = _bound(settings)
            shown = ", ".join(f"{key}={value}" for key, value in settings.items())
            seconds = []
            for run in range(runs):
                seconds.append(recover_once(url, run_dir, settings))
                say(f"{name} run {run + 1}: {seconds[-1]:.2f} s "
                    f"({shown or 'default settings'})")
            say(f"{name}: {format_runs(seconds, 's', 2)}")
            worst = max(seconds)
            goal = f"<= {bound:g} s (STALLED_JOB_THRESHOLD + " \
                   "STALLED_JOB_CHECK_INTERVAL)"
            met = worst <= bound
            if settings is TIGHTEST:
                goal += f" and < {TIGHT_GOAL_S:g} s"
                met = met and worst < TIGHT_GOAL_S
            targets.append(Target(
                name, f"worst {worst:.2f} s, median {median(seconds):.2f} s",
                goal, met))
    return targets
