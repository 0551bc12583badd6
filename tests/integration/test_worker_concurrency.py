"""Cancellation, the async API and locks under a real worker and database.

Test-only tasks are registered on the product's App for these tests; the worker
runs in this process so that its pool can be read directly.
"""

from __future__ import annotations

import asyncio
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import procrastinate
import pytest
from procrastinate import JobContext

from tests.support.faults import (
    InProcessWorker,
    defer_jobs,
    events,
    fleet_settings,
    query,
    wait_all_finished,
    wait_for_status,
    wait_until,
)
from tests.support.upstream import Upstream
from workers.app import build_app
from workers.settings import PROJECT_DIR, Settings
from workers.sync_calls import find_sync_calls
from workers.tasks.results import store_result


def app_with_test_tasks(settings: Settings) -> procrastinate.App:
    """Return the product's App plus the test-only tasks used in this module."""
    app = build_app(settings, "worker")

    @app.task(name="hold_pool_connection", queue="api_calls", pass_context=True)
    async def hold_pool_connection(context: JobContext) -> None:
        async with context.app.connector.pool.connection():  # type: ignore[attr-defined]
            await asyncio.sleep(5)

    @app.task(name="spawn_follow_up", queue="api_calls", pass_context=True)
    async def spawn_follow_up(context: JobContext) -> dict[str, Any]:
        follow_up = await context.app.tasks["fetch_joke"].defer_async()
        result = {"follow_up": follow_up}
        await store_result(context, result)
        return result

    return app


def test_cancelled_waits_keep_pool_whole(
    database_url: str, upstream: Upstream, full_run: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    count = 200 if full_run else 40
    settings = fleet_settings(
        database_url, upstream.url,
        WORKER_CONCURRENCY="10", DB_POOL_MAX_SIZE="3", JOB_TIMEOUT="1",
    )
    app = app_with_test_tasks(settings)
    with InProcessWorker(settings, app=app):
        held = defer_jobs(settings, "hold_pool_connection", [{}] * count)
        wait_all_finished(database_url, held, timeout=count / 10 * 1.5 + 20)

        pool = app.connector.pool  # type: ignore[attr-defined]

        def pool_whole() -> dict[str, int] | None:
            stats = pool.get_stats()
            idle = stats["pool_available"] == stats["pool_size"]
            return stats if idle and stats.get("requests_waiting", 0) == 0 else None

        stats = wait_until(pool_whole, 5, "every pool connection to be back")
        assert stats["pool_size"] >= 1

        deferred_at = time.monotonic()
        jokes = defer_jobs(settings, "fetch_joke", [{}, {}, {}])
        wait_all_finished(database_url, jokes, timeout=5)
        finished_after = time.monotonic() - deferred_at

    statuses = query(
        database_url,
        "SELECT status, count(*) AS n FROM procrastinate_jobs WHERE id = ANY(%s) "
        "GROUP BY status",
        (held,),
    )
    assert {row["status"]: row["n"] for row in statuses} == {"failed": count}
    for joke in jokes:
        assert wait_for_status(database_url, joke, "succeeded", 1)["status"]
        started = [e["at"] for e in events(database_url, joke)]
        assert (started[-1] - started[0]).total_seconds() < 1.0
    assert finished_after < 2.0
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "couldn't get a connection" in m]
    assert not [r for r in caplog.records if "PoolTimeout" in (r.exc_text or "")]


def test_product_code_uses_async_api() -> None:
    found = find_sync_calls([PROJECT_DIR / "workers"])
    assert [str(item) for item in found] == []


def test_sync_defer_in_async_code_found(tmp_path: Path) -> None:
    variant = tmp_path / "variant.py"
    variant.write_text(textwrap.dedent('''
        async def spawn_follow_up(context):
            return context.app.tasks["fetch_joke"].defer()

        async def fine(context):
            return await context.app.tasks["fetch_joke"].defer_async()

        async def opens(app):
            with app.open():
                app.job_manager.list_jobs()

        def plain(app):
            return app.tasks["fetch_joke"].defer()
    '''))
    found = find_sync_calls([variant])
    assert [(item.line, item.call, item.function) for item in found] == [
        (3, "defer", "spawn_follow_up"),
        (9, "app.open", "opens"),
        (10, "job_manager.list_jobs", "opens"),
    ]
    assert f"{variant}:3: synchronous defer() inside async function" in str(found[0])


def test_async_defers_keep_heartbeat(
    database_url: str, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    settings = fleet_settings(
        database_url, upstream.url, WORKER_CONCURRENCY="10", HEARTBEAT_INTERVAL="1"
    )
    app = app_with_test_tasks(settings)
    beats: list[Any] = []
    watching = threading.Event()

    def watch(worker_id: int) -> None:
        while not watching.is_set():
            rows = query(
                database_url,
                "SELECT last_heartbeat FROM procrastinate_workers WHERE id = %s",
                (worker_id,),
            )
            if rows and (not beats or rows[0]["last_heartbeat"] != beats[-1]):
                beats.append(rows[0]["last_heartbeat"])
            time.sleep(0.1)

    with InProcessWorker(settings, app=app) as worker:
        assert worker.worker_id is not None
        watcher = threading.Thread(target=watch, args=(worker.worker_id,))
        watcher.start()
        try:
            parents = defer_jobs(settings, "spawn_follow_up", [{}] * 50)
            wait_all_finished(database_url, parents, timeout=30)
            follow_ups = [
                row["result"]["follow_up"]
                for row in query(
                    database_url,
                    "SELECT result FROM job_results WHERE job_id = ANY(%s)",
                    (parents,),
                )
            ]
            wait_all_finished(database_url, follow_ups, timeout=30)
            time.sleep(0)  # let the watcher record the last beat
            wait_until(lambda: len(beats) >= 3, 5, "three heartbeats")
        finally:
            watching.set()
            watcher.join()

    assert len(follow_ups) == 50
    assert len(set(follow_ups)) == 50
    statuses = query(
        database_url,
        "SELECT status, count(*) AS n FROM procrastinate_jobs WHERE id = ANY(%s) "
        "GROUP BY status",
        (parents + follow_ups,),
    )
    assert {row["status"]: row["n"] for row in statuses} == {"succeeded": 100}
    fetch_jokes = query(
        database_url,
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE task_name = 'fetch_joke'",
    )
    assert fetch_jokes[0]["n"] == 50
    gaps = [(b - a).total_seconds() for a, b in zip(beats, beats[1:])]
    assert max(gaps) <= 2.0
    assert not [r for r in caplog.records if "RuntimeError" in r.getMessage()]


def test_same_lock_never_overlaps(
    database_url: str, upstream: Upstream, full_run: bool
) -> None:
    hold = 10.0 if full_run else 1.5
    upstream.hold("/items/42", seconds=hold, method="POST", then_status=201)
    settings = fleet_settings(database_url, upstream.url, WORKER_CONCURRENCY="4")
    with InProcessWorker(settings):
        arguments = {"method": "POST", "path": "/items/42", "json": {"sync": True}}
        (first,) = defer_jobs(
            settings, "call_api", [arguments],
            lock="items-42", queueing_lock="items-42",
        )
        wait_for_status(database_url, first, "doing", timeout=5)
        (second,) = defer_jobs(
            settings, "call_api", [arguments],
            lock="items-42", queueing_lock="items-42",
        )
        wait_for_status(database_url, second, "succeeded", timeout=3 * hold + 10)

    assert upstream.max_concurrent("/items/42") == 1
    first_done = [e["at"] for e in events(database_url, first)
                  if e["type"] == "succeeded"][0]
    first_start = [e["at"] for e in events(database_url, first)
                   if e["type"] == "started"][0]
    second_start = [e["at"] for e in events(database_url, second)
                    if e["type"] == "started"][0]
    assert second_start >= first_done
    assert (second_start - first_start).total_seconds() >= hold


def test_queueing_lock_alone_serializes(
    database_url: str, upstream: Upstream
) -> None:
    upstream.hold("/items/43", seconds=1.0, method="POST", then_status=201)
    settings = fleet_settings(database_url, upstream.url, WORKER_CONCURRENCY="4")
    with InProcessWorker(settings):
        arguments = {"method": "POST", "path": "/items/43", "json": {"sync": True}}
        (first,) = defer_jobs(settings, "call_api", [arguments],
                              queueing_lock="items-43")
        wait_for_status(database_url, first, "doing", timeout=5)
        (second,) = defer_jobs(settings, "call_api", [arguments],
                               queueing_lock="items-43")
        wait_for_status(database_url, second, "succeeded", timeout=15)

    rows = query(
        database_url,
        "SELECT lock, queueing_lock FROM procrastinate_jobs WHERE id = ANY(%s)",
        ([first, second],),
    )
    assert all(row["lock"] == "items-43" for row in rows)
    assert upstream.max_concurrent("/items/43") == 1


def test_other_keys_still_run_together(
    database_url: str, upstream: Upstream
) -> None:
    # Both calls are held far longer than the wait below, so they can only be
    # open together if the worker runs the two jobs side by side.
    upstream.hold("/items/*", seconds=60, method="POST", then_status=201)
    settings = fleet_settings(database_url, upstream.url, WORKER_CONCURRENCY="4",
                              WORKER_SHUTDOWN_TIMEOUT="1")
    with InProcessWorker(settings):
        defer_jobs(settings, "call_api", [
            {"method": "POST", "path": f"/items/{n}"} for n in (1, 2)
        ])
        wait_until(
            lambda: upstream.open_count("/items/1") == 1
            and upstream.open_count("/items/2") == 1,
            20, "both calls to be in flight at once",
        )
