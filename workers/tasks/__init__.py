"""The tasks, registered on an App by ``register_tasks``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.settings import Settings
from workers.tasks.catalog import TASKS

if TYPE_CHECKING:
    import procrastinate


def register_tasks(app: procrastinate.App, settings: Settings) -> None:
    """Register every task of the catalog, with its policy, on ``app``."""
    from workers.app import retry_strategy
    from workers.tasks import api, maintenance

    functions = {
        "fetch_joke": api.fetch_joke,
        "call_api": api.call_api,
        "health_check": maintenance.health_check,
        "retry_stalled_jobs": maintenance.retry_stalled_jobs,
        "prune_old_jobs": maintenance.prune_old_jobs,
    }
    periodic = {
        "health_check": settings.health_check_cron,
        "retry_stalled_jobs": settings.stalled_check_cron,
        "prune_old_jobs": "17 * * * *",
    }
    for name, func in functions.items():
        description = TASKS[name]
        task = app.task(
            name=name,
            queue=description.queue,
            pass_context=True,
            retry=retry_strategy(settings, description),
            # A waiting maintenance job makes the next tick skip instead of piling up.
            queueing_lock=name if description.periodic else None,
        )(func)
        if name in periodic:
            app.periodic(cron=periodic[name], periodic_id=name)(task)
