"""The Procrastinate App and its connector, built per process after any fork."""

from __future__ import annotations

from typing import Any

import procrastinate

from workers.identity import application_name
from workers.retry import BackoffRetry
from workers.settings import Settings
from workers.tasks import register_tasks
from workers.tasks.catalog import TaskDescription


def connection_kwargs(settings: Settings, role: str) -> dict[str, Any]:
    """Return psycopg connection options naming this process in pg_stat_activity."""
    return {
        "application_name": application_name(role),
        "connect_timeout": settings.db_connect_timeout,
    }


def build_app(settings: Settings, role: str, *, pool_max_size: int | None = None
              ) -> procrastinate.App:
    """Build an unopened App with every task registered; nothing is connected yet."""
    if settings.database_url is None:
        from workers.startup import require_database_url

        require_database_url(settings)
    max_size = pool_max_size or settings.db_pool_max_size
    connector = procrastinate.PsycopgConnector(
        conninfo=settings.database_url,
        min_size=1,
        max_size=max_size,
        timeout=max(settings.db_connect_timeout, 5),
        kwargs=connection_kwargs(settings, role),
    )
    app = procrastinate.App(connector=connector)
    register_tasks(app, settings)
    return app


def retry_strategy(settings: Settings, description: TaskDescription) -> BackoffRetry:
    """Build a task's retry strategy from the settings and its own overrides."""
    return BackoffRetry(
        max_attempts=description.max_attempts or settings.retry_max_attempts,
        base_delay=(
            description.base_delay
            if description.base_delay is not None
            else settings.retry_base_delay
        ),
        max_delay=(
            description.max_delay
            if description.max_delay is not None
            else settings.retry_max_delay
        ),
        jitter=settings.retry_jitter == "full",
        retry_after_max=settings.retry_after_max,
    )
