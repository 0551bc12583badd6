"""Scheduler process entry point: python -m workers.scheduler.

The scheduler serves the 'maintenance' queue alone: the health check, the stalled-job
sweep and the pruning of old jobs, deferred on their schedules.
"""

from __future__ import annotations

from workers.runner import main

if __name__ == "__main__":
    main("scheduler")
