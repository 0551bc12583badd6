"""Actions on one job: each in its allowed states, rejected in every other state."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg.types.json import Jsonb

from tests.integration.test_jobs_fixtures import (
    audit_rows,
    defer_job,
    flashes,
    job_in_state,
    job_row,
    post_action,
    run_sql,
    stop_heartbeats,
    token_for,
)

UTC = datetime.timezone.utc
STATES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborted")
ALLOWED = {
    "retry": {"failed"},
    "cancel": {"todo"},
    "abort": {"doing"},
    "run_now": set(),  # needs a todo job scheduled later; tested on its own
    "delete": {"succeeded", "failed", "cancelled", "aborted"},
}
AUDIT_ACTIONS = {"retry": "job_retried", "cancel": "job_cancelled",
                 "abort": "job_abort_requested", "run_now": "job_run_now",
                 "delete": "job_deleted"}


@pytest.mark.parametrize("action", sorted(ALLOWED))
def test_action_rejected_in_wrong_states(
        panel: Flask, client_for: Callable[[str], FlaskClient], action: str) -> None:
    client = client_for("operator")
    rejected = [state for state in STATES if state not in ALLOWED[action]]
    for state in rejected:
        job_id = job_in_state(panel, state)
        before = job_row(panel, job_id)
        response = post_action(client, job_id, action)
        assert response.status_code == 303, state
        assert job_row(panel, job_id) == before, state
        messages = flashes(client)
        assert len(messages) == 1, state
        assert f"job {job_id}" in messages[0].lower(), state
    entries = audit_rows(panel, AUDIT_ACTIONS[action])
    assert len(entries) == len(rejected)
    assert all(entry["result"].startswith("rejected:") for entry in entries)


def test_retry_failed_job(panel: Flask,
                          client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "failed")
    client = client_for("operator")
    response = post_action(client, job_id, "retry")
    assert response.status_code == 303
    assert response.headers["Location"] == f"/jobs/{job_id}"
    row = job_row(panel, job_id)
    assert row is not None
    assert row["status"] == "todo"
    events = run_sql(panel, "SELECT type::text AS type FROM procrastinate_events "
                            "WHERE job_id = %(id)s ORDER BY id", {"id": job_id})
    assert events[-1]["type"] == "retried"
    assert [entry["result"] for entry in audit_rows(panel, "job_retried")] == ["ok"]


def test_retry_rejects_job_of_live_worker(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "doing")
    response = post_action(client_for("operator"), job_id, "retry")
    assert response.status_code == 303
    row = job_row(panel, job_id)
    assert row is not None
    assert row["status"] == "doing"


def test_retry_job_of_silent_worker(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "doing")
    stop_heartbeats(panel, job_id)
    post_action(client_for("operator"), job_id, "retry")
    row = job_row(panel, job_id)
    assert row is not None
    assert row["status"] == "todo"
    lost = run_sql(panel, "SELECT outcome, error_message FROM job_attempts WHERE "
                          "job_id = %(id)s", {"id": job_id})
    assert [item["outcome"] for item in lost] == ["worker_lost"]
    assert "retried by operator" in lost[0]["error_message"]


def test_retry_job_whose_worker_row_is_gone(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "doing")
    run_sql(panel, "DELETE FROM procrastinate_workers WHERE id = (SELECT worker_id "
                   "FROM procrastinate_jobs WHERE id = %(id)s)", {"id": job_id})
    post_action(client_for("operator"), job_id, "retry")
    row = job_row(panel, job_id)
    assert row is not None
    assert row["status"] == "todo"


def test_retry_skips_queueing_lock_conflict(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    failed = job_in_state(panel, "failed", queueing_lock="only-one")
    waiting = defer_job(panel, queueing_lock="only-one")
    client = client_for("operator")
    response = post_action(client, failed, "retry")
    assert response.status_code == 303
    row = job_row(panel, failed)
    assert row is not None
    assert row["status"] == "failed"
    messages = flashes(client)
    assert messages == [f"Job {failed} was not retried: job {waiting} with queueing "
                        "lock only-one is already waiting"]


def test_cancel_waiting_job(panel: Flask,
                            client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "todo")
    post_action(client_for("operator"), job_id, "cancel")
    row = job_row(panel, job_id)
    assert row is not None
    assert row["status"] == "cancelled"


def test_abort_running_job_requests_abort(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "doing")
    client = client_for("operator")
    post_action(client, job_id, "abort")
    row = job_row(panel, job_id)
    assert row is not None
    assert row["status"] == "doing"
    assert row["abort_requested"] is True
    post_action(client, job_id, "abort")
    messages = flashes(client)
    assert any("already requested" in message for message in messages)
    entries = audit_rows(panel, "job_abort_requested")
    assert [entry["result"][:8] for entry in entries] == ["ok", "rejected"]


def test_run_now_moves_schedule(panel: Flask,
                                client_for: Callable[[str], FlaskClient]) -> None:
    later = datetime.datetime.now(UTC) + datetime.timedelta(days=2)
    job_id = defer_job(panel, schedule_at=later)
    client = client_for("operator")
    post_action(client, job_id, "run_now")
    row = job_row(panel, job_id)
    assert row is not None
    assert row["scheduled_at"] < datetime.datetime.now(UTC) + datetime.timedelta(
        seconds=5)
    post_action(client, job_id, "run_now")
    assert any("already due" in message for message in flashes(client))


def test_run_now_rejects_due_job(panel: Flask,
                                 client_for: Callable[[str], FlaskClient]) -> None:
    job_id = defer_job(panel)
    client = client_for("operator")
    post_action(client, job_id, "run_now")
    row = job_row(panel, job_id)
    assert row is not None
    assert row["scheduled_at"] is None
    assert any("already due" in message for message in flashes(client))


def test_delete_removes_attempts_results_and_periodic_link(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "succeeded")
    run_sql(panel, "INSERT INTO job_attempts (job_id, attempt, task_name, "
                   "queue_name, started_at, outcome) VALUES (%(id)s, 1, "
                   "'fetch_joke', 'api_calls', now(), 'succeeded')", {"id": job_id})
    run_sql(panel, "INSERT INTO job_results (job_id, task_name, result) VALUES "
                   "(%(id)s, 'fetch_joke', %(r)s)",
            {"id": job_id, "r": Jsonb({"joke": "x"})})
    run_sql(panel, "INSERT INTO procrastinate_periodic_defers (task_name, "
                   "defer_timestamp, job_id, periodic_id) VALUES ('fetch_joke', 1, "
                   "%(id)s, 'p')", {"id": job_id})
    response = post_action(client_for("operator"), job_id, "delete",
                           next_url=f"/jobs/{job_id}")
    assert response.status_code == 303
    assert response.headers["Location"] == "/jobs"
    assert job_row(panel, job_id) is None
    for table in ("job_attempts", "job_results"):
        rows = run_sql(panel, f"SELECT 1 FROM {table} WHERE job_id = %(id)s",
                       {"id": job_id})
        assert rows == []
    periodic = run_sql(panel, "SELECT job_id FROM procrastinate_periodic_defers")
    assert periodic == [{"job_id": None}]


def test_action_goes_back_to_the_list_url(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "todo")
    back = "/jobs?status=todo&queue=api_calls&before=99"
    response = post_action(client_for("operator"), job_id, "cancel", next_url=back)
    assert response.headers["Location"] == back
    unsafe = post_action(client_for("operator"), job_id, "delete",
                         next_url="//evil.example/")
    assert unsafe.headers["Location"] == "/jobs"


def test_viewer_cannot_act(panel: Flask,
                           client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "failed")
    response = post_action(client_for("viewer"), job_id, "retry")
    assert response.status_code == 403
    row = job_row(panel, job_id)
    assert row is not None
    assert row["status"] == "failed"


def test_action_without_csrf_changes_nothing(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "failed")
    response = client_for("operator").post(f"/jobs/{job_id}/retry")
    assert response.status_code in {302, 303}
    row = job_row(panel, job_id)
    assert row is not None
    assert row["status"] == "failed"


def test_unknown_action_and_job(client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("operator")
    token = token_for(client)
    assert client.post("/jobs/1/explode",
                       data={"csrf_token": token}).status_code == 404
    response = client.post("/jobs/424242/retry", data={"csrf_token": token})
    assert response.status_code == 303
    assert "does not exist" in " ".join(flashes(client))
    beyond_bigint = client.post(f"/jobs/{2**63}/retry", data={"csrf_token": token})
    assert beyond_bigint.status_code in {303, 404}
