"""Writing a job's end state again after connection errors, within a window."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import psycopg_pool
import pytest
from procrastinate import exceptions as procrastinate_exceptions

from workers.end_state import OutageWindow, is_connection_error, write_through_outage

FAST = {"first_delay": 0.01, "max_delay": 0.02}


def wrapped(cause: Exception) -> procrastinate_exceptions.ConnectorException:
    """Return the error Procrastinate's connector raises for ``cause``."""
    try:
        raise procrastinate_exceptions.ConnectorException() from cause
    except procrastinate_exceptions.ConnectorException as exc:
        return exc


class FlakyWrite:
    """A write that raises the given errors in turn, then returns "written"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "written"


@pytest.mark.parametrize(
    "error",
    [
        psycopg.OperationalError("connection refused"),
        psycopg_pool.PoolTimeout("couldn't get a connection after 5.00 sec"),
        wrapped(psycopg.OperationalError("server closed the connection")),
        wrapped(psycopg.errors.AdminShutdown("terminating connection")),
    ],
)
def test_connection_errors_recognized(error: Exception) -> None:
    assert is_connection_error(error)


@pytest.mark.parametrize(
    "error",
    [
        wrapped(psycopg.errors.RaiseException('Job was not found or not in "doing"')),
        wrapped(psycopg.errors.UniqueViolation("duplicate key")),
        procrastinate_exceptions.ConnectorException(),
        ValueError("bad row"),
    ],
)
def test_other_errors_not_connection(error: Exception) -> None:
    assert not is_connection_error(error)


def test_write_retried_until_it_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    write = FlakyWrite(
        wrapped(psycopg.OperationalError("connection refused")),
        psycopg_pool.PoolTimeout("couldn't get a connection"),
    )
    caplog.set_level(logging.INFO, logger="workers.end_state")

    result = asyncio.run(write_through_outage(
        write, description="the status of job 7", window=5, outage=OutageWindow(),
        **FAST,
    ))

    assert result == "written"
    assert write.calls == 3
    retries = [r for r in caplog.records if r.action == "end_state_write_retry"]
    assert len(retries) == 2
    assert retries[0].levelname == "WARNING"
    assert "Could not write the status of job 7" in retries[0].getMessage()
    assert "connection refused" in retries[0].getMessage()
    done = [r for r in caplog.records if r.action == "end_state_written"]
    assert [r.getMessage() for r in done] == ["Wrote the status of job 7 after 3 tries"]


def test_other_error_raised_at_once() -> None:
    error = wrapped(psycopg.errors.RaiseException("not in doing status"))
    write = FlakyWrite(error)

    with pytest.raises(procrastinate_exceptions.ConnectorException) as raised:
        asyncio.run(write_through_outage(write, description="x", window=5,
                                         outage=OutageWindow(), **FAST))

    assert raised.value is error
    assert write.calls == 1


def test_last_error_raised_after_window() -> None:
    errors = [psycopg.OperationalError(f"refused {n}") for n in range(1000)]
    write = FlakyWrite(*errors)

    with pytest.raises(psycopg.OperationalError) as raised:
        asyncio.run(write_through_outage(write, description="x", window=0.1,
                                         outage=OutageWindow(), **FAST))

    assert 2 <= write.calls < 1000
    assert str(raised.value) == f"refused {write.calls - 1}"


def test_delay_doubles_up_to_max(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []

    async def record_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr("workers.end_state.asyncio.sleep", record_sleep)
    write = FlakyWrite(*[psycopg.OperationalError("refused")] * 5)

    asyncio.run(write_through_outage(write, description="x", window=60,
                                     first_delay=0.5, max_delay=4.0,
                                     outage=OutageWindow()))

    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0]


def fail_until_window_ends(outage: OutageWindow) -> FlakyWrite:
    """Run a write that always fails until ``outage``'s 0.1 s window ends."""
    write = FlakyWrite(*[psycopg.OperationalError("refused")] * 1000)
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(write_through_outage(write, description="x", window=0.1,
                                         outage=outage, **FAST))
    return write


def test_writes_share_one_outage_window() -> None:
    outage = OutageWindow()
    fail_until_window_ends(outage)

    # The outage goes on: the next write gets no new window.
    second = FlakyWrite(*[psycopg.OperationalError("refused")] * 1000)
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(write_through_outage(second, description="y", window=0.1,
                                         outage=outage, **FAST))
    assert second.calls == 1


def test_success_ends_outage_window() -> None:
    outage = OutageWindow()
    fail_until_window_ends(outage)
    asyncio.run(write_through_outage(FlakyWrite(), description="y", window=0.1,
                                     outage=outage, **FAST))
    assert outage.started is None

    # A later outage starts a window of its own.
    later = FlakyWrite(psycopg.OperationalError("refused"))
    result = asyncio.run(write_through_outage(later, description="z", window=5,
                                              outage=outage, **FAST))
    assert result == "written"
    assert later.calls == 2
