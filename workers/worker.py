"""Worker process entry point: python -m workers.worker."""

from __future__ import annotations

from workers.runner import main

if __name__ == "__main__":
    main("worker")
