"""Times at the edge of the calendar are rejected with a message, not a 500."""

from __future__ import annotations

from collections.abc import Callable

from flask.testing import FlaskClient


def test_list_rejects_time_beyond_calendar(
    client_for: Callable[[str], FlaskClient],
) -> None:
    client = client_for("viewer")
    response = client.get("/jobs?created_from=0001-01-01T00:00%2B01:00")
    assert response.status_code == 400
    assert "out of range" in response.get_data(as_text=True)
