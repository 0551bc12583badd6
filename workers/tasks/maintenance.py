"""Periodic maintenance tasks, served by the scheduler on the 'maintenance' queue."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from procrastinate import JobContext

from workers.recovery import recover_stalled_jobs
from workers.settings import Settings
from workers.supervision import SupervisorClient, SupervisorUnavailable

logger = logging.getLogger(__name__)

PRUNE_BATCH_SIZE = 500  # jobs deleted per statement
PRUNE_MAX_BATCHES = 200  # per run, so that one run stays short

MEASURE_FLEET = """
SELECT
    (SELECT count(*) FROM procrastinate_workers
      WHERE last_heartbeat >= now() - make_interval(secs => %(threshold)s))
        AS live_workers,
    (SELECT extract(epoch FROM now() - min(coalesce(scheduled_at, e.at)))
       FROM procrastinate_jobs j
       JOIN LATERAL (SELECT min(at) AS at FROM procrastinate_events
                      WHERE job_id = j.id AND type = 'deferred') e ON true
      WHERE j.status = 'todo'
        AND coalesce(j.scheduled_at, e.at) <= now()) AS oldest_todo_age_s,
    (SELECT count(*) FROM procrastinate_jobs j
       LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
      WHERE j.status = 'doing'
        AND (w.id IS NULL
             OR w.last_heartbeat < now() - make_interval(secs => %(threshold)s)))
        AS stalled_jobs
"""

STORE_HEALTH = """
INSERT INTO health_checks (
    db_latency_ms, live_workers, oldest_todo_age_s, stalled_jobs, pool_size,
    pool_available, details
) VALUES (
    %(db_latency_ms)s, %(live_workers)s, %(oldest_todo_age_s)s, %(stalled_jobs)s,
    %(pool_size)s, %(pool_available)s, %(details)s
)
"""

# Pool counters of the processes that are alive, as each stored them last.
PROCESS_POOLS = """
SELECT p.process_name, p.worker_id, p.pool_min_size, p.pool_max_size, p.pool_size,
       p.pool_available, p.pool_requests_waiting,
       extract(epoch FROM now() - p.pool_stats_at) AS stats_age_s
  FROM worker_processes p
  JOIN procrastinate_workers w ON w.id = p.worker_id
 WHERE p.stopped_at IS NULL
   AND p.pool_stats_at IS NOT NULL
   AND w.last_heartbeat >= now() - make_interval(secs => %(threshold)s)
 ORDER BY p.process_name
"""

PREVIOUS_HEALTH_DETAILS = """
SELECT details FROM health_checks ORDER BY id DESC LIMIT 1
"""

PRUNE_PROCESS_RECORDS = """
DELETE FROM worker_processes
 WHERE stopped_at < now() - make_interval(days => %(days)s)
"""

PRUNE_HEALTH_CHECKS = """
DELETE FROM health_checks
 WHERE checked_at < now() - make_interval(days => %(days)s)
"""

PRUNE_BATCH = """
WITH doomed AS (
    SELECT j.id FROM procrastinate_jobs j
     WHERE j.status IN ('succeeded', 'failed', 'cancelled', 'aborted')
       AND (SELECT max(e.at) FROM procrastinate_events e WHERE e.job_id = j.id)
           < now() - make_interval(days => %(days)s)
     ORDER BY j.id
     LIMIT %(batch)s
), unlinked AS (
    DELETE FROM procrastinate_periodic_defers p USING doomed
     WHERE p.job_id = doomed.id
)
DELETE FROM procrastinate_jobs j USING doomed WHERE j.id = doomed.id
RETURNING j.id
"""


def _settings(context: JobContext) -> Settings:
    return context.additional_context["settings"]


def _process_states(settings: Settings) -> dict[str, Any]:
    client = SupervisorClient(settings.supervisor_socket, timeout=3.0)
    try:
        processes = client.processes()
    except SupervisorUnavailable as exc:
        return {"reachable": False, "error": str(exc)}
    return {
        "reachable": True,
        "processes": {info.name: info.state for info in processes},
    }


async def _process_pools(
    connector: Any, threshold: float
) -> dict[str, dict[str, Any]]:
    rows = await connector.execute_query_all_async(PROCESS_POOLS, threshold=threshold)
    pools = {}
    for row in rows:
        pools[row["process_name"]] = {
            "worker_id": row["worker_id"],
            "min_size": row["pool_min_size"],
            "max_size": row["pool_max_size"],
            "size": row["pool_size"],
            "available": row["pool_available"],
            "requests_waiting": row["pool_requests_waiting"],
            "stats_age_s": round(float(row["stats_age_s"]), 3),
        }
    return pools


async def _pools_below_minimum(
    connector: Any, pools: dict[str, dict[str, Any]]
) -> list[str]:
    """Return the processes whose pool is below its minimum now and last time."""
    now_below = {
        name for name, pool in pools.items()
        if pool["size"] is not None and pool["min_size"] is not None
        and pool["size"] < pool["min_size"]
    }
    if not now_below:
        return []
    previous = await connector.execute_query_all_async(PREVIOUS_HEALTH_DETAILS)
    if not previous:
        return []
    earlier = previous[0]["details"].get("pools", {})
    return sorted(
        name for name in now_below
        if name in earlier
        and earlier[name].get("size") is not None
        and earlier[name].get("min_size") is not None
        and earlier[name]["size"] < earlier[name]["min_size"]
    )


async def health_check(context: JobContext, timestamp: int) -> dict[str, Any]:
    """Measure the database, the workers and the queues, and store a health row."""
    settings = _settings(context)
    connector = context.app.connector
    started = time.perf_counter()
    await connector.execute_query_one_async("SELECT 1 AS one")
    latency_ms = (time.perf_counter() - started) * 1000

    fleet = await connector.execute_query_one_async(
        MEASURE_FLEET, threshold=settings.stalled_job_threshold
    )
    stats = connector.pool.get_stats()
    pools = await _process_pools(connector, settings.stalled_job_threshold)
    below_min = await _pools_below_minimum(connector, pools)
    processes = await asyncio.to_thread(_process_states, settings)
    row = {
        "db_latency_ms": round(latency_ms, 3),
        "live_workers": fleet["live_workers"],
        "oldest_todo_age_s": (
            float(fleet["oldest_todo_age_s"])
            if fleet["oldest_todo_age_s"] is not None else None
        ),
        "stalled_jobs": fleet["stalled_jobs"],
        "pool_size": stats.get("pool_size"),
        "pool_available": stats.get("pool_available"),
        "details": {
            "process_control": processes,
            "tick": timestamp,
            "pools": pools,
            "pools_below_min": below_min,
        },
    }
    if below_min:
        logger.warning(
            "Database pools below their minimum size for 2 health checks in a row: "
            "%s", ", ".join(below_min),
            extra={"action": "pool_below_minimum", "processes": below_min},
        )
    await connector.execute_query_async(STORE_HEALTH, **row)
    logger.info(
        "Health check: %s live workers, %s stalled jobs, database %.1f ms",
        row["live_workers"], row["stalled_jobs"], latency_ms,
        extra={"action": "health_checked", **{k: v for k, v in row.items()
                                                if k != "details"}},
    )
    return {key: value for key, value in row.items() if key != "details"}


async def retry_stalled_jobs(context: JobContext, timestamp: int) -> dict[str, Any]:
    """Give jobs held by dead workers back to the queue, or fail them."""
    settings = _settings(context)
    report = await recover_stalled_jobs(context.app, settings.stalled_job_threshold)
    return {"retried": report.retried, "failed": report.failed}


async def prune_old_jobs(context: JobContext, timestamp: int) -> dict[str, Any]:
    """Delete finished jobs older than JOB_RETENTION_DAYS, with their records."""
    settings = _settings(context)
    connector = context.app.connector
    days = settings.job_retention_days
    deleted = 0
    for _batch in range(PRUNE_MAX_BATCHES):
        rows = await connector.execute_query_all_async(
            PRUNE_BATCH, days=days, batch=PRUNE_BATCH_SIZE
        )
        deleted += len(rows)
        if len(rows) < PRUNE_BATCH_SIZE:
            break
    await connector.execute_query_async(PRUNE_PROCESS_RECORDS, days=days)
    await connector.execute_query_async(PRUNE_HEALTH_CHECKS, days=days)
    logger.info(
        "Pruned %d finished jobs older than %d days", deleted, days,
        extra={"action": "old_jobs_pruned", "deleted": deleted},
    )
    return {"deleted": deleted}
