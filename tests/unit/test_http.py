"""Tests of upstream calls: the URL guard, redirects, errors and slow bodies.

They run against the in-process loopback upstream server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import pytest

from tests.support.upstream import Upstream
from workers import http
from workers.attempts import AttemptNotes, current_attempt
from workers.errors import InvalidTaskArguments
from workers.retry import RedirectRejected, UpstreamHTTPError
from workers.settings import Settings, load_settings

_T = TypeVar("_T")
BASE = "http://127.0.0.1:8001"


def settings_for(url: str, **overrides: str) -> Settings:
    return load_settings({"API_BASE_URL": url, **overrides})


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` on a new loop, closing the process's client after."""

    async def wrapper() -> _T:
        try:
            return await coroutine
        finally:
            await http.close_client()

    return asyncio.run(wrapper())


@pytest.mark.parametrize(
    "path",
    [
        "/items/42",
        "/items?sort=name",
        "/v2/jokes/random",
        "/items/%2Fencoded",
        "/a-b_c~d",
    ],
)
def test_resolve_accepts_relative_path(path: str) -> None:
    assert http.resolve_api_url(BASE, path) == BASE + path


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "missing"),
        ("items", "single '/'"),
        ("//evil.example/x", "single '/'"),
        ("http://evil.example/", "single '/'"),
        ("/a/../../admin", "'..'"),
        ("/a/%2e%2e/admin", "'..'"),
        ("/a/%252e%252e/admin", "'..'"),
        ("/a/./b", "'.'"),
        ("/a b", "control characters"),
        ("/a\nb", "control characters"),
        ("/a\\b", "backslash"),
        ("/a#frag", "fragment"),
        ("/" + "a" * 2001, "limit is 2000"),
    ],
)
def test_resolve_rejects_escape(path: str, reason: str) -> None:
    with pytest.raises(InvalidTaskArguments) as raised:
        http.resolve_api_url(BASE, path)
    assert reason in str(raised.value)


def test_resolve_keeps_base_path() -> None:
    assert http.resolve_api_url(BASE + "/api", "/items") == BASE + "/api/items"
    assert http.is_under_base(BASE + "/api", BASE + "/api/items")
    assert not http.is_under_base(BASE + "/api", BASE + "/apix")
    assert not http.is_under_base(BASE, "http://127.0.0.1:8002/items")
    assert not http.is_under_base(BASE, "https://127.0.0.1:8001/items")


def test_client_sets_every_timeout() -> None:
    settings = settings_for(BASE, HTTP_TIMEOUT="7")

    async def timeouts() -> httpx.Timeout:
        return http.get_client(settings).timeout

    timeout = run(timeouts())
    assert timeout.connect == 7
    assert timeout.read == 7
    assert timeout.write == 7
    assert timeout.pool == 7


def test_client_does_not_follow_redirects() -> None:
    async def follows() -> bool:
        return http.get_client(settings_for(BASE)).follow_redirects

    assert run(follows()) is False


def test_success_returns_body(upstream: Upstream) -> None:
    upstream.respond("/items", status=201, json={"id": 7}, method="POST")
    response = run(
        http.request(settings_for(upstream.url), "POST", "/items",
                     json_body={"name": "a"}, idempotency_key="42")
    )
    assert response.status_code == 201
    assert http.response_body(response) == {"id": 7}
    (record,) = upstream.requests("/items")
    assert record.headers["Idempotency-Key"] == "42"
    assert record.json() == {"name": "a"}


def test_error_status_raises_with_path(upstream: Upstream) -> None:
    upstream.respond("/jokes/random", status=503)
    with pytest.raises(UpstreamHTTPError) as raised:
        run(http.request(settings_for(upstream.url), "GET", "/jokes/random"))
    assert raised.value.status == 503
    assert str(raised.value) == "HTTP 503 from /jokes/random"


def test_retry_after_recorded_on_attempt(upstream: Upstream) -> None:
    upstream.retry_after("/jokes/random", 429, "30")
    notes = AttemptNotes()

    async def call() -> None:
        token = current_attempt.set(notes)
        try:
            await http.request(settings_for(upstream.url), "GET", "/jokes/random")
        finally:
            current_attempt.reset(token)

    with pytest.raises(UpstreamHTTPError) as raised:
        run(call())
    assert raised.value.retry_after == "30"
    assert notes.http_status == 429
    assert notes.retry_after == "30"


def test_permanent_redirect_not_followed(upstream: Upstream) -> None:
    upstream.redirect("/jokes/random", 301, "/v2/jokes/random")
    with pytest.raises(RedirectRejected) as raised:
        run(http.request(settings_for(upstream.url), "GET", "/jokes/random"))
    assert str(raised.value) == (
        "HTTP 301 redirect to /v2/jokes/random; update API_BASE_URL or the path"
    )
    assert upstream.count("/jokes/random") == 1
    assert upstream.count("/v2/jokes/random") == 0


@pytest.mark.parametrize("status", [300, 302, 303, 304])
def test_other_redirects_rejected(upstream: Upstream, status: int) -> None:
    upstream.redirect("/items", status, "/elsewhere")
    with pytest.raises(RedirectRejected) as raised:
        run(http.request(settings_for(upstream.url), "GET", "/items"))
    assert "/elsewhere" in str(raised.value) or "Location" in str(raised.value)
    assert upstream.count("/elsewhere") == 0


def test_redirect_without_location_rejected(upstream: Upstream) -> None:
    upstream.respond("/items", status=300)
    with pytest.raises(RedirectRejected) as raised:
        run(http.request(settings_for(upstream.url), "GET", "/items"))
    assert "without a Location header" in str(raised.value)


def test_same_host_307_followed(upstream: Upstream) -> None:
    upstream.redirect("/items", 307, "/v2/items", method="POST")
    upstream.respond("/v2/items", status=201, json={"id": 1}, method="POST")
    response = run(
        http.request(settings_for(upstream.url), "POST", "/items",
                     json_body={"name": "a"}, idempotency_key="99")
    )
    assert response.status_code == 201
    (first,) = upstream.requests("/items")
    (second,) = upstream.requests("/v2/items")
    assert second.method == "POST"
    assert second.json() == {"name": "a"}
    assert second.headers["Idempotency-Key"] == "99"
    assert first.headers["Idempotency-Key"] == "99"


def test_other_host_308_not_followed(upstream: Upstream) -> None:
    with Upstream() as other:
        target = f"{other.url}/items"
        upstream.redirect("/items", 308, target, method="POST")
        with pytest.raises(RedirectRejected) as raised:
            run(http.request(settings_for(upstream.url), "POST", "/items",
                             json_body={"name": "a"}, idempotency_key="5"))
        assert other.stats()["total"] == 0
    assert target in str(raised.value)
    assert "outside API_BASE_URL" in str(raised.value)


def test_redirect_loop_stops(upstream: Upstream) -> None:
    upstream.redirect("/loop", 307, "/loop")
    with pytest.raises(RedirectRejected) as raised:
        run(http.request(settings_for(upstream.url, HTTP_MAX_REDIRECTS="5"),
                         "GET", "/loop"))
    assert "too many redirects" in str(raised.value)
    assert upstream.count("/loop") == 6


def test_cancelled_drip_closes_connection(upstream: Upstream) -> None:
    upstream.drip("/jokes/random", interval=0.2, total_seconds=30)
    settings = settings_for(upstream.url, HTTP_TIMEOUT="1")

    async def call() -> None:
        async with asyncio.timeout(1.5):
            await http.request(settings, "GET", "/jokes/random")

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        run(call())
    timed_out = time.monotonic()
    record = upstream.wait_for(lambda r: r.client_closed, timeout=2)
    assert timed_out - started < 2.5
    assert record.closed_at is not None
    assert record.closed_at - timed_out < 1.0
