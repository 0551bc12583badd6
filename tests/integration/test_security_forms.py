"""Forms across key rotation and token expiry, origin checks, and session cookies.

Key rotation is simulated with two panel instances on one database: the first
signs with the old key, the second has a new SECRET_KEY and the old one in
SECRET_KEY_FALLBACKS, as after a restart with rotated settings.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from itsdangerous import TimestampSigner
from werkzeug.test import TestResponse

from tests.support.panel import (
    PASSWORDS,
    TEST_SECRET_KEY,
    build_panel,
    csrf_token,
    log_in,
)
from webpanel import db
from webpanel.errors import EXPIRED_FORM_MESSAGE

NEW_KEY = "rotated-secret-key-" + "n" * 40
SESSION_COOKIE = "panel_session"


@pytest.fixture
def rotated(database_url: str) -> Iterator[Flask]:
    """Yield a panel whose new key replaced TEST_SECRET_KEY, kept as a fallback."""
    app = build_panel(database_url, env={
        "SECRET_KEY": NEW_KEY, "SECRET_KEY_FALLBACKS": TEST_SECRET_KEY})
    yield app
    db.close_process_pool()


@pytest.fixture
def replaced(database_url: str) -> Iterator[Flask]:
    """Yield a panel whose new key replaced TEST_SECRET_KEY with no fallback."""
    app = build_panel(database_url, env={"SECRET_KEY": NEW_KEY})
    yield app
    db.close_process_pool()


def move_cookies(source: FlaskClient, target_app: Flask) -> FlaskClient:
    """Return a client of ``target_app`` holding ``source``'s session cookie."""
    client = target_app.test_client()
    cookie = source.get_cookie(SESSION_COOKIE)
    assert cookie is not None
    client.set_cookie(SESSION_COOKIE, cookie.value)
    return client


def token_count(database_url: str) -> int:
    """Return the number of stored API tokens."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM api_tokens").fetchone()
    assert row is not None
    return int(row[0])


def field_value(html: str, name: str) -> str | None:
    """Return the value attribute of the input named ``name``."""
    match = re.search(rf'<input[^>]*name="{name}"[^>]*value="([^"]*)"', html)
    return None if match is None else match.group(1)


@contextmanager
def clock_ahead(monkeypatch: pytest.MonkeyPatch, seconds: int) -> Iterator[None]:
    """Move the clock of every itsdangerous signature ``seconds`` ahead."""
    with monkeypatch.context() as patch:
        patch.setattr(TimestampSigner, "get_timestamp",
                      lambda self: int(time.time()) + seconds)
        yield


def test_session_survives_rotation(panel: Flask, rotated: Flask) -> None:
    old = panel.test_client()
    log_in(old, "operator")
    new = move_cookies(old, rotated)
    response = new.get("/account")
    assert response.status_code == 200
    assert "Account operator" in response.get_data(as_text=True)


def test_open_form_survives_rotation(
    panel: Flask, rotated: Flask, database_url: str
) -> None:
    old = panel.test_client()
    log_in(old, "operator")
    token = csrf_token(old.get("/account").get_data(as_text=True))
    new = move_cookies(old, rotated)
    response = new.post("/account/tokens",
                        data={"name": "opened-before-rotation", "csrf_token": token})
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert "Copy the new token now" in response.get_data(as_text=True)
    assert token_count(database_url) == 1
    assert new.get("/account").status_code == 200


def test_open_login_form_survives_rotation(panel: Flask, rotated: Flask) -> None:
    old = panel.test_client()
    token = csrf_token(old.get("/login").get_data(as_text=True))
    new = move_cookies(old, rotated)
    response = new.post("/login", data={
        "username": "viewer", "password": PASSWORDS["viewer"], "csrf_token": token})
    assert response.status_code == 302


def test_rotated_session_is_signed_with_new_key(
    panel: Flask, rotated: Flask, replaced: Flask
) -> None:
    old = panel.test_client()
    log_in(old, "viewer")
    new = move_cookies(old, rotated)
    assert new.get("/account").status_code == 200
    # Once the fallback is removed, the re-signed cookie still opens the session.
    final = move_cookies(new, replaced)
    assert final.get("/account").status_code == 200


def test_form_without_fallback_keeps_values(
    panel: Flask, replaced: Flask
) -> None:
    old = panel.test_client()
    token = csrf_token(old.get("/login").get_data(as_text=True))
    new = move_cookies(old, replaced)
    response = new.post("/login", data={
        "username": "viewer", "password": PASSWORDS["viewer"], "csrf_token": token})
    body = response.get_data(as_text=True)
    assert response.status_code == 400
    assert EXPIRED_FORM_MESSAGE in body
    assert field_value(body, "username") == "viewer"
    assert PASSWORDS["viewer"] not in body
    fresh = csrf_token(body)
    assert fresh != token
    again = new.post("/login", data={
        "username": "viewer", "password": PASSWORDS["viewer"], "csrf_token": fresh})
    assert again.status_code == 302


def test_forged_token_on_account_form_keeps_values(
    client_for: Callable[[str], FlaskClient], database_url: str
) -> None:
    client = client_for("operator")
    client.get("/account")
    response = client.post("/account/tokens", data={
        "name": "kept-name", "csrf_token": "forged." + secrets.token_urlsafe(20)})
    body = response.get_data(as_text=True)
    assert response.status_code == 400
    assert EXPIRED_FORM_MESSAGE in body
    assert field_value(body, "name") == "kept-name"
    assert token_count(database_url) == 0
    again = client.post("/account/tokens", data={
        "name": "kept-name", "csrf_token": csrf_token(body)})
    assert again.status_code == 200
    assert token_count(database_url) == 1


@pytest.fixture
def short_lived(database_url: str) -> Iterator[Flask]:
    """Yield a panel whose form tokens expire after 5 seconds."""
    app = build_panel(database_url, config={"WTF_CSRF_TIME_LIMIT": 5})
    yield app
    db.close_process_pool()


def test_expired_login_form_keeps_values(
    short_lived: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = short_lived.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    with clock_ahead(monkeypatch, 6):
        response = client.post("/login", data={
            "username": "operator", "password": PASSWORDS["operator"],
            "csrf_token": token})
        body = response.get_data(as_text=True)
        assert response.status_code == 400
        assert EXPIRED_FORM_MESSAGE in body
        assert "Bad Request" not in body
        assert field_value(body, "username") == "operator"
        fresh = csrf_token(body)
        assert fresh != token
        again = client.post("/login", data={
            "username": "operator", "password": PASSWORDS["operator"],
            "csrf_token": fresh})
        # Still ahead: a cookie signed in the future is rejected as tampered.
        assert client.get("/account").status_code == 200
    assert again.status_code == 302


def test_expired_account_form_keeps_values(
    short_lived: Flask, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    client = short_lived.test_client()
    log_in(client, "viewer")
    token = csrf_token(client.get("/account").get_data(as_text=True))
    with clock_ahead(monkeypatch, 6):
        response = client.post("/account/tokens",
                               data={"name": "nightly-export", "csrf_token": token})
        body = response.get_data(as_text=True)
        assert response.status_code == 400
        assert EXPIRED_FORM_MESSAGE in body
        assert field_value(body, "name") == "nightly-export"
        assert token_count(database_url) == 0
        again = client.post("/account/tokens", data={
            "name": "nightly-export", "csrf_token": csrf_token(body)})
        assert client.get("/account").status_code == 200
    assert again.status_code == 200
    assert token_count(database_url) == 1


def test_expired_logout_redirects_with_message(
    short_lived: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = short_lived.test_client()
    log_in(client, "viewer")
    token = csrf_token(client.get("/account").get_data(as_text=True))
    with clock_ahead(monkeypatch, 6):
        response = client.post("/logout", data={"csrf_token": token},
                               headers={"Referer": "http://localhost/account"})
        assert response.status_code == 303
        assert response.headers["Location"] == "http://localhost/account"
        page = client.get("/account")
    assert page.status_code == 200
    assert "nothing was changed" in page.get_data(as_text=True)


def _post_logout(client: FlaskClient, headers: dict[str, str]) -> TestResponse:
    token = csrf_token(client.get("/account").get_data(as_text=True))
    return client.post("/logout", data={"csrf_token": token}, headers=headers)


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Origin": "https://evil.example"},
    {"Origin": "null"},
])
def test_cross_site_post_is_rejected(
    client_for: Callable[[str], FlaskClient], headers: dict[str, str]
) -> None:
    client = client_for("viewer")
    response = _post_logout(client, headers)
    assert response.status_code == 403
    assert "another" in response.get_data(as_text=True)
    assert client.get("/account").status_code == 200  # still logged in


def test_same_origin_post_is_accepted(
    client_for: Callable[[str], FlaskClient],
) -> None:
    client = client_for("viewer")
    response = _post_logout(client, {"Sec-Fetch-Site": "same-origin",
                                     "Origin": "http://localhost"})
    assert response.status_code == 302
    assert client.get("/account").status_code == 302


def test_post_without_csrf_token_changes_nothing(
    client_for: Callable[[str], FlaskClient], database_url: str
) -> None:
    client = client_for("viewer")
    response = client.post("/account/tokens", data={"name": "no-token"})
    assert response.status_code == 400
    assert token_count(database_url) == 0


def _session_cookie_header(response: TestResponse) -> str:
    for header in response.headers.getlist("Set-Cookie"):
        if header.startswith(SESSION_COOKIE + "="):
            return header
    raise AssertionError(f"no {SESSION_COOKIE} cookie in {response.headers}")


def _login_response(app: Flask, base_url: str,
                    headers: dict[str, str] | None = None) -> TestResponse:
    client = app.test_client()
    headers = dict(headers or {})
    page = client.get("/login", base_url=base_url, headers=headers)
    headers["Referer"] = base_url + "/login"
    return client.post("/login", base_url=base_url, headers=headers, data={
        "username": "viewer", "password": PASSWORDS["viewer"],
        "csrf_token": csrf_token(page.get_data(as_text=True))})


def test_session_cookie_flags_over_http(panel: Flask) -> None:
    response = _login_response(panel, "http://localhost")
    assert response.status_code == 302
    cookie = _session_cookie_header(response)
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie


def test_session_cookie_secure_over_https(panel: Flask) -> None:
    response = _login_response(panel, "https://localhost")
    assert response.status_code == 302
    cookie = _session_cookie_header(response)
    assert "Secure" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")


@pytest.fixture
def proxied(database_url: str) -> Iterator[Flask]:
    """Yield the panel behind one trusted TLS-terminating proxy."""
    app = build_panel(database_url, env={"TRUSTED_PROXIES": "1"})
    yield app
    db.close_process_pool()


def test_session_cookie_secure_behind_tls_proxy(proxied: Flask) -> None:
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "panel.example",
               "X-Forwarded-For": "192.0.2.10"}
    client = proxied.test_client()
    page = client.get("/login", headers=headers)
    response = client.post("/login", headers={
        **headers, "Origin": "https://panel.example"}, data={
        "username": "viewer", "password": PASSWORDS["viewer"],
        "csrf_token": csrf_token(page.get_data(as_text=True))})
    assert response.status_code == 302
    assert "Secure" in _session_cookie_header(response)


def test_forwarded_proto_ignored_without_trusted_proxy(panel: Flask) -> None:
    response = _login_response(panel, "http://localhost",
                               headers={"X-Forwarded-Proto": "https"})
    assert response.status_code == 302
    assert "Secure" not in _session_cookie_header(response)
    assert "Strict-Transport-Security" not in response.headers


def test_https_post_from_other_origin_is_rejected(proxied: Flask) -> None:
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "panel.example"}
    client = proxied.test_client()
    page = client.get("/login", headers=headers)
    response = client.post("/login", headers={
        **headers, "Origin": "https://evil.example"}, data={
        "username": "viewer", "password": PASSWORDS["viewer"],
        "csrf_token": csrf_token(page.get_data(as_text=True))})
    assert response.status_code == 403
