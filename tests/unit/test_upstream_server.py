"""Tests for the scriptable upstream HTTP server used by job and chaos tests."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from email.utils import format_datetime

import httpx
import pytest

from tests.support.upstream import (
    Headers,
    RecordedRequest,
    Rule,
    Upstream,
    UpstreamProcess,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def client(upstream: Upstream) -> Iterator[httpx.Client]:
    """Return an httpx client bound to the in-process server."""
    with httpx.Client(base_url=upstream.url, timeout=5.0) as http_client:
        yield http_client


@pytest.fixture(scope="module")
def process() -> Iterator[UpstreamProcess]:
    """Start one server subprocess for the control-endpoint tests."""
    with UpstreamProcess() as server:
        yield server


def test_default_joke_echoes_category(client: httpx.Client) -> None:
    response = client.get("/jokes/random", params={"category": "dev"})

    assert response.status_code == 200
    payload = response.json()
    assert payload["categories"] == ["dev"]
    assert "dev" in payload["value"]
    assert len(payload["id"]) == 32


def test_default_joke_without_category(client: httpx.Client) -> None:
    first = client.get("/jokes/random").json()
    second = client.get("/jokes/random").json()

    assert first["categories"] == []
    assert first["value"]
    assert first["id"] != second["id"]


def test_default_echoes_request(client: httpx.Client) -> None:
    response = client.post("/orders", params={"a": "1"}, json={"item": "x"})

    assert response.status_code == 200
    payload = response.json()
    assert payload["method"] == "POST"
    assert payload["path"] == "/orders"
    assert payload["query"] == {"a": ["1"]}
    assert payload["json"] == {"item": "x"}


def test_respond_times_falls_through(upstream: Upstream, client: httpx.Client) -> None:
    upstream.respond("/items", status=503, json={"error": "down"}, times=2)
    upstream.respond("/items", status=201, json={"ok": True}, headers={"X-Rule": "2"})

    statuses = [client.get("/items").status_code for _ in range(4)]
    last = client.get("/items")

    assert statuses == [503, 503, 201, 201]
    assert last.json() == {"ok": True}
    assert last.headers["x-rule"] == "2"
    assert upstream.count("/items") == 5
    assert [r.rule for r in upstream.requests("/items")][:3] == ["respond"] * 3


def test_respond_method_and_glob(upstream: Upstream, client: httpx.Client) -> None:
    upstream.respond("/api/*", status=418, method="POST")

    assert client.post("/api/v1/x").status_code == 418
    assert client.get("/api/v1/x").json()["method"] == "GET"
    assert client.post("/other").status_code == 200
    assert len(upstream.requests(method="post")) == 2


def test_chunked_body_and_headers_recorded(
    upstream: Upstream, client: httpx.Client
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"part": '
        yield b'"one"}'

    response = client.post(
        "/upload", content=chunks(), headers={"Idempotency-Key": "key-1"}
    )

    assert response.status_code == 200
    [record] = upstream.requests("/upload")
    assert record.headers["transfer-encoding"] == "chunked"
    assert record.headers["IDEMPOTENCY-KEY"] == "key-1"
    assert record.body == b'{"part": "one"}'
    assert record.json() == {"part": "one"}
    assert response.json()["json"] == {"part": "one"}


def test_keep_alive_reuses_connection(upstream: Upstream, client: httpx.Client) -> None:
    client.get("/a")
    client.post("/b", content=b"x" * 1000)
    client.get("/c")

    connections = {record.connection for record in upstream.requests()}
    assert len(connections) == 1
    assert [record.body for record in upstream.requests("/b")] == [b"x" * 1000]


def test_hold_answers_after_delay(upstream: Upstream, client: httpx.Client) -> None:
    upstream.hold("/slow", 0.5, then_status=202, json={"done": 1}, times=1)

    started = time.monotonic()
    held = client.get("/slow")
    held_elapsed = time.monotonic() - started
    started = time.monotonic()
    fast = client.get("/slow")
    fast_elapsed = time.monotonic() - started

    assert held.status_code == 202
    assert held.json() == {"done": 1}
    assert held_elapsed >= 0.45
    assert fast.status_code == 200
    assert fast_elapsed < 0.3


def test_hold_detects_client_disconnect(
    upstream: Upstream, client: httpx.Client
) -> None:
    upstream.hold("/slow", 10.0)

    with pytest.raises(httpx.ReadTimeout):
        client.get("/slow", timeout=httpx.Timeout(5.0, read=0.3))
    record = upstream.wait_for(lambda r: r.client_closed, timeout=3.0)

    assert record.status is None
    assert record.closed_at is not None
    assert record.closed_at - record.started_at < 2.0
    assert record.ended_at is not None
    assert upstream.open_count("/slow") == 0


def test_drip_sends_one_byte_per_interval(
    upstream: Upstream, client: httpx.Client
) -> None:
    upstream.drip("/stream", interval=0.2, total_seconds=0.6)

    started = time.monotonic()
    with client.stream("GET", "/stream") as response:
        headers_after = time.monotonic() - started
        body = b"".join(response.iter_raw())
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert response.headers["content-length"] == "3"
    assert headers_after < 0.15
    assert body == b"..."
    assert elapsed >= 0.55
    assert upstream.requests("/stream")[0].status == 200


def test_drip_detects_client_disconnect(
    upstream: Upstream, client: httpx.Client
) -> None:
    upstream.drip("/stream", interval=0.2, total_seconds=10.0)

    with client.stream("GET", "/stream") as response:
        first = next(response.iter_raw())
    record = upstream.wait_for(lambda r: r.client_closed, timeout=3.0)

    assert first == b"."
    assert record.status is None
    assert record.closed_at is not None
    assert record.closed_at - record.started_at < 2.0


def test_redirect_sets_location(upstream: Upstream, client: httpx.Client) -> None:
    upstream.redirect("/old", 307, "/new")

    response = client.get("/old")

    assert response.status_code == 307
    assert response.headers["location"] == "/new"
    assert response.content == b""


@pytest.mark.parametrize(
    ("status", "value"),
    [
        (429, "7"),
        (503, format_datetime(datetime(2030, 1, 2, tzinfo=timezone.utc), usegmt=True)),
    ],
)
def test_retry_after_sends_raw_value(
    upstream: Upstream, client: httpx.Client, status: int, value: str
) -> None:
    upstream.retry_after("/limited", status, value, times=1)

    limited = client.get("/limited")
    after = client.get("/limited")

    assert limited.status_code == status
    assert limited.headers["retry-after"] == value
    assert after.status_code == 200


def test_retry_after_rejects_other_status(upstream: Upstream) -> None:
    with pytest.raises(ValueError, match="429 or 503"):
        upstream.retry_after("/limited", 500, "1")


def test_reset_raises_transport_error(upstream: Upstream, client: httpx.Client) -> None:
    upstream.reset("/flaky", times=1)

    with pytest.raises(httpx.TransportError):
        client.get("/flaky")
    recovered = client.get("/flaky")

    assert recovered.status_code == 200
    statuses = [record.status for record in upstream.requests("/flaky")]
    assert statuses == [None, 200]


def test_max_concurrent_counts_overlap(upstream: Upstream) -> None:
    upstream.hold("/slow", 0.5)

    async def send_all() -> list[int]:
        async with httpx.AsyncClient(base_url=upstream.url, timeout=5.0) as client:
            responses = await asyncio.gather(*(client.get("/slow") for _ in range(20)))
        return [response.status_code for response in responses]

    statuses = asyncio.run(send_all())

    assert statuses == [200] * 20
    assert upstream.max_concurrent("/slow") == 20
    assert upstream.open_count("/slow") == 0
    assert upstream.count("/slow") == 20
    assert upstream.max_concurrent("/never") == 0


def test_server_handles_hundreds_of_connections(upstream: Upstream) -> None:
    upstream.hold("/slow", 0.5)
    request = b"GET /slow HTTP/1.1\r\nHost: upstream\r\n\r\n"

    async def exchange_twice() -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", upstream.port)
        status_lines = []
        for _ in range(2):
            writer.write(request)
            status_lines.append(await reader.readline())
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()
        await writer.wait_closed()
        return status_lines

    async def run_all() -> list[list[bytes]]:
        return await asyncio.wait_for(
            asyncio.gather(*(exchange_twice() for _ in range(300))), timeout=10.0
        )

    results = asyncio.run(run_all())

    assert all(lines == [b"HTTP/1.1 200 OK\r\n"] * 2 for lines in results)
    assert upstream.count("/slow") == 600
    assert upstream.max_concurrent("/slow") >= 150
    assert len({record.connection for record in upstream.requests()}) == 300


def test_bad_request_gets_400(upstream: Upstream) -> None:
    with socket.create_connection(("127.0.0.1", upstream.port), timeout=3.0) as sock:
        sock.sendall(b"NOT HTTP\r\n\r\n")
        reply = sock.recv(1024)

    assert reply.startswith(b"HTTP/1.1 400 ")
    assert upstream.requests() == []


def test_wait_for_wakes_on_state_change(upstream: Upstream) -> None:
    upstream.hold("/slow", 0.3)
    sender = threading.Thread(target=httpx.get, args=(upstream.url + "/slow",))

    sender.start()
    arrived = upstream.wait_for(lambda r: r.path == "/slow", timeout=3.0)
    answered = upstream.wait_for(lambda r: r.status == 200, timeout=3.0)
    sender.join(timeout=3.0)

    assert arrived.ended_at is None
    assert answered.ended_at is not None
    assert answered.id == arrived.id


def test_wait_for_timeout_names_recent_requests(
    upstream: Upstream, client: httpx.Client
) -> None:
    client.get("/seen")

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"0\.2 s.*GET /seen -> 200"):
        upstream.wait_for(lambda r: r.path == "/never", timeout=0.2)

    assert time.monotonic() - started < 1.0


def test_wait_for_count_returns_requests(
    upstream: Upstream, client: httpx.Client
) -> None:
    client.get("/counted")
    client.get("/counted")

    found = upstream.wait_for_count("/counted", 2, timeout=1.0)

    assert [record.path for record in found] == ["/counted", "/counted"]
    with pytest.raises(TimeoutError, match=r"3 request\(s\) to /counted"):
        upstream.wait_for_count("/counted", 3, timeout=0.1)


def test_close_returns_promptly_with_held_requests(upstream: Upstream) -> None:
    upstream.hold("/slow", 30.0)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            httpx.get(upstream.url + "/slow", timeout=10.0)
        except httpx.TransportError as exc:
            errors.append(exc)

    senders = [threading.Thread(target=send) for _ in range(3)]
    for sender in senders:
        sender.start()
    upstream.wait_for_count("/slow", 3, timeout=3.0)

    started = time.monotonic()
    upstream.close()
    elapsed = time.monotonic() - started
    for sender in senders:
        sender.join(timeout=3.0)

    assert elapsed < 1.0
    assert len(errors) == 3
    records = upstream.requests("/slow")
    assert all(record.ended_at is not None for record in records)
    assert not any(record.client_closed for record in records)
    with pytest.raises(httpx.ConnectError):
        httpx.get(upstream.url + "/slow", timeout=1.0)


def test_clear_drops_rules_and_records(
    upstream: Upstream, client: httpx.Client
) -> None:
    upstream.respond("/x", status=500)
    client.get("/x")

    upstream.clear()

    assert upstream.requests() == []
    assert upstream.stats() == {"total": 0, "paths": {}}
    assert client.get("/x").status_code == 200


def test_rule_from_dict_rejects_unknown_field() -> None:
    with pytest.raises(ValueError, match=r"unknown rule fields \['delay'\]"):
        Rule.from_dict({"kind": "hold", "path": "/x", "delay": 1})


def test_rule_rejects_invalid_kind() -> None:
    with pytest.raises(ValueError, match="invalid rule kind 'sleep'"):
        Rule("sleep", "/x")


def test_recorded_request_round_trips_dict() -> None:
    original = RecordedRequest(
        method="POST",
        path="/x",
        query_string="a=1",
        headers=Headers([("Idempotency-Key", "k")]),
        body=b"\xff\x00",
        started_at=1.0,
    )

    copy = RecordedRequest.from_dict(json.loads(json.dumps(original.to_dict())))

    assert copy == original
    assert copy.body == b"\xff\x00"
    assert copy.headers["idempotency-key"] == "k"


def test_process_writes_url_and_serves(process: UpstreamProcess) -> None:
    process.clear()

    response = httpx.get(process.url + "/jokes/random", params={"category": "ops"})

    assert process.url.startswith("http://127.0.0.1:")
    assert response.json()["categories"] == ["ops"]


def test_process_control_rules_and_records(process: UpstreamProcess) -> None:
    process.clear()
    process.respond("/remote", status=503, times=1)
    process.hold("/remote", 0.5)

    with httpx.Client(base_url=process.url, timeout=5.0) as client:
        first = client.post("/remote", json={"n": 1}, headers={"Idempotency-Key": "k"})
        second = client.get("/remote")

    assert first.status_code == 503
    assert second.status_code == 200
    records = process.requests("/remote")
    assert [record.status for record in records] == [503, 200]
    assert records[0].headers["idempotency-key"] == "k"
    assert records[0].json() == {"n": 1}
    assert records[1].ended_at - records[1].started_at >= 0.45
    assert process.count("/remote") == 2
    assert process.max_concurrent("/remote") == 1
    assert len(process.wait_for_count("/remote", 2, timeout=1.0)) == 2


def test_process_wait_times_out(process: UpstreamProcess) -> None:
    process.clear()

    with pytest.raises(TimeoutError, match=r"1 request\(s\) to /never"):
        process.wait_for_count("/never", 1, timeout=0.2)


def test_process_control_rejects_bad_input(process: UpstreamProcess) -> None:
    with httpx.Client(base_url=process.url, timeout=5.0) as client:
        unknown = client.get("/_control/nothing")
        bad_rule = client.post("/_control/rules", json=[{"kind": "nap", "path": "/x"}])
        raw_rule = client.post("/_control/rules", json={"kind": "reset", "path": "/r"})
        with pytest.raises(httpx.TransportError):
            client.get("/r")

    assert unknown.status_code == 404
    assert "POST rules" in unknown.json()["error"]
    assert bad_rule.status_code == 400
    assert "invalid rule kind 'nap'" in bad_rule.json()["error"]
    assert raw_rule.json() == {"added": 1}
    assert [record.rule for record in process.requests("/r")] == ["reset"]
    process.clear()
    assert process.stats() == {"total": 0, "paths": {}}


def test_process_stops_on_close() -> None:
    server = UpstreamProcess().start()
    url = server.url

    started = time.monotonic()
    server.close()
    elapsed = time.monotonic() - started

    assert elapsed < 2.0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=1.0)
