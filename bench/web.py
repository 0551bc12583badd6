"""The panel under gunicorn for the benchmarks, and a logged-in HTTP client.

``Panel`` runs gunicorn with conf/gunicorn.conf.py and the product's defaults
(WEB_WORKERS and the rest come from workers/settings.py) on a free loopback port,
after creating the admin account with the panel's own ``users sync-admin`` command.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import httpx
import psycopg

from bench.processes import (
    Child,
    bench_environment,
    child_pids,
    start_child,
    wait_until,
)
from tests.support.panel import csrf_token
from tests.support.postgres import free_port
from workers.settings import PROJECT_DIR

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for gunicorn to respond to its first request
ADMIN_USERNAME = "admin"


class Panel:
    """gunicorn serving the panel on one database."""

    def __init__(self, database_url: str, run_dir: Path, **settings: str) -> None:
        self.password = secrets.token_urlsafe(18)
        self.bind = f"127.0.0.1:{free_port()}"
        self.environment = bench_environment(
            database_url, run_dir, WEB_BIND=self.bind,
            ADMIN_USERNAME=ADMIN_USERNAME, ADMIN_PASSWORD=self.password,
            **settings,
        )
        self.run_dir = run_dir
        self.child: Child | None = None

    @property
    def url(self) -> str:
        """Return the panel's base URL."""
        return f"http://{self.bind}"

    def __enter__(self) -> Panel:
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "wsgi", "users", "sync-admin"],
            cwd=PROJECT_DIR, env=self.environment, capture_output=True, text=True,
            timeout=120, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"users sync-admin failed with status "
                               f"{result.returncode}:\n{result.stdout}{result.stderr}")
        self.child = start_child(
            "gunicorn",
            [sys.executable, "-m", "gunicorn", "-c",
             str(PROJECT_DIR / "conf" / "gunicorn.conf.py"), "wsgi:app"],
            self.environment, self.run_dir,
        )
        wait_until(self._responds, START_TIMEOUT, "gunicorn responding to /login",
                   [self.child])
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.child is not None:
            self.child.stop()

    def _responds(self) -> bool:
        try:
            return httpx.get(f"{self.url}/login", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> httpx.Client:
        """Return a new HTTP client logged in as the admin account."""
        client = httpx.Client(base_url=self.url, timeout=30)
        page = client.get("/login")
        response = client.post(
            "/login",
            data={"username": ADMIN_USERNAME, "password": self.password,
                  "csrf_token": csrf_token(page.text)},
        )
        if response.status_code != 302:
            client.close()
            raise RuntimeError(f"login failed with status {response.status_code}: "
                               f"{response.text[:300]}")
        return client

    def api_client(self) -> httpx.Client | None:
        """Return a client sending a new admin API token, or None without tokens."""
        try:
            from webpanel.tokens import generate_token, hash_token
        except ImportError:
            return None
        token = generate_token()
        with psycopg.connect(self.environment["DATABASE_URL"]) as conn:
            conn.execute(
                "INSERT INTO api_tokens (user_id, name, token_hash) SELECT id, "
                "%s, %s FROM panel_users WHERE username = %s",
                (f"bench-{secrets.token_hex(4)}", hash_token(token),
                 ADMIN_USERNAME),
            )
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {token}"})

    def worker_pids(self) -> list[int]:
        """Return the pids of gunicorn's worker processes."""
        assert self.child is not None
        return child_pids(self.child.pid)
