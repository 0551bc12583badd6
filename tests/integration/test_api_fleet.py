"""The catalog and fleet API: tasks, queues, workers and the OpenAPI document."""

from __future__ import annotations

import re
from collections.abc import Callable

from flask import Flask

from tests.integration.test_api_fixtures import (  # noqa: F401 - fixtures
    ApiCaller,
    api_as,
    api_panel,
    schema_errors,
)
from tests.integration.test_jobs_fixtures import (
    defer_job,
    job_in_state,
    run_sql,
    start_job,
)
from workers.tasks.catalog import TASKS

ApiAs = Callable[[str | None], ApiCaller]


def test_tasks_lists_catalog(api_as: ApiAs) -> None:
    body = api_as("viewer")("GET", "/api/v1/tasks").get_json()
    tasks = {task["name"]: task for task in body["tasks"]}
    assert set(tasks) == set(TASKS)
    assert tasks["call_api"]["deferrable"] is True
    assert tasks["health_check"]["deferrable"] is False
    assert tasks["call_api"]["queues"] == ["api_calls", "default"]
    path = next(item for item in tasks["call_api"]["arguments"]
                if item["name"] == "path")
    assert path["max_length"] == 2000
    assert path["pattern"] == r"^(?:/[\x21-\x7e]*)$"
    schema = tasks["call_api"]["arguments_schema"]
    assert schema["required"] == ["method", "path"]
    assert schema["properties"]["method"]["enum"] == ["GET", "POST", "PUT",
                                                      "PATCH", "DELETE"]


def test_queues_counts_jobs(api_panel: Flask, api_as: ApiAs) -> None:
    defer_job(api_panel)
    defer_job(api_panel)
    job_in_state(api_panel, "failed")
    body = api_as("viewer")("GET", "/api/v1/queues").get_json()
    queues = {queue["name"]: queue for queue in body["queues"]}
    assert {"api_calls", "default", "maintenance"} <= set(queues)
    api_calls = queues["api_calls"]
    assert api_calls["jobs"]["todo"] == {"value": 2, "kind": "exact"}
    assert api_calls["jobs"]["failed"] == {"value": 1, "kind": "exact"}
    assert api_calls["oldest_waiting"]["job_id"] is not None
    assert queues["default"]["oldest_waiting"] is None


def test_workers_lists_running_jobs(api_panel: Flask, api_as: ApiAs) -> None:
    worker = int(run_sql(api_panel, "SELECT worker_id FROM "
                                    "procrastinate_register_worker_v1()")[0]
                 ["worker_id"])
    run_sql(api_panel, "INSERT INTO worker_processes (worker_id, host, pid, "
                       "process_name, role, queues, concurrency) VALUES "
                       "(%(id)s, 'host-a', 4242, 'worker_0', 'worker', "
                       "ARRAY['api_calls'], 4)", {"id": worker})
    job_id = defer_job(api_panel)
    start_job(api_panel, job_id, worker)
    body = api_as("viewer")("GET", "/api/v1/workers").get_json()
    rows = {row["worker_id"]: row for row in body["workers"]}
    assert rows[worker]["host"] == "host-a"
    assert rows[worker]["stale"] is False
    assert rows[worker]["queues"] == ["api_calls"]
    assert [job["id"] for job in rows[worker]["jobs"]] == [job_id]
    queues = api_as("viewer")("GET", "/api/v1/queues").get_json()["queues"]
    api_calls = next(queue for queue in queues if queue["name"] == "api_calls")
    assert api_calls["live_workers"] == 1
    assert api_calls["slots"] == 4


def _flask_rule_as_path(rule: str) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.removeprefix("/api/v1"))


def test_openapi_describes_every_route(api_panel: Flask, api_as: ApiAs) -> None:
    document = api_as("viewer")("GET", "/api/v1/openapi.json").get_json()
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer",
        "description": "A per-account API token (pnl_...)."}
    documented = set(document["paths"])
    for rule in api_panel.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1"):
            continue
        path = _flask_rule_as_path(rule.rule)
        if "{task}" in path:
            for task in ("fetch_joke", "call_api"):
                assert path.replace("{task}", task) in documented
            continue
        assert path in documented, f"{rule.rule} is not in the OpenAPI document"
        methods = set(rule.methods or ()) - {"HEAD", "OPTIONS"}
        assert {method.lower() for method in methods} <= set(document["paths"][path])


def test_openapi_request_schemas_follow_catalog(api_as: ApiAs) -> None:
    document = api_as("viewer")("GET", "/api/v1/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    arguments = schemas["CallApiArguments"]
    assert arguments["properties"]["path"]["maxLength"] == 2000
    assert arguments["properties"]["method"]["enum"] == list(
        TASKS["call_api"].arguments[0].choices)
    assert arguments["additionalProperties"] is False
    category = schemas["FetchJokeArguments"]["properties"]["category"]
    assert category["type"] == ["string", "null"]
    defer = schemas["CallApiDefer"]
    assert defer["properties"]["queue"]["enum"] == ["api_calls", "default", None]
    assert defer["properties"]["priority"]["maximum"] == 1000
    assert schemas["CallApiBatch"]["properties"]["jobs"]["maxItems"] == 1000
    valid = {"arguments": {"method": "GET", "path": "/x"}, "queue": "default"}
    assert schema_errors(valid, defer, document) == []
    invalid = {"arguments": {"method": "GET", "path": "x"}, "priority": 5000}
    assert len(schema_errors(invalid, defer, document)) == 2
    joke = schemas["FetchJokeDefer"]
    assert schema_errors({"arguments": {"category": ""}}, joke, document) == []
    assert schema_errors({"arguments": {"category": "Dev"}}, joke, document)


def test_openapi_operations_name_roles(api_as: ApiAs) -> None:
    document = api_as("viewer")("GET", "/api/v1/openapi.json").get_json()
    roles = {(path, method): operation["x-required-role"]
             for path, item in document["paths"].items()
             for method, operation in item.items()}
    assert roles[("/jobs", "get")] == "viewer"
    assert roles[("/jobs/{job_id}/{action}", "post")] == "operator"
    assert roles[("/tasks/call_api/jobs/batch", "post")] == "operator"
    assert all(role == "operator" for (path, method), role in roles.items()
               if method == "post")


def test_unknown_api_route_is_json_404(api_as: ApiAs) -> None:
    response = api_as("viewer")("GET", "/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.get_json()["error"] == "Not Found"


def test_wrong_method_is_json_405(api_as: ApiAs) -> None:
    response = api_as("operator")("DELETE", "/api/v1/jobs")
    assert response.status_code == 405
    assert "GET" in response.headers["Allow"]
