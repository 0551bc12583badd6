"""Tasks that call the upstream API."""

from __future__ import annotations

import logging
from typing import Any

from procrastinate import JobContext

from workers import http
from workers.errors import InvalidTaskArguments
from workers.settings import Settings
from workers.tasks.catalog import validate_arguments
from workers.tasks.results import store_result, stored_result

logger = logging.getLogger(__name__)


def _settings(context: JobContext) -> Settings:
    return context.additional_context["settings"]


async def fetch_joke(context: JobContext, category: str | None = None) -> dict[str, Any]:
    """Fetch a random joke, in ``category`` when given, and store it once."""
    settings = _settings(context)
    arguments = {"category": category} if category is not None else {}
    validate_arguments("fetch_joke", arguments, settings.max_arguments_bytes)
    earlier = await stored_result(context)
    if earlier is not None:
        return earlier

    params = {"category": category} if category else None
    response = await http.request(settings, "GET", "/jokes/random", params=params)
    body = http.response_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("value"), str):
        raise InvalidTaskArguments(
            "the upstream's /jokes/random response has no 'value' text; check "
            "API_BASE_URL"
        )
    result = {
        "joke": body["value"],
        "joke_id": body.get("id"),
        "categories": body.get("categories") or [],
        "http_status": response.status_code,
    }
    await store_result(context, result)
    return result


async def call_api(
    context: JobContext, method: str, path: str, json: Any = None
) -> dict[str, Any]:
    """Send one request to a path under API_BASE_URL and store the response once."""
    settings = _settings(context)
    arguments: dict[str, Any] = {"method": method, "path": path}
    if json is not None:
        arguments["json"] = json
    validate_arguments("call_api", arguments, settings.max_arguments_bytes)
    earlier = await stored_result(context)
    if earlier is not None:
        return earlier

    # The job id keys the effect upstream: a retried POST carries the same key.
    key = None if method == "GET" else str(context.job.id)
    response = await http.request(
        settings, method, path, json_body=json, idempotency_key=key
    )
    result = {
        "http_status": response.status_code,
        "body": http.response_body(response),
    }
    await store_result(context, result)
    return result
