"""Helpers for tests that drive the panel in-process with Flask's test client."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from webpanel import create_app, db
from webpanel.auth import save_user
from workers.settings import load_settings

TEST_SECRET_KEY = "test-secret-key-" + "k" * 40
PASSWORDS = {
    "admin": "admin-password-123",
    "operator": "operator-password-123",
    "viewer": "viewer-password-123",
}
_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def build_panel(
    database_url: str,
    env: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Flask:
    """Build the panel on ``database_url`` with one account per role."""
    environ = {
        "DATABASE_URL": database_url,
        "SECRET_KEY": TEST_SECRET_KEY,
        "API_BASE_URL": "http://127.0.0.1:9",
        "SUPERVISOR_SOCKET": "/nonexistent/supervisor.sock",
        **(env or {}),
    }
    app = create_app(config={"TESTING": True, **(config or {})},
                     settings=load_settings(environ))
    with app.app_context():
        for role, password in PASSWORDS.items():
            save_user(role, password, role)
    return app


def csrf_token(html: str) -> str:
    """Return the CSRF token of the first form in ``html``."""
    match = _CSRF.search(html)
    assert match, "the page has no csrf_token field"
    return match.group(1)


def log_in(client: FlaskClient, role: str) -> None:
    """Log ``client`` in as the account with ``role``."""
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"username": role, "password": PASSWORDS[role],
              "csrf_token": csrf_token(page.get_data(as_text=True))},
    )
    assert response.status_code == 302, response.get_data(as_text=True)[:500]


def logged_in_client(app: Flask, role: str) -> FlaskClient:
    """Return a new test client logged in with ``role``."""
    client = app.test_client()
    log_in(client, role)
    return client


def close_pool() -> Iterator[None]:
    """Close the process's panel pool after a test (use in a fixture)."""
    yield
    db.close_process_pool()
