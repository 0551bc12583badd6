"""The worker pool's checkout check, which makes a round trip only when needed.

The connections are stand-ins with a real socket pair, so that "the server closed
the connection" is a real end of file on the socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Iterator
from typing import Any

import psycopg_pool
import pytest
from psycopg.pq import TransactionStatus

from workers import app as worker_app
from workers import pool_check
from workers.app import worker_pool
from workers.pool_check import RecentUseCheck


@dataclasses.dataclass
class FakePGconn:
    """The libpq connection attributes the check reads."""

    socket: int
    transaction_status: TransactionStatus = TransactionStatus.IDLE


class FakeConnection:
    """An idle stand-in connection on the client end of a socket pair."""

    def __init__(self, client: socket.socket) -> None:
        self.pgconn = FakePGconn(client.fileno())
        self.closed = False
        self.broken = False


@dataclasses.dataclass
class Pair:
    """A stand-in connection and the socket its server would write to."""

    conn: FakeConnection
    server: socket.socket


@pytest.fixture
def pair() -> Iterator[Pair]:
    client, server = socket.socketpair()
    try:
        yield Pair(FakeConnection(client), server)
    finally:
        client.close()
        server.close()


@pytest.fixture
def full_checks(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the connections given to psycopg_pool's full check instead of it."""
    calls: list[Any] = []

    async def record(conn: Any) -> None:
        calls.append(conn)

    monkeypatch.setattr(
        psycopg_pool.AsyncConnectionPool, "check_connection", staticmethod(record)
    )
    return calls


def check_out(check: RecentUseCheck, conn: FakeConnection) -> None:
    asyncio.run(check(conn))  # type: ignore[arg-type]


def test_check_first_checkout_round_trip(pair: Pair, full_checks: list[Any]) -> None:
    check_out(RecentUseCheck(), pair.conn)
    assert full_checks == [pair.conn]


def test_check_recent_connection_skipped(pair: Pair, full_checks: list[Any]) -> None:
    check = RecentUseCheck()
    check_out(check, pair.conn)
    check_out(check, pair.conn)
    check_out(check, pair.conn)
    assert full_checks == [pair.conn]


def test_check_idle_connection_round_trip(
    pair: Pair, full_checks: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    check = RecentUseCheck(recent_use_seconds=2.0)
    now = [1000.0]
    monkeypatch.setattr(pool_check.time, "monotonic", lambda: now[0])
    check_out(check, pair.conn)
    now[0] += 1.9
    check_out(check, pair.conn)
    assert len(full_checks) == 1
    now[0] += 2.1
    check_out(check, pair.conn)
    assert len(full_checks) == 2


def test_check_server_closed_round_trip(pair: Pair, full_checks: list[Any]) -> None:
    check = RecentUseCheck()
    check_out(check, pair.conn)
    pair.server.close()  # what a terminated backend does to its socket
    check_out(check, pair.conn)
    assert full_checks == [pair.conn, pair.conn]


def test_check_pending_bytes_round_trip(pair: Pair, full_checks: list[Any]) -> None:
    check = RecentUseCheck()
    check_out(check, pair.conn)
    pair.server.sendall(b"E")
    check_out(check, pair.conn)
    assert len(full_checks) == 2


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("closed", True),
        ("broken", True),
        ("transaction_status", TransactionStatus.INTRANS),
        ("transaction_status", TransactionStatus.UNKNOWN),
    ],
)
def test_check_unusable_state_round_trip(
    pair: Pair, full_checks: list[Any], attribute: str, value: object
) -> None:
    check = RecentUseCheck()
    check_out(check, pair.conn)
    target = pair.conn.pgconn if attribute == "transaction_status" else pair.conn
    setattr(target, attribute, value)
    check_out(check, pair.conn)
    assert len(full_checks) == 2


def test_check_failure_propagates(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def dead(conn: Any) -> None:
        raise OSError("server closed the connection")

    monkeypatch.setattr(
        psycopg_pool.AsyncConnectionPool, "check_connection", staticmethod(dead)
    )
    with pytest.raises(OSError, match="server closed"):
        check_out(RecentUseCheck(), pair.conn)


def test_worker_pool_overrides_check() -> None:
    pool = worker_pool(
        conninfo="postgresql://127.0.0.1:1/unused",
        open=False,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
    )
    assert isinstance(pool._check, RecentUseCheck)
    assert pool._configure is worker_app.set_autocommit
