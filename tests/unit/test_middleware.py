"""Tests of the job middleware: timeout, attempt records and log levels.

The worker and connector are small stand-ins that record what the middleware asks
of them; the retry strategy is the real one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from procrastinate import JobContext
from procrastinate.job_context import AbortReason
from procrastinate.jobs import Job

from workers.middleware import JobMiddleware
from workers.retry import BackoffRetry, JobTimeout, UpstreamHTTPError


class RecordingConnector:
    """Connector stand-in that keeps every attempt row it is asked to write."""

    def __init__(self, fail: bool = False) -> None:
        self.rows: list[dict[str, Any]] = []
        self.fail = fail

    async def execute_query_async(self, query: str, **arguments: Any) -> None:
        if self.fail:
            raise OSError("database unreachable")
        self.rows.append(arguments)


@dataclasses.dataclass
class FakeTask:
    retry_strategy: BackoffRetry


@dataclasses.dataclass
class FakeApp:
    connector: RecordingConnector
    tasks: dict[str, FakeTask]


@dataclasses.dataclass
class FakeWorker:
    app: FakeApp
    worker_id: int = 7


def make(
    task_name: str = "fetch_joke",
    attempts: int = 0,
    abort_reason: AbortReason | None = None,
    fail_writes: bool = False,
) -> tuple[JobContext, FakeWorker]:
    strategy = BackoffRetry(max_attempts=5, base_delay=0.5, max_delay=1)
    app = FakeApp(RecordingConnector(fail_writes), {task_name: FakeTask(strategy)})
    job = Job(
        id=42, queue="api_calls", lock=None, queueing_lock=None,
        task_name=task_name, attempts=attempts,
    )
    context = JobContext(
        app=app,  # type: ignore[arg-type]
        job=job,
        start_timestamp=time.time(),
        abort_reason=lambda: abort_reason,
    )
    return context, FakeWorker(app)


def run(
    middleware: JobMiddleware,
    call_next: Callable[[], Awaitable[Any]],
    context: JobContext,
    worker: FakeWorker,
) -> Any:
    return asyncio.run(middleware(call_next, context, worker))  # type: ignore[arg-type]


def test_success_recorded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "workers.middleware")
    context, worker = make()

    async def task() -> str:
        return "done"

    assert run(JobMiddleware(5, "worker:worker_00"), task, context, worker) == "done"
    (row,) = worker.app.connector.rows
    assert row["outcome"] == "succeeded"
    assert row["attempt"] == 1
    assert row["worker_id"] == 7
    assert row["process_name"] == "worker:worker_00"
    assert row["error_type"] is None
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]


def test_timeout_recorded_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "workers.middleware")
    context, worker = make()

    async def slow() -> None:
        await asyncio.sleep(30)

    started = time.monotonic()
    with pytest.raises(JobTimeout):
        run(JobMiddleware(0.2, "w"), slow, context, worker)
    assert time.monotonic() - started < 2
    (row,) = worker.app.connector.rows
    assert row["outcome"] == "timeout"
    assert row["error_type"] == "TimeoutError"
    assert row["error_message"] == "job timed out after 0.2 s (job timeout)"
    assert row["next_attempt_at"] is not None
    assert 150 <= row["duration_ms"] < 1500
    assert caplog.records[-1].levelno == logging.WARNING
    assert "retrying in" in caplog.records[-1].getMessage()


def test_swallowed_cancellation_still_times_out() -> None:
    context, worker = make()

    async def stubborn() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "pretend success"
        return "unreachable"

    with pytest.raises(JobTimeout) as raised:
        run(JobMiddleware(0.2, "w"), stubborn, context, worker)
    assert "ignored its cancellation" in str(raised.value)
    assert worker.app.connector.rows[0]["outcome"] == "timeout"


def test_error_after_cancellation_is_timeout() -> None:
    context, worker = make()

    async def converts() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise ConnectionResetError("closed under us") from None

    with pytest.raises(JobTimeout):
        run(JobMiddleware(0.2, "w"), converts, context, worker)
    assert worker.app.connector.rows[0]["error_type"] == "TimeoutError"


def test_task_timeout_overrides_default() -> None:
    middleware = JobMiddleware(300, "w")
    assert middleware.timeout_for("health_check") == 60
    assert middleware.timeout_for("fetch_joke") == 300
    assert middleware.timeout_for("unknown") == 300


def test_last_attempt_fails_with_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "workers.middleware")
    context, worker = make(attempts=4)

    async def unavailable() -> None:
        raise UpstreamHTTPError(503, "/jokes/random")

    with pytest.raises(UpstreamHTTPError):
        run(JobMiddleware(5, "w"), unavailable, context, worker)
    (row,) = worker.app.connector.rows
    assert row["outcome"] == "failed"
    assert row["attempt"] == 5
    assert row["http_status"] == 503
    assert row["error_message"] == (
        "gave up after 5 attempts; last error: HTTP 503 from /jokes/random"
    )
    assert caplog.records[-1].levelno == logging.ERROR


def test_retried_error_logged_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "workers.middleware")
    context, worker = make(attempts=1)

    async def limited() -> None:
        raise UpstreamHTTPError(429, "/jokes/random", retry_after="1")

    with pytest.raises(UpstreamHTTPError):
        run(JobMiddleware(5, "w"), limited, context, worker)
    (row,) = worker.app.connector.rows
    assert row["outcome"] == "error"
    assert row["attempt"] == 2
    assert row["http_status"] == 429
    assert row["retry_after"] == "1"
    assert row["traceback"] and "UpstreamHTTPError" in row["traceback"]
    levels = [record.levelno for record in caplog.records]
    assert logging.ERROR not in levels
    assert levels[-1] == logging.WARNING


def test_permanent_error_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "workers.middleware")
    context, worker = make()

    async def not_found() -> None:
        raise UpstreamHTTPError(404, "/items/9")

    with pytest.raises(UpstreamHTTPError):
        run(JobMiddleware(5, "w"), not_found, context, worker)
    (row,) = worker.app.connector.rows
    assert row["outcome"] == "failed"
    assert row["error_message"] == "not retryable: HTTP 404 from /items/9"
    assert row["next_attempt_at"] is None
    assert caplog.records[-1].levelno == logging.ERROR


def test_shutdown_abort_requeues_job() -> None:
    context, worker = make(attempts=4, abort_reason=AbortReason.SHUTDOWN)
    seen: list[BaseException] = []

    async def interrupted() -> None:
        error = asyncio.CancelledError()
        seen.append(error)
        raise error

    with pytest.raises(asyncio.CancelledError):
        run(JobMiddleware(5, "w"), interrupted, context, worker)
    (row,) = worker.app.connector.rows
    assert row["outcome"] == "interrupted"
    assert getattr(seen[0], "fleet_shutdown_abort", False) is True
    strategy = worker.app.tasks["fetch_joke"].retry_strategy
    decision = strategy.get_retry_decision(exception=seen[0], job=context.job)
    assert decision is not None


def test_user_abort_recorded() -> None:
    context, worker = make(abort_reason=AbortReason.USER_REQUEST)

    async def aborted() -> None:
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        run(JobMiddleware(5, "w"), aborted, context, worker)
    assert worker.app.connector.rows[0]["outcome"] == "aborted"


def test_record_failure_keeps_outcome(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "workers.middleware")
    context, worker = make(fail_writes=True)

    async def task() -> int:
        return 3

    assert run(JobMiddleware(5, "w"), task, context, worker) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Could not record attempt 1 of job 42" in warnings[0].getMessage()
