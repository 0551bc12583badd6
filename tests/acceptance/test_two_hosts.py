"""Two complete stacks against one PostgreSQL, as two hosts would run them.

Each stack has its own folder, supervisord, socket and panel port. They share the
jobs; one stack crashing outright has its jobs recovered by the other.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import psycopg
from psycopg.types.json import Jsonb

from tests.support.forms import form_fields
from tests.support.faults import wait_until
from tests.support.stack import Stack
from tests.support.upstream import Upstream

DEADLINE = 90.0  # seconds
FAST_RECOVERY = {
    "HEARTBEAT_INTERVAL": "1",
    "STALLED_JOB_THRESHOLD": "4",
    "STALLED_JOB_CHECK_INTERVAL": "2",
    "WORKER_SHUTDOWN_TIMEOUT": "2",
    "SCHEDULER_SHUTDOWN_TIMEOUT": "2",
}




def _defer_many(database_url: str, count: int, path: str) -> list[int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """
            SELECT procrastinate_defer_jobs_v1(ARRAY[ROW(
                'api_calls', 'call_api', 0, NULL, NULL,
                %s::jsonb, NULL)::procrastinate_job_to_defer_v1])
              FROM generate_series(1, %s)
            """,
            (Jsonb({"method": "POST", "path": path, "json": {"n": 1}}), count),
        ).fetchall()
    return [row[0][0] for row in rows]


def _statuses(database_url: str, job_ids: list[int]) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT status::text, count(*) FROM procrastinate_jobs "
            "WHERE id = ANY(%s) GROUP BY 1", (job_ids,),
        ).fetchall()
    return dict(rows)


def _hosts_of_started_attempts(database_url: str, job_ids: list[int]) -> set[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT DISTINCT process_name || '@' || pid FROM job_attempts "
            "WHERE job_id = ANY(%s)", (job_ids,),
        ).fetchall()
    return {row[0] for row in rows}


def _assert_no_overlap(upstream: Upstream, path: str) -> None:
    """Fail when two requests for one job (one Idempotency-Key) were open at once."""
    by_job: dict[str, list[tuple[float, float]]] = {}
    for request in upstream.requests(path):
        end = request.closed_at or request.ended_at
        assert end is not None, f"request {request.id} never ended"
        by_job.setdefault(request.headers["Idempotency-Key"], []).append(
            (request.started_at, end))
    for key, spans in by_job.items():
        spans.sort()
        for (_, previous_end), (next_start, _) in zip(spans, spans[1:]):
            assert next_start >= previous_end, f"job {key} ran twice at once"


def _log_in(stack: Stack) -> httpx.Client:
    client = httpx.Client(base_url=stack.url, timeout=10.0)
    fields = form_fields(client.get("/login").text)
    fields.update(username="admin", password=stack.environment["ADMIN_PASSWORD"])
    assert client.post("/login", data=fields).status_code == 302
    return client


def test_two_stacks_share_jobs_and_recover_a_crashed_one(
    stack_factory: Callable[..., Stack], database_url: str, upstream: Upstream
) -> None:
    shared = {"DATABASE_URL": database_url, "API_BASE_URL": upstream.url,
              **FAST_RECOVERY}
    first = stack_factory(shared)
    second = stack_factory({**shared,
                            "ADMIN_PASSWORD": first.environment["ADMIN_PASSWORD"]})

    upstream.hold("/work/a", 0.2)
    job_ids = _defer_many(database_url, 60, "/work/a")
    wait_until(lambda: _statuses(database_url, job_ids).get("succeeded") == 60,
              DEADLINE, "60 jobs to succeed on two stacks")
    processes = {name.split("@")[0] for name in
                 _hosts_of_started_attempts(database_url, job_ids)}
    assert len(_hosts_of_started_attempts(database_url, job_ids)) >= 3, processes
    for request in upstream.requests("/work/a"):
        assert request.headers.get("Idempotency-Key")
    keys = [request.headers["Idempotency-Key"] for request in
            upstream.requests("/work/a")]
    assert len(keys) == len(set(keys)) == 60

    for stack in (first, second):
        page = _log_in(stack).get("/workers")
        assert page.status_code == 200
        for process in ("worker:worker_00", "worker:worker_01"):
            assert page.text.count(process) >= 2, page.text[:2000]

    upstream.clear()
    upstream.hold("/slow/b", 30, times=20)
    slow_ids = _defer_many(database_url, 20, "/slow/b")
    upstream.wait_for_count("/slow/b", 20, timeout=DEADLINE)
    first.crash()
    wait_until(lambda: _statuses(database_url, slow_ids).get("succeeded") == 20,
              DEADLINE, "the crashed stack's jobs to be recovered and succeed")
    _assert_no_overlap(upstream, "/slow/b")
    with psycopg.connect(database_url) as conn:
        doing = conn.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'"
        ).fetchone()
    assert doing == (0,)
