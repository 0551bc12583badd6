"""Pool ``check`` callbacks that skip the round trip for a recently used connection.

psycopg_pool runs its check on every checkout: an empty query, one round trip per
query of the app. These callbacks run that full check only when a connection was
not handed out in the last ``recent_use_seconds``, is not idle, or has bytes
waiting on its socket. An idle pooled connection receives nothing unsolicited. A
server that ends a connection (shutdown, restart, ``pg_terminate_backend``) sends
an error and closes the socket, so the full check runs, fails, and the pool
replaces the connection.

NOTE: a peer that vanished without closing the TCP connection (a host powered
off, a dropped network path) leaves the socket quiet, so a connection used within
the window passes. Its next query then waits until TCP gives up, as the empty
query of the full check would.
"""

from __future__ import annotations

import select
import threading
import time
import weakref
from typing import Any

import psycopg
import psycopg_pool
from psycopg.pq import TransactionStatus

# Seconds after a checkout within which the next checkout of the same connection
# makes no round trip to the server, provided its socket has nothing to read.
RECENT_USE_SECONDS = 2.0

AnyConnection = psycopg.Connection[Any] | psycopg.AsyncConnection[Any]


class RecentUse:
    """The record of when each connection was last handed out, shared by threads."""

    def __init__(self, recent_use_seconds: float = RECENT_USE_SECONDS) -> None:
        self.recent_use_seconds = recent_use_seconds
        self._lock = threading.Lock()
        self._handed_out_at: weakref.WeakKeyDictionary[AnyConnection, float] = (
            weakref.WeakKeyDictionary()
        )

    def needs_round_trip(self, conn: AnyConnection) -> bool:
        """Return whether ``conn`` must pass the full check before it is handed out."""
        with self._lock:
            last = self._handed_out_at.get(conn)
        if last is None or time.monotonic() - last > self.recent_use_seconds:
            return True
        if conn.closed or conn.broken:
            return True
        if conn.pgconn.transaction_status != TransactionStatus.IDLE:
            return True
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))

    def handed_out(self, conn: AnyConnection) -> None:
        """Record that ``conn`` is being handed out now."""
        with self._lock:
            self._handed_out_at[conn] = time.monotonic()


class RecentUseCheck(RecentUse):
    """``check`` callback of an async pool (the workers' Procrastinate App)."""

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.needs_round_trip(conn):
            await psycopg_pool.AsyncConnectionPool.check_connection(conn)
        self.handed_out(conn)


class SyncRecentUseCheck(RecentUse):
    """``check`` callback of a sync pool (the panel's pool in each web worker)."""

    def __call__(self, conn: psycopg.Connection[Any]) -> None:
        if self.needs_round_trip(conn):
            psycopg_pool.ConnectionPool.check_connection(conn)
        self.handed_out(conn)
