"""The panel at scale: every page and listing timed over a seeded database.

The database is seeded with BENCH_JOBS jobs (bench/seed.py), then gunicorn serves
the panel with its defaults. One logged-in client requests each page once to warm
it up and BENCH_REQUESTS times more, one request at a time, and p50 and p95 are
taken over those. The sample values (deep keyset positions, argument searches,
job ids) come from the seeded rows. A route that returns 404 is reported as
pending. Then one more request per page runs with auto_explain on, and every
statement that reads a large table with a sequential scan is printed with its
plan; pg_stat_statements gives the slowest statements by mean time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx
import psycopg

from bench.config import BenchConfig
from bench.database import BenchServer
from bench.plans import capture_plans, render, slow, unindexed
from bench.report import Target, percentile, say, section, unmeasured
from bench.seed import seed_jobs
from bench.web import Panel

logger = logging.getLogger(__name__)

PAGE_GOAL_MS = 100.0
DASHBOARD_GOAL_MS = 150.0
SEED_GOAL_S = 60.0
SLOWEST_SHOWN = 10  # statements listed from pg_stat_statements
SLOW_PLAN_MS = 20.0  # a captured statement this slow has its plan printed


@dataclasses.dataclass(frozen=True)
class Page:
    """One URL to time: its kind (dashboard, page or api) and a short name."""

    kind: str
    name: str
    path: str
    # /healthz returns 503 while no worker runs, which is its normal response here.
    accepted: tuple[int, ...] = (200,)


@dataclasses.dataclass
class Timing:
    """The measured times of one page, or why it was not measured."""

    page: Page
    times_ms: list[float]
    status: int

    @property
    def p50(self) -> float:
        """Return the median time in ms."""
        return percentile(self.times_ms, 0.5)

    @property
    def p95(self) -> float:
        """Return the 95th percentile time in ms."""
        return percentile(self.times_ms, 0.95)


def _one(conn: psycopg.Connection, sql: str) -> object:
    row = conn.execute(sql).fetchone()
    return row[0] if row else None


def sample_values(url: str, jobs: int) -> dict[str, str]:
    """Return ids, times and keys taken from the seeded rows for the page URLs."""
    with psycopg.connect(url) as conn:
        values = {
            "deep": str(max(jobs // 20, 2)),
            "middle": str(max(jobs // 2, 1)),
            "newest": str(_one(conn, "SELECT max(id) FROM procrastinate_jobs")),
            "retried": _one(conn, "SELECT min(id) FROM procrastinate_jobs "
                                  "WHERE attempts = 3 AND status = 'succeeded'"),
            "failed": _one(conn, "SELECT max(id) FROM procrastinate_jobs "
                                 "WHERE status = 'failed' AND attempts = 5"),
            "todo": _one(conn, "SELECT max(id) FROM procrastinate_jobs "
                               "WHERE status = 'todo'"),
            "queueing_lock": _one(conn, "SELECT queueing_lock FROM "
                                        "procrastinate_jobs WHERE queueing_lock "
                                        "IS NOT NULL ORDER BY id DESC LIMIT 1"),
        }
    day = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    values["day_from"] = day.strftime("%Y-%m-%dT%H:%M")
    values["day_before"] = (day + datetime.timedelta(days=1)).strftime(
        "%Y-%m-%dT%H:%M")
    return {key: str(value) for key, value in values.items()}


def _listing(name: str, **params: str | list[str]) -> tuple[str, str]:
    return name, urlencode(params, doseq=True)


def listings(values: dict[str, str]) -> list[tuple[str, str]]:
    """Return every job-list filter to time, as (name, query string)."""
    deep, middle = values["deep"], values["middle"]
    window = {"created_from": values["day_from"],
              "created_before": values["day_before"]}
    return [
        _listing("jobs"),
        _listing("jobs_limit_200", limit="200"),
        _listing("jobs_status_failed", status="failed"),
        _listing("jobs_status_todo", status="todo"),
        _listing("jobs_status_doing", status="doing"),
        _listing("jobs_two_statuses", status=["failed", "aborted"]),
        _listing("jobs_queue_default", queue="default"),
        _listing("jobs_task_rare", task="prune_old_jobs"),
        _listing("jobs_task_status_queue", task="call_api", status="failed",
                 queue="default"),
        _listing("jobs_lock", lock="customer-17"),
        _listing("jobs_queueing_lock", queueing_lock=values["queueing_lock"]),
        _listing("jobs_created_day", **window),
        _listing("jobs_created_day_failed", status="failed", **window),
        _listing("jobs_arg_category", arg_key="category", arg_value="dev"),
        _listing("jobs_arg_nested", arg_key="json.name", arg_value="item-5"),
        _listing("jobs_arg_path", arg_key="path", arg_value="/items/4242"),
        _listing("jobs_arg_no_match", arg_key="category", arg_value="nomatch"),
        _listing("jobs_deep_before", before=deep),
        _listing("jobs_deep_after", after=deep),
        _listing("jobs_deep_succeeded", status="succeeded", before=deep),
        _listing("jobs_deep_rare_task", task="prune_old_jobs", before=deep),
        _listing("jobs_middle_failed_maintenance", queue="maintenance",
                 status="failed", before=middle),
        _listing("jobs_deep_arg", arg_key="category", arg_value="dev",
                 before=deep),
    ]


def pages(values: dict[str, str]) -> list[Page]:
    """Return every page and API listing to time, with its filters."""
    middle = values["middle"]
    panel_lists = []
    api_lists = []
    for name, params in listings(values):
        suffix = f"?{params}" if params else ""
        panel_lists.append(Page("page", name, f"/jobs{suffix}"))
        api_lists.append(Page("api", f"api_{name}", f"/api/v1/jobs{suffix}"))
    singles = [
        Page("page", "job_retried", f"/jobs/{values['retried']}"),
        Page("page", "job_failed", f"/jobs/{values['failed']}"),
        Page("page", "job_todo", f"/jobs/{values['todo']}"),
        Page("page", "job_newest", f"/jobs/{values['newest']}"),
    ]
    fleet = [Page("page", name, f"/{name}")
             for name in ("workers", "stalled", "processes", "queues", "periodic",
                          "defer", "account")]
    audit = [
        Page("page", "audit", "/audit"),
        Page("page", "audit_action", "/audit?action=retry_jobs"),
        Page("page", "audit_job", f"/audit?job_id={middle}"),
        Page("page", "healthz", "/healthz", accepted=(200, 503)),
        Page("page", "metrics", "/metrics"),
    ]
    dashboard = [
        Page("dashboard", "dashboard", "/"),
        Page("dashboard", "dashboard_day_charts", "/?range=day"),
    ]
    api_singles = [
        Page("api", "api_job_retried", f"/api/v1/jobs/{values['retried']}"),
        Page("api", "api_job_failed", f"/api/v1/jobs/{values['failed']}"),
        Page("api", "api_tasks", "/api/v1/tasks"),
        Page("api", "api_queues", "/api/v1/queues"),
        Page("api", "api_workers", "/api/v1/workers"),
    ]
    return (dashboard + panel_lists + singles + fleet + audit + api_lists
            + api_singles)


def time_page(client: httpx.Client, page: Page, requests: int) -> Timing:
    """Request ``page`` once to warm up, then ``requests`` times, timing each."""
    status = client.get(page.path).status_code
    if status not in page.accepted:
        return Timing(page, [], status)
    times = []
    for _ in range(requests):
        began = time.perf_counter()
        response = client.get(page.path)
        times.append((time.perf_counter() - began) * 1000)
        if response.status_code not in page.accepted:
            return Timing(page, [], response.status_code)
    return Timing(page, times, 200)


def run_panel(config: BenchConfig, server: BenchServer) -> list[Target]:
    """Seed BENCH_JOBS jobs, time every page and return the panel targets."""
    section(f"panel at scale: {config.panel_jobs} jobs, {config.requests} "
            "requests per page after one warm-up request")
    url = server.new_database("bench_panel")
    targets = [_seed(url, config.panel_jobs)]
    values = sample_values(url, config.panel_jobs)

    with tempfile.TemporaryDirectory(prefix="bench-panel-") as folder, \
            Panel(url, Path(folder)) as panel, \
            contextlib.closing(panel.client()) as client:
        api_client = panel.api_client() or client
        if server.has_statements:
            server.reset_statements(url)
        timings = [time_page(api_client if page.kind == "api" else client, page,
                             config.requests)
                   for page in pages(values)]
        _show_timings(timings)

        if server.has_statements:
            _show_slowest(server, url)
        _show_plans(server, client, api_client, timings)
        if api_client is not client:
            api_client.close()

    targets.extend(_targets(timings))
    return targets


def _seed(url: str, jobs: int) -> Target:
    report = seed_jobs(url, jobs)
    seed_seconds = sum(report.seconds.values())
    say(f"seed: {jobs} jobs in {seed_seconds:.1f} s, of which VACUUM ANALYZE "
        f"{report.seconds['vacuum']:.1f} s; rows: "
        + ", ".join(f"{name} {rows}" for name, rows in report.rows.items()))
    say("seed steps: " + ", ".join(f"{name} {seconds:.1f} s"
                                   for name, seconds in report.seconds.items()))
    return Target(f"seed_{jobs}_jobs", f"{seed_seconds:.1f} s",
                  f"< {SEED_GOAL_S:g} s", seed_seconds < SEED_GOAL_S)


def _show_timings(timings: list[Timing]) -> None:
    for timing in timings:
        if timing.status == 404:
            say(f"{timing.page.name}: pending (404) {timing.page.path}")
        elif timing.status != 200:
            say(f"{timing.page.name}: status {timing.status} {timing.page.path}")
        else:
            say(f"{timing.page.name}: p50 {timing.p50:.1f} ms, p95 "
                f"{timing.p95:.1f} ms  {timing.page.path}")


def _show_slowest(server: BenchServer, url: str) -> None:
    counts = server.count_statements(url)
    with psycopg.connect(server.url) as conn:
        rows = conn.execute(
            "SELECT s.query, s.calls, s.mean_exec_time FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s "
            "ORDER BY s.mean_exec_time DESC LIMIT %s",
            (url.rsplit("/", 1)[1], SLOWEST_SHOWN),
        ).fetchall()
    say(f"slowest statements by mean time ({counts.total} statements ran):")
    for text, calls, mean in rows:
        say(f"    {mean:8.2f} ms x {calls}: {' '.join(str(text).split())[:150]}")


def _show_plans(server: BenchServer, client: httpx.Client,
                api_client: httpx.Client, timings: list[Timing]) -> None:
    if server.log_path is None or not server.has_plans:
        say("plans: not captured, because auto_explain is not loaded on a server "
            "whose log this run reads")
        return
    with capture_plans(server.url, server.log_path) as plans:
        for timing in timings:
            if timing.status == 200:
                chosen = api_client if timing.page.kind == "api" else client
                chosen.get(timing.page.path)
    found = unindexed(plans)
    say(f"plans: {len(plans)} captured; {len(found)} statements read a large "
        "table with a sequential scan (under a Limit or EXISTS such a scan stops "
        "at the first rows it needs)")
    for text, plan in found.items():
        say(f"  {plan.duration_ms:.1f} ms, sequential scan of "
            f"{', '.join(plan.sequential_scans())}: {text[:300]}")
        for line in render(plan.plan):
            say(line)
    slowest = slow(plans, SLOW_PLAN_MS)
    say(f"plans of the {len(slowest)} statements that took {SLOW_PLAN_MS:g} ms "
        "or more:")
    for text, plan in sorted(slowest.items(), key=lambda item: -item[1].duration_ms):
        say(f"  {plan.duration_ms:.1f} ms: {text[:300]}")
        for line in render(plan.plan):
            say(line)


def _targets(timings: list[Timing]) -> list[Target]:
    targets = []
    for kind, name, goal_ms in (("page", "panel_pages_p95", PAGE_GOAL_MS),
                                ("api", "api_listings_p95", PAGE_GOAL_MS),
                                ("dashboard", "dashboard_p95", DASHBOARD_GOAL_MS)):
        group = [timing for timing in timings if timing.page.kind == kind]
        measured = [timing for timing in group if timing.status == 200]
        missing = [timing.page.name for timing in group if timing.status != 200]
        goal = f"p95 < {goal_ms:g} ms on every one"
        if not measured:
            targets.append(unmeasured(name, goal, "no route returned 200: "
                                      + ", ".join(missing)))
            continue
        worst = max(measured, key=lambda timing: timing.p95)
        text = f"worst p95 {worst.p95:.1f} ms ({worst.page.name})"
        if missing:
            text += f"; not measured: {', '.join(missing)}"
        targets.append(Target(name, text, goal,
                              worst.p95 < goal_ms and not missing))
    return targets
