"""gunicorn settings for the admin panel, read from the project's settings.

The master process only forks and watches workers: it opens no database pool and
no HTTP client, so ``preload_app`` stays False. GUNICORN_CMD_ARGS, which gunicorn
applies after this file, can still turn it on (``--preload``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from workers.settings import load_settings  # noqa: E402

_settings = load_settings()

bind = [_settings.web_bind]
workers = _settings.web_workers
timeout = _settings.web_timeout
graceful_timeout = _settings.web_graceful_timeout
preload_app = False
chdir = str(PROJECT_DIR)
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level
proc_name = "procrastinate-panel"
# gunicorn's control socket (for gunicornc) would default to a path shared by every
# instance under $HOME or $XDG_RUNTIME_DIR; keep it beside supervisord's socket.
control_socket = str(_settings.var_dir / "gunicorn.ctl")


def worker_exit(server: Any, worker: Any) -> None:
    """Close the exiting worker's database pool so its connections end cleanly."""
    try:
        from webpanel.db import close_process_pool
    except ImportError as exc:
        server.log.warning("close_process_pool is not importable: %s", exc)
        return
    try:
        close_process_pool()
    except Exception:
        server.log.exception("closing the pool of worker %s failed", worker.pid)
