"""Tests of the address checks ``python -m workers.launch check`` runs before start."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.launch import busy_addresses
from workers.settings import Settings, load_settings


@pytest.fixture
def listener() -> Iterator[int]:
    """Yield a loopback port that a socket of this test listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def settings_for(tmp_path: Path, **values: str) -> Settings:
    environment = {
        "VAR_DIR": str(tmp_path),
        "WEB_BIND": f"127.0.0.1:{free_port()}",
        "API_BASE_URL": f"http://127.0.0.1:{free_port()}",
    }
    environment.update(values)
    return load_settings(environment)


def test_free_addresses_pass(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, LOCAL_DATABASE="true", DEMO_API="true")
    environ = {"LOCAL_DATABASE_PORT": str(free_port())}
    assert busy_addresses(settings, environ) == []


def test_taken_web_port_named(tmp_path: Path, listener: int) -> None:
    settings = settings_for(tmp_path, WEB_BIND=f"127.0.0.1:{listener}")
    (problem,) = busy_addresses(settings, {})
    assert problem.startswith(f"WEB_BIND: 127.0.0.1:{listener} is already in use")
    assert "set WEB_BIND to a free HOST:PORT" in problem


def test_taken_database_port_named(tmp_path: Path, listener: int) -> None:
    settings = settings_for(tmp_path, LOCAL_DATABASE="true")
    (problem,) = busy_addresses(settings, {"LOCAL_DATABASE_PORT": str(listener)})
    assert problem.startswith(f"LOCAL_DATABASE_PORT: 127.0.0.1:{listener} is")
    assert "set LOCAL_DATABASE_PORT to a free port" in problem


def test_taken_demo_api_port_named(tmp_path: Path, listener: int) -> None:
    settings = settings_for(
        tmp_path, DEMO_API="true", API_BASE_URL=f"http://127.0.0.1:{listener}"
    )
    (problem,) = busy_addresses(settings, {})
    assert problem.startswith(f"API_BASE_URL: 127.0.0.1:{listener} is")


def test_demo_port_ignored_with_own_api(tmp_path: Path, listener: int) -> None:
    settings = settings_for(tmp_path, API_BASE_URL=f"http://127.0.0.1:{listener}")
    assert busy_addresses(settings, {}) == []


def test_running_supervisord_reported(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        settings = settings_for(tmp_path, SUPERVISOR_SOCKET=str(path))
        (problem,) = busy_addresses(settings, {})
    assert problem.startswith(f"supervisord already runs on {path}")
