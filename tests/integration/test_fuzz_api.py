"""Fuzzing the API with hypothesis: no 5xx, nothing deferred from rejected input.

Each request is checked by ``ApiCaller`` against the OpenAPI document. Around each
request the test counts procrastinate_jobs: a rejected request must leave the
count alone, an accepted defer must add exactly its jobs, with the arguments the
validator kept. ``FULL=1`` runs ten times as many examples.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from flask import Flask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.integration.test_api_fixtures import ApiCaller, create_token
from tests.support.panel import build_panel
from webpanel import db
from webpanel.job_filters import FILTER_FIELDS
from webpanel.job_operations import ACTIONS
from workers.tasks.catalog import HTTP_METHODS

SCALE = 10 if os.environ.get("FULL", "") == "1" else 1
UTC = datetime.timezone.utc
TASKS = ("fetch_joke", "call_api")
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata",
         "Pacific/Kiritimati", "Australia/Lord_Howe", "America/St_Johns")
SPECIAL_TEXT = ("", " ", "\x00", "\u202e", "\ufeff", "\u200b", "\U0001f4a5",
                "\uffff", "\U0010ffff", "null", "__proto__", "../../etc/passwd",
                "%s%n", "' OR 1=1 --", "\r\nX-Injected: 1", "a" * 129, "é" * 600,
                "\u0662\u0660\u0663\u0660", "api_calls\x00", "default ")


def fuzz_settings(examples: int) -> settings:
    """Return the hypothesis settings of one fuzz test: ``examples`` × SCALE."""
    return settings(
        max_examples=examples * SCALE, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Text with any code point except surrogates, which form fields cannot carry.
odd_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
    st.sampled_from(SPECIAL_TEXT),
    st.builds(lambda character, count: character * count,
              st.characters(exclude_categories=("Cs",)),
              st.integers(min_value=100, max_value=20_000)),
)
# JSON strings may also carry lone surrogates, written as \ud800 escapes.
json_text = st.one_of(odd_text, st.text(st.characters(
    min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3))
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), json_text)
any_json = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(json_text, children, max_size=4)),
    max_leaves=10)


def _shifted(delta: datetime.timedelta, offset_minutes: int) -> str:
    zone = datetime.timezone(datetime.timedelta(minutes=offset_minutes))
    return (datetime.datetime.now(UTC) + delta).astimezone(zone).isoformat()


def _local(delta: datetime.timedelta, seconds: bool) -> str:
    moment = (datetime.datetime.now(UTC) + delta).replace(tzinfo=None)
    return moment.isoformat(timespec="seconds" if seconds else "minutes")


near = st.timedeltas(min_value=datetime.timedelta(days=-10),
                     max_value=datetime.timedelta(days=400))
schedule_text = st.one_of(
    st.builds(_shifted, near, st.integers(min_value=-14 * 60, max_value=14 * 60)),
    st.builds(_local, near, st.booleans()),
    st.datetimes(min_value=datetime.datetime(1, 1, 2),
                 max_value=datetime.datetime(9999, 12, 30),
                 timezones=st.none() | st.timezones()).map(
                     lambda moment: moment.isoformat()),
    st.sampled_from(["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00",
                     "2030-02-30T10:00:00Z", "2030-01-01T24:00:00Z",
                     "2030-01-01 10:00:00Z", "2030-01-01T10:00:00z"]),
    odd_text,
)
zone_names = st.one_of(st.sampled_from(ZONES), st.timezone_keys(), odd_text)
arguments = st.one_of(
    st.fixed_dictionaries({}, optional={
        "category": st.from_regex(r"[a-z]{1,12}", fullmatch=True) | any_json,
        "method": st.sampled_from(HTTP_METHODS) | any_json,
        "path": st.from_regex(r"/[\x21-\x7e]{0,30}", fullmatch=True) | any_json,
        "json": any_json,
    }),
    st.dictionaries(json_text, any_json, max_size=3),
    any_json,
)
defer_body = st.fixed_dictionaries({}, optional={
    "arguments": arguments,
    "queue": st.sampled_from(["api_calls", "default", "maintenance"]) | any_json,
    "priority": st.integers(min_value=-1100, max_value=1100) | any_json,
    "schedule_at": schedule_text | any_json,
    "time_zone": zone_names | any_json,
    "lock": odd_text | any_json,
    "queueing_lock": st.sampled_from(["fuzz-a", "fuzz-b"]) | odd_text | any_json,
    "extra": any_json,
})
task_names = st.one_of(st.sampled_from(TASKS), st.sampled_from(TASKS),
                       st.sampled_from(["health_check", "prune_old_jobs"]),
                       odd_text.filter(lambda text: "/" not in text))


@pytest.fixture(scope="module")
def fuzz_panel(module_database_url: str) -> Iterator[Flask]:
    """Yield one panel for the module's fuzz tests; closes the pool after."""
    app = build_panel(module_database_url)
    yield app
    db.close_process_pool()


@pytest.fixture(scope="module")
def operator_api(fuzz_panel: Flask) -> ApiCaller:
    """Return an ApiCaller with an operator's token."""
    return ApiCaller(fuzz_panel, create_token(fuzz_panel, "operator"))


@pytest.fixture(scope="module")
def jobs_in_database(module_database_url: str) -> Iterator[Callable[[], int]]:
    """Yield a function counting procrastinate_jobs on one open connection."""
    with psycopg.connect(module_database_url, autocommit=True) as conn:
        def count() -> int:
            row = conn.execute("SELECT count(*) FROM procrastinate_jobs").fetchone()
            assert row is not None
            return int(row[0])
        yield count


def _encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def _stored_arguments(app: Flask, job_id: int) -> Any:
    url = app.config["FLEET_SETTINGS"].database_url
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT args FROM procrastinate_jobs WHERE id = %s",
                           (job_id,)).fetchone()
    assert row is not None, f"job {job_id} was reported deferred but is missing"
    return row[0]


def _kept_arguments(body: dict[str, Any]) -> dict[str, Any]:
    sent = body.get("arguments") or {}
    return {name: value for name, value in sent.items()
            if value is not None and value != ""}


def same_json(left: Any, right: Any) -> bool:
    """Tell whether two JSON values are equal, numbers compared as doubles.

    jsonb stores a float such as 1.7976931348623157e308 as the decimal it is
    written as, which reads back as an int that is not exactly the float.
    """
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    if isinstance(left, (int, float)) and isinstance(right, (int, float)):
        return float(left) == float(right)
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(
            same_json(left[key], right[key]) for key in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(
            same_json(one, other) for one, other in zip(left, right))
    return type(left) is type(right) and left == right


@fuzz_settings(600)
@given(task=task_names, body=st.one_of(defer_body, defer_body, any_json))
@example(task="fetch_joke", body={"schedule_at": "9999-12-31T23:59:59-05:00"})
@example(task="fetch_joke", body={"schedule_at": "9999-12-31T23:59",
                                  "time_zone": "America/New_York"})
@example(task="call_api", body={"arguments": {"method": "GET", "path": "/",
                                              "json": float("nan")}})
def test_fuzz_defer_api(fuzz_panel: Flask, operator_api: ApiCaller,
                        jobs_in_database: Callable[[], int], task: str,
                        body: Any) -> None:
    before = jobs_in_database()
    response = operator_api("POST", f"/api/v1/tasks/{quote(task, safe='')}/jobs",
                            raw=_encode(body))
    after = jobs_in_database()
    if response.status_code == 201:
        assert after == before + 1
        job_id = response.get_json()["job_id"]
        assert same_json(_stored_arguments(fuzz_panel, job_id),
                         _kept_arguments(body))
    else:
        assert 400 <= response.status_code < 500
        assert after == before, f"{response.status_code} but a job was deferred"


@fuzz_settings(300)
@given(task=st.sampled_from(TASKS), items=st.one_of(
    st.lists(defer_body, max_size=6),
    st.lists(st.fixed_dictionaries({}, optional={
        "queueing_lock": st.sampled_from(["fuzz-a", "fuzz-c", "fuzz-d"])}),
        max_size=4),
    any_json))
def test_fuzz_batch_api(fuzz_panel: Flask, operator_api: ApiCaller,
                        jobs_in_database: Callable[[], int], task: str,
                        items: Any) -> None:
    before = jobs_in_database()
    response = operator_api("POST", f"/api/v1/tasks/{task}/jobs/batch",
                            raw=_encode({"jobs": items}))
    after = jobs_in_database()
    if response.status_code == 201:
        assert isinstance(items, list)
        assert after == before + len(items)
        for item, job_id in zip(items, response.get_json()["job_ids"]):
            assert same_json(_stored_arguments(fuzz_panel, job_id),
                             _kept_arguments(item))
    else:
        assert 400 <= response.status_code < 500
        assert after == before, f"{response.status_code} but jobs were deferred"


@fuzz_settings(250)
@given(raw=st.one_of(st.binary(max_size=200),
                     st.text(max_size=200).map(lambda text: text.encode())))
def test_fuzz_raw_bodies(operator_api: ApiCaller,
                         jobs_in_database: Callable[[], int], raw: bytes) -> None:
    before = jobs_in_database()
    response = operator_api("POST", "/api/v1/tasks/fetch_joke/jobs", raw=raw)
    if response.status_code != 201:
        assert jobs_in_database() == before
    bulk = operator_api("POST", "/api/v1/jobs/bulk", raw=raw)
    assert bulk.status_code in {200, 400, 409, 413, 415, 422}


list_parameters = st.lists(st.tuples(
    st.sampled_from(FILTER_FIELDS + ("before", "after", "limit")) | odd_text,
    st.one_of(odd_text, schedule_text, st.sampled_from(
        ["todo", "failed", "20", "50", "1", "0", "-1", "9" * 30])),
), max_size=5)


@fuzz_settings(300)
@given(parameters=list_parameters)
def test_fuzz_job_list(operator_api: ApiCaller,
                       parameters: list[tuple[str, str]]) -> None:
    response = operator_api("GET", "/api/v1/jobs", query_string=parameters)
    assert response.status_code in {200, 400}


@fuzz_settings(100)
@given(raw=st.binary(min_size=1, max_size=60))
def test_fuzz_job_list_raw_query(operator_api: ApiCaller, raw: bytes) -> None:
    # WSGI carries the raw query bytes as a latin-1 string.
    response = operator_api("GET", "/api/v1/jobs",
                            environ={"QUERY_STRING": raw.decode("latin-1")})
    assert response.status_code in {200, 400}


# An empty segment would make werkzeug redirect to the path without "//".
path_segment = odd_text.filter(lambda text: text != "")


@fuzz_settings(250)
@given(job_id=st.one_of(st.integers(min_value=-5, max_value=2**64).map(str),
                        path_segment),
       action=st.one_of(st.sampled_from(ACTIONS), path_segment))
def test_fuzz_job_action(operator_api: ApiCaller,
                         jobs_in_database: Callable[[], int], job_id: str,
                         action: str) -> None:
    before = jobs_in_database()
    path = f"/api/v1/jobs/{quote(job_id, safe='')}/{quote(action, safe='')}"
    response = operator_api("POST", path)
    assert response.status_code in {200, 404, 405, 409}
    removed = 1 if response.status_code == 200 and action == "delete" else 0
    assert jobs_in_database() == before - removed


bulk_body = st.fixed_dictionaries({}, optional={
    "action": st.sampled_from(ACTIONS) | any_json,
    "job_ids": st.lists(st.integers(min_value=-3, max_value=2**64),
                        max_size=5) | any_json,
    "filter": st.dictionaries(
        st.sampled_from(FILTER_FIELDS) | odd_text,
        odd_text | schedule_text | st.lists(odd_text, max_size=3) | any_json,
        max_size=3) | any_json,
    "snapshot_id": st.integers(min_value=-2, max_value=2**64) | any_json,
    "confirm_count": st.integers(min_value=-2, max_value=3) | any_json,
})


@fuzz_settings(250)
@given(body=st.one_of(bulk_body, any_json))
def test_fuzz_bulk(operator_api: ApiCaller, jobs_in_database: Callable[[], int],
                   body: Any) -> None:
    before = jobs_in_database()
    response = operator_api("POST", "/api/v1/jobs/bulk", raw=_encode(body))
    assert response.status_code in {200, 400, 409, 413, 422}
    result = response.get_json()
    removed = len(result["done"]) if response.status_code == 200 \
        and result["performed"] and body.get("action") == "delete" else 0
    assert jobs_in_database() == before - removed
