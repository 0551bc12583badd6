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
    redirect,
    render_template,
    request,
)
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from webpanel.db import DatabaseUnavailable

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

EXPIRED_FORM_MESSAGE = "This form expired. Check the values and submit again."


def keeps_input_when_expired(view: F) -> F:
    """Mark a form view that re-renders its input when its CSRF token expired."""
    view.keeps_input_when_expired = True  # type: ignore[attr-defined]
    return view


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in {"/healthz"}


def _page(status: int, title: str, message: str) -> Any:
    if _wants_json():
        return jsonify({"error": title, "message": message}), status
    return render_template("error.html", status=status, title=title,
                           message=message), status


def _handle_http(exc: HTTPException) -> Any:
    status = exc.code or 500
    title = exc.name
    message = exc.description or ""
    if status == 413:
        message = "The request body is too large; send less data."
    return _page(status, title, message)


def _handle_csrf(exc: CSRFError) -> Any:
    view = current_app.view_functions.get(request.endpoint or "")
    logger.info("Form for %s rejected: %s", request.path, exc.description,
                extra={"action": "csrf_rejected"})
    if view is not None and getattr(view, "keeps_input_when_expired", False):
        g.csrf_expired = True
        return current_app.ensure_sync(view)(**(request.view_args or {}))
    if _wants_json():
        return _page(400, "Bad Request", "missing or invalid CSRF token")
    flash("The form expired, so nothing was changed. Submit it again.", "error")
    target = request.referrer or "/"
    if not target.startswith(request.host_url):
        target = "/"
    return redirect(target, code=303)


def _handle_database(exc: Exception) -> Any:
    timed_out = isinstance(exc, DatabaseUnavailable) and exc.timed_out
    if isinstance(exc, psycopg_pool.PoolTimeout):
        timed_out = True
    logger.warning("Database unavailable for %s %s: %s", request.method,
                   request.path, exc, extra={"action": "database_unavailable"})
    if timed_out:
        message = ("The database did not answer in time. Nothing was changed; "
                   "try again in a moment.")
    else:
        message = ("The database cannot be reached. Nothing was changed; the panel "
                   "will work again as soon as it is back.")
    response = _page(503, "Database unavailable", message)
    body, status = response
    if hasattr(body, "headers"):
        body.headers["Retry-After"] = "5"
    return body, status


def _handle_unexpected(exc: Exception) -> Any:
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
    for kind in (DatabaseUnavailable, psycopg.OperationalError,
                 psycopg_pool.PoolTimeout, procrastinate.exceptions.ConnectorException):
        app.register_error_handler(kind, _handle_database)
    app.register_error_handler(Exception, _handle_unexpected)
