"""Request checks that need no database: redirects, origins, ids, tokens, keys."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from flask import Flask
from flask_wtf.csrf import CSRFError
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from werkzeug.exceptions import Forbidden, NotFound
from wtforms import ValidationError

from webpanel import create_app, security
from webpanel.security import BIGINT_MAX
from webpanel.auth import address_key, safe_next
from webpanel.tokens import generate_token, hash_token, parse_bearer
from workers.settings import load_settings

KEY = "unit-test-secret-key-" + "u" * 30
OLD_KEY = "unit-test-old-secret-key-" + "o" * 30


@pytest.fixture
def app() -> Iterator[Flask]:
    """Yield a panel that never reaches its (unreachable) database."""
    settings = load_settings({
        "DATABASE_URL": "postgresql://panel@127.0.0.1:9/none",
        "SECRET_KEY": KEY,
        "SECRET_KEY_FALLBACKS": OLD_KEY,
        "API_BASE_URL": "http://127.0.0.1:9",
    })
    yield create_app(config={"TESTING": True}, settings=settings)


@pytest.mark.parametrize("target", [
    "/jobs?status=failed",
    "/jobs/12",
    "/",
])
def test_safe_next_keeps_local_paths(app: Flask, target: str) -> None:
    with app.test_request_context():
        assert safe_next(target) == target


@pytest.mark.parametrize("target", [
    None,
    "",
    "https://evil.example/",
    "//evil.example/",
    "/\\evil.example/",
    "/\t/evil.example/",
    "/\n/evil.example/",
    "/ /evil.example",
    "javascript:alert(1)",
    "jobs",
    "/\x7f/evil.example",
])
def test_safe_next_rejects_other_sites(app: Flask, target: str | None) -> None:
    with app.test_request_context():
        assert safe_next(target) == "/"


@pytest.mark.parametrize(("address", "key"), [
    ("203.0.113.7", "addr:203.0.113.7"),
    ("2001:db8:1:2:3:4:5:6", "addr:2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "addr:2001:db8:1:2::/64"),
    ("::ffff:198.51.100.4", "addr:198.51.100.4"),
    ("unknown", "addr:unknown"),
])
def test_address_key_groups_ipv6_networks(address: str, key: str) -> None:
    assert address_key(address) == key


@pytest.mark.parametrize(("header", "expected"), [
    ("Bearer abc_DEF-123", "abc_DEF-123"),
    ("bearer abc", "abc"),
    ("Basic dXNlcjpwYXNz", None),
    ("Bearer", None),
    ("", None),
    (None, None),
    ("Bearer " + "a" * 201, None),
    ("Bearer t\u00f6ken", None),
])
def test_parse_bearer_accepts_only_bearer(
    header: str | None, expected: str | None
) -> None:
    assert parse_bearer(header) == expected


def test_generated_tokens_are_long_and_distinct() -> None:
    tokens = {generate_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert token.startswith("pnl_")
        assert len(token) >= 4 + 43  # 32 bytes in URL-safe base64
        assert len(hash_token(token)) == 64
        assert token not in hash_token(token)


def _fill(rule: str, number: int) -> str:
    path = re.sub(r"<int(\([^)]*\))?:\w+>", str(number), rule)
    return re.sub(r"<[^>]+>", "x", path)


def test_int_converter_stops_at_bigint(app: Flask) -> None:
    adapter = app.url_map.bind("localhost")
    rules = [rule for rule in app.url_map.iter_rules() if "<int" in rule.rule]
    assert rules, "no route with an <int:...> part to check"
    for rule in rules:
        method = sorted(rule.methods or {"GET"})[0]
        endpoint, _ = adapter.match(_fill(rule.rule, BIGINT_MAX), method=method)
        assert endpoint == rule.endpoint
        with pytest.raises(NotFound):
            adapter.match(_fill(rule.rule, BIGINT_MAX + 1), method=method)


def test_csrf_keys_current_first(app: Flask) -> None:
    assert security.csrf_keys(app) == [KEY, OLD_KEY]


def test_csrf_accepts_fallback_key(app: Flask) -> None:
    with app.test_request_context():
        from flask import session

        session["csrf_token"] = "raw-token-value"
        old = URLSafeTimedSerializer(OLD_KEY, salt="wtf-csrf-token").dumps(
            "raw-token-value")
        security.validate_csrf_token(old)
        current = URLSafeTimedSerializer(KEY, salt="wtf-csrf-token").dumps(
            "raw-token-value")
        security.validate_csrf_token(current)


def test_csrf_rejects_unknown_key(app: Flask) -> None:
    with app.test_request_context():
        from flask import session

        session["csrf_token"] = "raw-token-value"
        forged = URLSafeTimedSerializer("another-key-" + "x" * 30,
                                        salt="wtf-csrf-token").dumps("raw-token-value")
        with pytest.raises(ValidationError, match="invalid"):
            security.validate_csrf_token(forged)


def test_csrf_rejects_token_of_other_session(app: Flask) -> None:
    with app.test_request_context():
        from flask import session

        session["csrf_token"] = "raw-token-value"
        other = URLSafeTimedSerializer(OLD_KEY, salt="wtf-csrf-token").dumps(
            "someone-else")
        with pytest.raises(ValidationError, match="do not match"):
            security.validate_csrf_token(other)


def test_csrf_rejects_missing_token(app: Flask) -> None:
    with app.test_request_context():
        with pytest.raises(ValidationError, match="missing"):
            security.validate_csrf_token(None)


def test_csrf_expired_token_is_final(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.config["WTF_CSRF_TIME_LIMIT"] = 10
    with app.test_request_context():
        from flask import session

        session["csrf_token"] = "raw-token-value"
        with monkeypatch.context() as patch:
            patch.setattr(TimestampSigner, "get_timestamp", lambda self: 1_000_000)
            old = URLSafeTimedSerializer(OLD_KEY, salt="wtf-csrf-token").dumps(
                "raw-token-value")
        with pytest.raises(ValidationError, match="expired"):
            security.validate_csrf_token(old)


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Origin": "https://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://localhost:8000"},
    {"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"},
])
def test_check_origin_rejects_other_sites(
    app: Flask, headers: dict[str, str]
) -> None:
    with app.test_request_context("/logout", method="POST", headers=headers):
        with pytest.raises(Forbidden):
            security.check_origin()


@pytest.mark.parametrize("headers", [
    {},
    {"Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "none"},
    {"Origin": "http://localhost"},
    {"Origin": "http://LOCALHOST"},
    {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"},
])
def test_check_origin_accepts_same_origin(
    app: Flask, headers: dict[str, str]
) -> None:
    with app.test_request_context("/logout", method="POST", headers=headers):
        security.check_origin()


def test_check_origin_ignores_reads(app: Flask) -> None:
    with app.test_request_context("/", headers={"Sec-Fetch-Site": "cross-site"}):
        security.check_origin()


def _post_context(app: Flask, **options: object):  # type: ignore[no-untyped-def]
    token = URLSafeTimedSerializer(KEY, salt="wtf-csrf-token").dumps("raw")
    return app.test_request_context(
        "/logout", method="POST", data={"csrf_token": token}, **options)


def test_check_csrf_over_https_needs_referrer(app: Flask) -> None:
    with _post_context(app, base_url="https://localhost"):
        from flask import session

        session["csrf_token"] = "raw"
        with pytest.raises(CSRFError, match="referrer header is missing"):
            security.check_csrf()


def test_check_csrf_over_https_rejects_other_referrer(app: Flask) -> None:
    with _post_context(app, base_url="https://localhost",
                       headers={"Referer": "https://evil.example/form"}):
        from flask import session

        session["csrf_token"] = "raw"
        with pytest.raises(CSRFError, match="does not match"):
            security.check_csrf()


def test_check_csrf_over_https_accepts_same_origin(app: Flask) -> None:
    with _post_context(app, base_url="https://localhost",
                       headers={"Referer": "https://localhost/account"}):
        from flask import g, session

        session["csrf_token"] = "raw"
        security.check_csrf()
        assert g.csrf_valid is True


def test_check_csrf_over_http_needs_no_referrer(app: Flask) -> None:
    with _post_context(app):
        from flask import g, session

        session["csrf_token"] = "raw"
        security.check_csrf()
        assert g.csrf_valid is True


def test_check_csrf_rejects_post_without_token(app: Flask) -> None:
    with app.test_request_context("/logout", method="POST"):
        from flask import session

        session["csrf_token"] = "raw"
        with pytest.raises(CSRFError, match="missing"):
            security.check_csrf()
