"""A worker writes a job's new status only while it still holds the job.

The stalled-job sweep can give a job to another worker while the first one cannot
reach the database. The first worker's late finish or retry must then leave the
job alone, so that two runs of one job never overlap.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable

import pytest
from procrastinate.jobs import Job, Status

from tests.support.faults import fleet_settings, insert_job, job
from tests.support.upstream import Upstream
from workers.app import build_app


async def fetch_twice(database_url: str, upstream_url: str,
                      job_id: int) -> tuple[Job, int]:
    """Fetch ``job_id`` as worker A, then hand it to worker B as the sweep would.

    Return worker A's view of the job and worker B's id.
    """
    app = build_app(fleet_settings(database_url, upstream_url), "worker")
    async with app.open_async():
        manager = app.job_manager
        first = await manager.register_worker()
        fetched = await manager.fetch_job(["api_calls"], worker_id=first)
        assert fetched is not None and fetched.id == job_id
        second = await manager.register_worker()
        await app.connector.execute_query_async(
            "UPDATE procrastinate_jobs SET worker_id = %(worker)s "
            "WHERE id = %(job_id)s",
            worker=second, job_id=job_id,
        )
    return fetched, second


async def finish(database_url: str, upstream_url: str, job_view: Job) -> None:
    app = build_app(fleet_settings(database_url, upstream_url), "worker")
    async with app.open_async():
        await app.job_manager.finish_job(job_view, Status.SUCCEEDED, delete_job=False)


async def retry(database_url: str, upstream_url: str, job_view: Job) -> None:
    app = build_app(fleet_settings(database_url, upstream_url), "worker")
    async with app.open_async():
        await app.job_manager.retry_job(
            job_view, retry_at=datetime.datetime.now(datetime.timezone.utc)
        )


@pytest.mark.parametrize("write", [finish, retry])
def test_late_write_leaves_job_alone(
    database_url: str, upstream: Upstream, caplog: pytest.LogCaptureFixture,
    write: Callable[[str, str, Job], Awaitable[None]],
) -> None:
    job_id = insert_job(database_url, "call_api", {"method": "GET", "path": "/a"})
    stale_view, other_worker = asyncio.run(fetch_twice(database_url, upstream.url, job_id))
    caplog.set_level(logging.WARNING, logger="workers.end_state")

    asyncio.run(write(database_url, upstream.url, stale_view))

    row = job(database_url, job_id)
    assert row["status"] == "doing"
    assert row["worker_id"] == other_worker
    skipped = [r for r in caplog.records if r.action == "end_state_skipped"]
    assert len(skipped) == 1
    assert f"job {job_id}" in skipped[0].getMessage()
    assert "no longer doing for worker" in skipped[0].getMessage()


def test_holder_finishes_job(database_url: str, upstream: Upstream) -> None:
    job_id = insert_job(database_url, "call_api", {"method": "GET", "path": "/a"})
    stale_view, other_worker = asyncio.run(fetch_twice(database_url, upstream.url, job_id))
    holder = stale_view.evolve(worker_id=other_worker)

    asyncio.run(finish(database_url, upstream.url, holder))

    assert job(database_url, job_id)["status"] == "succeeded"


def test_holder_retries_job(database_url: str, upstream: Upstream) -> None:
    job_id = insert_job(database_url, "call_api", {"method": "GET", "path": "/a"})
    stale_view, other_worker = asyncio.run(fetch_twice(database_url, upstream.url, job_id))
    holder = stale_view.evolve(worker_id=other_worker)

    asyncio.run(retry(database_url, upstream.url, holder))

    row = job(database_url, job_id)
    assert row["status"] == "todo"
    assert row["attempts"] == 1
