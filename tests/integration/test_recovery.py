"""The stalled-job sweep against real worker processes killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

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
from workers.app import build_app
from workers.recovery import RecoveryReport, recover_stalled_jobs
from workers.settings import Settings

# seconds, STALLED_JOB_THRESHOLD in tests.support.faults: above the shutdown
# timeouts plus one heartbeat interval, as the settings require.
THRESHOLD = 7.0

ANY_QUEUE_CHANNEL = "procrastinate_any_queue_v1"


def sweep(settings: Settings, threshold: float = THRESHOLD) -> RecoveryReport:
    """Run one stalled-job sweep on a freshly opened App."""

    async def run() -> RecoveryReport:
        app = build_app(settings, "scheduler")
        async with app.open_async():
            return await recover_stalled_jobs(app, threshold)

    return asyncio.run(run())


def start_and_kill(
    database_url: str, upstream: Upstream, tmp_path: Path, path: str = "/slow",
    attempts_before: int = 0,
) -> tuple[int, int]:
    """Run a held job on a worker process, SIGKILL it; return (job id, worker id)."""
    upstream.hold(path, seconds=120, times=1)
    environment = fleet_environment(database_url, upstream.url)
    settings = fleet_settings(database_url, upstream.url)
    job_id = defer_job(settings, "call_api", method="GET", path=path)
    if attempts_before:
        query(database_url, "UPDATE procrastinate_jobs SET attempts = %s WHERE id = %s",
              (attempts_before, job_id))
    with WorkerProcess(environment, tmp_path, name="worker_00") as process:
        worker_id = process.wait_registered()
        upstream.wait_for_count(path, 1, timeout=10)
        wait_for_status(database_url, job_id, "doing", timeout=5)
        process.signal(signal.SIGKILL)
        process.wait(10)
    return job_id, worker_id


def test_killed_worker_job_retried(
    database_url: str, upstream: Upstream, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "workers.recovery")
    job_id, dead_worker = start_and_kill(database_url, upstream, tmp_path)
    settings = fleet_settings(database_url, upstream.url)

    assert sweep(settings).retried == []
    assert job(database_url, job_id)["status"] == "doing"

    killed_at = time.monotonic()
    report = wait_until(
        lambda: sweep(settings).retried, THRESHOLD + 3, "the sweep to retry the job"
    )
    assert report == [job_id]
    assert time.monotonic() - killed_at <= THRESHOLD + 2
    row = job(database_url, job_id)
    assert row["status"] == "todo"
    assert row["attempts"] == 1

    lines = [r for r in caplog.records if getattr(r, "action", "") ==
             "stalled_job_recovered"]
    assert len(lines) == 1
    assert lines[0].job_id == job_id
    assert lines[0].old_worker_id == dead_worker
    assert str(job_id) in lines[0].getMessage()
    assert str(dead_worker) in lines[0].getMessage()
    summaries = [r for r in caplog.records if getattr(r, "action", "") ==
                 "stalled_jobs_swept"]
    assert summaries[-1].retried == 1

    (lost,) = attempts(database_url, job_id)
    assert lost["outcome"] == "worker_lost"
    assert lost["worker_id"] == dead_worker
    assert lost["process_name"] == "worker_00"
    assert lost["pid"] is not None

    with InProcessWorker(settings):
        wait_for_status(database_url, job_id, "succeeded", timeout=10)
    kinds = [e["type"] for e in events(database_url, job_id)]
    assert kinds.count("started") == 2
    assert kinds.count("succeeded") == 1
    assert upstream.count("/slow") == 2


def test_pruned_worker_row_still_recovered(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    job_id, dead_worker = start_and_kill(database_url, upstream, tmp_path)
    environment = fleet_environment(database_url, upstream.url)
    time.sleep(0)  # the heartbeat of the dead worker ages from here on
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM procrastinate_workers WHERE id = %s "
            "AND last_heartbeat < now() - make_interval(secs => %s)",
            (dead_worker, THRESHOLD),
        ),
        THRESHOLD + 3,
        "the dead worker's heartbeat to pass the threshold",
    )
    # A restarting worker prunes worker rows whose heartbeat is too old.
    with WorkerProcess(environment, tmp_path, name="worker_01") as restarted:
        restarted.wait_registered()
        gone = query(database_url, "SELECT 1 FROM procrastinate_workers WHERE id = %s",
                     (dead_worker,))
        assert gone == []
        assert job(database_url, job_id)["worker_id"] is None
        restarted.signal(signal.SIGTERM)
        assert restarted.wait(15) == 0

    settings = fleet_settings(database_url, upstream.url)
    assert sweep(settings).retried == [job_id]
    assert job(database_url, job_id)["status"] == "todo"
    (lost,) = attempts(database_url, job_id)
    assert lost["worker_id"] is None


def test_live_worker_job_left_alone(database_url: str, upstream: Upstream) -> None:
    upstream.hold("/slow", seconds=6)
    settings = fleet_settings(
        database_url, upstream.url, JOB_TIMEOUT="30", HTTP_TIMEOUT="10"
    )
    with InProcessWorker(settings):
        job_id = defer_job(settings, "call_api", method="GET", path="/slow")
        wait_for_status(database_url, job_id, "doing", timeout=5)
        upstream.wait_for_count("/slow", 1, timeout=5)
        # Older than the threshold by start time, but its worker heartbeats.
        wait_until(
            lambda: query(
                database_url,
                "SELECT 1 FROM procrastinate_events WHERE job_id = %s "
                "AND type = 'started' AND at < now() - interval '3.5 seconds'",
                (job_id,),
            ),
            10,
            "the job to run longer than the threshold",
        )
        report = sweep(settings)
        wait_for_status(database_url, job_id, "succeeded", timeout=10)
    assert report.retried == []
    assert report.failed == []
    assert upstream.count("/slow") == 1


def test_last_attempt_lost_fails_job(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    job_id, _ = start_and_kill(database_url, upstream, tmp_path, attempts_before=4)
    settings = fleet_settings(database_url, upstream.url)
    report = wait_until(
        lambda: sweep(settings).failed, THRESHOLD + 3, "the sweep to fail the job"
    )
    assert report == [job_id]
    row = job(database_url, job_id)
    assert row["status"] == "failed"
    assert row["attempts"] == 5


def test_concurrent_sweeps_retry_once(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    job_id, _ = start_and_kill(database_url, upstream, tmp_path)
    settings = fleet_settings(database_url, upstream.url)
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM procrastinate_workers w JOIN procrastinate_jobs j "
            "ON j.worker_id = w.id WHERE j.id = %s "
            "AND w.last_heartbeat < now() - make_interval(secs => %s)",
            (job_id, THRESHOLD + 0.2),
        ),
        THRESHOLD + 3,
        "the job's worker to count as dead",
    )

    async def two_sweeps() -> list[RecoveryReport]:
        apps = [build_app(settings, "scheduler") for _ in range(2)]
        async with apps[0].open_async(), apps[1].open_async():
            return list(await asyncio.gather(
                *(recover_stalled_jobs(app, THRESHOLD) for app in apps)
            ))

    reports = asyncio.run(two_sweeps())
    retried = [job_id for report in reports for job_id in report.retried]
    assert retried == [job_id]
    assert job(database_url, job_id)["attempts"] == 1
    assert len(attempts(database_url, job_id)) == 1


def test_scheduler_sweeps_on_schedule(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    settings = fleet_settings(
        database_url, upstream.url, STALLED_JOB_CHECK_INTERVAL="1"
    )
    job_id, _ = start_and_kill(database_url, upstream, tmp_path)
    killed_at = time.monotonic()
    with InProcessWorker(settings, role="scheduler", queues=["maintenance"],
                         concurrency=2):
        wait_for_status(database_url, job_id, "todo", timeout=THRESHOLD + 5)
        recovered_after = time.monotonic() - killed_at
    assert recovered_after <= THRESHOLD + 1 + 2
    sweeps = query(
        database_url,
        "SELECT status, count(*) AS n FROM procrastinate_jobs "
        "WHERE task_name = 'retry_stalled_jobs' GROUP BY status",
    )
    assert {row["status"] for row in sweeps} <= {"succeeded", "todo", "doing"}


def listen(database_url: str, channels: list[str]) -> psycopg.Connection:
    """Open an autocommit connection listening on ``channels``."""
    conn = psycopg.connect(database_url, autocommit=True)
    for channel in channels:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    return conn


def received(conn: psycopg.Connection, count: int) -> list[psycopg.Notify]:
    """Return the next ``count`` notifications, or fewer after 10 s."""
    return list(conn.notifies(timeout=10, stop_after=count))


def test_recovered_job_sends_inserted_notification(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    job_id, _ = start_and_kill(database_url, upstream, tmp_path)
    settings = fleet_settings(database_url, upstream.url)
    queue = job(database_url, job_id)["queue_name"]
    queue_channel = f"procrastinate_queue_v1#{queue}"

    with listen(database_url, [ANY_QUEUE_CHANNEL, queue_channel]) as conn:
        # What Procrastinate's insert trigger sends, for comparison.
        new_job = defer_job(settings, "fetch_joke")
        assert job(database_url, new_job)["queue_name"] == queue
        inserted = received(conn, 2)
        wait_until(
            lambda: sweep(settings).retried, THRESHOLD + 3, "the sweep to retry the job"
        )
        recovered = received(conn, 2)

    assert job(database_url, job_id)["status"] == "todo"
    assert {n.channel for n in inserted} == {ANY_QUEUE_CHANNEL, queue_channel}
    assert {n.channel for n in recovered} == {ANY_QUEUE_CHANNEL, queue_channel}
    for notification in recovered:
        payload = json.loads(notification.payload)
        assert payload == {"type": "job_inserted", "job_id": job_id}
    # The same text up to the job id, so any listener parses both alike.
    trigger_text = inserted[0].payload.replace(str(new_job), "ID")
    assert recovered[0].payload.replace(str(job_id), "ID") == trigger_text


def test_recovered_job_wakes_idle_worker(
    database_url: str, upstream: Upstream, tmp_path: Path,
) -> None:
    # With a poll every 300 s, only a notification can start the job within
    # the waits below.
    job_id, _ = start_and_kill(database_url, upstream, tmp_path)
    settings = fleet_settings(database_url, upstream.url, WORKER_POLL_INTERVAL="300")
    queue = job(database_url, job_id)["queue_name"]

    with InProcessWorker(settings):
        # The worker listens on its queues' channels in order, the job's last.
        assert settings.worker_queues[-1] == queue
        wait_until(
            lambda: query(
                database_url,
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle' AND query LIKE %s",
                (f'LISTEN "procrastinate_queue_v1#{queue}"%',),
            ),
            10,
            "the in-process worker to listen",
        )
        wait_until(
            lambda: sweep(settings).retried, THRESHOLD + 3, "the sweep to retry the job"
        )
        wait_for_status(database_url, job_id, "succeeded", timeout=10)

    times = [(e["type"], e["at"]) for e in events(database_url, job_id)]
    retried_at = [at for kind, at in times if kind == "deferred_for_retry"][-1]
    started_at = [at for kind, at in times if kind == "started"][-1]
    assert (started_at - retried_at).total_seconds() < 2.0
    assert upstream.count("/slow") == 2
