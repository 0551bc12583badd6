"""The jobs API: list, job page, actions and the bulk two-step, with roles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from tests.integration.test_api_fixtures import (  # noqa: F401 - fixtures
    ApiCaller,
    api_as,
    api_panel,
    job_total,
    shared_api_as,
    shared_api_panel,
    shared_tokens,
)
from tests.integration.test_jobs_fixtures import (
    audit_rows,
    defer_job,
    job_in_state,
    job_row,
)
from tests.support.panel import csrf_token, log_in

ApiAs = Callable[[str | None], ApiCaller]


def _ids(body: dict[str, Any]) -> list[int]:
    return [job["id"] for job in body["jobs"]]


def test_list_jobs_newest_first_with_count(api_panel: Flask, api_as: ApiAs) -> None:
    ids = [defer_job(api_panel) for _ in range(3)]
    response = api_as("viewer")("GET", "/api/v1/jobs")
    assert response.status_code == 200
    body = response.get_json()
    assert _ids(body) == sorted(ids, reverse=True)
    assert body["count"] == {"value": 3, "capped": False, "estimate": None,
                             "label": "3"}
    assert body["next"] is None
    assert body["prev"] is None
    assert body["limit"] == 50


def test_list_jobs_follows_cursors(api_panel: Flask, api_as: ApiAs) -> None:
    ids = sorted((defer_job(api_panel) for _ in range(45)), reverse=True)
    call = api_as("viewer")
    first = call("GET", "/api/v1/jobs?limit=20").get_json()
    assert _ids(first) == ids[:20]
    assert first["next"]["before"] == ids[19]
    second = call("GET", first["next"]["url"]).get_json()
    assert _ids(second) == ids[20:40]
    assert second["prev"]["after"] == ids[20]
    third = call("GET", second["next"]["url"]).get_json()
    assert _ids(third) == ids[40:]
    assert third["next"] is None
    back = call("GET", third["prev"]["url"]).get_json()
    assert _ids(back) == ids[20:40]


def test_list_jobs_filters(api_panel: Flask, api_as: ApiAs) -> None:
    failed = job_in_state(api_panel, "failed")
    job_in_state(api_panel, "succeeded")
    call_api = defer_job(api_panel, "call_api",
                         arguments={"method": "GET", "path": "/a"})
    call = api_as("viewer")
    by_status = call("GET", "/api/v1/jobs",
                     query_string=[("status", "failed"), ("status", "todo")])
    assert _ids(by_status.get_json()) == [call_api, failed]
    assert by_status.get_json()["filters"] == {"status": ["failed", "todo"]}
    by_task = call("GET", "/api/v1/jobs?task=call_api").get_json()
    assert _ids(by_task) == [call_api]
    by_argument = call("GET", "/api/v1/jobs?arg_key=path&arg_value=/a").get_json()
    assert _ids(by_argument) == [call_api]


def test_list_jobs_redacts_arguments(api_panel: Flask, api_as: ApiAs) -> None:
    defer_job(api_panel, "call_api", arguments={
        "method": "POST", "path": "/login", "json": {"password": "hunter2"}})
    body = api_as("viewer")("GET", "/api/v1/jobs").get_json()
    assert body["jobs"][0]["args"]["json"] == {"password": "[redacted]"}
    assert "hunter2" not in str(body)


@pytest.mark.parametrize(("query", "field"), [
    ("status=bogus", "status"),
    ("limit=7", "limit"),
    ("before=abc", "before"),
    ("before=5&after=3", "after"),
    ("created_from=yesterday", "created_from"),
    ("created_from=0001-01-01T00:00%2B01:00", "created_from"),
    ("queue=%00", "queue"),
    ("arg_key=password&arg_value=x", "arg_key"),
    ("stauts=failed", "stauts"),
])
def test_list_jobs_rejects_bad_query(shared_api_as: ApiAs, query: str,
                                     field: str) -> None:
    response = shared_api_as("viewer")("GET", f"/api/v1/jobs?{query}")
    assert response.status_code == 400
    assert field in response.get_json()["field_errors"]


def test_get_job_returns_detail(api_panel: Flask, api_as: ApiAs) -> None:
    job_id = job_in_state(api_panel, "failed")
    body = api_as("viewer")("GET", f"/api/v1/jobs/{job_id}").get_json()
    assert body["job"]["id"] == job_id
    assert body["job"]["status"] == "failed"
    assert body["actions"]["retry"] is None
    assert "only waiting" in body["actions"]["cancel"]
    assert [entry["kind"] for entry in body["timeline"]].count("event") >= 3


@pytest.mark.parametrize("path", ["/api/v1/jobs/999999", "/api/v1/jobs/0",
                                  "/api/v1/jobs/99999999999999999999",
                                  "/api/v1/jobs/abc"])
def test_get_job_missing_is_404(shared_api_as: ApiAs, path: str) -> None:
    response = shared_api_as("viewer")("GET", path)
    assert response.status_code == 404
    assert response.get_json()["error"] == "Not Found"


def test_action_retries_failed_job(api_panel: Flask, api_as: ApiAs) -> None:
    job_id = job_in_state(api_panel, "failed")
    response = api_as("operator")("POST", f"/api/v1/jobs/{job_id}/retry")
    assert response.status_code == 200
    body = response.get_json()
    assert body["done"] is True
    assert body["status_before"] == "failed"
    assert body["status_after"] == "todo"
    row = job_row(api_panel, job_id)
    assert row is not None
    assert row["status"] == "todo"
    entry = audit_rows(api_panel, "job_retried")[-1]
    assert entry["username"] == "operator"
    assert entry["job_ids"] == [job_id]


def test_action_wrong_state_is_409(api_panel: Flask, api_as: ApiAs) -> None:
    job_id = job_in_state(api_panel, "succeeded")
    response = api_as("operator")("POST", f"/api/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409
    body = response.get_json()
    assert body["reason"] == "wrong_state"
    assert "only waiting (todo) jobs can be cancelled" in body["message"]
    row = job_row(api_panel, job_id)
    assert row is not None
    assert row["status"] == "succeeded"
    assert audit_rows(api_panel, "job_cancelled")[-1]["result"].startswith(
        "rejected")


def test_action_deletes_finished_job(api_panel: Flask, api_as: ApiAs) -> None:
    job_id = job_in_state(api_panel, "cancelled")
    response = api_as("admin")("POST", f"/api/v1/jobs/{job_id}/delete")
    assert response.status_code == 200
    assert job_row(api_panel, job_id) is None
    again = api_as("operator")("POST", f"/api/v1/jobs/{job_id}/delete")
    assert again.status_code == 404
    assert again.get_json()["reason"] == "not_found"


def test_action_unknown_is_404(api_panel: Flask, api_as: ApiAs) -> None:
    job_id = defer_job(api_panel)
    response = api_as("operator")("POST", f"/api/v1/jobs/{job_id}/explode")
    assert response.status_code == 404
    assert "retry, cancel, abort, run_now, delete" in response.get_json()["message"]


def test_action_queueing_lock_conflict_is_409(api_panel: Flask,
                                              api_as: ApiAs) -> None:
    failed = job_in_state(api_panel, "failed", queueing_lock="key-1")
    holder = defer_job(api_panel, queueing_lock="key-1")
    response = api_as("operator")("POST", f"/api/v1/jobs/{failed}/retry")
    assert response.status_code == 409
    body = response.get_json()
    assert body["reason"] == "queueing_lock"
    assert body["conflicting_job_id"] == holder
    assert "key-1" in body["message"]


def test_viewer_cannot_act(api_panel: Flask, api_as: ApiAs) -> None:
    job_id = defer_job(api_panel)
    response = api_as("viewer")("POST", f"/api/v1/jobs/{job_id}/cancel")
    assert response.status_code == 403
    assert "operator role" in response.get_json()["message"]
    row = job_row(api_panel, job_id)
    assert row is not None
    assert row["status"] == "todo"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/jobs"), ("GET", "/api/v1/jobs/1"),
    ("POST", "/api/v1/jobs/1/cancel"), ("POST", "/api/v1/jobs/bulk"),
    ("GET", "/api/v1/openapi.json"),
])
def test_no_token_is_401(shared_api_as: ApiAs, method: str, path: str) -> None:
    response = shared_api_as(None)(method, path)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].lower().startswith("bearer")


def test_bad_token_is_401(api_panel: Flask) -> None:
    call = ApiCaller(api_panel, "pnl_" + "x" * 43)
    response = call("GET", "/api/v1/jobs")
    assert response.status_code == 401
    assert "invalid_token" in response.headers["WWW-Authenticate"]


def test_session_reads_but_posts_need_csrf(api_panel: Flask) -> None:
    job_id = defer_job(api_panel)
    call = ApiCaller(api_panel, None)
    log_in(call.client, "operator")
    assert call("GET", "/api/v1/jobs").status_code == 200
    rejected = call("POST", f"/api/v1/jobs/{job_id}/cancel")
    assert rejected.status_code == 400
    row = job_row(api_panel, job_id)
    assert row is not None
    assert row["status"] == "todo"
    token = csrf_token(call.client.get("/account").get_data(as_text=True))
    done = call("POST", f"/api/v1/jobs/{job_id}/cancel",
                headers={"X-CSRFToken": token})
    assert done.status_code == 200


def test_bulk_counts_then_runs(api_panel: Flask, api_as: ApiAs) -> None:
    failed = [job_in_state(api_panel, "failed") for _ in range(3)]
    job_in_state(api_panel, "succeeded")
    call = api_as("operator")
    request = {"action": "retry", "filter": {"status": ["failed", "succeeded"]}}
    counted = call("POST", "/api/v1/jobs/bulk", request)
    assert counted.status_code == 200
    count = counted.get_json()
    assert count["performed"] is False
    assert count["count"] == 3
    assert count["matched"] == 4
    assert count["by_status"] == {"failed": 3, "succeeded": 1}
    for job_id in failed:
        row = job_row(api_panel, job_id)
        assert row is not None
        assert row["status"] == "failed"
    later = job_in_state(api_panel, "failed")
    ran = call("POST", "/api/v1/jobs/bulk", {
        **request, "snapshot_id": count["snapshot_id"], "confirm_count": 3})
    assert ran.status_code == 200
    result = ran.get_json()
    assert result["performed"] is True
    assert result["complete"] is True
    assert sorted(result["done"]) == failed
    later_row = job_row(api_panel, later)
    assert later_row is not None
    assert later_row["status"] == "failed"
    assert len(audit_rows(api_panel, "jobs_bulk_retry")) == 1


def test_bulk_count_changed_is_409(api_panel: Flask, api_as: ApiAs) -> None:
    jobs = [defer_job(api_panel) for _ in range(2)]
    call = api_as("operator")
    request = {"action": "cancel", "job_ids": jobs}
    count = call("POST", "/api/v1/jobs/bulk", request).get_json()
    assert count["count"] == 2
    call("POST", f"/api/v1/jobs/{jobs[0]}/cancel")
    changed = call("POST", "/api/v1/jobs/bulk", {
        **request, "snapshot_id": count["snapshot_id"], "confirm_count": 2})
    assert changed.status_code == 409
    body = changed.get_json()
    assert body["count"] == 1
    assert body["performed"] is False
    row = job_row(api_panel, jobs[1])
    assert row is not None
    assert row["status"] == "todo"
    confirmed = call("POST", "/api/v1/jobs/bulk", {
        **request, "snapshot_id": body["snapshot_id"], "confirm_count": 1})
    assert confirmed.get_json()["done"] == [jobs[1]]


@pytest.mark.parametrize(("body", "field"), [
    ({"job_ids": [1]}, "action"),
    ({"action": "nuke", "job_ids": [1]}, "action"),
    ({"action": "cancel"}, "job_ids"),
    ({"action": "cancel", "job_ids": [1], "filter": {}}, "job_ids"),
    ({"action": "cancel", "job_ids": []}, "job_ids"),
    ({"action": "cancel", "job_ids": "1"}, "job_ids"),
    ({"action": "cancel", "job_ids": [True]}, "job_ids[0]"),
    ({"action": "cancel", "job_ids": [2**63]}, "job_ids[0]"),
    ({"action": "cancel", "job_ids": list(range(1, 1002))}, "job_ids"),
    ({"action": "cancel", "job_ids": [1], "confirm_count": 1}, "snapshot_id"),
    ({"action": "cancel", "job_ids": [1], "confirm_count": -1}, "confirm_count"),
    ({"action": "cancel", "filter": {"status": "nope"}}, "filter.status"),
    ({"action": "cancel", "filter": {"queue": 5}}, "filter.queue"),
    ({"action": "cancel", "filter": {"colour": "red"}}, "filter.colour"),
    ({"action": "cancel", "filter": []}, "filter"),
    ({"action": "cancel", "job_ids": [1], "extra": 1}, "extra"),
])
def test_bulk_rejects_invalid_request(shared_api_panel: Flask,
                                      shared_api_as: ApiAs,
                                      body: dict[str, Any], field: str) -> None:
    job_id = defer_job(shared_api_panel)
    before = job_total(shared_api_panel)
    response = shared_api_as("operator")("POST", "/api/v1/jobs/bulk", body)
    assert response.status_code == 400
    assert field in response.get_json()["field_errors"]
    assert job_total(shared_api_panel) == before
    row = job_row(shared_api_panel, job_id)
    assert row is not None
    assert row["status"] == "todo"


def test_bulk_needs_operator(api_panel: Flask, api_as: ApiAs) -> None:
    response = api_as("viewer")("POST", "/api/v1/jobs/bulk",
                                {"action": "cancel", "filter": {}})
    assert response.status_code == 403
