"""A worker process across a PostgreSQL outage: it waits, reconnects and listens.

The test runs a PostgreSQL server of its own, so that stopping it touches no other
test. The outage lasts a few seconds here and 30 s with ``FULL=1``.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faults import (
    WorkerProcess,
    attempts,
    defer_job,
    events,
    fleet_environment,
    fleet_settings,
    job,
    wait_for_status,
    wait_until,
)
from tests.support.postgres import PostgresServer, create_database
from tests.support.upstream import Upstream
from workers.schema import apply_schema
from workers.startup import RECONNECT_MAX_DELAY

NOT_READY = re.compile(
    r"WARNING workers\.startup: Database at \S+ not ready \(attempt (\d+)\): .*; "
    r"retrying in ([0-9.]+) s"
)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """Yield a PostgreSQL server of this test alone, so it can be stopped."""
    with PostgresServer() as server:
        yield server


def assert_outage_logged_as_warning(log: str) -> None:
    """Check that worker_00 logged the lost database as a WARNING and nothing worse."""
    assert re.search(r"WARNING workers\.runner: Worker worker_00 lost the database",
                     log)
    assert " CRITICAL " not in log
    assert " ERROR " not in log
    assert "Traceback" not in log


# The outage tests poll for jobs only every POLL_SECONDS, so a job that starts
# within NOTIFY_BOUND seconds was woken by its NOTIFY.
POLL_SECONDS = "300"
NOTIFY_BOUND = 5.0


def start_latency(database_url: str, job_id: int) -> float:
    """Return the seconds between a job's deferred and started events."""
    times = {event["type"]: event["at"] for event in events(database_url, job_id)}
    return (times["started"] - times["deferred"]).total_seconds()


def test_worker_waits_out_outage(
    own_postgres: PostgresServer, upstream: Upstream, tmp_path: Path,
    full_run: bool,
) -> None:
    outage = 30 if full_run else 4
    database_url = create_database(own_postgres.url, "outage")
    apply_schema(database_url)
    environment = fleet_environment(database_url, upstream.url, DB_CONNECT_TIMEOUT="2",
                                    WORKER_POLL_INTERVAL=POLL_SECONDS)
    settings = fleet_settings(database_url, upstream.url)

    own_postgres.halt()
    with WorkerProcess(environment, tmp_path, name="worker_00") as process:
        # Started during the outage: it waits, one WARNING per attempt.
        process.wait_for_log(NOT_READY.pattern, timeout=outage + 10, count=4)
        wait_until(lambda: len(NOT_READY.findall(process.log())) >= outage // 2,
                   outage + 10, "the outage to go on")
        own_postgres.resume()
        process.wait_registered(timeout=20)

        attempts = NOT_READY.findall(process.log())
        numbers = [int(number) for number, _ in attempts]
        delays = [float(delay) for _, delay in attempts]
        assert numbers == list(range(1, len(numbers) + 1))
        assert delays == sorted(delays)
        assert max(delays) == RECONNECT_MAX_DELAY

        for _ in range(3):
            job_id = defer_job(settings, "fetch_joke")
            wait_for_status(database_url, job_id, "succeeded", timeout=10)
            assert start_latency(database_url, job_id) < NOTIFY_BOUND

        # Outage while running: the worker exits 1 for supervisord to restart it.
        own_postgres.halt()
        code = process.wait(outage + 30)
        own_postgres.resume()
    assert code == 1
    assert_outage_logged_as_warning(process.log())


def test_restarted_worker_listens_again(
    own_postgres: PostgresServer, upstream: Upstream, tmp_path: Path
) -> None:
    database_url = create_database(own_postgres.url, "listen")
    apply_schema(database_url)
    environment = fleet_environment(database_url, upstream.url, DB_CONNECT_TIMEOUT="2",
                                    WORKER_POLL_INTERVAL=POLL_SECONDS)
    settings = fleet_settings(database_url, upstream.url)

    with WorkerProcess(environment, tmp_path, name="worker_00") as first:
        first.wait_registered()
        own_postgres.halt()
        assert first.wait(30) == 1
    # What supervisord does next: start the program again while the database
    # is still down.
    with WorkerProcess(environment, tmp_path, name="worker_01") as second:
        second.wait_for_log(NOT_READY.pattern, timeout=10, count=2)
        own_postgres.resume()
        second.wait_registered(timeout=20)
        latencies = []
        for _ in range(3):
            job_id = defer_job(settings, "fetch_joke")
            wait_for_status(database_url, job_id, "succeeded", timeout=10)
            latencies.append(start_latency(database_url, job_id))
        second.signal(signal.SIGTERM)
        assert second.wait(15) == 0
    assert max(latencies) < NOTIFY_BOUND, latencies


def slow_job_through_outage(
    own_postgres: PostgresServer, upstream: Upstream, tmp_path: Path, *,
    database: str, hold: float, wait_for: str, **overrides: str,
) -> tuple[WorkerProcess, str, int, int]:
    """Run one slow call_api job and stop PostgreSQL while it runs.

    The server stays down until the worker logs ``wait_for`` (a regex). Return the
    worker, the database URL, the job id and the worker's exit code.
    """
    database_url = create_database(own_postgres.url, database)
    apply_schema(database_url)
    upstream.hold("/slow", seconds=hold, times=1)
    environment = fleet_environment(
        database_url, upstream.url, DB_CONNECT_TIMEOUT="2", **overrides
    )
    settings = fleet_settings(database_url, upstream.url)

    with WorkerProcess(environment, tmp_path, name="worker_00") as process:
        process.wait_registered()
        job_id = defer_job(settings, "call_api", method="GET", path="/slow")
        upstream.wait_for_count("/slow", 1, timeout=10)
        own_postgres.halt()
        process.wait_for_log(wait_for, timeout=20)
        own_postgres.resume()
        code = process.wait(60)
    return process, database_url, job_id, code


def test_outage_during_running_job_warns(
    own_postgres: PostgresServer, upstream: Upstream, tmp_path: Path
) -> None:
    # The database comes back while the worker still waits for its running job,
    # so its stop raises nothing. The exit must still read as an outage.
    process, database_url, job_id, code = slow_job_through_outage(
        own_postgres, upstream, tmp_path, database="short_outage", hold=60,
        wait_for=r"Side task \w+ failed|error connecting in",
        WORKER_SHUTDOWN_TIMEOUT="4",
    )

    assert code == 1
    assert_outage_logged_as_warning(process.log())
    assert job(database_url, job_id)["status"] == "todo"


def test_job_ended_during_outage_recorded(
    own_postgres: PostgresServer, upstream: Upstream, tmp_path: Path
) -> None:
    # The job succeeds while the database is down. Its end state is written once
    # the database is back, so stalled-job recovery does not run it again.
    process, database_url, job_id, code = slow_job_through_outage(
        own_postgres, upstream, tmp_path, database="end_during_outage", hold=3,
        wait_for=r"Could not write the result of job \d+, the database is "
                 "unreachable",
        WORKER_SHUTDOWN_TIMEOUT="30", STALLED_JOB_THRESHOLD="60",
    )

    assert code == 1
    log = process.log()
    assert_outage_logged_as_warning(log)
    assert re.search(rf"Wrote the result of job {job_id} after \d+ tries", log)
    row = job(database_url, job_id)
    assert row["status"] == "succeeded"
    assert row["attempts"] == 1
    assert [a["outcome"] for a in attempts(database_url, job_id)] == ["succeeded"]
    assert upstream.count("/slow") == 1
