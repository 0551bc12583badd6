"""The audit page: filters and keyset pagination, against the real database."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg.rows import dict_row

from webpanel import audit


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """Yield an autocommit connection to the test database."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def entries(sql: psycopg.Connection[dict[str, Any]]) -> list[int]:
    """Store 120 entries, one a minute back from 2026-01-02 02:00 UTC; return ids.

    Every third entry is by alice, the others by bob; every fourth is a
    process_restarted, the others job_retried on job 1000 + n.
    """
    rows = sql.execute(
        "INSERT INTO audit_log (at, username, action, job_ids, details, result) "
        "SELECT timestamptz '2026-01-02 02:00:00+00' - make_interval(mins => 120 - n),"
        " CASE WHEN n % 3 = 0 THEN 'alice' ELSE 'bob' END,"
        " CASE WHEN n % 4 = 0 THEN 'process_restarted' ELSE 'job_retried' END,"
        " CASE WHEN n % 4 = 0 THEN '{}'::bigint[] ELSE ARRAY[1000 + n] END,"
        " jsonb_build_object('n', n), CASE WHEN n % 5 = 0 THEN 'failed: boom' "
        " ELSE 'ok' END FROM generate_series(1, 120) AS n ORDER BY n RETURNING id"
    ).fetchall()
    return [row["id"] for row in rows]


def shown_ids(body: str) -> list[int]:
    """Return the ids of the entries on a page, in page order."""
    return [int(value) for value in re.findall(r'data-audit-id="(\d+)"', body)]


def link(body: str, rel: str) -> str | None:
    """Return the href of the pager link with ``rel``, unescaped."""
    match = re.search(rf'<a href="([^"]+)" rel="{rel}">', body)
    return match.group(1).replace("&amp;", "&") if match else None


def test_audit_pages_through_all_entries(
    client_for: Callable[[str], FlaskClient], entries: list[int]
) -> None:
    client = client_for("viewer")

    first = client.get("/audit").get_data(as_text=True)
    older = link(first, "next")
    assert older is not None
    second = client.get(older).get_data(as_text=True)
    third_link = link(second, "next")
    assert third_link is not None
    third = client.get(third_link).get_data(as_text=True)

    newest_first = list(reversed(entries))
    assert shown_ids(first) == newest_first[:50]
    assert shown_ids(second) == newest_first[50:100]
    assert shown_ids(third) == newest_first[100:]
    assert link(first, "prev") is None
    assert link(third, "next") is None
    back = link(second, "prev")
    assert back is not None
    assert shown_ids(client.get(back).get_data(as_text=True)) == newest_first[:50]


def test_audit_filters_by_user_and_action(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
    entries: list[int],
) -> None:
    client = client_for("viewer")
    expected = [row["id"] for row in sql.execute(
        "SELECT id FROM audit_log WHERE username = 'alice' AND action = "
        "'process_restarted' ORDER BY id DESC").fetchall()]

    body = client.get("/audit?username=alice&action=process_restarted"
                      ).get_data(as_text=True)

    assert shown_ids(body) == expected
    assert len(expected) == 10
    assert link(body, "next") is None


def test_audit_filter_keeps_filters_across_pages(
    client_for: Callable[[str], FlaskClient], entries: list[int]
) -> None:
    client = client_for("viewer")

    first = client.get("/audit?username=bob").get_data(as_text=True)
    older = link(first, "next")
    assert older is not None
    assert "username=bob" in older
    second = client.get(older).get_data(as_text=True)

    assert len(shown_ids(first)) == 50
    assert len(shown_ids(second)) == 30
    assert "alice" not in second.split("<tbody>")[1]


def test_audit_filters_by_time_range(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
    entries: list[int],
) -> None:
    body = client_for("viewer").get(
        "/audit?since=2026-01-02T01:00&until=2026-01-02T01:10").get_data(as_text=True)

    expected = [row["id"] for row in sql.execute(
        "SELECT id FROM audit_log WHERE at >= '2026-01-02 01:00+00' AND "
        "at < '2026-01-02 01:10+00' ORDER BY id DESC").fetchall()]
    assert shown_ids(body) == expected
    assert len(expected) == 10


def test_audit_filters_by_job(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
    entries: list[int],
) -> None:
    body = client_for("viewer").get("/audit?job_id=1007").get_data(as_text=True)

    expected = sql.execute("SELECT id FROM audit_log WHERE 1007 = ANY(job_ids)"
                           ).fetchall()
    assert shown_ids(body) == [row["id"] for row in expected]
    assert 'href="/jobs/1007"' in body


@pytest.mark.parametrize(("query", "message"), [
    ("since=yesterday", "is not a time"),
    ("job_id=12a", "is not a job id"),
    ("since=2026-01-02T02:00&until=2026-01-02T01:00", "must be later"),
    ("username=" + "x" * 200, "longer than 150 characters"),
])
def test_audit_rejects_invalid_filters(
    client_for: Callable[[str], FlaskClient], query: str, message: str
) -> None:
    response = client_for("viewer").get(f"/audit?{query}")

    assert response.status_code == 400
    assert message in response.get_data(as_text=True)


def test_audit_lists_actions_in_filter(
    client_for: Callable[[str], FlaskClient], entries: list[int]
) -> None:
    body = client_for("viewer").get("/audit").get_data(as_text=True)

    assert '<option value="job_retried"' in body
    assert '<option value="process_restarted"' in body
    assert 'class="fleet-result fleet-result-failed"' in body


def test_audit_empty_filter_result(
    client_for: Callable[[str], FlaskClient], entries: list[int]
) -> None:
    body = client_for("viewer").get("/audit?username=nobody").get_data(as_text=True)
    assert "No audit entry matches." in body


def test_audit_page_needs_login(panel: Flask) -> None:
    response = panel.test_client().get("/audit")
    assert response.status_code == 302


def test_audit_record_stores_entry(
    panel: Flask,
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    with panel.test_request_context():
        audit.record("job_cancelled", "ok", [5, 6], {"reason": "test"})

    rows = sql.execute("SELECT username, action, job_ids, details, result "
                       "FROM audit_log").fetchall()
    assert rows == [{"username": "anonymous", "action": "job_cancelled",
                     "job_ids": [5, 6], "details": {"reason": "test"},
                     "result": "ok"}]
    body = client_for("viewer").get("/audit?action=job_cancelled"
                                    ).get_data(as_text=True)
    assert "job_cancelled" in body
    assert "{&#34;reason&#34;: &#34;test&#34;}" in body
