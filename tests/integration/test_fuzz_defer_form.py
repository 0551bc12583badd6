"""Fuzzing the defer form with hypothesis: no 5xx, nothing deferred when rejected.

The form is posted as a logged-in operator with a valid CSRF token, so every
request reaches the form's checks. ``FULL=1`` runs ten times as many examples.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import example, given
from hypothesis import strategies as st

from tests.integration.test_fuzz_api import (  # noqa: F401 - fixtures
    any_json,
    fuzz_panel,
    fuzz_settings,
    jobs_in_database,
    odd_text,
    same_json,
    schedule_text,
    zone_names,
)
from tests.support.panel import csrf_token, logged_in_client
from workers.tasks.catalog import HTTP_METHODS, TASKS

FORM_TASKS = ("fetch_joke", "call_api")


@pytest.fixture(scope="module")
def operator_form(fuzz_panel: Flask) -> tuple[FlaskClient, str]:
    """Return an operator's client and a CSRF token for its session."""
    client = logged_in_client(fuzz_panel, "operator")
    page = client.get("/defer/fetch_joke").get_data(as_text=True)
    return client, csrf_token(page)


def _json_text(value: Any) -> str:
    return json.dumps(value)


form_values = st.fixed_dictionaries({}, optional={
    "category": st.from_regex(r"[a-z]{1,12}", fullmatch=True) | odd_text,
    "method": st.sampled_from(HTTP_METHODS) | odd_text,
    "path": st.from_regex(r"/[\x21-\x7e]{0,30}", fullmatch=True) | odd_text,
    "json": any_json.map(_json_text) | odd_text,
    "queue": st.sampled_from(["api_calls", "default", "maintenance"]) | odd_text,
    "priority": st.integers(min_value=-1100, max_value=1100).map(str) | odd_text,
    "schedule_at": schedule_text,
    "timezone": zone_names,
    "lock": odd_text,
    "queueing_lock": st.sampled_from(["form-a", "form-b"]) | odd_text,
    "unexpected": odd_text,
})
task_in_url = st.one_of(st.sampled_from(FORM_TASKS), st.sampled_from(FORM_TASKS),
                        odd_text.filter(lambda text: text.strip("/.") != ""))


def _expected_arguments(task: str, fields: dict[str, str]) -> dict[str, Any]:
    expected: dict[str, Any] = {}
    for argument in TASKS[task].arguments:
        raw = fields.get(argument.name)
        if raw is None or raw.strip() == "":
            if argument.default is not None and raw is None:
                expected[argument.name] = argument.default
            continue
        if argument.kind == "json":
            value = json.loads(raw)
            if value is not None:
                expected[argument.name] = value
        else:
            expected[argument.name] = raw
    return expected


def _stored_arguments(app: Flask, job_id: int) -> Any:
    url = app.config["FLEET_SETTINGS"].database_url
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT args FROM procrastinate_jobs WHERE id = %s",
                           (job_id,)).fetchone()
    assert row is not None, f"job {job_id} was reported deferred but is missing"
    return row[0]


@fuzz_settings(700)
@given(task=task_in_url, fields=form_values)
@example(task="fetch_joke", fields={"schedule_at": "9999-12-31T23:59-05:00",
                                    "timezone": "UTC"})
@example(task="call_api", fields={"method": "GET", "path": "/",
                                  "json": "[" * 5000})
@example(task="call_api", fields={"method": "GET", "path": "/",
                                  "json": '{"a": NaN}'})
@example(task="/0", fields={})
def test_fuzz_defer_form(fuzz_panel: Flask,
                         operator_form: tuple[FlaskClient, str],
                         jobs_in_database: Callable[[], int], task: str,
                         fields: dict[str, str]) -> None:
    client, token = operator_form
    before = jobs_in_database()
    response = client.post(f"/defer/{quote(task, safe='')}",
                           data={"csrf_token": token, **fields})
    after = jobs_in_database()
    assert response.status_code < 500, response.get_data(as_text=True)[:800]
    if response.status_code == 303:
        assert after == before + 1
        match = re.fullmatch(r"/jobs/(\d+)", response.headers["Location"])
        assert match is not None
        stored = _stored_arguments(fuzz_panel, int(match.group(1)))
        assert same_json(stored, _expected_arguments(task, fields))
    else:
        assert response.status_code in {400, 404, 413}
        assert after == before, f"{response.status_code} but a job was deferred"
