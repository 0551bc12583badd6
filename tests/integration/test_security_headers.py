"""Security headers on every kind of response: pages, errors, static files, JSON."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.support.panel import csrf_token


def check_headers(response: TestResponse, what: str) -> None:
    """Assert the security headers every response carries."""
    headers = response.headers
    csp = headers.get("Content-Security-Policy", "")
    assert "default-src 'self'" in csp, what
    assert "frame-ancestors 'none'" in csp, what
    assert "unsafe-inline" not in csp, what
    assert "unsafe-eval" not in csp, what
    assert headers.get("X-Frame-Options") == "DENY", what
    assert headers.get("X-Content-Type-Options") == "nosniff", what
    assert headers.get("Referrer-Policy") == "same-origin", what
    response.close()


def test_headers_on_every_route(
    panel: Flask, client_for: Callable[[str], FlaskClient]
) -> None:
    admin = client_for("admin")
    anonymous = panel.test_client()
    for rule in panel.url_map.iter_rules():
        values = {name: "app.css" if rule.endpoint == "static" else "1"
                  for name in rule.arguments}
        built = rule.build(values, append_unknown=False)
        assert built is not None
        for method in sorted(rule.methods or ()):
            for client in (admin, anonymous):
                response = client.open(built[1], method=method)
                check_headers(response, f"{method} {built[1]}")


@pytest.mark.parametrize(("path", "status"), [
    ("/login", 200),
    ("/", 302),
    ("/static/app.css", 200),
    ("/static/missing.css", 404),
    ("/no-such-page", 404),
    ("/api/v1/no-such-endpoint", 404),
    ("/?q=%ff", 302),
])
def test_headers_anonymous(panel: Flask, path: str, status: int) -> None:
    response = panel.test_client().get(path)
    assert response.status_code == status
    check_headers(response, path)


def test_headers_on_405(panel: Flask) -> None:
    response = panel.test_client().delete("/login")
    assert response.status_code == 405
    check_headers(response, "DELETE /login")


def test_headers_on_raw_query_400(panel: Flask) -> None:
    response = panel.test_client().get(
        "/", environ_overrides={"QUERY_STRING": "q=\xff"})
    assert response.status_code == 400
    assert "percent-encode" in response.get_data(as_text=True)
    check_headers(response, "raw query")


def test_headers_on_403_and_csrf_failure(
    client_for: Callable[[str], FlaskClient],
) -> None:
    viewer = client_for("viewer")
    token = csrf_token(viewer.get("/account").get_data(as_text=True))
    cross = viewer.post("/logout", data={"csrf_token": token},
                        headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    check_headers(cross, "cross-site POST")
    missing = viewer.post("/logout")
    assert missing.status_code == 303
    check_headers(missing, "POST without token")


def test_headers_on_413(client_for: Callable[[str], FlaskClient], panel: Flask) -> None:
    admin = client_for("admin")
    limit = panel.config["MAX_CONTENT_LENGTH"]
    response = admin.post("/account/tokens", data={"name": "x" * (limit + 1)})
    assert response.status_code == 413
    check_headers(response, "413")


def test_pages_are_not_cached(client_for: Callable[[str], FlaskClient]) -> None:
    response = client_for("viewer").get("/account")
    assert response.headers["Cache-Control"] == "no-store"
    static = client_for("viewer").get("/static/app.css")
    assert static.headers.get("Cache-Control") != "no-store"
    static.close()


def test_pages_have_no_inline_script_or_style(
    client_for: Callable[[str], FlaskClient], panel: Flask
) -> None:
    admin = client_for("admin")
    for rule in panel.url_map.iter_rules():
        if "GET" not in (rule.methods or ()) or rule.arguments:
            continue
        body = admin.get(rule.rule).get_data(as_text=True)
        if "<html" not in body:
            continue
        assert "<script>" not in body, rule.rule
        assert " style=" not in body, rule.rule
        assert " onclick=" not in body.lower(), rule.rule
