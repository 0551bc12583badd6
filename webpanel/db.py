"""The panel's database access: one small pool per gunicorn worker, opened lazily.

The pool is created on the first request a worker process serves, never in the
gunicorn master, so a forked worker never shares sockets or pool threads with its
parent (``--preload`` included). Every connection carries a statement timeout equal
to WEB_REQUEST_BUDGET, and waiting for a pooled connection has the same budget, so a
slow database turns into a readable 503 page well before gunicorn's worker timeout.

``fetch_one``, ``fetch_all`` and ``execute`` run their single statement in autocommit
mode, so PostgreSQL runs it as its own transaction without a BEGIN and a COMMIT.
``connection`` lends a connection in one transaction, for work of several statements.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import procrastinate
import psycopg
import psycopg_pool
from flask import current_app
from psycopg.rows import dict_row

from workers.app import build_app
from workers.identity import application_name
from workers.pool_check import SyncRecentUseCheck
from workers.settings import Settings

logger = logging.getLogger(__name__)


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not respond within the budget."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class _ProcessState:
    """The pool and the Procrastinate App of one process."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pool: psycopg_pool.ConnectionPool | None = None
        self.app: procrastinate.App | None = None
        self.lock = threading.Lock()
        # Set when a request found the database unreachable, cleared by the
        # next request that got a connection.
        self.unreachable = False


_state = _ProcessState()


def _settings() -> Settings:
    return current_app.config["FLEET_SETTINGS"]


def _leave_autocommit(conn: psycopg.Connection[Any]) -> None:
    # Runs when the pool takes a connection back (its ``reset`` callback), so a
    # connection lent in autocommit mode never reaches a caller that expects a
    # transaction. When this raises, the pool closes the connection.
    if conn.autocommit:
        conn.autocommit = False


def _open(settings: Settings) -> None:
    budget_ms = int(settings.web_request_budget * 1000)
    pool = psycopg_pool.ConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=settings.web_db_pool_max_size,
        timeout=settings.web_request_budget,
        kwargs={
            "application_name": application_name("web"),
            "connect_timeout": min(settings.db_connect_timeout,
                                   max(1, int(settings.web_request_budget))),
            # JIT compilation costs the chart queries more than it saves.
            "options": (f"-c statement_timeout={budget_ms} "
                        f"-c lock_timeout={budget_ms} -c jit=off"),
        },
        open=False,
        check=SyncRecentUseCheck(),
        reset=_leave_autocommit,
        name=f"web-{os.getpid()}",
    )
    pool.open(wait=False)
    app = build_app(settings, "web", pool_max_size=settings.web_db_pool_max_size)
    app.open(pool)
    _state.pid, _state.pool, _state.app = os.getpid(), pool, app
    logger.info("Opened the database pool of web worker %s", os.getpid(),
                extra={"action": "web_pool_opened"})


def _ensure_open() -> None:
    if _state.pid == os.getpid() and _state.pool is not None:
        return
    with _state.lock:
        if _state.pid != os.getpid():
            # Inherited from a parent process: never close or reuse it here.
            _state.pool, _state.app = None, None
        if _state.pool is None:
            _open(_settings())


def procrastinate_app() -> procrastinate.App:
    """Return this process's Procrastinate App, opened on the process's pool."""
    _ensure_open()
    assert _state.app is not None
    return _state.app


def close_process_pool() -> None:
    """Close this process's pool, if this process opened one."""
    with _state.lock:
        if _state.pid == os.getpid() and _state.pool is not None:
            _state.pool.close()
        _state.pid, _state.pool, _state.app = None, None, None


def _translate(exc: Exception) -> DatabaseUnavailable:
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return DatabaseUnavailable(
            "the database did not answer in time (no connection became free)",
            timed_out=True,
        )
    if isinstance(exc, (psycopg.errors.QueryCanceled,
                        psycopg.errors.LockNotAvailable)):
        return DatabaseUnavailable(
            "the database did not answer in time", timed_out=True
        )
    return DatabaseUnavailable("the database cannot be reached")


@contextlib.contextmanager
def connection(
    autocommit: bool = False,
) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """Lend a pooled connection returning dict rows, in one transaction.

    With ``autocommit`` every statement commits on its own, with no BEGIN or
    COMMIT sent: use it only for a single statement.
    """
    _ensure_open()
    pool = _state.pool
    assert pool is not None
    if _state.unreachable:
        _probe(pool)
    try:
        with pool.connection() as conn:
            _state.unreachable = False
            conn.row_factory = dict_row  # type: ignore[assignment]
            if autocommit:
                conn.autocommit = True
            yield conn  # type: ignore[misc]
    except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
        _state.unreachable = pool.get_stats().get("pool_available", 0) == 0
        if _state.unreachable and isinstance(exc, psycopg_pool.PoolTimeout):
            # No connection became free: tell a refusing server from a slow one.
            _probe(pool)
        raise _translate(exc) from exc
    except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable) as exc:
        raise _translate(exc) from exc


def _probe(pool: psycopg_pool.ConnectionPool) -> None:
    """Raise DatabaseUnavailable at once if the server still refuses connections.

    After a request found the database unreachable, the next ones would each wait
    the whole WEB_REQUEST_BUDGET for the pool. While the pool has no idle
    connection, one direct connection attempt decides within the connect timeout.
    """
    if pool.get_stats().get("pool_available", 0) > 0:
        return
    try:
        psycopg.connect(pool.conninfo, **pool.kwargs).close()
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable("the database cannot be reached") from exc


def fetch_all(sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run one statement in autocommit mode and return every row as a dict."""
    with connection(autocommit=True) as conn:
        return conn.execute(sql, params or {}).fetchall()  # type: ignore[arg-type]


def fetch_one(sql: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Run one statement in autocommit mode and return its first row, or None."""
    with connection(autocommit=True) as conn:
        return conn.execute(sql, params or {}).fetchone()  # type: ignore[arg-type]


def execute(sql: str, params: dict[str, Any] | None = None) -> int:
    """Run one statement in autocommit mode and return the number of rows it touched."""
    with connection(autocommit=True) as conn:
        cursor = conn.execute(sql, params or {})  # type: ignore[arg-type]
        return cursor.rowcount
