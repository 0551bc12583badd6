"""Fixtures for browser tests: one real stack per module and headless Chromium.

Chromium is Debian's (/usr/bin/chromium), driven by Playwright; nothing is
downloaded. Screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.support.stack import Stack
from tests.support.upstream import Upstream

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
# Flags that keep Chromium from reaching any host but the panel on loopback.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]


@pytest.fixture(scope="module")
def browser_upstream() -> Iterator[Upstream]:
    """Yield a loopback upstream for the module's stack."""
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def browser_stack(
    module_database_url: str, browser_upstream: Upstream
) -> Iterator[Stack]:
    """Yield a running stack shared by the tests of one module."""
    stack = Stack.start({
        "DATABASE_URL": module_database_url,
        "API_BASE_URL": browser_upstream.url,
        "WORKER_PROCESSES": "2",
    })
    try:
        yield stack
    finally:
        stack.stop(remove_var_dir=False)
        shutil.copytree(stack.var_dir / "log",
                        SCREENSHOTS.parent / "browser-stack-logs",
                        dirs_exist_ok=True)
        stack.remove_var_dir()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Yield headless Debian Chromium, closed with its Playwright loop after the module.

    Playwright's synchronous API keeps an event loop registered on the main thread
    while it is open, which would make later tests' asyncio.run() fail.
    """
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing; install Debian's chromium package "
                    "(.ci/run does)")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield instance
        instance.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """Yield a fresh page in its own browser context."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(15_000)
    tab = context.new_page()
    yield tab
    context.close()


def log_in(page: Page, stack: Stack, username: str = "admin",
           password: str | None = None) -> None:
    """Log in through the login form."""
    page.goto(f"{stack.url}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password or stack.environment["ADMIN_PASSWORD"])
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/login" not in url)


def screenshot(page: Page, name: str) -> Path:
    """Save a full-page screenshot under test-artifacts/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
