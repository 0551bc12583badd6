"""The job timeout bounds a whole attempt, even against a body sent byte by byte."""

from __future__ import annotations



from tests.support.faults import (
    InProcessWorker,
    attempts,
    defer_jobs,
    events,
    fleet_settings,
    wait_for_status,
    wait_until,
)
from tests.support.upstream import Upstream


def test_slow_drip_bounded_by_job_timeout(
    database_url: str, upstream: Upstream, full_run: bool
) -> None:
    # Each byte arrives inside the read timeout, so only the job timeout ends it.
    if full_run:
        http_timeout, drip_interval, job_timeout = 5.0, 4.0, 30.0
    else:
        http_timeout, drip_interval, job_timeout = 1.0, 0.5, 3.0
    upstream.drip("/jokes/random", interval=drip_interval, total_seconds=600, times=1)
    settings = fleet_settings(
        database_url, upstream.url,
        WORKER_CONCURRENCY="1",
        HTTP_TIMEOUT=str(http_timeout),
        JOB_TIMEOUT=str(job_timeout),
        RETRY_BASE_DELAY="60", RETRY_MAX_DELAY="60", RETRY_JITTER="none",
    )
    with InProcessWorker(settings):
        first, second = defer_jobs(settings, "fetch_joke", [{}, {}])
        wait_for_status(database_url, second, "succeeded", timeout=job_timeout + 15)
        timed_out = wait_until(
            lambda: attempts(database_url, first), 5, "the timed-out attempt"
        )[0]
        first_row = wait_for_status(database_url, first, "todo", timeout=5)

    duration = timed_out["duration_ms"] / 1000
    assert job_timeout - 0.2 <= duration <= job_timeout + 1
    assert timed_out["outcome"] == "timeout"
    assert timed_out["error_type"] == "TimeoutError"
    assert timed_out["error_message"] == (
        f"job timed out after {job_timeout:g} s (job timeout)"
    )
    assert first_row["attempts"] == 1
    assert timed_out["next_attempt_at"] == first_row["scheduled_at"]

    second_started = [e["at"] for e in events(database_url, second)
                      if e["type"] == "started"]
    assert len(second_started) == 1
    slot_free_after = (second_started[0] - timed_out["ended_at"]).total_seconds()
    assert slot_free_after < 1.0

    dripped = upstream.requests("/jokes/random")[0]
    assert dripped.client_closed
    assert dripped.closed_at is not None
    assert dripped.closed_at - dripped.started_at <= job_timeout + 1.0


def test_timeout_retried_then_succeeds(database_url: str, upstream: Upstream) -> None:
    upstream.hold("/jokes/random", seconds=30, times=1)
    settings = fleet_settings(
        database_url, upstream.url, JOB_TIMEOUT="1",
        RETRY_BASE_DELAY="0.05", RETRY_MAX_DELAY="0.1",
    )
    with InProcessWorker(settings):
        (job_id,) = defer_jobs(settings, "fetch_joke", [{}])
        wait_for_status(database_url, job_id, "succeeded", timeout=15)

    rows = attempts(database_url, job_id)
    assert [row["outcome"] for row in rows] == ["timeout", "succeeded"]
    held = upstream.requests("/jokes/random")[0]
    assert held.client_closed
