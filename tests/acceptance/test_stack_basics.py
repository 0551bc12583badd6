"""The whole stack under the real supervisord: log in, defer, run, and survive a kill.

The panel is reached over HTTP through gunicorn, jobs run in the real worker
processes, and the upstream is a loopback server the test controls.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable

import httpx
import psycopg

from tests.support.forms import form_fields
from tests.support.faults import wait_until
from tests.support.stack import Stack
from tests.support.upstream import Upstream

JOB_DEADLINE = 60.0  # seconds for a job to reach its expected state


def _log_in(stack: Stack) -> httpx.Client:
    client = httpx.Client(base_url=stack.url, timeout=10.0)
    page = client.get("/login")
    fields = form_fields(page.text)
    fields.update(username="admin", password=stack.environment["ADMIN_PASSWORD"])
    response = client.post("/login", data=fields)
    assert response.status_code == 302, response.text[:500]
    return client


def _defer(client: httpx.Client, task: str, values: dict[str, str]) -> int:
    page = client.get(f"/defer/{task}")
    assert page.status_code == 200, page.text[:500]
    fields = form_fields(page.text)
    fields.update(values)
    response = client.post(f"/defer/{task}", data=fields)
    assert response.status_code in (302, 303), response.text[:1000]
    match = re.search(r"/jobs/(\d+)$", response.headers["Location"])
    assert match, response.headers["Location"]
    return int(match.group(1))




def _dashboard_count(client: httpx.Client, status: str) -> int:
    """Return the exact number of ``status`` jobs the dashboard shows."""
    page = client.get("/")
    assert page.status_code == 200, page.text[:500]
    match = re.search(
        rf'data-status="{status}" data-exact="(yes|no)">\s*([^<]*?)\s*<', page.text)
    assert match is not None, f"the dashboard shows no {status} count"
    assert match.group(1) == "yes", match.group(0)
    return int(match.group(2).replace(",", ""))


def _worker_state(client: httpx.Client, worker_id: int) -> str | None:
    """Return the state the Workers page shows for ``worker_id``, if it lists it."""
    page = client.get("/workers")
    assert page.status_code == 200, page.text[:500]
    row = re.search(
        rf'data-worker-id="{worker_id}">(.*?)</tr>', page.text, re.DOTALL)
    if row is None:
        return None
    state = re.search(r'data-worker-state="(\w+)"', row.group(1))
    assert state is not None, row.group(1)
    return state.group(1)


def _job_row(database_url: str, job_id: int) -> dict[str, object]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status::text, attempts, worker_id FROM procrastinate_jobs "
            "WHERE id = %s", (job_id,),
        ).fetchone()
    assert row is not None
    return {"status": row[0], "attempts": row[1], "worker_id": row[2]}


def _event_types(database_url: str, job_id: int) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT type::text FROM procrastinate_events WHERE job_id = %s "
            "ORDER BY id", (job_id,),
        ).fetchall()
    return [row[0] for row in rows]


def _process_of_worker(database_url: str, worker_id: int) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT process_name FROM worker_processes WHERE worker_id = %s",
            (worker_id,),
        ).fetchone()
    assert row is not None, f"no worker_processes row for worker {worker_id}"
    return row[0]


def test_stack_runs_panel_workers_and_scheduler(
    stack_factory: Callable[..., Stack], database_url: str, upstream: Upstream
) -> None:
    stack = stack_factory({"DATABASE_URL": database_url, "API_BASE_URL": upstream.url})

    status = stack.supervisorctl("status")
    lines = {line.split()[0]: line.split()[1] for line in
             status.stdout.splitlines() if line.strip()}
    for name in ("web", "worker:worker_00", "worker:worker_01", "scheduler"):
        assert lines.get(name) == "RUNNING", status.stdout

    client = _log_in(stack)
    job_id = _defer(client, "fetch_joke", {})
    wait_until(lambda: _job_row(database_url, job_id)["status"] == "succeeded",
              JOB_DEADLINE, f"job {job_id} to succeed")
    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200
    assert "succeeded" in page.text
    joke = upstream.requests("/jokes/random")[0]
    assert joke.path == "/jokes/random"
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT result->>'joke' FROM job_results WHERE job_id = %s", (job_id,)
        ).fetchone()
    assert stored is not None and stored[0]
    assert stored[0] in page.text


def test_killed_worker_job_is_retried_and_finishes_once(
    stack_factory: Callable[..., Stack], database_url: str, upstream: Upstream
) -> None:
    upstream.hold("/slow", 60, times=1)
    stack = stack_factory({
        "DATABASE_URL": database_url,
        "API_BASE_URL": upstream.url,
        "HEARTBEAT_INTERVAL": "1",
        "STALLED_JOB_THRESHOLD": "4",
        "STALLED_JOB_CHECK_INTERVAL": "2",
        "WORKER_SHUTDOWN_TIMEOUT": "2",
        "SCHEDULER_SHUTDOWN_TIMEOUT": "2",
        "JOB_TIMEOUT": "120",
        "HTTP_TIMEOUT": "90",
    })
    client = _log_in(stack)
    job_id = _defer(client, "call_api", {"method": "GET", "path": "/slow"})

    upstream.wait_for(lambda request: request.path == "/slow", timeout=JOB_DEADLINE)
    doing = wait_until(
        lambda: (row := _job_row(database_url, job_id))["status"] == "doing"
        and row["worker_id"] is not None and row,
        JOB_DEADLINE, f"job {job_id} to be doing",
    )
    assert isinstance(doing, dict)
    assert _dashboard_count(client, "doing") >= 1
    name = _process_of_worker(database_url, int(doing["worker_id"]))
    old_pid = stack.process_info(name)["pid"]
    assert _worker_state(client, int(doing["worker_id"])) == "live"
    stack.kill(name, signal.SIGKILL)
    # supervisord reaps the process at once, long before the heartbeat is 4 s old.
    wait_until(lambda: _worker_state(client, int(doing["worker_id"])) == "exited",
               3, "the Workers page to show the killed worker as exited")

    wait_until(lambda: stack.process_info(name)["statename"] == "RUNNING"
              and stack.process_info(name)["pid"] != old_pid,
              JOB_DEADLINE, f"{name} to be restarted")
    wait_until(lambda: _job_row(database_url, job_id)["status"] == "succeeded",
              JOB_DEADLINE, f"job {job_id} to be recovered and succeed")

    events = _event_types(database_url, job_id)
    assert events.count("started") == 2, events
    assert events.count("succeeded") == 1, events
    assert upstream.count("/slow") == 2
    # Procrastinate counts every finished run: the killed one and the final one.
    assert _job_row(database_url, job_id)["attempts"] == 2
    scheduler_log = stack.log("scheduler")
    assert re.search(rf"Stalled job {job_id} of dead worker {doing['worker_id']}",
                     scheduler_log), scheduler_log[-2000:]
    # A periodic maintenance job may be running at the moment of a look, so the
    # dashboard gets a few seconds to show none.
    wait_until(lambda: _dashboard_count(client, "doing") == 0, 15,
               "the dashboard to show 0 doing jobs")
