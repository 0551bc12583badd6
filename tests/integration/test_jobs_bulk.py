"""Bulk actions: exact count, confirmation, changed counts, conflicts and budget."""

from __future__ import annotations

import html as html_module
import itertools
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import MultiDict

from tests.integration.test_jobs_fixtures import (
    audit_rows,
    defer_job,
    flashes,
    job_in_state,
    job_row,
    run_sql,
    text,
)
from tests.support.panel import build_panel, logged_in_client
from webpanel import db, job_bulk, job_service


def _hidden_fields(page: str) -> MultiDict[str, str]:
    form = page[page.index('action="/jobs/bulk"'):]
    form = form[:form.index("</form>")]
    return MultiDict([(name, html_module.unescape(value)) for name, value in re.findall(
        r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form)])


def _confirm(client: FlaskClient, query: str) -> tuple[Any, MultiDict[str, str]]:
    response = client.get(f"/jobs/bulk?{query}")
    page = text(response)
    return response, (_hidden_fields(page) if response.status_code == 200
                      else MultiDict())


def _statuses(panel: Flask, ids: list[int]) -> list[str | None]:
    statuses = []
    for job_id in ids:
        row = job_row(panel, job_id)
        statuses.append(row["status"] if row else None)
    return statuses


def test_bulk_retry_by_filter_after_exact_count(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    failed = [job_in_state(panel, "failed") for _ in range(3)]
    done = [job_in_state(panel, "succeeded") for _ in range(2)]
    client = client_for("operator")
    response, fields = _confirm(
        client, "action=retry&scope=filter&status=failed&return_to=/jobs%3Fstatus%3D"
                "failed")
    page = text(response)
    assert response.status_code == 200
    assert 'data-applicable="3" data-matched="3"' in page
    assert fields["count"] == "3"
    assert fields.getlist("status") == ["failed"]
    posted = client.post("/jobs/bulk", data=fields)
    assert posted.status_code == 303
    assert posted.headers["Location"] == "/jobs?status=failed"
    assert _statuses(panel, failed) == ["todo"] * 3
    assert _statuses(panel, done) == ["succeeded"] * 2
    assert flashes(client) == ["Retried 3 jobs."]
    entries = audit_rows(panel, "jobs_bulk_retry")
    assert len(entries) == 1
    assert sorted(entries[0]["job_ids"]) == sorted(failed)


def test_bulk_count_shows_skipped_states(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    for state in ("failed", "succeeded", "todo", "todo"):
        job_in_state(panel, state)
    response, fields = _confirm(client_for("operator"),
                                "action=delete&scope=filter")
    page = text(response)
    assert 'data-applicable="2" data-matched="4"' in page
    assert "2 are in a state that does not allow it" in page


def test_bulk_rejects_changed_count(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    failed = [job_in_state(panel, "failed") for _ in range(3)]
    client = client_for("operator")
    _, fields = _confirm(client, "action=retry&scope=filter&status=failed")
    run_sql(panel, "DELETE FROM procrastinate_jobs WHERE id = %(id)s",
            {"id": failed[0]})
    response = client.post("/jobs/bulk", data=fields)
    assert response.status_code == 409
    page = text(response)
    assert "changed since you looked" in page
    assert 'data-applicable="2" data-matched="2"' in page
    assert _statuses(panel, failed[1:]) == ["failed", "failed"]
    assert audit_rows(panel, "jobs_bulk_retry") == []
    again = client.post("/jobs/bulk", data=_hidden_fields(page))
    assert again.status_code == 303
    assert _statuses(panel, failed[1:]) == ["todo", "todo"]


def test_bulk_on_selected_jobs_only(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    picked = [job_in_state(panel, "todo") for _ in range(2)]
    running = job_in_state(panel, "doing")
    other = job_in_state(panel, "todo")
    client = client_for("operator")
    query = "action=cancel&scope=selected&" + "&".join(
        f"job_id={job_id}" for job_id in [*picked, running])
    response, fields = _confirm(client, query)
    assert 'data-applicable="2" data-matched="3"' in text(response)
    client.post("/jobs/bulk", data=fields)
    assert _statuses(panel, picked) == ["cancelled", "cancelled"]
    assert _statuses(panel, [running, other]) == ["doing", "todo"]
    message = flashes(client)[0]
    assert message.startswith("Cancelled 2 jobs; skipped 1 in a state")


def test_bulk_retry_skips_queueing_lock_conflicts(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    blocked = job_in_state(panel, "failed", queueing_lock="held")
    holder = defer_job(panel, queueing_lock="held")
    first = job_in_state(panel, "failed", queueing_lock="pair")
    second = job_in_state(panel, "failed", queueing_lock="pair")
    free = job_in_state(panel, "failed")
    client = client_for("operator")
    _, fields = _confirm(client, "action=retry&scope=filter&status=failed")
    response = client.post("/jobs/bulk", data=fields)
    assert response.status_code == 303
    assert _statuses(panel, [free, second, first, blocked]) == [
        "todo", "todo", "failed", "failed"]
    message = flashes(client)[0]
    assert "Retried 2 jobs; skipped 2 whose queueing lock" in message
    assert f"job {first} (held by job {second})" in message
    assert f"job {blocked} (held by job {holder})" in message
    details = audit_rows(panel, "jobs_bulk_retry")[0]["details"]
    assert {item["job_id"] for item in details["queueing_lock_conflicts"]} == {
        first, blocked}


def test_bulk_leaves_jobs_created_after_confirmation(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    early = job_in_state(panel, "todo")
    client = client_for("operator")
    _, fields = _confirm(client, "action=cancel&scope=filter&status=todo")
    late = job_in_state(panel, "todo")
    client.post("/jobs/bulk", data=fields)
    assert _statuses(panel, [early, late]) == ["cancelled", "todo"]


def test_bulk_stops_at_time_budget(panel: Flask, monkeypatch: pytest.MonkeyPatch
                                   ) -> None:
    ids = sorted((job_in_state(panel, "todo") for _ in range(6)), reverse=True)
    clock = itertools.count(0.0, 1.0)
    monkeypatch.setattr(job_bulk, "monotonic", lambda: next(clock))
    with panel.test_request_context():
        selection = job_service.Selection(
            scope="filter", filters=job_service.JobFilters(statuses=("todo",)),
            at_most=job_service.snapshot_id())
        report = job_service.run_bulk("cancel", selection, budget=4.5)
    assert report.complete is False
    assert 0 < len(report.done) < len(ids)
    assert report.done == ids[:len(report.done)]
    assert report.resume_at_most == report.done[-1] - 1
    untouched = ids[len(report.done):]
    assert _statuses(panel, untouched) == ["todo"] * len(untouched)
    assert "Stopped after" in report.summary()


def test_bulk_result_page_offers_continue(
        panel: Flask, client_for: Callable[[str], FlaskClient],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [job_in_state(panel, "todo") for _ in range(3)]
    client = client_for("operator")
    _, fields = _confirm(client, "action=cancel&scope=filter&status=todo")
    monkeypatch.setattr(job_bulk, "bulk_time_budget", lambda settings: 0.0)
    response = client.post("/jobs/bulk", data=fields)
    page = text(response)
    assert response.status_code == 200
    assert 'data-state="incomplete"' in page
    assert _statuses(panel, ids) == ["todo"] * 3
    continue_query = urlencode([
        (name, html_module.unescape(value)) for name, value in re.findall(
            r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page)])
    monkeypatch.undo()
    _, again = _confirm(client, continue_query)
    assert again["count"] == "3"
    assert client.post("/jobs/bulk", data=again).status_code == 303
    assert _statuses(panel, ids) == ["cancelled"] * 3


def test_bulk_without_selection_changes_nothing(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "todo")
    client = client_for("operator")
    response = client.get("/jobs/bulk?action=cancel&scope=selected&return_to=/jobs")
    assert response.status_code == 303
    assert "select at least one job" in " ".join(flashes(client))
    no_action = client.get("/jobs/bulk?scope=filter")
    assert no_action.status_code == 303
    assert _statuses(panel, [job_id]) == ["todo"]


def test_bulk_post_without_confirmed_count_changes_nothing(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "failed")
    client = client_for("operator")
    _, fields = _confirm(client, "action=retry&scope=filter")
    fields.pop("count")
    response = client.post("/jobs/bulk", data=fields)
    assert response.status_code == 409
    assert _statuses(panel, [job_id]) == ["failed"]


def test_viewer_cannot_bulk(panel: Flask,
                            client_for: Callable[[str], FlaskClient]) -> None:
    job_in_state(panel, "failed")
    client = client_for("viewer")
    assert client.get("/jobs/bulk?action=retry&scope=filter").status_code == 403


def test_bulk_count_timeout_changes_nothing(database_url: str) -> None:
    panel = build_panel(database_url, env={"WEB_REQUEST_BUDGET": "0.5"})
    try:
        job_id = job_in_state(panel, "failed")
        client = logged_in_client(panel, "operator")
        with psycopg.connect(database_url) as blocker:
            blocker.execute("LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE")
            response = client.get(
                f"/jobs/bulk?action=retry&scope=filter&at_most={job_id}")
            blocker.rollback()
        assert response.status_code == 303
        message = " ".join(flashes(client))
        assert "counting the jobs took longer than 0.2 s" in message
        assert _statuses(panel, [job_id]) == ["failed"]
    finally:
        db.close_process_pool()
