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

from workers.errors import ConfigurationError  # noqa: E402
from workers.settings import check_web_secrets, load_settings  # noqa: E402

# Check the settings once here, before gunicorn binds its port or forks: a bad or
# missing SECRET_KEY stops the master with one clear line instead of one traceback
# per worker. Exit status 78 is EX_CONFIG from sysexits.h.
try:
    _settings = load_settings()
    check_web_secrets(_settings)
except ConfigurationError as _error:
    print(f"error: {_error}", file=sys.stderr, flush=True)
    sys.exit(78)

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
