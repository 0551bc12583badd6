"""Login hardening against the real database: throttling, timing, enumeration, proxies.

Two panel instances built on one database stand for two gunicorn workers: every
count and lock lives in PostgreSQL, so each instance sees the other's failures.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.support.panel import PASSWORDS, build_panel, csrf_token, log_in
from webpanel import auth, db
from webpanel.auth import (
    ADDRESS_FAILURE_LIMIT,
    INVALID_LOGIN_MESSAGE,
    USER_FAILURE_LIMIT,
)


@pytest.fixture
def panels(database_url: str) -> Iterator[tuple[Flask, Flask]]:
    """Yield two panel instances sharing one database, like two web workers."""
    first = build_panel(database_url)
    second = build_panel(database_url)
    yield first, second
    db.close_process_pool()


def post_login(client: FlaskClient, username: str, password: str,
               headers: dict[str, str] | None = None) -> TestResponse:
    """Load the login form and submit it."""
    page = client.get("/login", headers=headers)
    return client.post("/login", headers=headers, data={
        "username": username, "password": password,
        "csrf_token": csrf_token(page.get_data(as_text=True))})


def failures(database_url: str) -> dict[str, int]:
    """Return the failure count of every throttle key."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT key, failures FROM login_failures").fetchall()
    return {key: count for key, count in rows}


def test_unknown_user_and_wrong_password_look_alike(panel: Flask) -> None:
    client = panel.test_client()
    unknown = post_login(client, "nobody-here", "wrong-password")
    wrong = post_login(client, "operator", "wrong-password")
    assert unknown.status_code == wrong.status_code == 400
    for response in (unknown, wrong):
        body = response.get_data(as_text=True)
        assert INVALID_LOGIN_MESSAGE in body
        assert "nobody-here" not in body.replace('value="nobody-here"', "")


def test_disabled_account_looks_like_wrong_password(panel: Flask) -> None:
    with panel.app_context():
        assert auth.set_disabled("operator", True)
    response = post_login(panel.test_client(), "operator", PASSWORDS["operator"])
    assert response.status_code == 400
    assert INVALID_LOGIN_MESSAGE in response.get_data(as_text=True)


def test_every_login_path_checks_one_hash(
    panel: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []
    real_check = auth.check_password_hash

    def counting_check(password_hash: str, password: str) -> bool:
        checked.append(password_hash.split("$")[0])
        return real_check(password_hash, password)

    monkeypatch.setattr(auth, "check_password_hash", counting_check)
    with panel.app_context():
        assert auth.set_disabled("viewer", True)
    client = panel.test_client()
    for username in ("nobody-here", "operator", "viewer"):
        checked.clear()
        post_login(client, username, "wrong-password")
        assert len(checked) == 1, username
        assert checked[0] == "scrypt:32768:8:1", username


def test_failed_login_is_logged_without_password(
    panel: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "correct-horse-battery-staple-9"
    with caplog.at_level(logging.INFO):
        post_login(panel.test_client(), "operator", secret)
    failed = [record for record in caplog.records
              if getattr(record, "action", "") == "login_failed"]
    assert len(failed) == 1
    assert "operator" in failed[0].getMessage()
    assert "127.0.0.1" in failed[0].getMessage()
    assert secret not in caplog.text


def test_lock_shows_minutes_and_refuses_right_password(
    panel: Flask, database_url: str
) -> None:
    client = panel.test_client()
    for _ in range(USER_FAILURE_LIMIT):
        post_login(client, "operator", "wrong-password")
    response = post_login(client, "operator", PASSWORDS["operator"])
    body = response.get_data(as_text=True)
    assert response.status_code == 400
    assert "Try again in 5 minutes" in body
    assert failures(database_url)["user:operator"] == USER_FAILURE_LIMIT


def test_lock_applies_to_unknown_accounts_too(panel: Flask) -> None:
    client = panel.test_client()
    for _ in range(USER_FAILURE_LIMIT):
        post_login(client, "nobody-here", "wrong-password")
    response = post_login(client, "nobody-here", "wrong-password")
    assert "Too many failed logins" in response.get_data(as_text=True)


def test_lock_expires(panel: Flask, database_url: str) -> None:
    client = panel.test_client()
    for _ in range(USER_FAILURE_LIMIT):
        post_login(client, "operator", "wrong-password")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE login_failures SET locked_until = now() - "
                     "interval '1 second' WHERE key = 'user:operator'")
    response = post_login(client, "operator", PASSWORDS["operator"])
    assert response.status_code == 302
    assert "user:operator" not in failures(database_url)


def test_failure_after_expired_lock_locks_again(
    panel: Flask, database_url: str
) -> None:
    client = panel.test_client()
    for _ in range(USER_FAILURE_LIMIT):
        post_login(client, "operator", "wrong-password")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE login_failures SET locked_until = now() - "
                     "interval '1 second' WHERE key = 'user:operator'")
    post_login(client, "operator", "wrong-password")
    response = post_login(client, "operator", PASSWORDS["operator"])
    assert "Too many failed logins" in response.get_data(as_text=True)


def test_count_restarts_after_window(panel: Flask, database_url: str) -> None:
    client = panel.test_client()
    for _ in range(USER_FAILURE_LIMIT - 1):
        post_login(client, "operator", "wrong-password")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE login_failures SET first_failure_at = now() - "
                     "interval '1 hour'")
    post_login(client, "operator", "wrong-password")
    assert failures(database_url)["user:operator"] == 1
    assert post_login(client, "operator", PASSWORDS["operator"]).status_code == 302


def test_stale_counts_are_purged(panel: Flask, database_url: str) -> None:
    client = panel.test_client()
    post_login(client, "first-name", "wrong-password")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE login_failures SET first_failure_at = now() - "
                     "interval '1 hour' WHERE key = 'user:first-name'")
    post_login(client, "second-name", "wrong-password")
    keys = failures(database_url)
    assert "user:first-name" not in keys
    assert "user:second-name" in keys


def test_lock_is_shared_by_workers(
    panels: tuple[Flask, Flask], database_url: str
) -> None:
    clients = [panel.test_client() for panel in panels]
    for attempt in range(USER_FAILURE_LIMIT):
        post_login(clients[attempt % 2], "operator", "wrong-password")
    for client in clients:
        response = post_login(client, "operator", PASSWORDS["operator"])
        assert "Too many failed logins" in response.get_data(as_text=True)
    assert failures(database_url)["user:operator"] == USER_FAILURE_LIMIT


def test_concurrent_failures_all_count(
    panels: tuple[Flask, Flask], database_url: str
) -> None:
    attempts = 8
    barrier = threading.Barrier(attempts, timeout=30)
    errors: list[BaseException] = []

    def fail_once(index: int) -> None:
        try:
            client = panels[index % 2].test_client()
            page = client.get("/login")
            token = csrf_token(page.get_data(as_text=True))
            barrier.wait()
            client.post("/login", data={"username": "nobody-here",
                                         "password": "wrong", "csrf_token": token})
        except BaseException as exc:  # reported by the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=fail_once, args=(i,)) for i in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    counts = failures(database_url)
    assert counts["user:nobody-here"] == attempts
    assert counts["addr:127.0.0.1"] == attempts


def test_success_clears_account_count_only(
    panel: Flask, database_url: str
) -> None:
    client = panel.test_client()
    for _ in range(2):
        post_login(client, "operator", "wrong-password")
    assert post_login(client, "operator", PASSWORDS["operator"]).status_code == 302
    counts = failures(database_url)
    assert "user:operator" not in counts
    assert counts["addr:127.0.0.1"] == 2


def test_address_lock_covers_every_account(panel: Flask) -> None:
    client = panel.test_client()
    for attempt in range(ADDRESS_FAILURE_LIMIT):
        post_login(client, f"spray-{attempt}", "wrong-password")
    response = post_login(client, "viewer", PASSWORDS["viewer"])
    assert "Too many failed logins" in response.get_data(as_text=True)


def test_forwarded_for_ignored_without_trusted_proxy(
    panel: Flask, database_url: str
) -> None:
    client = panel.test_client()
    post_login(client, "operator", "wrong-password",
               headers={"X-Forwarded-For": "198.51.100.9"})
    counts = failures(database_url)
    assert "addr:127.0.0.1" in counts
    assert "addr:198.51.100.9" not in counts


@pytest.fixture
def proxied_panel(database_url: str) -> Iterator[Flask]:
    """Yield the panel behind one trusted reverse proxy."""
    app = build_panel(database_url, env={"TRUSTED_PROXIES": "1"})
    yield app
    db.close_process_pool()


def test_forwarded_for_counts_behind_trusted_proxy(
    proxied_panel: Flask, database_url: str
) -> None:
    client = proxied_panel.test_client()
    # The proxy appends the address it saw; the client's own value comes first.
    headers = {"X-Forwarded-For": "192.0.2.1, 198.51.100.9"}
    for attempt in range(ADDRESS_FAILURE_LIMIT):
        post_login(client, f"spray-{attempt}", "wrong-password", headers=headers)
    counts = failures(database_url)
    assert counts["addr:198.51.100.9"] == ADDRESS_FAILURE_LIMIT
    assert "addr:192.0.2.1" not in counts
    other = {"X-Forwarded-For": "203.0.113.5"}
    response = post_login(client, "viewer", PASSWORDS["viewer"], headers=other)
    assert response.status_code == 302


def test_login_replaces_anonymous_session(panel: Flask) -> None:
    client = panel.test_client()
    page = client.get("/login")
    anonymous_token = csrf_token(page.get_data(as_text=True))
    client.post("/login", data={"username": "viewer",
                                "password": PASSWORDS["viewer"],
                                "csrf_token": anonymous_token})
    # The session was cleared at login: the anonymous form token is now stale.
    response = client.post("/logout", data={"csrf_token": anonymous_token})
    assert response.status_code == 303
    assert client.get("/account").status_code == 200


def test_password_change_ends_sessions(
    client_for: Callable[[str], FlaskClient], panel: Flask
) -> None:
    client = client_for("operator")
    assert client.get("/account").status_code == 200
    with panel.app_context():
        assert auth.set_password("operator", "a-new-password-42")
    assert client.get("/account").status_code == 302
    assert post_login(client, "operator", PASSWORDS["operator"]).status_code == 400
    assert post_login(client, "operator", "a-new-password-42").status_code == 302


def test_disable_ends_sessions(
    client_for: Callable[[str], FlaskClient], panel: Flask
) -> None:
    client = client_for("operator")
    with panel.app_context():
        assert auth.set_disabled("operator", True)
    assert client.get("/account").status_code == 302


def test_setup_rerun_keeps_sessions(
    client_for: Callable[[str], FlaskClient], panel: Flask
) -> None:
    client = client_for("admin")
    with panel.app_context():
        auth.save_user("admin", PASSWORDS["admin"], "admin")
    assert client.get("/account").status_code == 200


def test_cheaper_hash_upgraded_at_login(panel: Flask, database_url: str) -> None:
    from werkzeug.security import generate_password_hash

    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE panel_users SET password_hash = %s WHERE username = "
                     "'viewer'", (generate_password_hash(PASSWORDS["viewer"],
                                                         method="pbkdf2"),))
    client = panel.test_client()
    log_in(client, "viewer")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT password_hash FROM panel_users WHERE "
                           "username = 'viewer'").fetchone()
    assert row is not None
    assert row[0].startswith("scrypt:32768:8:1$")
    assert client.get("/account").status_code == 200


def test_empty_login_form_asks_for_both_fields(panel: Flask) -> None:
    response = post_login(panel.test_client(), "", "")
    assert response.status_code == 400
    assert "Enter a user name and a password" in response.get_data(as_text=True)


@pytest.mark.parametrize("target", ["//evil.example/x", "/\t/evil.example",
                                    "https://evil.example/"])
def test_login_next_stays_on_site(panel: Flask, target: str) -> None:
    client = panel.test_client()
    page = client.get("/login", query_string={"next": target})
    response = client.post("/login", query_string={"next": target}, data={
        "username": "viewer", "password": PASSWORDS["viewer"],
        "csrf_token": csrf_token(page.get_data(as_text=True))})
    assert response.status_code == 302
    assert response.headers["Location"] == "/"


def test_login_next_returns_to_page(panel: Flask) -> None:
    client = panel.test_client()
    first = client.get("/account")
    assert first.status_code == 302
    location = first.headers["Location"]
    page = client.get(location)
    response = client.post(location, data={
        "username": "viewer", "password": PASSWORDS["viewer"],
        "csrf_token": csrf_token(page.get_data(as_text=True))})
    assert response.headers["Location"] == "/account"
