"""An operator's day in headless Chromium against the real stack.

The tests share one stack and run in file order: the jobs each one leaves are
found by the next through the panel itself. Each saves a screenshot of the page it
checked under test-artifacts/screenshots/.
"""

from __future__ import annotations

import re
import time

import psycopg
from playwright.sync_api import Page, expect
from psycopg.types.json import Jsonb

from tests.browser.conftest import log_in, screenshot
from tests.support.stack import Stack
from tests.support.upstream import Upstream

JOB_DEADLINE = 60.0  # seconds for a job to reach its expected state


def _reload_until_status(page: Page, status: str) -> None:
    deadline = time.monotonic() + JOB_DEADLINE
    while page.get_attribute("[data-job-status]", "data-job-status") != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"the job page never showed {status}")
        page.wait_for_timeout(300)
        page.reload()


def _defer_scheduled(database_url: str, count: int) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            """
            SELECT procrastinate_defer_jobs_v1(ARRAY[ROW(
                'api_calls', 'call_api', 0, NULL, NULL, %s::jsonb,
                now() + interval '1 hour')::procrastinate_job_to_defer_v1])
              FROM generate_series(1, %s)
            """,
            (Jsonb({"method": "GET", "path": "/later"}), count),
        )


def test_log_in_defer_and_read_the_joke(
    page: Page, browser_stack: Stack
) -> None:
    log_in(page, browser_stack)
    expect(page.locator("h1")).to_have_text("Dashboard")
    screenshot(page, "dashboard")

    page.goto(f"{browser_stack.url}/defer/fetch_joke")
    page.fill("input[name=category]", "dev")
    screenshot(page, "defer-form")
    page.click("button:has-text('Defer job')")
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    _reload_until_status(page, "succeeded")
    expect(page.locator("[data-section=joke]")).not_to_be_empty()
    screenshot(page, "job-page")


def test_oversized_body_keeps_the_form(page: Page, browser_stack: Stack) -> None:
    log_in(page, browser_stack)
    page.goto(f"{browser_stack.url}/defer/call_api")
    page.select_option("select[name=method]", "POST")
    page.fill("input[name=path]", "/items")
    body = '{"blob": "' + "x" * (2 * 1024 * 1024) + '"}'
    page.fill("textarea[name=json]", body)
    page.click("button:has-text('Defer job')")

    notice = page.locator("#defer-size-error")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("The arguments are 2.0 MiB")
    expect(notice).to_contain_text("MAX_ARGUMENTS_BYTES")
    expect(page).to_have_url(re.compile(r"/defer/call_api$"))
    expect(page.locator("input[name=path]")).to_have_value("/items")
    assert len(page.input_value("textarea[name=json]")) == len(body)
    screenshot(page, "defer-too-large")


def test_filter_and_search_by_argument(page: Page, browser_stack: Stack) -> None:
    log_in(page, browser_stack)
    page.goto(f"{browser_stack.url}/jobs")
    page.fill("#f-key", "category")
    page.fill("#f-value", "dev")
    page.check("input[name=status][value=succeeded]")
    page.click("button:has-text('Apply filters')")
    expect(page).to_have_url(re.compile(r"arg_key=category"))
    rows = page.locator("tr[data-job-id]")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("fetch_joke")
    screenshot(page, "jobs-filtered")

    page.fill("#f-value", "nothing-like-this")
    page.click("button:has-text('Apply filters')")
    expect(page.locator("[data-state=empty]")).to_contain_text("No jobs match")


def test_retry_a_failed_job(
    page: Page, browser_stack: Stack, browser_upstream: Upstream
) -> None:
    browser_upstream.respond("/flaky", status=404, times=1)
    log_in(page, browser_stack)
    page.goto(f"{browser_stack.url}/defer/call_api")
    page.select_option("select[name=method]", "GET")
    page.fill("input[name=path]", "/flaky")
    page.click("button:has-text('Defer job')")
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    _reload_until_status(page, "failed")
    expect(page.locator("body")).to_contain_text("HTTP 404 from /flaky")
    screenshot(page, "job-failed")

    page.click("button[data-action=retry]")
    _reload_until_status(page, "succeeded")
    expect(page.locator("[data-audit-action=job_retried]")).to_contain_text(
        "Job retried by admin")
    screenshot(page, "job-retried")


def test_bulk_cancel_shows_the_count_first(
    page: Page, browser_stack: Stack, module_database_url: str
) -> None:
    _defer_scheduled(module_database_url, 7)
    log_in(page, browser_stack)
    page.goto(f"{browser_stack.url}/jobs?status=todo&task=call_api")
    expect(page.locator("tr[data-job-id]")).to_have_count(7)
    page.select_option("#bulk-action", "cancel")
    page.click("button[name=scope][value=filter]")
    expect(page.locator(".bulk-count")).to_have_attribute("data-applicable", "7")
    screenshot(page, "bulk-confirm")
    page.click("button:has-text('Cancel 7 jobs')")
    page.goto(f"{browser_stack.url}/jobs?status=cancelled&task=call_api")
    expect(page.locator("tr[data-job-id]")).to_have_count(7)


def test_restart_a_worker_process(page: Page, browser_stack: Stack) -> None:
    old_pid = browser_stack.process_info("worker:worker_00")["pid"]
    log_in(page, browser_stack)
    page.goto(f"{browser_stack.url}/processes")
    screenshot(page, "processes")
    page.on("dialog", lambda dialog: dialog.accept())
    row = page.locator("tr", has_text="worker:worker_00")
    row.locator("button:has-text('Restart')").click()
    confirm = page.locator("button:has-text('Restart worker:worker_00')")
    if confirm.count():
        confirm.click()
    expect(page.locator("body")).to_contain_text("RUNNING")
    info = browser_stack.process_info("worker:worker_00")
    assert info["statename"] == "RUNNING"
    assert info["pid"] != old_pid
    screenshot(page, "process-restarted")


def test_audit_lists_the_actions(page: Page, browser_stack: Stack) -> None:
    log_in(page, browser_stack)
    page.goto(f"{browser_stack.url}/audit")
    body = page.locator("body")
    for action in ("job_deferred", "job_retried", "process_restarted"):
        expect(body).to_contain_text(action)
    expect(body).to_contain_text("cancel")
    screenshot(page, "audit")
    for path, name in (("/workers", "workers"), ("/queues", "queues"),
                       ("/periodic", "periodic"), ("/stalled", "stalled")):
        page.goto(f"{browser_stack.url}{path}")
        expect(page.locator("h1")).to_be_visible()
        screenshot(page, name)


def test_logs_hold_no_secrets(page: Page, browser_stack: Stack) -> None:
    # Runs last: by now every program has logged a login, defers, a failed job,
    # a retry, a bulk action and a process restart.
    log_in(page, browser_stack)
    page.goto(f"{browser_stack.url}/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "wrong-password-for-the-log-check")
    page.click("button[type=submit]")
    secrets = {
        "ADMIN_PASSWORD": browser_stack.environment["ADMIN_PASSWORD"],
        "SECRET_KEY": browser_stack.environment["SECRET_KEY"],
        "typed wrong password": "wrong-password-for-the-log-check",
    }
    logs = [path for path in (browser_stack.var_dir / "log").iterdir()
            if path.is_file()]
    assert len(logs) >= 5
    for path in logs:
        text = path.read_text(errors="replace")
        for name, value in secrets.items():
            assert value not in text, f"{name} appears in {path.name}"
