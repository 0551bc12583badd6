"""The log filter that drops Procrastinate's per-job lines and keeps the fleet's."""

from __future__ import annotations

import logging

import psycopg
import pytest

from workers.logs import ProcrastinateNoiseFilter


def record(name: str, level: int, action: str,
           error: BaseException | None = None) -> logging.LogRecord:
    """Return a log record from logger ``name`` carrying ``action``."""
    exc_info = (type(error), error, None) if error is not None else None
    log_record = logging.LogRecord(name, level, __file__, 1, "line", (), exc_info)
    log_record.action = action
    return log_record


@pytest.mark.parametrize(
    "action", ["start_job", "job_success", "job_error", "job_aborted", "finish_task"]
)
def test_procrastinate_job_lines_dropped(action: str) -> None:
    noise = ProcrastinateNoiseFilter(logging.INFO)
    line = record("procrastinate.worker.worker_00", logging.INFO, action)
    assert not noise.filter(line)


@pytest.mark.parametrize("action", ["job_error", "job_aborted", "job_failed"])
def test_middleware_job_lines_kept(action: str) -> None:
    noise = ProcrastinateNoiseFilter(logging.INFO)
    line = record("workers.middleware", logging.WARNING, action)
    assert noise.filter(line)
    assert line.levelname == "WARNING"


def test_side_task_database_error_lowered() -> None:
    noise = ProcrastinateNoiseFilter(logging.INFO)
    line = record("procrastinate.worker.worker_00", logging.ERROR,
                  "side_task_failed", psycopg.OperationalError("refused"))
    assert noise.filter(line)
    assert line.levelname == "WARNING"
    assert line.exc_info is None


def test_side_task_other_error_stays_error() -> None:
    noise = ProcrastinateNoiseFilter(logging.INFO)
    line = record("procrastinate.worker.worker_00", logging.ERROR,
                  "side_task_failed", KeyError("bug"))
    assert noise.filter(line)
    assert line.levelname == "ERROR"
