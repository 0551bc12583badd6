"""Helpers for tests that drive the panel and a real in-process worker together.

The panel runs in this process under Flask's test client, with CSRF checks on.
The worker is ``tests.support.faults.InProcessWorker`` on the same database, and it
calls a loopback upstream that the test controls.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from tests.support.forms import form_fields
from tests.support.panel import build_panel


def panel_for_upstream(database_url: str, upstream_url: str,
                       **env: str) -> Flask:
    """Build the panel on ``database_url`` with API_BASE_URL at the upstream."""
    return build_panel(database_url, env={"API_BASE_URL": upstream_url, **env})


def defer_from_form(client: FlaskClient, task: str, values: dict[str, str]) -> int:
    """Submit the task's defer form with ``values`` over its defaults; return the id."""
    page = client.get(f"/defer/{task}")
    assert page.status_code == 200, page.get_data(as_text=True)[:500]
    fields = form_fields(page.get_data(as_text=True))
    fields.update(values)
    response = client.post(f"/defer/{task}", data=fields)
    assert response.status_code == 303, response.get_data(as_text=True)[:1000]
    match = re.fullmatch(r"/jobs/(\d+)", response.headers["Location"])
    assert match is not None, response.headers["Location"]
    return int(match.group(1))


def post_with_token(client: FlaskClient, url: str, page_url: str,
                    data: dict[str, str] | None = None) -> Any:
    """POST ``data`` to ``url`` with the CSRF token of the page at ``page_url``."""
    fields = form_fields(client.get(page_url).get_data(as_text=True))
    return client.post(url, data={"csrf_token": fields["csrf_token"],
                                  **(data or {})})
