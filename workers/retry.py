"""The retry policy: capped exponential backoff with full jitter, and Retry-After.

A failed attempt is retried when its error is transient: an httpx transport error or
timeout, an upstream answer of 5xx, 408 or 429, the job timeout, or a lost database
connection. Anything else, such as invalid arguments, another 4xx or a redirect that
the task does not follow, fails the job at once.

The delay before attempt ``n + 1`` is ``min(max_delay, base * 2 ** n)``, drawn at
random between 0 and that value under full jitter. A ``Retry-After`` header on a 429
or 503 answer sets a floor under the delay, capped at ``retry_after_max``.

Procrastinate asks the strategy once per failed attempt, and the job middleware asks
it first to record the decision; the decision is therefore cached on the exception
object so that both see the same jittered delay.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import math
import random
import re

import attr
import httpx
import psycopg
from procrastinate import RetryDecision, RetryStrategy
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate.jobs import Job

from workers.errors import InvalidTaskArguments

RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
RETRY_AFTER_STATUSES = frozenset({429, 503})
# 2 ** 64 seconds exceeds any cap; larger exponents are clamped to avoid overflow.
_MAX_EXPONENT = 64
_DECISION_ATTR = "_fleet_retry_decision"
# RFC 9110 section 10.2.3: delay-seconds is 1*DIGIT, ASCII digits only.
_DELAY_SECONDS = re.compile(r"[0-9]+")


class UpstreamHTTPError(Exception):
    """The upstream responded with an HTTP status that is not a success."""

    def __init__(self, status: int, path: str, retry_after: str | None = None) -> None:
        self.status = status
        self.path = path
        self.retry_after = retry_after
        super().__init__(f"HTTP {status} from {path}")


class RedirectRejected(Exception):
    """The upstream redirected somewhere the task does not follow."""


class JobTimeout(TimeoutError):
    """An attempt ran longer than its job timeout."""


def is_retryable(exc: BaseException) -> bool:
    """Tell whether a failed attempt's error is transient."""
    if isinstance(exc, (InvalidTaskArguments, RedirectRejected)):
        return False
    if isinstance(exc, UpstreamHTTPError):
        return exc.status in RETRYABLE_STATUSES
    if isinstance(exc, httpx.TooManyRedirects):
        return False
    if isinstance(exc, (httpx.TransportError, TimeoutError)):
        return True
    if isinstance(exc, (psycopg.OperationalError,
                        procrastinate_exceptions.ConnectorException)):
        return True
    return False


def parse_retry_after(value: str | None, now: datetime.datetime) -> float | None:
    """Return the seconds a Retry-After value requests, or None when invalid."""
    if value is None:
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - now).total_seconds())


def backoff_ceiling(base: float, max_delay: float, attempts: int) -> float:
    """Return ``min(max_delay, base * 2 ** attempts)`` without overflowing."""
    if base <= 0:
        return 0.0
    exponent = min(max(attempts, 0), _MAX_EXPONENT)
    return min(max_delay, math.ldexp(base, exponent))


@attr.dataclass(kw_only=True)
class BackoffRetry(RetryStrategy):
    """Capped exponential backoff with full jitter, honouring Retry-After."""

    max_attempts: int | None = 5
    base_delay: float = 2.0
    max_delay: float = 300.0
    jitter: bool = True
    retry_after_max: float = 3600.0

    def delay_for(self, attempts: int, rng: random.Random | None = None) -> float:
        """Return the delay in seconds before the attempt after ``attempts`` runs."""
        ceiling = backoff_ceiling(self.base_delay, self.max_delay, attempts)
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(0.0, ceiling)

    def retry_after_floor(self, exc: BaseException, now: datetime.datetime) -> float:
        """Return the capped Retry-After wait carried by ``exc``, or 0."""
        if not isinstance(exc, UpstreamHTTPError):
            return 0.0
        if exc.status not in RETRY_AFTER_STATUSES:
            return 0.0
        seconds = parse_retry_after(exc.retry_after, now)
        if seconds is None:
            return 0.0
        return min(seconds, self.retry_after_max)

    def gives_up(self, attempts: int) -> bool:
        """Tell whether a job that has run ``attempts + 1`` times has no try left."""
        return self.max_attempts is not None and attempts + 1 >= self.max_attempts

    def get_retry_decision(
        self, *, exception: BaseException, job: Job
    ) -> RetryDecision | None:
        """Decide once per exception whether and when the job runs again."""
        cached = getattr(exception, _DECISION_ATTR, _MISSING)
        if cached is not _MISSING:
            return cached
        decision = self._decide(exception, job)
        try:
            setattr(exception, _DECISION_ATTR, decision)
        except AttributeError:
            pass
        return decision

    def _decide(self, exc: BaseException, job: Job) -> RetryDecision | None:
        now = datetime.datetime.now(datetime.timezone.utc)
        if is_shutdown_abort(exc):
            # The worker stopped under the job: not the job's fault, so it gets
            # its turn again at once, whatever its attempt count.
            return RetryDecision(retry_at=now)
        if not is_retryable(exc) or self.gives_up(job.attempts):
            return None
        delay = max(self.delay_for(job.attempts), self.retry_after_floor(exc, now))
        return RetryDecision(retry_at=now + datetime.timedelta(seconds=delay))

    def upcoming_delays(self, attempts: int) -> list[tuple[int, float, float]]:
        """List (attempt number, shortest, longest delay) for the attempts left."""
        schedule = []
        for done in range(attempts, (self.max_attempts or attempts + 5) - 1):
            ceiling = backoff_ceiling(self.base_delay, self.max_delay, done)
            shortest = 0.0 if self.jitter else ceiling
            schedule.append((done + 2, shortest, ceiling))
        return schedule


_MISSING = object()


def is_shutdown_abort(exc: BaseException) -> bool:
    """Tell whether ``exc`` is the cancellation of a job by a stopping worker."""
    return bool(getattr(exc, "fleet_shutdown_abort", False)) and isinstance(
        exc, (asyncio.CancelledError, procrastinate_exceptions.JobAborted)
    )


def describe_failure(exc: BaseException) -> str:
    """Return a one-line description of an attempt's error for records and logs."""
    if isinstance(exc, (JobTimeout, UpstreamHTTPError, RedirectRejected,
                        InvalidTaskArguments)):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    described = f"{name}: {text}" if text else name
    target = _request_target(exc)
    return f"{described} ({target})" if target else described


def _request_target(exc: BaseException) -> str:
    """Return "METHOD scheme://host:port/path" of an httpx error's request, if any."""
    if not isinstance(exc, httpx.RequestError):
        return ""
    try:
        request = exc.request
    except RuntimeError:  # raised when no request was attached to the error
        return ""
    url = request.url
    port = f":{url.port}" if url.port is not None else ""
    # The query and any credentials are left out, because either may carry a secret.
    return f"{request.method} {url.scheme}://{url.host}{port}{url.path}"
