"""The demo upstream that make run starts: jokes, chosen statuses, slow responses."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.support.faults import wait_until
from tests.support.postgres import free_port
from workers.settings import PROJECT_DIR


@pytest.fixture
def demo() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Yield the running demo API process and its base URL."""
    url = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_DIR / "scripts" / "demo_api.py"), url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/jokes/random", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, 10, "the demo API to answer")
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


def test_joke_has_value(demo: tuple[subprocess.Popen[bytes], str]) -> None:
    _, url = demo
    joke = httpx.get(f"{url}/jokes/random", params={"category": "dev"}).json()
    assert joke["value"]
    assert joke["categories"] == ["dev"]


def test_status_path_sets_status(demo: tuple[subprocess.Popen[bytes], str]) -> None:
    _, url = demo
    assert httpx.get(f"{url}/status/404").status_code == 404
    assert httpx.post(f"{url}/status/503", json={}).status_code == 503


def test_slow_path_echoes(demo: tuple[subprocess.Popen[bytes], str]) -> None:
    _, url = demo
    response = httpx.post(f"{url}/slow/0.1", json={"n": 1})
    assert response.status_code == 200
    assert response.json()["json"] == {"n": 1}


def test_slow_path_outlasts_read_timeout(
    demo: tuple[subprocess.Popen[bytes], str],
) -> None:
    # The workers allow HTTP_TIMEOUT between two reads. A slow path longer than
    # that must still complete, so that the demo can keep a job running for minutes.
    _, url = demo
    timeout = httpx.Timeout(5.0, read=1.5)
    with httpx.Client(timeout=timeout) as client:
        response = client.get(f"{url}/slow/3.5")
    assert response.status_code == 200
    assert response.json()["path"] == "/slow/3.5"


def test_sigterm_exits_zero(demo: tuple[subprocess.Popen[bytes], str]) -> None:
    process, _ = demo
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
