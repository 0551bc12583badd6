"""``make run`` from a minimal environment, with its settings only in ``.env``.

Under an init system or cron, supervisord starts with little more than PATH and
HOME. The test copies the project into a short temporary folder (sharing .venv),
writes DATABASE_URL and WORKER_PROCESSES=3 into that copy's .env only, and runs
``make run`` there under ``env -i``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from supervisor.xmlrpc import SupervisorTransport

from tests.support.faults import wait_until
from tests.support.postgres import free_port
from tests.support.stack import STACK_ID_VARIABLE, _kill_tagged_processes
from tests.support.upstream import Upstream
from workers.settings import PROJECT_DIR

COPIED = ("workers", "webpanel", "conf", "scripts", "wsgi.py", "Makefile",
          "requirements.txt", "requirements-dev.txt")


@pytest.fixture
def project_copy() -> Iterator[Path]:
    """Yield a copy of the project in a short folder, sharing the virtualenv."""
    root = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        source = PROJECT_DIR / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)
    (root / ".venv").symlink_to(PROJECT_DIR / ".venv")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def process_states(socket_path: Path) -> dict[str, str]:
    transport = SupervisorTransport(None, None, f"unix://{socket_path}")
    try:
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        infos = proxy.supervisor.getAllProcessInfo()
    finally:
        transport.close()
    return {f"{info['group']}:{info['name']}": info["statename"] for info in infos}


def test_make_run_reads_dotenv_only(
    project_copy: Path, database_url: str
) -> None:
    password = urlsplit(database_url).password
    assert password
    stack_id = secrets.token_hex(8)
    with Upstream() as upstream:
        (project_copy / ".env").write_text(
            f"DATABASE_URL={database_url}\n"
            "WORKER_PROCESSES=3\n"
            f"API_BASE_URL={upstream.url}\n"
            f"WEB_BIND=127.0.0.1:{free_port()}\n"
            f"SECRET_KEY={secrets.token_urlsafe(48)}\n"
            f"ADMIN_PASSWORD={secrets.token_urlsafe(18)}\n"
        )
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            STACK_ID_VARIABLE: stack_id,
        }
        output = project_copy / "make-run.out"
        with open(output, "wb") as sink:
            make = subprocess.Popen(
                ["env", "-i", *(f"{k}={v}" for k, v in environment.items()),
                 "make", "run"],
                cwd=project_copy, stdin=subprocess.DEVNULL, stdout=sink,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        socket_path = project_copy / "var" / "supervisor.sock"
        log_dir = project_copy / "var" / "log"
        try:
            workers = [f"worker:worker_{n:02d}" for n in range(3)]

            def all_running() -> dict[str, str] | None:
                if make.poll() is not None:
                    raise AssertionError(
                        f"make run exited with {make.returncode}:\n"
                        f"{output.read_text(errors='replace')[-3000:]}"
                    )
                if not socket_path.exists():
                    return None
                states = process_states(socket_path)
                wanted = workers + ["scheduler:scheduler"]
                running = all(states.get(name) == "RUNNING" for name in wanted)
                return states if running else None

            states = wait_until(all_running, 90, "three workers and the scheduler",
                                interval=0.2)
            assert sorted(n for n in states if n.startswith("worker:")) == workers

            host = urlsplit(database_url).hostname
            port = urlsplit(database_url).port
            for name in ("worker_00", "worker_01", "worker_02", "scheduler"):
                log_file = log_dir / f"{name}.log"
                wait_until(
                    lambda log_file=log_file: log_file.exists()
                    and "Connected to the database" in log_file.read_text(),
                    30, f"{name} to connect",
                )
                text = log_file.read_text()
                assert re.search(
                    rf"Connected to the database at {re.escape(str(host))}:{port}\b",
                    text,
                )
                assert password not in text
        finally:
            pid_file = project_copy / "var" / "supervisord.pid"
            with contextlib.suppress(FileNotFoundError, ValueError,
                                     ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            try:
                make.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(make.pid, signal.SIGKILL)
                make.wait()
            _kill_tagged_processes(stack_id)
