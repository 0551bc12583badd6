"""Settings that would run a stopping worker's jobs twice, and results jsonb rejects."""

from __future__ import annotations

import httpx
import pytest

from workers.errors import ConfigurationError, InvalidTaskArguments
from workers.http import MAX_STORED_BODY, response_body
from workers.settings import load_settings
from workers.tasks.catalog import validate_arguments
from workers.tasks.results import storable


def test_shutdown_longer_than_threshold_rejected() -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings({"WORKER_SHUTDOWN_TIMEOUT": "300"})
    message = str(error.value)
    assert "WORKER_SHUTDOWN_TIMEOUT=300" in message
    assert "STALLED_JOB_THRESHOLD" in message


def test_scheduler_shutdown_checked_too() -> None:
    with pytest.raises(ConfigurationError) as error:
        load_settings({"SCHEDULER_SHUTDOWN_TIMEOUT": "55"})
    assert "SCHEDULER_SHUTDOWN_TIMEOUT=55" in str(error.value)


def test_defaults_leave_room_for_shutdown() -> None:
    settings = load_settings({})
    limit = settings.stalled_job_threshold - settings.heartbeat_interval
    assert settings.worker_shutdown_timeout < limit


def test_storable_replaces_nul_everywhere() -> None:
    value = storable({"a\x00": ["x\x00y", {"k": "\x00"}], "n": 1})
    assert value == {"a\ufffd": ["x\ufffdy", {"k": "\ufffd"}], "n": 1}


def test_large_json_body_is_truncated() -> None:
    content = b'{"data": "' + b"x" * (MAX_STORED_BODY + 10) + b'"}'
    response = httpx.Response(200, content=content)
    body = response_body(response)
    assert body["truncated"] is True
    assert body["size"] == len(content)
    assert len(body["text"]) == MAX_STORED_BODY


@pytest.mark.parametrize("path", ["//host/x", "/../x", "/%2e%2e/x", "/a\\b", "/a b"])
def test_call_api_path_rejected_at_defer(path: str) -> None:
    with pytest.raises(InvalidTaskArguments) as error:
        validate_arguments("call_api", {"method": "GET", "path": path}, 16384)
    assert "path" in error.value.field_errors  # type: ignore[attr-defined]
