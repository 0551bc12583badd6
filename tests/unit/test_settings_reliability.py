"""Tests of the settings that the retry policy, recovery and shutdown depend on."""

from __future__ import annotations

import pytest
from croniter import croniter

from workers.errors import ConfigurationError
from workers.settings import interval_to_cron, load_settings


def test_threshold_below_three_heartbeats_rejected() -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"HEARTBEAT_INTERVAL": "10", "STALLED_JOB_THRESHOLD": "29"})
    message = str(raised.value)
    assert "STALLED_JOB_THRESHOLD=29" in message
    assert "HEARTBEAT_INTERVAL=10" in message
    assert "at least 30" in message


def test_threshold_of_three_heartbeats_accepted() -> None:
    settings = load_settings(
        {"HEARTBEAT_INTERVAL": "1", "STALLED_JOB_THRESHOLD": "3",
         "WORKER_SHUTDOWN_TIMEOUT": "1", "SCHEDULER_SHUTDOWN_TIMEOUT": "1"}
    )
    assert settings.stalled_job_threshold == 3


@pytest.mark.parametrize(
    ("seconds", "cron"),
    [
        (1, "* * * * * */1"),
        (5, "* * * * * */5"),
        (30, "* * * * * */30"),
        (60, "*/1 * * * *"),
        (600, "*/10 * * * *"),
        (3600, "0 */1 * * *"),
        (86400, "0 */24 * * *"),
    ],
)
def test_check_interval_becomes_cron(seconds: int, cron: str) -> None:
    assert interval_to_cron(seconds) == cron
    assert croniter.is_valid(cron)


@pytest.mark.parametrize("seconds", [7, 45, 90, 7200 + 60])
def test_uneven_check_interval_rejected(seconds: int) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"STALLED_JOB_CHECK_INTERVAL": str(seconds)})
    assert f"STALLED_JOB_CHECK_INTERVAL={seconds}" in str(raised.value)


def test_seconds_cron_accepted_for_health_check() -> None:
    settings = load_settings({"HEALTH_CHECK_CRON": "* * * * * */2"})
    assert settings.health_check_cron == "* * * * * */2"


def test_max_delay_below_base_rejected() -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"RETRY_BASE_DELAY": "10", "RETRY_MAX_DELAY": "5"})
    assert "RETRY_MAX_DELAY=5 is less than RETRY_BASE_DELAY=10" in str(raised.value)


def test_maintenance_queue_reserved_for_scheduler() -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"WORKER_QUEUES": "default,maintenance"})
    assert "maintenance" in str(raised.value)


def test_every_problem_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"JOB_TIMEOUT": "0", "RETRY_MAX_ATTEMPTS": "many"})
    message = str(raised.value)
    assert "JOB_TIMEOUT='0'" in message
    assert "RETRY_MAX_ATTEMPTS='many'" in message


def test_retry_defaults() -> None:
    settings = load_settings({})
    assert settings.retry_base_delay == 2
    assert settings.retry_max_delay == 300
    assert settings.retry_max_attempts == 5
    assert settings.retry_jitter == "full"
    assert settings.retry_after_max == 3600
    assert settings.http_max_redirects == 5
