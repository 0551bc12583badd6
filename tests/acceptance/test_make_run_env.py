"""``make run`` from a minimal environment, with its settings only in ``.env``.

Under an init system or cron, supervisord starts with little more than PATH and
HOME. Each test copies the project into a short temporary folder (sharing .venv),
writes its settings into that copy's .env only, and runs ``make run`` there under
``env -i``: once against the test database, once as a newcomer would, with the
project-local PostgreSQL and the demo upstream.
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

import httpx
import pytest
from supervisor.xmlrpc import SupervisorTransport

from tests.support.faults import wait_until
from tests.support.forms import form_fields
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


def start_make_run(project_copy: Path, stack_id: str) -> subprocess.Popen[bytes]:
    """Start ``make run`` in the copy under ``env -i``, its output in make-run.out."""
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        STACK_ID_VARIABLE: stack_id,
    }
    with open(project_copy / "make-run.out", "wb") as sink:
        return subprocess.Popen(
            ["env", "-i", *(f"{k}={v}" for k, v in environment.items()),
             "make", "run"],
            cwd=project_copy, stdin=subprocess.DEVNULL, stdout=sink,
            stderr=subprocess.STDOUT, start_new_session=True,
        )


def stop_make_run(project_copy: Path, make: subprocess.Popen[bytes],
                  stack_id: str, signum: int = signal.SIGTERM) -> int | None:
    """Send ``signum`` to supervisord and return make's exit status, if it ended."""
    pid_file = project_copy / "var" / "supervisord.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pid_file.read_text().strip()), signum)
    code: int | None
    try:
        code = make.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(make.pid, signal.SIGKILL)
        make.wait()
        code = None
    _kill_tagged_processes(stack_id)
    return code


def wait_all_running(
    project_copy: Path, make: subprocess.Popen[bytes], names: list[str]
) -> dict[str, str]:
    """Wait until every process in ``names`` is RUNNING; fail early if make ends."""
    socket_path = project_copy / "var" / "supervisor.sock"
    output = project_copy / "make-run.out"

    def all_running() -> dict[str, str] | None:
        if make.poll() is not None:
            raise AssertionError(
                f"make run exited with {make.returncode}:\n"
                f"{output.read_text(errors='replace')[-3000:]}"
            )
        if not socket_path.exists():
            return None
        states = process_states(socket_path)
        running = all(states.get(name) == "RUNNING" for name in names)
        return states if running else None

    return wait_until(all_running, 120, ", ".join(names), interval=0.2)


def test_make_run_local_database_and_demo(project_copy: Path) -> None:
    # The postgres account must reach the project folder.
    project_copy.chmod(0o755)
    password = secrets.token_urlsafe(18)
    web_port, database_port, demo_port = free_port(), free_port(), free_port()
    (project_copy / ".env").write_text(
        f"LOCAL_DATABASE_PORT={database_port}\n"
        f"WEB_BIND=127.0.0.1:{web_port}\n"
        f"API_BASE_URL=http://127.0.0.1:{demo_port}\n"
        "DEMO_API=true\n"
        f"ADMIN_PASSWORD={password}\n"
    )
    stack_id = secrets.token_hex(8)
    make = start_make_run(project_copy, stack_id)
    code: int | None = None
    try:
        programs = ["postgres:postgres", "demo_api:demo_api", "web:web",
                  "worker:worker_00", "worker:worker_01", "scheduler:scheduler"]
        wait_all_running(project_copy, make, programs)
        socket_path = project_copy / "var" / "supervisor.sock"
        # The admin account exists once setup has exited.
        wait_until(lambda: process_states(socket_path)["setup:setup"] == "EXITED",
                   60, "setup to finish", interval=0.2)

        with httpx.Client(base_url=f"http://127.0.0.1:{web_port}",
                          timeout=10.0) as client:
            fields = form_fields(client.get("/login").text)
            fields.update(username="admin", password=password)
            assert client.post("/login", data=fields).status_code == 302
            fields = form_fields(client.get("/defer/fetch_joke").text)
            response = client.post("/defer/fetch_joke", data=fields)
            assert response.status_code in (302, 303), response.text[:1000]
            job_page = response.headers["Location"]

            def finished() -> str | None:
                page = client.get(job_page).text
                return page if 'data-job-status="succeeded"' in page else None

            page = wait_until(finished, 60, "the demo joke job to succeed",
                              interval=0.2)
        assert "No result stored" not in page
    finally:
        # What Ctrl-C in the terminal of make run does.
        code = stop_make_run(project_copy, make, stack_id, signal.SIGINT)

    assert code == 0
    log = (project_copy / "var" / "log" / "supervisord.log").read_text()
    stopped = re.findall(r"stopped: (\S+) ", log)
    assert stopped[-1] == "postgres", stopped
    assert set(stopped) >= {"web", "worker_00", "worker_01", "scheduler", "demo_api"}
    assert "SIGKILL" not in log


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
        make = start_make_run(project_copy, stack_id)
        log_dir = project_copy / "var" / "log"
        try:
            workers = [f"worker:worker_{n:02d}" for n in range(3)]
            states = wait_all_running(project_copy, make,
                                      workers + ["scheduler:scheduler"])
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
            stop_make_run(project_copy, make, stack_id)
