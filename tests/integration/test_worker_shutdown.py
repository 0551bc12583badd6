"""Warm shutdown of a worker process on SIGTERM, and its exit codes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg

from tests.support.faults import (
    InProcessWorker,
    WorkerProcess,
    attempts,
    defer_job,
    events,
    fleet_environment,
    fleet_settings,
    job,
    query,
    wait_for_status,
    wait_until,
)
from tests.support.upstream import Upstream

SHUTDOWN_TIMEOUT = 3.0  # seconds, WORKER_SHUTDOWN_TIMEOUT in these tests


def start_worker(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> WorkerProcess:
    environment = fleet_environment(
        database_url, upstream.url,
        WORKER_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT), HTTP_TIMEOUT="30",
    )
    process = WorkerProcess(environment, tmp_path, name="worker_00").start()
    process.wait_registered()
    return process


def test_sigterm_finishes_short_job(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.hold("/slow", seconds=1.5, times=1)
    settings = fleet_settings(database_url, upstream.url)
    with start_worker(database_url, upstream, tmp_path) as process:
        running = defer_job(settings, "call_api", method="GET", path="/slow")
        upstream.wait_for_count("/slow", 1, timeout=10)
        process.signal(signal.SIGTERM)
        process.wait_for_log("warm shutdown", timeout=5)
        waiting = defer_job(settings, "fetch_joke")
        assert process.wait(SHUTDOWN_TIMEOUT + 10) == 0

    assert job(database_url, running)["status"] == "succeeded"
    assert job(database_url, waiting)["status"] == "todo"
    assert upstream.count("/jokes/random") == 0
    log = process.log()
    assert "Worker worker_00 stopped" in log
    assert "Traceback" not in log


def test_sigterm_requeues_long_job(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.hold("/slow", seconds=60, times=1)
    settings = fleet_settings(database_url, upstream.url)
    with start_worker(database_url, upstream, tmp_path) as process:
        job_id = defer_job(settings, "call_api", method="GET", path="/slow")
        upstream.wait_for_count("/slow", 1, timeout=10)
        signalled = time.monotonic()
        process.signal(signal.SIGTERM)
        assert process.wait(SHUTDOWN_TIMEOUT + 10) == 0
        stopped_after = time.monotonic() - signalled

    assert SHUTDOWN_TIMEOUT - 0.5 <= stopped_after <= SHUTDOWN_TIMEOUT + 5
    row = job(database_url, job_id)
    assert row["status"] == "todo"
    assert row["attempts"] == 1
    (interrupted,) = attempts(database_url, job_id)
    assert interrupted["outcome"] == "interrupted"
    held = upstream.requests("/slow")[0]
    assert held.client_closed

    with InProcessWorker(settings):
        wait_for_status(database_url, job_id, "succeeded", timeout=10)
    kinds = [event["type"] for event in events(database_url, job_id)]
    assert "aborted" not in kinds
    assert kinds.count("deferred_for_retry") == 1
    assert kinds.count("succeeded") == 1
    assert upstream.count("/slow") == 2


def test_second_sigterm_keeps_waiting(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.hold("/slow", seconds=1.5, times=1)
    settings = fleet_settings(database_url, upstream.url)
    with start_worker(database_url, upstream, tmp_path) as process:
        job_id = defer_job(settings, "call_api", method="GET", path="/slow")
        upstream.wait_for_count("/slow", 1, timeout=10)
        process.signal(signal.SIGTERM)
        process.wait_for_log("warm shutdown", timeout=5)
        process.signal(signal.SIGTERM)
        process.wait_for_log("again; still waiting", timeout=5)
        assert process.wait(SHUTDOWN_TIMEOUT + 10) == 0
    assert job(database_url, job_id)["status"] == "succeeded"


def test_sigint_stops_cleanly(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    with start_worker(database_url, upstream, tmp_path) as process:
        process.signal(signal.SIGINT)
        assert process.wait(10) == 0
    assert "Received SIGINT" in process.log()


def test_stop_during_attempt_record_requeues(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    # The locked table plays the part of a stalled database: the failed attempt is
    # still writing its record when the shutdown timeout expires. The job must go
    # back to the queue, not end as aborted.
    upstream.respond("/flaky", status=500, times=1)
    settings = fleet_settings(database_url, upstream.url)
    blocker = psycopg.connect(database_url)
    try:
        blocker.execute("LOCK TABLE job_attempts IN EXCLUSIVE MODE")
        with start_worker(database_url, upstream, tmp_path) as process:
            job_id = defer_job(settings, "call_api", method="GET", path="/flaky")
            upstream.wait_for_count("/flaky", 1, timeout=10)
            wait_until(
                lambda: query(
                    database_url,
                    "SELECT 1 FROM pg_locks WHERE NOT granted "
                    "AND relation = 'job_attempts'::regclass",
                ),
                10, "the attempt record to wait for the table lock",
            )
            process.signal(signal.SIGTERM)
            process.wait_for_log("still running after graceful timeout",
                                 timeout=SHUTDOWN_TIMEOUT + 10)
            blocker.rollback()
            assert process.wait(10) == 0
    finally:
        blocker.close()

    row = job(database_url, job_id)
    assert row["status"] == "todo", row
    kinds = [event["type"] for event in events(database_url, job_id)]
    assert "aborted" not in kinds
    with InProcessWorker(settings):
        wait_for_status(database_url, job_id, "succeeded", timeout=10)
