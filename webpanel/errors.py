"""Error pages: readable messages, never a traceback, and 503 when the database is slow.

A form whose CSRF token expired is shown again with the operator's input and a
message, instead of a bare 400: views that can do that are marked with
``keeps_input_when_expired``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import procrastinate.exceptions
import psycopg
import psycopg_pool
from flask import (
    Flask,
    current_app,
    flash,
    g,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from webpanel.db import DatabaseUnavailable
from workers.settings import redact_url
from workers.tasks.catalog import arguments_too_large, format_bytes

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Views that defer jobs: a body too large for them names the job argument limit.
DEFER_ENDPOINTS = frozenset({"jobs.defer_task", "api.defer_job",
                             "api.defer_jobs_batch"})
EXPIRED_FORM_MESSAGE = "This form expired. Check the values and submit again."
DATABASE_ERRORS = (DatabaseUnavailable, psycopg.OperationalError,
                   psycopg_pool.PoolTimeout,
                   procrastinate.exceptions.ConnectorException)
# Errors of a query that names a table, column, function or type the database
# lacks: its schema is older than the code.
SCHEMA_ERRORS = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn,
                 psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedObject)


def keeps_input_when_expired(view: F) -> F:
    """Mark a form view that re-renders its input when its CSRF token expired."""
    view.keeps_input_when_expired = True  # type: ignore[attr-defined]
    return view


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in {"/healthz"}


def _load_page_user(database_failed: bool) -> None:
    # The layout shows the logged-in account. When the database just failed,
    # asking it again would only double the wait, so the page shows no account.
    if "user" in g:
        return
    if database_failed:
        g.user = None
        return
    from webpanel.auth import current_user

    try:
        current_user()
    except DATABASE_ERRORS:
        g.user = None


def _page(status: int, title: str, message: str,
          database_failed: bool = False, back_url: str | None = None) -> Response:
    if _wants_json():
        response = jsonify({"error": title, "message": message})
    else:
        _load_page_user(database_failed)
        response = make_response(render_template(
            "error.html", status=status, title=title, message=message,
            back_url=back_url))
    response.status_code = status
    return response


def _too_large_message() -> str:
    # The body was not read, so its size is the Content-Length the client sent.
    limit = request.max_content_length
    size = request.content_length
    measured = f" is {format_bytes(size)}," if size else ""
    message = "The request body is too large; send less data."
    if limit:
        message = (f"The request body{measured} larger than {limit} bytes "
                   f"({format_bytes(limit)}), the largest the panel accepts.")
    if request.endpoint in DEFER_ENDPOINTS:
        settings = current_app.config["FLEET_SETTINGS"]
        message += (" Nothing was deferred: job arguments "
                    + arguments_too_large(None, settings.max_arguments_bytes)
                    + ".")
    elif limit:
        message += " Send less data."
    return message


def _handle_http(exc: HTTPException) -> Any:
    status = exc.code or 500
    title = exc.name
    message = exc.description or ""
    back_url = None
    if status == 413:
        message = _too_large_message()
        if request.endpoint == "jobs.defer_task":
            back_url = request.path
    response = _page(status, title, message, back_url=back_url)
    # Keep the headers the exception carries: Allow, WWW-Authenticate, Retry-After.
    for name, value in exc.get_headers():
        if name.lower() not in {"content-type", "content-length"}:
            response.headers[name] = value
    return response


def _is_invalid_input(exc: psycopg.DataError) -> bool:
    # PostgreSQL's class 22 (data exception: out of range, invalid text, bad
    # encoding) comes from a value the request sent, and so does psycopg's own
    # refusal of NUL characters in text. Other client-side DataErrors, such as a
    # list it cannot adapt, are bugs and stay 500.
    if exc.sqlstate is not None:
        return exc.sqlstate.startswith("22")
    return "NUL (0x00)" in str(exc)


def _handle_data_error(exc: psycopg.DataError) -> Any:
    if not _is_invalid_input(exc):
        return _handle_unexpected(exc)
    first_line = (str(exc).splitlines() or [""])[0]
    logger.info("Rejected %s %s: the database refused a value: %s",
                request.method, request.path, redact_url(first_line)[:200],
                extra={"action": "invalid_value"})
    return _page(400, "Bad Request",
                 "A value in the request is out of range or not valid text "
                 "(for example a NUL character); correct it and try again.")


def _handle_csrf(exc: CSRFError) -> Any:
    from webpanel.auth import current_user

    view = current_app.view_functions.get(request.endpoint or "")
    logger.info("Form for %s rejected: %s", request.path, exc.description,
                extra={"action": "csrf_rejected"})
    if view is not None and not getattr(view, "is_public", False) \
            and current_user() is None:
        return redirect(url_for("auth.login"), code=303)
    if view is not None and getattr(view, "keeps_input_when_expired", False) \
            and not g.get("csrf_expired"):
        g.csrf_expired = True
        try:
            return current_app.ensure_sync(view)(**(request.view_args or {}))
        except Exception as view_exc:  # noqa: BLE001 - each kind has its handler
            # An error raised while re-rendering (a 404 for an unknown task, the
            # database timing out) gets the page it would get from the view.
            return current_app.handle_user_exception(view_exc)
    if _wants_json():
        return _page(400, "Bad Request", "missing or invalid CSRF token")
    flash("The form expired, so nothing was changed. Submit it again.", "error")
    target = request.referrer or "/"
    if not target.startswith(request.host_url):
        target = "/"
    return redirect(target, code=303)


def _timed_out(exc: BaseException) -> bool:
    # Procrastinate wraps psycopg's errors in ConnectorException, so the reason
    # sits somewhere in the chain of causes.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DatabaseUnavailable):
            # The panel's own verdict wins over the errors that led to it.
            return seen.timed_out
        if isinstance(seen, (psycopg_pool.PoolTimeout, psycopg.errors.QueryCanceled,
                             psycopg.errors.LockNotAvailable)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _handle_database(exc: Exception) -> Any:
    if _schema_cause(exc) is not None:
        return _handle_schema(exc)
    timed_out = _timed_out(exc)
    logger.warning("Database unavailable for %s %s: %s", request.method,
                   request.path, redact_url(str(exc)),
                   extra={"action": "database_unavailable"})
    if timed_out:
        message = ("The database did not answer in time. Nothing was changed; "
                   "try again in a moment.")
    else:
        message = ("The database cannot be reached. Nothing was changed; the panel "
                   "will work again as soon as it is back.")
    response = _page(503, "Database unavailable", message, database_failed=True)
    response.headers["Retry-After"] = "5"
    return response


def _schema_cause(exc: BaseException) -> psycopg.Error | None:
    # Procrastinate wraps psycopg's errors in ConnectorException, so the missing
    # object may sit anywhere in the chain of causes.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SCHEMA_ERRORS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _handle_schema(exc: Exception) -> Any:
    cause = _schema_cause(exc) or exc
    first_line = (str(cause).splitlines() or [""])[0][:200]
    logger.error("Database schema behind the code on %s %s: %s; run `python -m "
                 "workers.schema apply`", request.method, request.path, first_line,
                 extra={"action": "schema_behind_code"})
    return _page(503, "Database schema behind the code",
                 f"The database schema is behind the code: {first_line}. Apply the "
                 "migrations with `python -m workers.schema apply`; /healthz lists "
                 "every missing object.", database_failed=True)


def _handle_unexpected(exc: Exception) -> Any:
    if _schema_cause(exc) is not None:
        return _handle_schema(exc)
    incident = uuid.uuid4().hex[:12]
    logger.error("Unhandled error %s on %s %s", incident, request.method,
                 request.path, exc_info=exc,
                 extra={"action": "request_failed", "incident": incident})
    return _page(500, "Internal Server Error",
                 f"Something went wrong. The log has the details under "
                 f"incident {incident}.")


def init_app(app: Flask) -> None:
    """Register every error handler."""
    app.register_error_handler(CSRFError, _handle_csrf)
    app.register_error_handler(HTTPException, _handle_http)
    app.register_error_handler(psycopg.DataError, _handle_data_error)
    for kind in SCHEMA_ERRORS:
        app.register_error_handler(kind, _handle_schema)
    for kind in DATABASE_ERRORS:
        app.register_error_handler(kind, _handle_database)
    app.register_error_handler(Exception, _handle_unexpected)
