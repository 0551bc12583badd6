"""Upstream calls: one httpx client per process, paths kept under API_BASE_URL.

httpx applies its timeouts to each network operation, so a server that drips its
body can hold a request far longer than HTTP_TIMEOUT; the job timeout applied by the
middleware is the budget for a whole attempt.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from typing import Any

import httpx

from workers.attempts import note_http_answer
from workers.errors import InvalidTaskArguments
from workers.retry import RedirectRejected, UpstreamHTTPError
from workers.settings import Settings

logger = logging.getLogger(__name__)

MAX_PATH_LENGTH = 2000  # characters
MAX_STORED_BODY = 65536  # characters of a response body kept as a result
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x20\x7f-\x9f]")
_FOLLOWED_REDIRECTS = frozenset({307, 308})

_client: httpx.AsyncClient | None = None


def get_client(settings: Settings) -> httpx.AsyncClient:
    """Return this process's shared client, creating it on first use."""
    global _client
    if _client is None:
        timeout = settings.http_timeout
        _client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=timeout, read=timeout, write=timeout, pool=timeout
            ),
            limits=httpx.Limits(
                max_connections=max(settings.worker_concurrency, 10),
                max_keepalive_connections=max(settings.worker_concurrency, 10),
            ),
            follow_redirects=False,
            headers={"User-Agent": "procrastinate-fleet"},
            trust_env=False,
        )
    return _client


async def close_client() -> None:
    """Close this process's client, if it was opened."""
    global _client
    if _client is not None:
        await _client.aclose()
        _client = None


def check_relative_path(path: str) -> None:
    """Reject a path that is absolute, has dot segments or control characters."""
    if not isinstance(path, str) or not path:
        raise InvalidTaskArguments("path is missing; give a path such as /items/42")
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidTaskArguments(
            f"path is {len(path)} characters long; the limit is {MAX_PATH_LENGTH}"
        )
    if _CONTROL_CHARACTERS.search(path) or "\\" in path:
        raise InvalidTaskArguments(
            f"path {path[:80]!r} contains spaces, control characters or a backslash; "
            "percent-encode them"
        )
    if not path.startswith("/") or path.startswith("//"):
        raise InvalidTaskArguments(
            f"path {path[:80]!r} must start with a single '/' and be relative to "
            "API_BASE_URL; absolute URLs are rejected"
        )
    raw_path = path.split("?", 1)[0].split("#", 1)[0]
    decoded = urllib.parse.unquote(urllib.parse.unquote(raw_path))
    segments = decoded.split("/")
    if ".." in segments or "." in segments:
        raise InvalidTaskArguments(
            f"path {path[:80]!r} contains '.' or '..' segments; give the final path"
        )
    if "#" in path:
        raise InvalidTaskArguments(f"path {path[:80]!r} contains a fragment ('#')")


def resolve_api_url(base_url: str, path: str) -> str:
    """Join ``path`` to ``base_url``, rejecting anything that leaves the base URL."""
    check_relative_path(path)
    url = base_url.rstrip("/") + path
    if not is_under_base(base_url, url):
        raise InvalidTaskArguments(f"path {path[:80]!r} leaves API_BASE_URL")
    return url


def is_under_base(base_url: str, url: str) -> bool:
    """Tell whether ``url`` has the scheme, host and port of ``base_url`` and its path."""
    base = urllib.parse.urlsplit(base_url)
    target = urllib.parse.urlsplit(url)
    if (target.scheme, target.hostname, _port(target)) != (
        base.scheme, base.hostname, _port(base)
    ):
        return False
    if target.username or target.password:
        return False
    prefix = base.path.rstrip("/")
    return target.path == prefix or target.path.startswith(prefix + "/")


def _port(parts: urllib.parse.SplitResult) -> int | None:
    try:
        return parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None


def _show(base_url: str, url: str) -> str:
    """Return ``url`` relative to the base when it is under it, else in full."""
    if is_under_base(base_url, url):
        base_path = urllib.parse.urlsplit(base_url).path.rstrip("/")
        parts = urllib.parse.urlsplit(url)
        shown = parts.path[len(base_path):] or "/"
        return shown + (f"?{parts.query}" if parts.query else "")
    return url


async def request(
    settings: Settings,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    params: dict[str, str] | None = None,
    idempotency_key: str | None = None,
) -> httpx.Response:
    """Send one request under API_BASE_URL, following only same-base 307/308."""
    base_url = settings.api_base_url
    url = resolve_api_url(base_url, path)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    client = get_client(settings)
    display = path.split("?", 1)[0]

    for _hop in range(settings.http_max_redirects + 1):
        response = await _send(client, method, url, json_body, params, headers)
        status = response.status_code
        retry_after = response.headers.get("Retry-After")
        note_http_answer(status, retry_after)
        if status >= 400:
            raise UpstreamHTTPError(status, display, retry_after)
        if not 300 <= status < 400:
            return response

        # Any 3xx is a redirect here: a 3xx body is never a result.
        location = response.headers.get("Location", "")
        if not location:
            raise RedirectRejected(
                f"HTTP {status} from {display} without a Location header; update "
                "API_BASE_URL or the path"
            )
        target = urllib.parse.urljoin(str(response.url), location)
        shown = _show(base_url, target)
        if status not in _FOLLOWED_REDIRECTS:
            raise RedirectRejected(
                f"HTTP {status} redirect to {shown}; update API_BASE_URL or the path"
            )
        if not is_under_base(base_url, target):
            raise RedirectRejected(
                f"HTTP {status} redirect to {shown}, outside API_BASE_URL "
                f"({base_url}); not followed"
            )
        target_parts = urllib.parse.urlsplit(target)
        try:
            check_relative_path(
                target_parts.path
                + (f"?{target_parts.query}" if target_parts.query else "")
            )
        except InvalidTaskArguments as exc:
            raise RedirectRejected(
                f"HTTP {status} redirect to {shown} rejected: {exc}"
            ) from None
        logger.info(
            "Following HTTP %s redirect from %s to %s", status, display, shown,
            extra={"action": "upstream_redirect_followed"},
        )
        url, display, params = target, shown, None

    raise RedirectRejected(
        f"too many redirects: more than {settings.http_max_redirects} from {path}"
    )


async def _send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    json_body: Any,
    params: dict[str, str] | None,
    headers: dict[str, str],
) -> httpx.Response:
    """Send one request and read its whole body, closing the connection on any error.

    Streaming and closing in ``finally`` makes a cancelled read (the job timeout
    hitting a slow-drip body) close the connection at once instead of leaving it
    half-read in the pool.
    """
    request = client.build_request(
        method, url, json=json_body, params=params, headers=headers
    )
    response = await client.send(request, stream=True)
    try:
        await response.aread()
    finally:
        await response.aclose()
    return response


def response_body(response: httpx.Response) -> Any:
    """Return the parsed JSON body, or the text truncated for storage.

    A body longer than MAX_STORED_BODY is kept as truncated text even when it is
    JSON, so that one large response cannot bloat the results table or the job page.
    """
    if len(response.content) > MAX_STORED_BODY:
        return {"truncated": True, "size": len(response.content),
                "text": response.text[:MAX_STORED_BODY]}
    try:
        return response.json()
    except ValueError:
        return response.text[:MAX_STORED_BODY]
