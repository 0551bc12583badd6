"""Login, logout and the login requirement, against the real database."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask
from flask.testing import FlaskClient

from tests.support.panel import PASSWORDS, csrf_token
from webpanel import db


def test_dashboard_redirects_anonymous_to_login(panel: Flask) -> None:
    response = panel.test_client().get("/")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login")


def test_login_with_wrong_password_is_rejected(panel: Flask) -> None:
    client = panel.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    response = client.post("/login", data={
        "username": "admin", "password": "wrong", "csrf_token": token})
    assert response.status_code == 400
    assert "Invalid user name or password" in response.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_login_then_dashboard_shows_counts(
    client_for: Callable[[str], FlaskClient],
) -> None:
    client = client_for("viewer")
    response = client.get("/")
    assert response.status_code == 200
    assert 'data-status="todo"' in response.get_data(as_text=True)


def test_logout_ends_the_session(client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("admin")
    token = csrf_token(client.get("/").get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/").status_code == 302


def test_copied_cookie_dies_at_logout(
    panel: Flask, client_for: Callable[[str], FlaskClient]
) -> None:
    client = client_for("admin")
    cookie = client.get_cookie("panel_session")
    assert cookie is not None
    copy = panel.test_client()
    copy.set_cookie("panel_session", cookie.value)
    assert copy.get("/").status_code == 200

    token = csrf_token(client.get("/").get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302

    response = copy.get("/")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login")


def test_other_sessions_survive_a_logout(
    client_for: Callable[[str], FlaskClient],
) -> None:
    first = client_for("operator")
    second = client_for("operator")
    token = csrf_token(first.get("/").get_data(as_text=True))
    assert first.post("/logout", data={"csrf_token": token}).status_code == 302
    assert second.get("/").status_code == 200


def test_expired_session_row_rejected(
    panel: Flask, client_for: Callable[[str], FlaskClient]
) -> None:
    client = client_for("viewer")
    with panel.app_context():
        db.execute("UPDATE panel_sessions SET created_at = now() - interval '13 hours'")
    assert client.get("/").status_code == 302


def test_login_locks_after_repeated_failures(panel: Flask) -> None:
    client = panel.test_client()
    for _ in range(5):
        token = csrf_token(client.get("/login").get_data(as_text=True))
        client.post("/login", data={"username": "operator", "password": "nope",
                                    "csrf_token": token})
    token = csrf_token(client.get("/login").get_data(as_text=True))
    response = client.post("/login", data={
        "username": "operator", "password": PASSWORDS["operator"],
        "csrf_token": token})
    assert response.status_code == 400
    assert "Too many failed logins" in response.get_data(as_text=True)
