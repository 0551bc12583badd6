"""Secrets stay out of logs, pages and error messages.

The secrets watched for: an account password typed at login, SECRET_KEY (and its
fallback), the database password and METRICS_TOKEN.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from flask import Flask

from tests.support.panel import PASSWORDS, build_panel, csrf_token
from webpanel import create_app, db
from workers.errors import ConfigurationError
from workers.settings import check_web_secrets, load_settings, redact_url

SECRET_KEY = "watched-secret-key-" + "s" * 40
OLD_KEY = "watched-old-secret-key-" + "o" * 40
DB_PASSWORD = "watched-db-password-d8f3"
METRICS_TOKEN = "watched-metrics-token-" + "m" * 20
TYPED_PASSWORD = "watched-typed-password-p4"


def assert_no_secrets(text: str, what: str) -> None:
    """Assert that none of the watched secrets appears in ``text``."""
    for secret in (SECRET_KEY, OLD_KEY, DB_PASSWORD, METRICS_TOKEN, TYPED_PASSWORD,
                   *PASSWORDS.values()):
        assert secret not in text, f"{what} contains a secret"


@pytest.fixture
def watched_panel(database_url: str) -> Iterator[Flask]:
    """Yield the panel with watched values as its secrets."""
    app = build_panel(database_url, env={
        "SECRET_KEY": SECRET_KEY, "SECRET_KEY_FALLBACKS": OLD_KEY,
        "METRICS_TOKEN": METRICS_TOKEN})
    yield app
    db.close_process_pool()


def test_failed_login_reveals_no_secret(
    watched_panel: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client = watched_panel.test_client()
    with caplog.at_level(logging.DEBUG):
        page = client.get("/login")
        response = client.post("/login", data={
            "username": "operator", "password": TYPED_PASSWORD,
            "csrf_token": csrf_token(page.get_data(as_text=True))})
        unknown = client.post("/login", data={
            "username": "ghost", "password": TYPED_PASSWORD,
            "csrf_token": csrf_token(response.get_data(as_text=True))})
    assert response.status_code == 400
    assert unknown.status_code == 400
    assert_no_secrets(response.get_data(as_text=True), "the login page")
    assert_no_secrets(unknown.get_data(as_text=True), "the login page")
    assert_no_secrets(caplog.text, "the log")
    for record in caplog.records:
        assert_no_secrets(repr(record.__dict__), f"log record {record.msg!r}")


def test_expired_login_form_reveals_no_password(watched_panel: Flask) -> None:
    client = watched_panel.test_client()
    client.get("/login")
    response = client.post("/login", data={
        "username": "operator", "password": TYPED_PASSWORD,
        "csrf_token": "forged-token"})
    assert response.status_code == 400
    assert 'value="operator"' in response.get_data(as_text=True)
    assert_no_secrets(response.get_data(as_text=True), "the expired login page")


@pytest.fixture
def refused_port() -> Iterator[int]:
    """Yield a loopback port that refuses connections while the test runs."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))  # bound but never listening
        yield blocker.getsockname()[1]


@pytest.fixture
def unreachable_panel(refused_port: int) -> Iterator[Flask]:
    """Yield a panel whose database, with a watched password, refuses connections."""
    db.close_process_pool()
    settings = load_settings({
        "DATABASE_URL": f"postgresql://panel:{DB_PASSWORD}@127.0.0.1:{refused_port}"
                        "/panel",
        "SECRET_KEY": SECRET_KEY,
        "API_BASE_URL": "http://127.0.0.1:9",
        "WEB_REQUEST_BUDGET": "1",
        "DB_CONNECT_TIMEOUT": "1",
    })
    yield create_app(config={"TESTING": True}, settings=settings)
    db.close_process_pool()


def test_database_error_page_reveals_no_secret(
    unreachable_panel: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client = unreachable_panel.test_client()
    page = client.get("/login")
    assert page.status_code == 200
    with caplog.at_level(logging.DEBUG):
        response = client.post("/login", data={
            "username": "operator", "password": TYPED_PASSWORD,
            "csrf_token": csrf_token(page.get_data(as_text=True))})
    body = response.get_data(as_text=True)
    assert response.status_code == 503
    assert "The database" in body
    assert response.headers["Retry-After"] == "5"
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert_no_secrets(body, "the 503 page")
    assert_no_secrets(caplog.text, "the log")


def test_settings_errors_reveal_no_secret() -> None:
    environ = {
        "DATABASE_URL": f"mysql://panel:{DB_PASSWORD}@db/panel",
        "SECRET_KEY": "short",
        "METRICS_TOKEN": METRICS_TOKEN,
        "WEB_WORKERS": "many",
    }
    with pytest.raises(ConfigurationError) as raised:
        load_settings(environ)
    message = str(raised.value)
    assert "DATABASE_URL=****" in message
    assert "WEB_WORKERS='many'" in message
    assert_no_secrets(message, "the settings error")


def test_secret_checks_reveal_no_secret() -> None:
    settings = load_settings({
        "DATABASE_URL": f"postgresql://panel:{DB_PASSWORD}@db/panel",
        "SECRET_KEY": SECRET_KEY[:20],
        "ADMIN_PASSWORD": "changeme",
    })
    with pytest.raises(ConfigurationError) as raised:
        check_web_secrets(settings)
    message = str(raised.value)
    assert "SECRET_KEY is 20 characters long" in message
    assert "ADMIN_PASSWORD is a well-known default" in message
    assert SECRET_KEY[:20] not in message
    assert "changeme" not in message


def test_public_settings_mask_secrets() -> None:
    settings = load_settings({
        "DATABASE_URL": f"postgresql://panel:{DB_PASSWORD}@db/panel",
        "SECRET_KEY": SECRET_KEY, "SECRET_KEY_FALLBACKS": OLD_KEY,
        "METRICS_TOKEN": METRICS_TOKEN, "ADMIN_PASSWORD": TYPED_PASSWORD,
    })
    assert_no_secrets(repr(settings.public_items()), "public_items()")


def test_redact_url_masks_database_password() -> None:
    text = f"failed: postgresql://panel:{DB_PASSWORD}@db:5432/panel timed out"
    assert_no_secrets(redact_url(text), "redact_url()")
    assert "postgresql://panel:****@db:5432/panel" in redact_url(text)


def test_metrics_token_not_echoed(watched_panel: Flask) -> None:
    client = watched_panel.test_client()
    wrong = client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    assert_no_secrets(wrong.get_data(as_text=True), "the 401 for /metrics")
