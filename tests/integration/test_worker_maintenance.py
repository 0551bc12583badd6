"""The health check's pool data and the retention sweep, run on a real database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from procrastinate import JobContext
from procrastinate.jobs import Job

from tests.support.faults import fleet_settings, query
from workers.app import build_app
from workers.settings import Settings
from workers.tasks import maintenance

UPSTREAM = "http://127.0.0.1:9"


def run_task(settings: Settings, task_name: str) -> dict[str, Any]:
    """Run one maintenance task function the way the worker calls it."""

    async def run() -> dict[str, Any]:
        app = build_app(settings, "scheduler")
        async with app.open_async():
            job = Job(id=0, queue="maintenance", lock=None, queueing_lock=None,
                      task_name=task_name)
            context = JobContext(
                app=app, job=job, start_timestamp=time.time(),
                additional_context={"settings": settings},
                abort_reason=lambda: None,
            )
            function = getattr(maintenance, task_name)
            return await function(context, timestamp=int(time.time()))

    return asyncio.run(run())


def add_process(database_url: str, name: str, size: int) -> int:
    """Register a live Procrastinate worker with pool counters; return its id."""
    (worker,) = query(
        database_url, "SELECT worker_id FROM procrastinate_register_worker_v1()"
    )
    query(
        database_url,
        "INSERT INTO worker_processes (worker_id, host, pid, process_name, role, "
        "queues, concurrency, pool_min_size, pool_max_size, pool_size, "
        "pool_available, pool_requests_waiting, pool_stats_at) "
        "VALUES (%s, 'host', 1, %s, 'worker', '{default}', 1, 2, 10, %s, %s, 3, "
        "now())",
        (worker["worker_id"], name, size, size),
    )
    return int(worker["worker_id"])


def test_health_check_stores_pools(database_url: str) -> None:
    settings = fleet_settings(database_url, UPSTREAM)
    add_process(database_url, "worker:worker_00", 4)
    add_process(database_url, "worker:worker_01", 1)

    first = run_task(settings, "health_check")
    second = run_task(settings, "health_check")

    rows = query(database_url, "SELECT * FROM health_checks ORDER BY id")
    assert len(rows) == 2
    assert first["live_workers"] == 2
    pools = rows[-1]["details"]["pools"]
    assert pools["worker:worker_00"]["size"] == 4
    assert pools["worker:worker_00"]["available"] == 4
    assert pools["worker:worker_00"]["requests_waiting"] == 3
    assert rows[0]["details"]["pools_below_min"] == []
    assert rows[-1]["details"]["pools_below_min"] == ["worker:worker_01"]
    assert rows[-1]["details"]["process_control"]["reachable"] is False
    assert second["db_latency_ms"] >= 0


def test_prune_deletes_old_finished_jobs(database_url: str) -> None:
    settings = fleet_settings(database_url, UPSTREAM, JOB_RETENTION_DAYS="30")
    old_count = maintenance.PRUNE_BATCH_SIZE * 2 + 7
    finished = "(ARRAY['succeeded','failed','cancelled','aborted'])[1 + id %% 4]"
    query(
        database_url,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
        "SELECT 'api_calls', 'fetch_joke', '{}' FROM generate_series(1, %s)",
        (old_count,),
    )
    query(
        database_url,
        f"UPDATE procrastinate_jobs SET status = {finished}::procrastinate_job_status",
    )
    query(database_url, "UPDATE procrastinate_events SET at = now() - interval '40 days'")
    query(
        database_url,
        "INSERT INTO job_attempts (job_id, attempt, task_name, queue_name, "
        "started_at, outcome) SELECT id, 1, task_name, queue_name, "
        "now() - interval '40 days', 'succeeded' FROM procrastinate_jobs",
    )
    # Kept: finished recently, still waiting, and waiting for 40 days.
    (recent,) = query(
        database_url,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
        "VALUES ('api_calls', 'fetch_joke', '{}') RETURNING id",
    )
    query(database_url, "UPDATE procrastinate_jobs SET status = 'succeeded' "
          "WHERE id = %s", (recent["id"],))
    query(
        database_url,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
        "VALUES ('api_calls', 'fetch_joke', '{}'), ('api_calls', 'fetch_joke', '{}')",
    )
    query(
        database_url,
        "UPDATE procrastinate_events SET at = now() - interval '40 days' "
        "WHERE job_id = (SELECT max(id) FROM procrastinate_jobs)",
    )

    result = run_task(settings, "prune_old_jobs")

    assert result == {"deleted": old_count}
    left = query(database_url, "SELECT status FROM procrastinate_jobs ORDER BY id")
    assert [row["status"] for row in left] == ["succeeded", "todo", "todo"]
    orphans = query(
        database_url,
        "SELECT count(*) AS n FROM job_attempts a WHERE NOT EXISTS "
        "(SELECT 1 FROM procrastinate_jobs j WHERE j.id = a.job_id)",
    )
    assert orphans[0]["n"] == 0
    assert query(database_url, "SELECT count(*) AS n FROM job_attempts")[0]["n"] == 0


@pytest.mark.parametrize("batch", [maintenance.PRUNE_BATCH_SIZE])
def test_prune_batches_are_small(batch: int) -> None:
    assert 100 <= batch <= 1000
    assert "LIMIT %(batch)s" in maintenance.PRUNE_BATCH
