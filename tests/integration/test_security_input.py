"""Malformed requests get 4xx pages, never a 500, on every route of the URL map."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.support.panel import build_panel, csrf_token, logged_in_client
from webpanel import db
from webpanel.auth import UNSAFE_METHODS

ODD_TEXT = [
    "%00", "%ff%fe", "%c3%28", "\u202e\u0000x", "\U0001f600" * 3, "'\";--",
    "x" * 5000, "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "<script>alert(1)</script>",
]
ODD_IDS = ["-1", "0", "9223372036854775807", "9223372036854775808",
           "1" * 40, "1e9", "0x10", "%31"]


@pytest.fixture(scope="module")
def input_panel(module_database_url: str) -> Iterator[Flask]:
    """Yield one panel for the whole module (these tests only read)."""
    app = build_panel(module_database_url)
    yield app
    db.close_process_pool()


@pytest.fixture
def admin(input_panel: Flask) -> FlaskClient:
    """Return a client logged in as admin."""
    return logged_in_client(input_panel, "admin")


def _check(response: TestResponse, what: str) -> None:
    response.get_data()
    response.close()
    status = response.status_code
    assert status < 500 or (status == 503 and "/healthz" in what), \
        f"{what} answered {status}: {response.get_data(as_text=True)[:300]!r}"


def _templates(app: Flask) -> list[tuple[str, list[str]]]:
    """Return each rule's path template and its methods, static excluded."""
    return [(rule.rule, sorted(rule.methods or ()))
            for rule in app.url_map.iter_rules() if rule.endpoint != "static"]


def _fill(template: str, value: str) -> str:
    return re.sub(r"<[^>]+>", value, template)


def test_odd_values_in_urls(input_panel: Flask, admin: FlaskClient) -> None:
    for template, methods in _templates(input_panel):
        if "<" not in template:
            continue
        for value in ODD_IDS + ODD_TEXT:
            for method in methods:
                path = _fill(template, value)
                _check(admin.open(path, method=method), f"{method} {path}")


def test_odd_query_strings(input_panel: Flask, admin: FlaskClient) -> None:
    names = ["status", "queue", "task", "page", "before", "after", "id", "q",
             "next", "limit", "sort", "job_id", "search"]
    for template, methods in _templates(input_panel):
        if "GET" not in methods:
            continue
        path = _fill(template, "1")
        for value in ODD_TEXT + ODD_IDS:
            query = "&".join(f"{name}={value}" for name in names)
            _check(admin.get(f"{path}?{query}"), f"GET {path}?{query[:80]}")
        # WSGI carries the raw query bytes as a latin-1 string.
        raw = b"status=%ff&queue=\xff\xfe&page=-1&page=2".decode("latin-1")
        _check(admin.get(path, environ_overrides={"QUERY_STRING": raw}),
               f"GET {path} with raw bytes")


def test_malformed_bodies(input_panel: Flask, admin: FlaskClient) -> None:
    token = csrf_token(admin.get("/account").get_data(as_text=True))
    bodies = [
        ("application/x-www-form-urlencoded", b"csrf_token=" + token.encode()
         + b"&name=%ff%fe%zz&job_ids=-1&job_ids=abc&json=%7B"),
        ("application/x-www-form-urlencoded", b"\xff\xfe\x00" * 100),
        ("multipart/form-data", b"--nothing\r\nbroken"),
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: "
         b"form-data; name=\"x\"\r\n\r\nvalue"),
        ("application/json", b"{not json"),
        ("application/json", b"[" * 5000),
        ("text/plain; charset=utf-16", b"\xff\xfe\x00\xd8"),
    ]
    for template, methods in _templates(input_panel):
        path = _fill(template, "1")
        for method in methods:
            if method not in UNSAFE_METHODS:
                continue
            for content_type, body in bodies:
                response = admin.open(path, method=method, data=body,
                                      headers={"Content-Type": content_type,
                                               "X-CSRFToken": token})
                _check(response, f"{method} {path} with {content_type}")


def test_body_over_limit_gets_413_page(input_panel: Flask, admin: FlaskClient) -> None:
    token = csrf_token(admin.get("/account").get_data(as_text=True))
    limit = input_panel.config["MAX_CONTENT_LENGTH"]
    response = admin.post("/account/tokens", data={
        "csrf_token": token, "name": "x" * (limit + 1)})
    body = response.get_data(as_text=True)
    assert response.status_code == 413
    assert f"larger than {limit} bytes" in body
    assert "<title>Request Entity Too Large" in body
    assert "Content-Security-Policy" in response.headers


def test_body_over_limit_on_login_gets_413(input_panel: Flask) -> None:
    client = input_panel.test_client()
    limit = input_panel.config["MAX_CONTENT_LENGTH"]
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    response = client.post("/login", data=b"a" * (limit + 10), headers=form_type)
    assert response.status_code == 413


def test_garbage_session_cookie_is_anonymous(input_panel: Flask) -> None:
    for value in ("garbage", "e30.Zm9v.YmFy", "." * 4000, "\u00e9t\u00e9"):
        client = input_panel.test_client()
        client.set_cookie("panel_session", value)
        response = client.get("/")
        assert response.status_code == 302
        assert response.headers["Location"].startswith("/login")


def test_unknown_method_gets_405(input_panel: Flask, admin: FlaskClient) -> None:
    for method in ("PROPFIND", "TRACE", "PATCH"):
        response = admin.open("/account", method=method)
        assert response.status_code == 405, method
        assert "GET" in response.headers["Allow"]


def test_odd_host_header(input_panel: Flask) -> None:
    client = input_panel.test_client()
    for host in ("evil.example", "localhost:99999", "\u00e9.example"):
        response = client.get("/login", headers={"Host": host})
        assert response.status_code < 500, host


def test_raw_bytes_in_path(input_panel: Flask, admin: FlaskClient) -> None:
    for template, _ in _templates(input_panel):
        # WSGI carries the raw path bytes as a latin-1 string.
        path = _fill(template, "\xff\xfe") if "<" in template \
            else template.rstrip("/") + "/\xff\xfe"
        raw = path.encode("utf-8").decode("latin-1")
        response = admin.get("/", environ_overrides={"PATH_INFO": raw})
        _check(response, f"GET {raw!r}")
        assert response.status_code in {400, 404, 405}, raw
