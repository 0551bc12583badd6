"""Session-wide fixtures: a test PostgreSQL server, databases and supervisord stacks.

Tests are marked by their folder (unit, integration, acceptance, browser), so
``pytest -m unit`` selects one kind. ``FULL=1`` asks for the larger runs; tests read
it through the ``full_run`` fixture. ``TEST_DATABASE_URL`` makes the database
fixtures use an existing server (its role needs CREATEDB) instead of starting one.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support.postgres import (
    PostgresServer,
    create_database,
    database_name,
    drop_database,
    unique_name,
)
from tests.support.stack import Stack
from tests.support.upstream import Upstream

TESTS_DIR = Path(__file__).resolve().parent
ARTIFACTS_DIR = TESTS_DIR.parent / "test-artifacts"
KINDS = ("unit", "integration", "acceptance", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the kind named by its folder, and run browser tests last."""
    for item in items:
        try:
            relative = item.path.resolve().relative_to(TESTS_DIR)
        except ValueError:
            continue
        if relative.parts and relative.parts[0] in KINDS:
            item.add_marker(relative.parts[0])
    # Stable sort: browser tests keep their order but come after every other kind.
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    """Keep each phase's report on the item so fixtures can see a failed test."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def full_run() -> bool:
    """Return True when FULL=1 asks for the larger test runs."""
    return os.environ.get("FULL", "") == "1"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Yield the superuser URL of the session's PostgreSQL server."""
    override = os.environ.get("TEST_DATABASE_URL", "")
    if override:
        yield override
        return
    with PostgresServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def template_database(postgres_server: str) -> Iterator[str]:
    """Yield the URL of a database with the project's schema, applied once."""
    try:
        from workers.schema import apply_schema
    except ImportError as exc:
        pytest.fail(
            f"workers.schema.apply_schema is not importable ({exc}); "
            "the database fixtures need it to build the template database"
        )
    name = unique_name("test_template")
    url = create_database(postgres_server, name)
    try:
        apply_schema(url)
        yield url
    finally:
        drop_database(postgres_server, name)


def _clone_template(postgres_server: str, template_database: str) -> Iterator[str]:
    name = unique_name("test")
    url = create_database(
        postgres_server, name, template=database_name(template_database)
    )
    try:
        yield url
    finally:
        drop_database(postgres_server, name)


@pytest.fixture
def database_url(postgres_server: str, template_database: str) -> Iterator[str]:
    """Yield the URL of a fresh database with the schema, dropped after the test."""
    yield from _clone_template(postgres_server, template_database)


@pytest.fixture(scope="module")
def module_database_url(postgres_server: str, template_database: str) -> Iterator[str]:
    """Yield the URL of a fresh database with the schema, shared by one module."""
    yield from _clone_template(postgres_server, template_database)


@pytest.fixture
def stack_factory(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., Stack]]:
    """Yield a function that starts a supervisord stack; every stack stops after.

    The function takes the environment overrides (DATABASE_URL and API_BASE_URL are
    required) and Stack.start's keyword arguments. When the test failed, the stacks'
    logs are copied to test-artifacts/ before their folders are removed.
    """
    stacks: list[Stack] = []

    def start(env_overrides: Mapping[str, str], **options: Any) -> Stack:
        stack = Stack.start(env_overrides, **options)
        stacks.append(stack)
        return stack

    yield start

    failed = any(
        getattr(getattr(request.node, f"report_{phase}", None), "failed", False)
        for phase in ("setup", "call")
    )
    for index, stack in enumerate(stacks):
        try:
            stack.stop(remove_var_dir=False)
        finally:
            if failed:
                safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
                target = ARTIFACTS_DIR / safe_name / f"stack{index}"
                shutil.copytree(stack.var_dir / "log", target, dirs_exist_ok=True)
            stack.remove_var_dir()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """Yield a loopback HTTP server that the test scripts and inspects."""
    with Upstream() as server:
        yield server
