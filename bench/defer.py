"""Defer: jobs deferred per second through the panel against bare Procrastinate.

The anchors are bare Procrastinate in this process: sync ``defer()`` after
``app.open()``, ``defer_async`` and ``batch_defer_async`` (500 per batch). The
product is the defer form (``POST /defer/fetch_joke`` with its CSRF token) and
the API, both through gunicorn with its default workers. With pg_stat_statements,
the statements one defer costs the database are counted for both, by query text.
The API's batch figures alternate with ``batch_defer_async`` runs on a database of
their own, and the target compares those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.database import BenchServer, StatementCount, reset_jobs
from bench.config import BenchConfig
from bench.report import (
    Target,
    format_ratio,
    format_runs,
    median,
    say,
    section,
    unmeasured,
)
from bench.tasks import NOOP, deferrer_app
from bench.web import Panel
from tests.support.forms import form_fields

logger = logging.getLogger(__name__)

FORM_PATH = "/defer/fetch_joke"
BATCH_SIZE = 500  # jobs per batch_defer_async call and per API batch
BATCH_JOBS = 20_000  # jobs per batch-defer figure
COUNTED_DEFERS = 50  # defers whose statements are counted
CLIENTS = 2  # concurrent HTTP clients, one per default gunicorn worker
LOGIN_CYCLES = 20  # logins timed; each hashes the password with scrypt


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def bare_sync_rate(url: str, count: int) -> float:
    """Return sync defer() calls per second after app.open(), one at a time."""
    app = deferrer_app(url)
    with app.open():
        task = app.tasks[NOOP]
        task.defer()
        started = time.perf_counter()
        for _ in range(count):
            task.defer()
        return _rate(count, time.perf_counter() - started)


async def _async_rates(url: str, count: int, batch_jobs: int) -> tuple[float, float]:
    app = deferrer_app(url)
    async with app.open_async():
        task = app.tasks[NOOP]
        await task.defer_async()
        started = time.perf_counter()
        for _ in range(count):
            await task.defer_async()
        single = _rate(count, time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(batch_jobs // BATCH_SIZE):
            await task.batch_defer_async(*({} for _ in range(BATCH_SIZE)))
        batch = _rate(batch_jobs // BATCH_SIZE * BATCH_SIZE,
                      time.perf_counter() - started)
    return single, batch


def count_per_defer(server: BenchServer, url: str, defer: Callable[[], None],
                    count: int = COUNTED_DEFERS) -> StatementCount:
    """Count the statements of ``count`` defers; return the counts per defer."""
    defer()
    server.reset_statements(url)
    for _ in range(count):
        defer()
    totals = server.count_statements(url)
    return StatementCount({text: round(calls / count)
                           for text, calls in totals.calls.items()
                           if calls >= count // 2})


def show_statements(label: str, counts: StatementCount) -> None:
    """Print the statements of one defer, one line per query text."""
    say(f"{label}: {counts.total} statements per defer "
        f"({counts.work} without BEGIN/COMMIT)")
    for text, calls in sorted(counts.calls.items(), key=lambda item: -item[1]):
        one_line = " ".join(text.split())
        say(f"    {calls} x {one_line[:110]}")


def _post_form(client: httpx.Client, fields: dict[str, str]) -> None:
    response = client.post(FORM_PATH, data=fields)
    if response.status_code not in (302, 303):
        raise RuntimeError(f"POST {FORM_PATH} returned status {response.status_code}: "
                           f"{response.text[:300]}")


def form_rate(panel: Panel, count: int, clients: int) -> float:
    """Return form defers per second with ``clients`` logged-in clients at once."""
    sessions = [panel.client() for _ in range(clients)]
    try:
        forms = [form_fields(session.get(FORM_PATH).text) for session in sessions]
        per_client = count // clients

        def post_many(index: int) -> None:
            for _ in range(per_client):
                _post_form(sessions[index], forms[index])

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(post_many, range(clients)))
        return _rate(per_client * clients, time.perf_counter() - started)
    finally:
        for session in sessions:
            session.close()


def login_rate(panel: Panel, count: int) -> float:
    """Return login-then-dashboard cycles per second, each with a new client."""
    started = time.perf_counter()
    for _ in range(count):
        with contextlib.closing(panel.client()) as client:
            client.get("/").raise_for_status()
    return _rate(count, time.perf_counter() - started)


def _repeat(runs: int, measure: Callable[[], float]) -> list[float]:
    return [measure() for _ in range(runs)]


def run_defer(config: BenchConfig, server: BenchServer) -> list[Target]:
    """Measure bare and panel defers and return the defer targets."""
    section(f"defer: {config.defers} defers per figure, median of {config.runs} "
            f"runs, batches of {BATCH_SIZE}")
    url = server.new_database("bench_defer")
    sync_rates = _repeat(config.runs,
                              lambda: bare_sync_rate(url, config.defers))
    async_rates = [asyncio.run(_async_rates(url, config.defers, BATCH_JOBS))
                   for _ in range(config.runs)]
    say(f"bare sync defer(): {format_runs(sync_rates, 'jobs/s', 0)}")
    say("bare defer_async: "
        + format_runs([single for single, _ in async_rates], "jobs/s", 0))
    batch_rates = [batch for _, batch in async_rates]
    say(f"bare batch_defer_async: {format_runs(batch_rates, 'jobs/s', 0)}")
    bare_counts: StatementCount | None = None
    if server.has_statements:
        app = deferrer_app(url)
        with app.open():
            task = app.tasks[NOOP]

            def defer_one() -> None:
                task.defer()

            bare_counts = count_per_defer(server, url, defer_one)
        show_statements("bare defer()", bare_counts)
    reset_jobs(url)

    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="bench-defer-") as folder, \
            Panel(url, Path(folder)) as panel:
        logins = min(config.defers, LOGIN_CYCLES)
        say(f"panel login + dashboard: {login_rate(panel, logins):.1f} cycles/s "
            f"over {logins} cycles, one client at a time")
        with contextlib.closing(panel.client()) as client:
            form_status = client.get(FORM_PATH).status_code
        if form_status != 200:
            reason = f"GET {FORM_PATH} returned status {form_status}"
            say(f"defer form: pending ({reason})")
            targets.append(unmeasured("form_defer_statements",
                                      "bare defer() + the audit row", reason))
        else:
            targets.extend(_measure_form(server, panel, url, config,
                                         median(sync_rates), bare_counts))
        targets.extend(_measure_api(server, panel, url, config, median(sync_rates),
                                    server.new_database("bench_defer_bare")))
    return targets


def _measure_form(server: BenchServer, panel: Panel, url: str,
                  config: BenchConfig, sync_rate: float,
                  bare_counts: StatementCount | None) -> list[Target]:
    ones = _repeat(config.runs,
                        lambda: form_rate(panel, config.defers, 1))
    manys = _repeat(config.runs,
                         lambda: form_rate(panel, config.defers, CLIENTS))
    say(f"panel form defer, 1 client: {format_runs(ones, 'jobs/s', 0)}")
    say(f"panel form defer, {CLIENTS} clients: {format_runs(manys, 'jobs/s', 0)}")
    say(format_ratio("form_defer_1_client", median(ones), sync_rate))
    goal = "bare defer() + the audit row"
    if bare_counts is None:
        return [unmeasured("form_defer_statements", goal,
                           "pg_stat_statements is not loaded on the server")]
    with contextlib.closing(panel.client()) as client:
        fields = form_fields(client.get(FORM_PATH).text)
        form_counts = count_per_defer(server, url,
                                      lambda: _post_form(client, fields))
    show_statements("panel form defer", form_counts)
    allowed = bare_counts.total + 1
    return [Target(
        "form_defer_statements",
        f"{form_counts.total} statements per defer ({form_counts.work} without "
        "BEGIN/COMMIT)",
        f"<= {allowed}: bare defer() {bare_counts.total} + 1 audit INSERT",
        form_counts.total <= allowed,
    )]


API_DEFER_PATH = "/api/v1/tasks/fetch_joke/jobs"
API_BATCH_PATH = "/api/v1/tasks/fetch_joke/jobs/batch"


def _post_json(client: httpx.Client, path: str, body: dict[str, object]) -> None:
    response = client.post(path, json=body)
    if response.status_code != 201:
        raise RuntimeError(f"POST {path} returned status {response.status_code}: "
                           f"{response.text[:300]}")


def api_rate(client: httpx.Client, count: int) -> float:
    """Return single API defers per second, one request at a time."""
    started = time.perf_counter()
    for _ in range(count):
        _post_json(client, API_DEFER_PATH, {"arguments": {}})
    return _rate(count, time.perf_counter() - started)


def bare_batch_rate(url: str, jobs: int) -> float:
    """Return jobs per second deferred with batch_defer_async, BATCH_SIZE each."""

    async def measure() -> float:
        app = deferrer_app(url)
        async with app.open_async():
            task = app.tasks[NOOP]
            await task.defer_async()
            batches = max(jobs // BATCH_SIZE, 1)
            started = time.perf_counter()
            for _ in range(batches):
                await task.batch_defer_async(*({} for _ in range(BATCH_SIZE)))
            return _rate(batches * BATCH_SIZE, time.perf_counter() - started)

    return asyncio.run(measure())


def api_batch_rate(client: httpx.Client, jobs: int) -> float:
    """Return jobs per second deferred through the batch route, BATCH_SIZE each."""
    body = {"jobs": [{"arguments": {}} for _ in range(BATCH_SIZE)]}
    batches = max(jobs // BATCH_SIZE, 1)
    started = time.perf_counter()
    for _ in range(batches):
        _post_json(client, API_BATCH_PATH, body)
    return _rate(batches * BATCH_SIZE, time.perf_counter() - started)


def _measure_api(server: BenchServer, panel: Panel, url: str, config: BenchConfig,
                 sync_rate: float, bare_url: str) -> list[Target]:
    goal = ">= 80% of batch_defer_async"
    client = panel.api_client()
    if client is None:
        return [unmeasured("api_batch_defer", goal, "webpanel.tokens is missing")]
    with client:
        status = client.post(API_DEFER_PATH, json={"arguments": {}}).status_code
        if status != 201:
            reason = f"POST {API_DEFER_PATH} returned status {status}"
            say(f"API: pending ({reason})")
            return [unmeasured("api_batch_defer", goal, reason)]
        singles = _repeat(config.runs, lambda: api_rate(client, config.defers))
        say(f"API single defer: {format_runs(singles, 'jobs/s', 0)}")
        say(format_ratio("api_defer", median(singles), sync_rate))
        if server.has_statements:
            counts = count_per_defer(
                server, url,
                lambda: _post_json(client, API_DEFER_PATH, {"arguments": {}}))
            show_statements("API single defer", counts)
        # Bare and API batches alternate, on databases that grow alike, so that
        # other load on the machine reaches both.
        bares: list[float] = []
        batches: list[float] = []
        for _ in range(config.runs):
            bares.append(bare_batch_rate(bare_url, BATCH_JOBS))
            batches.append(api_batch_rate(client, BATCH_JOBS))
        say("bare batch_defer_async, alternating with the API: "
            + format_runs(bares, "jobs/s", 0))
        say(f"API batch defer: {format_runs(batches, 'jobs/s', 0)}")
        batch_async = median(bares)
        say(format_ratio("api_batch_defer", median(batches), batch_async))
    share = median(batches) / batch_async if batch_async else 0.0
    return [Target("api_batch_defer",
                   f"{share:.0%} of batch_defer_async ({median(batches):.0f} / "
                   f"{batch_async:.0f} jobs/s)", goal, share >= 0.80)]
