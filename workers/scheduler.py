"""Scheduler process entry point: python -m workers.scheduler.

The scheduler serves the 'maintenance' queue alone: the health check, the stalled-job
sweep and the pruning of old jobs, deferred on their schedules. As in the worker,
the settings and database checks run before Procrastinate is imported.
"""

from __future__ import annotations

from workers.startup import prepare_process

if __name__ == "__main__":
    settings = prepare_process("scheduler")

    from workers.runner import run_process

    run_process(settings, "scheduler")
