"""Periodic tasks under several worker and scheduler processes, one job per tick.

A once-a-minute schedule would need minutes of watching. Here the health check and
the sweep tick every 2 s, so every step (a duplicate scheduler, ticks held back by
waiting jobs, a scheduler killed right after a tick) fits in about half a minute.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path


from tests.support.faults import (
    WorkerProcess,
    defer_jobs,
    fleet_environment,
    fleet_settings,
    query,
    wait_all_finished,
    wait_until,
)
from tests.support.upstream import Upstream

TICK = 2  # seconds between two ticks of each periodic task in this test
PERIODIC = ("health_check", "retry_stalled_jobs")


def jobs_per_tick(database_url: str) -> dict[tuple[str, int], list[dict]]:
    rows = query(
        database_url,
        "SELECT j.id, j.task_name, (j.args->>'timestamp')::bigint AS tick, j.status, "
        "(SELECT min(at) FROM procrastinate_events e "
        "  WHERE e.job_id = j.id AND e.type = 'deferred') AS deferred_at "
        "FROM procrastinate_jobs j WHERE j.task_name = ANY(%s) ORDER BY j.id",
        (list(PERIODIC),),
    )
    grouped: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["task_name"], row["tick"]), []).append(row)
    return grouped


def test_one_job_per_tick_across_processes(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    hold = 6.0
    upstream.hold("/slow", seconds=hold)
    environment = fleet_environment(
        database_url, upstream.url,
        HEALTH_CHECK_CRON=f"* * * * * */{TICK}",
        STALLED_JOB_CHECK_INTERVAL=str(TICK),
        HTTP_TIMEOUT="30",
        SCHEDULER_SHUTDOWN_TIMEOUT="2",
    )
    settings = fleet_settings(database_url, upstream.url)
    scheduler_slots = 2 * 2  # two scheduler processes, concurrency 2 each
    slow = defer_jobs(
        settings, "call_api", [{"method": "GET", "path": "/slow"}] * scheduler_slots,
        queue="maintenance",
    )
    processes = [
        WorkerProcess(environment, tmp_path, "scheduler", "scheduler"),
        WorkerProcess(environment, tmp_path, "scheduler", "scheduler_copy"),
        *(WorkerProcess(environment, tmp_path, "worker", f"worker_{n:02d}")
          for n in range(3)),
    ]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_registered()
        upstream.wait_for_count("/slow", scheduler_slots, timeout=10)
        # While every maintenance slot is busy, later ticks find the earlier
        # tick's job still waiting and skip.
        processes[0].wait_for_log("cannot be enqueued", timeout=3 * TICK + 2)
        wait_all_finished(database_url, slow, timeout=hold + 10)
        slow_done = time.time()

        wait_until(lambda: time.time() > slow_done + 4 * TICK, 5 * TICK,
                   "four ticks after the slow jobs")
        scheduler = processes[0]
        # Kill the scheduler right after a tick, when it has just deferred.
        wait_until(lambda: time.time() % TICK < 0.3, TICK + 1, "a tick")
        scheduler.signal(signal.SIGKILL)
        scheduler.wait(10)
        killed_at = time.time()
        restarted = WorkerProcess(environment, tmp_path, "scheduler", "scheduler_2")
        processes.append(restarted.start())
        restarted.wait_registered()
        wait_until(lambda: time.time() > killed_at + 4 * TICK, 5 * TICK + 5,
                   "four ticks after the restart")
        watch_end = time.time()

        survivors = [p for p in processes if p is not scheduler]
        for process in survivors:
            assert process.process is not None
            assert process.process.poll() is None, f"{process.name} exited"
    finally:
        for process in processes:
            process.close()

    grouped = jobs_per_tick(database_url)
    duplicated = {key: len(rows) for key, rows in grouped.items() if len(rows) > 1}
    assert duplicated == {}

    for task in PERIODIC:
        ticks = sorted(tick for (name, tick) in grouped if name == task)
        steady = [t for t in range(int(slow_done) + TICK, int(watch_end) - TICK)
                  if t % TICK == 0]
        missing = [t for t in steady if t not in ticks]
        assert missing == [], f"{task} has no job for ticks {missing}"
        for tick in steady:
            (row,) = grouped[(task, tick)]
            assert row["status"] in {"succeeded", "doing", "todo"}
            assert row["deferred_at"].timestamp() - tick < 5
        finished = [grouped[(task, t)][0]["status"] for t in steady[:-2]]
        assert set(finished) == {"succeeded"}

    logs = "\n".join(process.log() for process in processes)
    assert "Traceback" not in logs
    skipped = [
        line for line in logs.splitlines() if "cannot be enqueued" in line
    ]
    assert skipped
    for line in skipped:
        assert " INFO " in line
        assert re.search(r"(health_check|retry_stalled_jobs)\[None\]\(timestamp=\d+\)",
                         line)

    health = query(database_url, "SELECT * FROM health_checks ORDER BY id")
    assert health
    latest = health[-1]["details"]
    assert latest["pools"]
    for pool in latest["pools"].values():
        assert {"size", "available", "requests_waiting", "min_size"} <= set(pool)
