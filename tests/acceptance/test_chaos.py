"""Chaos under the real supervisord: a flaky upstream, killed workers, a database outage.

Every job posts to its own upstream path, ``/items/N``, so the upstream's records
show per job how many requests arrived and whether two were ever open at once. The
upstream answers a share of first requests with 500, 429 and Retry-After, a
slow-drip body, a hold past the job timeout or a connection reset, and a few paths
always with 404. Meanwhile the test SIGKILLs random worker processes, restarts the
worker group once with supervisorctl and stops PostgreSQL once.

By default the run is sized for CI (a few hundred jobs, a 5 s outage, a handful of
kills). ``FULL=1`` runs thousands of jobs, dozens of kills and a 30 s outage, and
writes its figures to test-artifacts/chaos-figures.json.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import defer_jobs, fleet_settings, query, wait_until
from tests.support.postgres import PostgresServer, create_database
from tests.support.stack import Stack
from tests.support.upstream import Upstream
from workers.schema import apply_schema

ARTIFACTS = Path(__file__).resolve().parents[1].parent / "test-artifacts"


@dataclasses.dataclass(frozen=True)
class ChaosSize:
    """How big one chaos run is."""

    jobs: int
    late_jobs: int  # deferred after the database outage
    kills: int
    outage_seconds: float
    deadline: float  # seconds for every job to end after the last fault


CI_SIZE = ChaosSize(jobs=240, late_jobs=60, kills=5, outage_seconds=5, deadline=150)
FULL_SIZE = ChaosSize(
    jobs=2400, late_jobs=600, kills=36, outage_seconds=30, deadline=600
)

# Share of jobs whose first request (or first two) the upstream fails, by fault.
FAULTS = (
    ("error_500", 0.15),
    ("error_500_twice", 0.08),
    ("rate_limited", 0.10),
    ("drip", 0.04),
    ("hold_past_timeout", 0.04),
    ("reset", 0.05),
    ("not_found", 0.03),
)
JOB_TIMEOUT = 3  # seconds
STACK_SETTINGS = {
    "WORKER_PROCESSES": "3",
    "WORKER_CONCURRENCY": "8",
    "HEARTBEAT_INTERVAL": "1",
    "STALLED_JOB_THRESHOLD": "5",
    "STALLED_JOB_CHECK_INTERVAL": "2",
    "RETRY_BASE_DELAY": "0.2",
    "RETRY_MAX_DELAY": "1",
    "RETRY_MAX_ATTEMPTS": "10",
    "RETRY_AFTER_MAX": "2",
    "JOB_TIMEOUT": str(JOB_TIMEOUT),
    "HTTP_TIMEOUT": "2",
    "WORKER_SHUTDOWN_TIMEOUT": "3",
    "SCHEDULER_SHUTDOWN_TIMEOUT": "2",
    "HEALTH_CHECK_CRON": "* * * * * */10",
    "DB_CONNECT_TIMEOUT": "2",
}


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """Yield a PostgreSQL server of this test alone, so it can be stopped."""
    with PostgresServer() as server:
        yield server


def script_upstream(upstream: Upstream, count: int, rng: random.Random
                    ) -> dict[int, str]:
    """Give each path /items/N a fault, or none; return the fault per N."""
    plan: dict[int, str] = {}
    for number in range(count):
        draw = rng.random()
        fault = "none"
        for name, share in FAULTS:
            if draw < share:
                fault = name
                break
            draw -= share
        plan[number] = fault
        path = f"/items/{number}"
        if fault == "error_500":
            upstream.respond(path, status=500, method="POST", times=1)
        elif fault == "error_500_twice":
            upstream.respond(path, status=503, method="POST", times=2)
        elif fault == "rate_limited":
            upstream.retry_after(path, 429, "1", method="POST", times=1)
        elif fault == "drip":
            upstream.drip(path, interval=0.5, total_seconds=20, method="POST",
                          times=1)
        elif fault == "hold_past_timeout":
            upstream.hold(path, seconds=JOB_TIMEOUT + 5, method="POST", times=1)
        elif fault == "reset":
            upstream.reset(path, method="POST", times=1)
        elif fault == "not_found":
            upstream.respond(path, status=404, method="POST")
    # Every other request is answered after a short wait, so that kills and
    # restarts find requests in flight.
    upstream.hold("/items/*", seconds=0.3, method="POST", then_status=201)
    return plan


def running_workers(stack: Stack, min_uptime: float) -> list[str]:
    """Return the worker processes that have been RUNNING for ``min_uptime``."""
    names = []
    for info in stack.all_process_info():
        uptime = info["now"] - info["start"]
        if (info["group"] == "worker" and info["statename"] == "RUNNING"
                and uptime >= min_uptime):
            names.append(f"worker:{info['name']}")
    return names


def registered_since(database_url: str, since: float) -> int:
    rows = query(
        database_url,
        "SELECT count(*) AS n FROM worker_processes p "
        "JOIN procrastinate_workers w ON w.id = p.worker_id "
        "WHERE p.role = 'worker' AND p.stopped_at IS NULL "
        "AND p.started_at >= to_timestamp(%s)",
        (since,),
    )
    return int(rows[0]["n"])


def unfinished(database_url: str) -> int:
    rows = query(
        database_url,
        "SELECT count(*) AS n FROM procrastinate_jobs "
        "WHERE task_name = 'call_api' AND status IN ('todo', 'doing')",
    )
    return int(rows[0]["n"])


def kill_some(stack: Stack, rng: random.Random, count: int,
              pause: Callable[[], None]) -> list[str]:
    """SIGKILL ``count`` random worker processes, one after another."""
    killed = []
    for _ in range(count):
        candidates = wait_until(
            lambda: running_workers(stack, min_uptime=4.0), 60,
            "a worker process that has run for 4 s",
        )
        name = rng.choice(candidates)
        stack.kill(name, signal.SIGKILL)
        killed.append(name)
        pause()
    return killed


# The CI run takes about a minute; the FULL=1 run takes several.
@pytest.mark.timeout(1500)
def test_chaos_loses_and_repeats_nothing(
    own_postgres: PostgresServer,
    upstream: Upstream,
    stack_factory: Callable[..., Stack],
    full_run: bool,
) -> None:
    size = FULL_SIZE if full_run else CI_SIZE
    rng = random.Random(20261204)
    total = size.jobs + size.late_jobs
    plan = script_upstream(upstream, total, rng)
    database_url = create_database(own_postgres.url, "chaos")
    apply_schema(database_url)
    stack = stack_factory(
        {"DATABASE_URL": database_url, "API_BASE_URL": upstream.url,
         **STACK_SETTINGS},
        wait_for=("worker", "scheduler"),
    )
    settings = fleet_settings(database_url, upstream.url)
    started = time.monotonic()

    def body(number: int) -> dict[str, Any]:
        return {"method": "POST", "path": f"/items/{number}", "json": {"n": number}}

    early = defer_jobs(settings, "call_api", [body(n) for n in range(size.jobs)])
    upstream.wait_for_count("/items/0", 1, timeout=30)

    def short_pause() -> None:
        time.sleep(rng.uniform(0.5, 1.5))

    kills_before = size.kills // 2
    killed = kill_some(stack, rng, kills_before, short_pause)

    restart = stack.supervisorctl("restart", "worker:*")
    assert restart.returncode == 0, restart.stdout + restart.stderr

    own_postgres.halt()
    outage_started = time.monotonic()
    wait_until(lambda: time.monotonic() - outage_started >= size.outage_seconds,
               size.outage_seconds + 1, "the outage to last", interval=0.2)
    own_postgres.resume()
    resumed_at = time.time()

    worker_count = int(STACK_SETTINGS["WORKER_PROCESSES"])
    wait_until(lambda: registered_since(database_url, resumed_at - 1) >= worker_count,
               60, "every worker process to be back after the outage",
               interval=0.2)
    # With the queue drained the workers are idle, so a new job can only start
    # within a second through the LISTEN that each process issued anew.
    wait_until(lambda: unfinished(database_url) == 0, size.deadline,
               "the early jobs to end", interval=0.5)
    latencies = probe_start_latency(database_url, settings, upstream, total)

    late = defer_jobs(
        settings, "call_api", [body(n) for n in range(size.jobs, total)]
    )
    killed += kill_some(stack, rng, size.kills - kills_before, short_pause)

    wait_until(lambda: unfinished(database_url) == 0, size.deadline,
               "every job to end", interval=0.5)
    elapsed = time.monotonic() - started

    job_ids = early + late
    check_outcomes(database_url, job_ids, plan)
    check_requests(upstream, database_url, job_ids)
    check_processes(stack)
    assert max(latencies) < 1.0, latencies

    figures = {
        "jobs": total,
        "kills": len(killed),
        "outage_seconds": size.outage_seconds,
        "elapsed_seconds": round(elapsed, 1),
        "start_latency_after_outage_s": [round(value, 3) for value in latencies],
        **summarize(database_url, upstream, job_ids, plan),
    }
    if full_run:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "chaos-figures.json").write_text(json.dumps(figures, indent=2))


def probe_start_latency(
    database_url: str, settings: Any, upstream: Upstream, first_number: int
) -> list[float]:
    """Defer 3 jobs one at a time; return the seconds each waited to start."""
    latencies = []
    for offset in range(3):
        number = first_number + offset
        upstream.respond(f"/probe/{number}", status=200, method="GET")
        (job_id,) = defer_jobs(
            settings, "call_api", [{"method": "GET", "path": f"/probe/{number}"}]
        )
        row = wait_until(
            lambda: query(
                database_url,
                "SELECT extract(epoch FROM (SELECT min(at) FROM procrastinate_events "
                "  WHERE job_id = %(id)s AND type = 'started') - (SELECT min(at) "
                "  FROM procrastinate_events WHERE job_id = %(id)s "
                "  AND type = 'deferred')) AS wait",
                {"id": job_id},
            )[0]["wait"],
            10, f"probe job {job_id} to start",
        )
        latencies.append(float(row))
        wait_until(
            lambda: query(database_url, "SELECT status FROM procrastinate_jobs "
                          "WHERE id = %s", (job_id,))[0]["status"] == "succeeded",
            10, f"probe job {job_id} to succeed",
        )
    return latencies


def check_outcomes(database_url: str, job_ids: list[int], plan: dict[int, str]
                   ) -> None:
    rows = query(
        database_url,
        "SELECT id, status, (args->'json'->>'n')::int AS n FROM procrastinate_jobs "
        "WHERE id = ANY(%s)",
        (job_ids,),
    )
    assert len(rows) == len(job_ids), "jobs were lost"
    wrong = [
        (row["id"], plan[row["n"]], row["status"]) for row in rows
        if row["status"] != ("failed" if plan[row["n"]] == "not_found"
                             else "succeeded")
    ]
    assert wrong == []

    failures = query(
        database_url,
        "SELECT DISTINCT ON (job_id) job_id, error_message FROM job_attempts "
        "WHERE job_id = ANY(%s) AND outcome = 'failed' ORDER BY job_id, id DESC",
        (job_ids,),
    )
    for failure in failures:
        assert failure["error_message"].startswith("not retryable: HTTP 404 from ")

    results = query(
        database_url,
        "SELECT r.job_id, count(*) AS n FROM job_results r "
        "JOIN procrastinate_jobs j ON j.id = r.job_id WHERE r.job_id = ANY(%s) "
        "GROUP BY r.job_id",
        (job_ids,),
    )
    succeeded = {row["id"] for row in rows if row["status"] == "succeeded"}
    assert {row["job_id"] for row in results} == succeeded
    assert {row["n"] for row in results} == {1}

    # Maintenance jobs of the latest ticks may still wait or run.
    leftovers = query(
        database_url,
        "SELECT status, count(*) AS n FROM procrastinate_jobs "
        "WHERE queue_name <> 'maintenance' "
        "AND status IN ('todo', 'doing', 'aborted') GROUP BY status",
    )
    assert leftovers == []
    aborted = query(
        database_url,
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'aborted'",
    )
    assert aborted[0]["n"] == 0


def check_requests(upstream: Upstream, database_url: str, job_ids: list[int]
                   ) -> None:
    rows = query(
        database_url,
        "SELECT id, args->>'path' AS path FROM procrastinate_jobs WHERE id = ANY(%s)",
        (job_ids,),
    )
    overlapping = []
    wrong_keys = []
    for row in rows:
        if upstream.max_concurrent(row["path"]) > 1:
            overlapping.append(row["path"])
        keys = {r.headers.get("Idempotency-Key") for r in upstream.requests(row["path"])}
        if keys != {str(row["id"])}:
            wrong_keys.append((row["path"], keys))
    assert overlapping == []
    assert wrong_keys == []


def check_processes(stack: Stack) -> None:
    # A worker killed in the last seconds is still STARTING (startsecs) when the
    # jobs end; supervisord must bring every one back to RUNNING.
    stack.wait_running(("worker", "scheduler"), timeout=60)
    states = {
        f"{info['group']}:{info['name']}": info["statename"]
        for info in stack.all_process_info()
        if info["group"] in ("worker", "scheduler")
    }
    assert set(states.values()) == {"RUNNING"}, states
    outage = re.compile(
        r" WARNING workers\.(runner: Worker \S+ lost the database"
        r"|startup: Database at \S+ not ready \(attempt \d+\))"
    )
    # A worker killed just before the outage may come back only after it, so it
    # never finds the database down; the scheduler and at least one worker do.
    noticed = {name for name in states if outage.search(stack.log(name))}
    assert "scheduler:scheduler" in noticed or "scheduler" in noticed, states
    assert any(name.startswith("worker:") for name in noticed), noticed
    for name in states:
        log = stack.log(name)
        assert " CRITICAL " not in log
        assert "Traceback" not in log
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert all("not retryable: HTTP 404" in line for line in errors), errors


def summarize(database_url: str, upstream: Upstream, job_ids: list[int],
              plan: dict[int, str]) -> dict[str, Any]:
    statuses = query(
        database_url,
        "SELECT status, count(*) AS n FROM procrastinate_jobs WHERE id = ANY(%s) "
        "GROUP BY status",
        (job_ids,),
    )
    outcomes = query(
        database_url,
        "SELECT outcome, count(*) AS n FROM job_attempts WHERE job_id = ANY(%s) "
        "GROUP BY outcome",
        (job_ids,),
    )
    faults: dict[str, int] = {}
    for fault in plan.values():
        faults[fault] = faults.get(fault, 0) + 1
    return {
        "statuses": {row["status"]: row["n"] for row in statuses},
        "attempt_outcomes": {row["outcome"]: row["n"] for row in outcomes},
        "upstream_requests": upstream.stats()["total"],
        "faults_planned": faults,
    }
