"""The JSON API under /api/v1: jobs, actions, bulk actions, defers and the fleet.

Requests authenticate with ``Authorization: Bearer TOKEN`` (``webpanel.security``
checks the token before any view runs). A request that carries only the session
cookie may read, but every state change it makes also needs the CSRF token in the
``X-CSRFToken`` header. Roles are the panel's: viewers read, operators act and
defer, admins do everything.

Every error is JSON, ``{"error": ..., "message": ..., "field_errors": {...}}``, with
a 4xx status for anything wrong in the request. The routes live in ``api_jobs``,
``api_defer`` and ``api_fleet``, imported at the end of this module.
"""

from __future__ import annotations

import datetime
import decimal
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, current_app, request
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Response

from webpanel import security

logger = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api/v1")
security.exempt_api(bp)

JSON_MIMETYPE = "application/json"
MAX_FIELD_NAME_SHOWN = 80  # characters of an unknown field name echoed back
_UTC = datetime.timezone.utc


class ApiError(Exception):
    """A request the API rejects; becomes a JSON error response."""

    def __init__(self, status: int, message: str,
                 field_errors: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field_errors = dict(field_errors or {})
        self.headers = dict(headers or {})
        self.extra = extra


def json_default(value: Any) -> Any:
    """Encode datetimes as ISO 8601 in UTC and decimals as numbers, for JSON."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_UTC)
        return value.astimezone(_UTC).isoformat()
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def jsonable(value: Any) -> Any:
    """Return ``value`` as plain JSON types: dicts, lists, strings, numbers, None."""
    return json.loads(json.dumps(value, default=json_default))


def json_response(body: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> Response:
    """Return ``body`` as a JSON response; non-ASCII text is escaped."""
    text = json.dumps(body, default=json_default, ensure_ascii=True)
    response = current_app.response_class(text, status=status,
                                          mimetype=JSON_MIMETYPE)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def error_body(status: int, message: str,
               field_errors: Mapping[str, str] | None = None,
               **extra: Any) -> dict[str, Any]:
    """Return the JSON error body: the status phrase, a message, field errors."""
    return {"error": HTTP_STATUS_CODES.get(status, "Error"), "message": message,
            "field_errors": dict(field_errors or {}), **extra}


@bp.errorhandler(ApiError)
def _handle_api_error(exc: ApiError) -> Response:
    logger.info("API %s %s rejected with %d: %s", request.method, request.path,
                exc.status, exc.message[:300],
                extra={"action": "api_rejected", "status": exc.status,
                       "fields": sorted(exc.field_errors)[:20]})
    return json_response(error_body(exc.status, exc.message, exc.field_errors,
                                    **exc.extra),
                         exc.status, exc.headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON; send finite numbers")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a float")
    return value


def read_json_body(max_bytes: int | None = None) -> Any:
    """Parse the request body as strict JSON, raising ApiError when it is not.

    ``max_bytes`` raises the body size limit of this request above
    MAX_CONTENT_LENGTH; a larger body gets a 413. NaN, Infinity and numbers too
    large for a float are rejected, as PostgreSQL's jsonb rejects them.
    """
    if max_bytes is not None:
        request.max_content_length = max_bytes
    if not request.is_json:
        raise ApiError(415, "send the body as JSON with the header "
                            "'Content-Type: application/json'")
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise ApiError(400, "the body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not valid UTF-8 (invalid byte at offset "
                            f"{exc.start}); send UTF-8 JSON") from None
    try:
        return json.loads(text, parse_constant=_reject_constant,
                          parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: it is nested too "
                            "deeply") from None
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, rejecting a key that appears twice in it.

    json.loads keeps the last of repeated keys, while a proxy or a log reader may
    take the first, so a repeated key could make them see another request.
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key[:80]!r} appears twice in one object; "
                             "send each key once")
        result[key] = value
    return result


def read_json_object(max_bytes: int | None = None) -> dict[str, Any]:
    """Parse the request body as a JSON object, raising ApiError otherwise."""
    body = read_json_body(max_bytes)
    if not isinstance(body, dict):
        raise ApiError(400, f"the body is a JSON {json_type(body)}; send a JSON "
                            "object")
    return body


def json_type(value: Any) -> str:
    """Return the JSON name of a parsed value's type, such as 'array'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def shown_name(name: object) -> str:
    """Return a field name as it may be echoed back: text, at most 80 characters."""
    return str(name)[:MAX_FIELD_NAME_SHOWN]


# Imported last: these modules add their routes to ``bp``.
from webpanel import api_defer, api_fleet, api_jobs  # noqa: E402,F401
