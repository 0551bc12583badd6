"""Workers, stalled jobs, queues and periodic tasks, against the real database."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient
from psycopg.rows import dict_row

from tests.support.panel import csrf_token

STALE = 3600  # seconds; far beyond STALLED_JOB_THRESHOLD (60 s by default)


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """Yield an autocommit connection to the test database."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def add_job(
    sql: psycopg.Connection[dict[str, Any]],
    task: str = "fetch_joke",
    queue: str = "api_calls",
    **fields: Any,
) -> int:
    """Insert a waiting job, then apply ``fields`` (status, worker_id, ...)."""
    row = sql.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args, queueing_lock)"
        " VALUES (%s, %s, '{}', %s) RETURNING id",
        (queue, task, fields.pop("queueing_lock", None)),
    ).fetchone()
    assert row is not None
    if "status" in fields:
        # The status moves through doing so that the triggers write the events.
        status = fields.pop("status")
        if status != "todo":
            sql.execute("UPDATE procrastinate_jobs SET status = 'doing', worker_id = "
                        "%s WHERE id = %s", (fields.pop("worker_id", None), row["id"]))
        if status not in {"todo", "doing"}:
            sql.execute("UPDATE procrastinate_jobs SET status = %s WHERE id = %s",
                        (status, row["id"]))
    for name, value in fields.items():
        sql.execute(f"UPDATE procrastinate_jobs SET {name} = %s WHERE id = %s",
                    (value, row["id"]))
    return int(row["id"])


def add_worker(
    sql: psycopg.Connection[dict[str, Any]],
    name: str,
    age: float = 0.0,
    role: str = "worker",
    queues: tuple[str, ...] = ("default", "api_calls"),
) -> int:
    """Register a Procrastinate worker whose last heartbeat is ``age`` seconds old."""
    row = sql.execute(
        "INSERT INTO procrastinate_workers (last_heartbeat) "
        "VALUES (now() - make_interval(secs => %s)) RETURNING id", (age,),
    ).fetchone()
    assert row is not None
    sql.execute(
        "INSERT INTO worker_processes (worker_id, host, pid, process_name, role, "
        "queues, concurrency) VALUES (%s, 'host-a', 4242, %s, %s, %s, 10)",
        (row["id"], name, role, list(queues)),
    )
    return int(row["id"])


def job_status(sql: psycopg.Connection[dict[str, Any]], job_id: int) -> str:
    """Return the status of one job."""
    row = sql.execute("SELECT status::text AS status FROM procrastinate_jobs "
                      "WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return str(row["status"])


def audit_rows(sql: psycopg.Connection[dict[str, Any]], action: str
               ) -> list[dict[str, Any]]:
    """Return the audit entries of one action, oldest first."""
    return sql.execute("SELECT * FROM audit_log WHERE action = %s ORDER BY id",
                       (action,)).fetchall()


def page(client: FlaskClient, path: str) -> str:
    """Return the body of a GET that must return 200."""
    response = client.get(path)
    assert response.status_code == 200, response.get_data(as_text=True)[:2000]
    return response.get_data(as_text=True)


def test_workers_page_lists_live_stale_and_stopped(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    live = add_worker(sql, "worker:worker_00")
    stale = add_worker(sql, "worker:worker_01", age=STALE)
    job = add_job(sql, status="doing", worker_id=live)
    sql.execute(
        "INSERT INTO worker_processes (worker_id, host, pid, process_name, role, "
        "queues, concurrency, started_at, stopped_at) VALUES (987654, 'host-b', 7, "
        "'worker:worker_02', 'worker', '{default}', 10, now() - interval '2 hours', "
        "now() - interval '1 hour')")

    body = page(client_for("viewer"), "/workers")

    assert f'data-worker-id="{live}"' in body
    assert f'data-worker-id="{stale}"' in body
    assert "1 of 2 worker processes live" in body
    assert f"/jobs/{job}" in body
    assert "worker:worker_02" in body
    stale_row = re.search(rf'<tr class="fleet-row-stale" data-worker-id="{stale}"',
                          body)
    assert stale_row is not None


def test_workers_page_without_workers_says_so(
    client_for: Callable[[str], FlaskClient],
) -> None:
    body = page(client_for("viewer"), "/workers")
    assert "No Procrastinate worker is registered" in body
    assert "No worker stopped in the last day" in body


def test_stalled_page_lists_dead_workers_jobs(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    live = add_worker(sql, "worker:worker_00")
    dead = add_worker(sql, "worker:worker_01", age=STALE)
    healthy = add_job(sql, status="doing", worker_id=live)
    stalled = add_job(sql, status="doing", worker_id=dead)
    orphan = add_job(sql, status="doing", worker_id=None)

    body = page(client_for("viewer"), "/stalled")

    assert f'data-job-id="{stalled}"' in body
    assert f'data-job-id="{orphan}"' in body
    assert f'data-job-id="{healthy}"' not in body
    assert "The task may have run partly" in body
    assert "need the operator role" in body
    assert 'name="job_id"' not in body


def stalled_post(client: FlaskClient, action: str, job_ids: list[int]) -> Any:
    """Post the stalled-jobs form with a CSRF token from the page."""
    token = csrf_token(client.get("/stalled").get_data(as_text=True))
    return client.post(f"/stalled/{action}",
                       data={"csrf_token": token, "job_id": [str(i) for i in job_ids]})


def test_stalled_retry_gives_job_back_and_audits(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    dead = add_worker(sql, "worker:worker_01", age=STALE)
    job = add_job(sql, status="doing", worker_id=dead)
    client = client_for("operator")

    response = stalled_post(client, "retry", [job])

    assert response.status_code == 303
    assert job_status(sql, job) == "todo"
    attempts = sql.execute("SELECT attempts FROM procrastinate_jobs WHERE id = %s",
                           (job,)).fetchone()
    assert attempts is not None and attempts["attempts"] == 1
    lost = sql.execute("SELECT outcome, error_message FROM job_attempts "
                       "WHERE job_id = %s", (job,)).fetchall()
    assert [row["outcome"] for row in lost] == ["worker_lost"]
    assert "retried by operator" in lost[0]["error_message"]
    entries = audit_rows(sql, "stalled_job_retried")
    assert len(entries) == 1
    assert entries[0]["username"] == "operator"
    assert entries[0]["job_ids"] == [job]
    assert entries[0]["result"].startswith("ok")
    followed = client.get("/stalled")
    assert f"Jobs {job} retried" in followed.get_data(as_text=True)


def test_stalled_fail_marks_failed_and_audits(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    orphan = add_job(sql, status="doing", worker_id=None)

    response = stalled_post(client_for("admin"), "fail", [orphan])

    assert response.status_code == 303
    assert job_status(sql, orphan) == "failed"
    entries = audit_rows(sql, "stalled_job_failed")
    assert [entry["job_ids"] for entry in entries] == [[orphan]]


def test_stalled_action_skips_job_whose_worker_lives(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    live = add_worker(sql, "worker:worker_00")
    dead = add_worker(sql, "worker:worker_01", age=STALE)
    healthy = add_job(sql, status="doing", worker_id=live)
    stalled = add_job(sql, status="doing", worker_id=dead)

    response = stalled_post(client_for("operator"), "retry", [healthy, stalled])

    assert response.status_code == 303
    assert job_status(sql, healthy) == "doing"
    assert job_status(sql, stalled) == "todo"
    entry = audit_rows(sql, "stalled_job_retried")[0]
    assert entry["job_ids"] == [stalled]
    assert f"job {healthy} is no longer stalled" in entry["result"]


def test_stalled_action_on_finished_job_is_409(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    done = add_job(sql, status="succeeded")

    response = stalled_post(client_for("operator"), "fail", [done])

    assert response.status_code == 409
    assert f"job {done} is succeeded, no longer doing" in response.get_data(
        as_text=True)
    assert job_status(sql, done) == "succeeded"
    assert audit_rows(sql, "stalled_job_failed")[0]["result"].startswith("rejected")


def test_stalled_action_rejects_viewer(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    orphan = add_job(sql, status="doing", worker_id=None)

    response = stalled_post(client_for("viewer"), "retry", [orphan])

    assert response.status_code == 403
    assert job_status(sql, orphan) == "doing"
    assert audit_rows(sql, "stalled_job_retried") == []


def test_stalled_action_without_csrf_changes_nothing(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    orphan = add_job(sql, status="doing", worker_id=None)

    response = client_for("operator").post("/stalled/retry",
                                           data={"job_id": str(orphan)})

    assert response.status_code in {302, 303, 400}
    assert job_status(sql, orphan) == "doing"


@pytest.mark.parametrize(("action", "data", "status"), [
    ("retry", {}, 400),
    ("retry", {"job_id": "abc"}, 400),
    ("explode", {"job_id": "1"}, 404),
])
def test_stalled_action_rejects_bad_requests(
    client_for: Callable[[str], FlaskClient],
    action: str,
    data: dict[str, str],
    status: int,
) -> None:
    client = client_for("operator")
    token = csrf_token(client.get("/stalled").get_data(as_text=True))

    response = client.post(f"/stalled/{action}", data={"csrf_token": token, **data})

    assert response.status_code == status


def test_stalled_get_on_action_is_not_allowed(
    client_for: Callable[[str], FlaskClient],
) -> None:
    assert client_for("operator").get("/stalled/retry").status_code == 405


def test_queues_page_counts_and_oldest_waiting(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    old = add_job(sql, queue="api_calls")
    sql.execute("UPDATE procrastinate_events SET at = now() - interval '15 minutes' "
                "WHERE job_id = %s", (old,))
    add_job(sql, queue="api_calls")
    add_job(sql, queue="api_calls",
            scheduled_at=sql.execute("SELECT now() + interval '1 hour' AS t")
            .fetchone()["t"])  # type: ignore[index]
    add_job(sql, queue="default", status="succeeded")
    add_job(sql, queue="default", status="failed")
    add_job(sql, queue="reports", status="cancelled")
    add_worker(sql, "worker:worker_00", queues=("api_calls",))

    body = page(client_for("viewer"), "/queues")

    api_row = body[body.index('data-queue="api_calls"'):]
    api_row = api_row[:api_row.index("</tr>")]
    todo_cell = api_row[api_row.index('data-status="todo"'):]
    assert ">3</a>" in todo_cell[:200]
    assert "1 scheduled later" in api_row
    assert f"/jobs/{old}" in api_row
    assert "15 min" in api_row
    assert "1 worker" in api_row
    default_row = body[body.index('data-queue="default"'):]
    default_row = default_row[:default_row.index("</tr>")]
    assert "1 ok" in default_row
    assert "1 failed" in default_row
    assert "no live worker" in default_row
    assert 'data-queue="reports"' in body
    assert 'data-queue="maintenance"' in body
    assert "has no way to pause a queue" in body


def test_periodic_page_lists_registered_tasks(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    job = add_job(sql, task="health_check", queue="maintenance", status="succeeded")
    sql.execute("INSERT INTO procrastinate_periodic_defers (task_name, periodic_id, "
                "defer_timestamp, job_id) VALUES ('health_check', 'health_check', "
                "1700000000, %s)", (job,))

    body = page(client_for("operator"), "/periodic")

    for task in ("health_check", "retry_stalled_jobs", "prune_old_jobs"):
        assert f'data-task="{task}"' in body
    row = body[body.index('data-task="health_check"'):]
    row = row[:row.index("</tr>")]
    assert "* * * * *" in row
    assert "2023-11-14 22:13:20 UTC" in row
    assert f"/jobs/{job}" in row
    assert "Run now" in row


def periodic_post(client: FlaskClient, task: str, periodic_id: str) -> Any:
    """Post the Run now form of a periodic task."""
    token = csrf_token(client.get("/periodic").get_data(as_text=True))
    return client.post("/periodic/run", data={
        "csrf_token": token, "task": task, "periodic_id": periodic_id})


def test_periodic_run_now_defers_with_timestamp(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    response = periodic_post(client_for("operator"), "health_check", "health_check")

    assert response.status_code == 303
    jobs = sql.execute("SELECT id, queue_name, args, queueing_lock FROM "
                       "procrastinate_jobs WHERE task_name = 'health_check'"
                       ).fetchall()
    assert len(jobs) == 1
    assert jobs[0]["queue_name"] == "maintenance"
    assert jobs[0]["queueing_lock"] == "health_check"
    now = sql.execute("SELECT extract(epoch FROM now())::bigint AS t").fetchone()
    assert now is not None
    assert abs(jobs[0]["args"]["timestamp"] - now["t"]) < 60
    entry = audit_rows(sql, "periodic_task_run")[0]
    assert entry["job_ids"] == [jobs[0]["id"]]
    assert entry["result"] == "ok"


def test_periodic_run_now_reports_queueing_lock_conflict(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    waiting = add_job(sql, task="health_check", queue="maintenance",
                      queueing_lock="health_check")

    response = periodic_post(client_for("operator"), "health_check", "health_check")

    assert response.status_code == 409
    body = response.get_data(as_text=True)
    assert (f"job {waiting} of health_check, with queueing lock health_check, "
            "is todo") in body
    count = sql.execute("SELECT count(*) AS n FROM procrastinate_jobs "
                        "WHERE task_name = 'health_check'").fetchone()
    assert count is not None and count["n"] == 1
    assert audit_rows(sql, "periodic_task_run")[0]["result"].startswith("rejected")


def test_periodic_run_now_rejects_running_copy(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    add_job(sql, task="prune_old_jobs", queue="maintenance",
            queueing_lock="prune_old_jobs", status="doing")

    response = periodic_post(client_for("operator"), "prune_old_jobs",
                             "prune_old_jobs")

    assert response.status_code == 409
    assert "is doing" in response.get_data(as_text=True)


def test_periodic_run_now_unknown_task_is_404(
    client_for: Callable[[str], FlaskClient],
) -> None:
    response = periodic_post(client_for("operator"), "fetch_joke", "nope")
    assert response.status_code == 404


def test_periodic_run_now_rejects_viewer(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    response = periodic_post(client_for("viewer"), "health_check", "health_check")

    assert response.status_code == 403
    count = sql.execute("SELECT count(*) AS n FROM procrastinate_jobs").fetchone()
    assert count is not None and count["n"] == 0
