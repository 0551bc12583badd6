"""Worker process entry point: python -m workers.worker.

The settings and database checks run before Procrastinate and httpx are imported,
so that a process that cannot run exits soon after it starts.
"""

from __future__ import annotations

from workers.startup import prepare_process

if __name__ == "__main__":
    settings = prepare_process("worker")

    from workers.runner import run_process

    run_process(settings, "worker")
