"""The processes page and process actions, against a real supervisord.

The supervisord here runs throw-away `sleep` programs named like the stack's
(web, worker:worker_00, worker:worker_01, scheduler, setup, postgres) plus a few
that misbehave on purpose, from a config in a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg.rows import dict_row

from tests.support.panel import build_panel, csrf_token, logged_in_client
from webpanel import db, processes
from workers.settings import PROJECT_DIR
from workers.supervision import ProcessInfo, SupervisorClient, SupervisorUnavailable

START_TIMEOUT = 20.0  # seconds for supervisord and its programs to come up
BUDGET = 4.0  # seconds, WEB_REQUEST_BUDGET of the panel under test
AUTOSTARTED = ("web", "worker:worker_00", "worker:worker_01", "scheduler",
               "postgres", "slowstop")

CONFIG = """
[unix_http_server]
file={socket}
chmod=0700

[rpcinterface:supervisor]
supervisor.rpcinterface_factory=supervisor.rpcinterface:make_main_rpcinterface

[supervisord]
logfile={folder}/supervisord.log
pidfile={folder}/supervisord.pid
childlogdir={folder}

[program:web]
command=sleep 1000
startsecs=0
autorestart=true

[program:worker]
command=sleep 1000
process_name=worker_%(process_num)02d
numprocs=2
startsecs=0
autorestart=true

[program:scheduler]
command=sleep 1000
startsecs=0
autorestart=true

[program:postgres]
command=sleep 1000
startsecs=0
autorestart=true

[program:setup]
command=true
startsecs=0
autorestart=unexpected
exitcodes=0

[program:slowstop]
command=bash -c 'trap "sleep 3; exit 0" TERM; while true; do sleep 0.1; done'
startsecs=0
stopwaitsecs=20

[program:slowstart]
command=sleep 1000
autostart=false
startsecs=30

[program:broken]
command=false
autostart=false
startsecs=1
startretries=0
"""


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds, failing the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def states(client: SupervisorClient) -> dict[str, ProcessInfo]:
    """Return supervisord's processes by name."""
    return {info.name: info for info in client.processes()}


class Supervisord:
    """A supervisord started from a throw-away config."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "s.sock"
        config = folder / "supervisord.conf"
        config.write_text(textwrap.dedent(CONFIG).format(
            socket=self.socket, folder=folder))
        with open(folder / "supervisord.out", "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "supervisor.supervisord", "-n", "-c",
                 str(config)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.client = SupervisorClient(self.socket, timeout=2.0)

    def ready(self) -> bool:
        """Tell whether every autostarted program is RUNNING and setup exited."""
        try:
            infos = states(self.client)
        except SupervisorUnavailable:
            return False
        running = all(infos.get(name) and infos[name].state == "RUNNING"
                      for name in AUTOSTARTED)
        return running and infos["setup"].state == "EXITED"

    def reset(self) -> None:
        """Start the autostarted programs again and stop the others."""
        for name, info in states(self.client).items():
            if name in AUTOSTARTED and info.state not in {"RUNNING", "STARTING"}:
                self.client.act("start", name, wait=10)
            elif name in {"slowstart", "broken"} and info.state not in {
                    "STOPPED", "FATAL", "EXITED"}:
                self.client.act("stop", name, wait=10)
        wait_until(self.ready, START_TIMEOUT, "the test programs to run again")

    def stop(self) -> None:
        """Shut supervisord down and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def supervisord() -> Iterator[Supervisord]:
    """Yield a running supervisord with the test programs, shared by the module."""
    folder = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
    server = Supervisord(folder)
    try:
        wait_until(server.ready, START_TIMEOUT, "supervisord and its programs")
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sv(supervisord: Supervisord) -> Iterator[Supervisord]:
    """Yield the shared supervisord with every program in its initial state."""
    supervisord.reset()
    yield supervisord
    assert processes.wait_for_background(30), "a background restart is still running"


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """Yield an autocommit connection to the test database."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def make_panel(database_url: str) -> Iterator[Callable[..., Flask]]:
    """Yield a builder of panels on the test database with extra settings."""

    def build(socket_path: Path | str, **env: str) -> Flask:
        db.close_process_pool()
        return build_panel(database_url, env={
            "SUPERVISOR_SOCKET": str(socket_path),
            "WEB_REQUEST_BUDGET": str(BUDGET), **env})

    yield build
    db.close_process_pool()


@pytest.fixture
def admin(make_panel: Callable[..., Flask], sv: Supervisord) -> FlaskClient:
    """Return an admin client of a panel that controls the test supervisord."""
    return logged_in_client(make_panel(sv.socket), "admin")


def post_action(client: FlaskClient, action: str, target: str,
                confirmed: bool = True) -> Any:
    """Post a process action with a CSRF token; ``confirmed`` adds the confirmation."""
    token = csrf_token(client.get("/processes").get_data(as_text=True))
    data = {"csrf_token": token, "action": action, "target": target}
    if confirmed:
        data["confirmed"] = "yes"
    return client.post("/processes/action", data=data)


def audit_results(sql: psycopg.Connection[dict[str, Any]], action: str) -> list[str]:
    """Return the results of the audit entries of one action, oldest first."""
    rows = sql.execute("SELECT result FROM audit_log WHERE action = %s ORDER BY id",
                       (action,)).fetchall()
    return [row["result"] for row in rows]


def test_processes_page_names_processes_like_supervisorctl(
    admin: FlaskClient,
) -> None:
    body = admin.get("/processes").get_data(as_text=True)

    for name in ("web", "worker:worker_00", "worker:worker_01", "scheduler",
                 "setup", "postgres"):
        assert f'data-process="{name}"' in body
    assert 'data-process="worker:*"' in body
    assert 'data-state="RUNNING"' in body
    assert 'data-state="EXITED"' in body
    assert "Restart all" in body


def test_processes_page_hides_actions_from_operator(
    make_panel: Callable[..., Flask], sv: Supervisord,
) -> None:
    client = logged_in_client(make_panel(sv.socket), "operator")

    body = client.get("/processes").get_data(as_text=True)

    assert 'data-process="worker:worker_00"' in body
    assert "/processes/action" not in body
    assert "need the admin role" in body


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_process_action_rejects_non_admin(
    make_panel: Callable[..., Flask], sv: Supervisord, role: str,
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    client = logged_in_client(make_panel(sv.socket), role)
    before = sv.client.process("worker:worker_00").pid

    response = post_action(client, "restart", "worker:worker_00")

    assert response.status_code == 403
    assert sv.client.process("worker:worker_00").pid == before
    assert audit_results(sql, "process_restarted") == []


def test_process_action_asks_for_confirmation_first(
    admin: FlaskClient, sv: Supervisord
) -> None:
    before = sv.client.process("worker:worker_00").pid

    response = post_action(admin, "restart", "worker:worker_00", confirmed=False)

    assert response.status_code == 200
    body = response.get_data(as_text=True)
    assert 'name="confirmed" value="yes"' in body
    assert "Restart <code>worker:worker_00</code>?" in body
    assert sv.client.process("worker:worker_00").pid == before


def test_restart_changes_pid_and_audits(
    admin: FlaskClient, sv: Supervisord, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    before = sv.client.process("worker:worker_00").pid

    response = post_action(admin, "restart", "worker:worker_00")

    assert response.status_code == 303
    after = sv.client.process("worker:worker_00")
    assert after.state == "RUNNING"
    assert after.pid != before
    results = audit_results(sql, "process_restarted")
    assert len(results) == 1
    assert results[0].startswith("ok: worker:worker_00 RUNNING")
    assert f"(was {before})" in results[0]
    page = admin.get("/processes").get_data(as_text=True)
    assert "Restart of worker:worker_00 done" in page


def test_restart_group_restarts_every_member(
    admin: FlaskClient, sv: Supervisord
) -> None:
    before = states(sv.client)

    response = post_action(admin, "restart", "worker:*")

    assert response.status_code == 303
    after = states(sv.client)
    for name in ("worker:worker_00", "worker:worker_01"):
        assert after[name].state == "RUNNING"
        assert after[name].pid != before[name].pid
    assert after["scheduler"].pid == before["scheduler"].pid


def test_stop_then_start(
    admin: FlaskClient, sv: Supervisord, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    response = post_action(admin, "stop", "worker:worker_01")

    assert response.status_code == 303
    assert sv.client.process("worker:worker_01").state == "STOPPED"
    page = admin.get("/processes").get_data(as_text=True)
    row = page[page.index('data-process="worker:worker_01"'):]
    assert 'data-state="STOPPED"' in row[:400]

    response = post_action(admin, "start", "worker:worker_01")

    assert response.status_code == 303
    assert sv.client.process("worker:worker_01").state == "RUNNING"
    assert audit_results(sql, "process_stopped")[0].startswith("ok")
    assert audit_results(sql, "process_started")[0].startswith("ok")


def test_unknown_process_is_404(
    admin: FlaskClient, sv: Supervisord, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    for confirmed in (False, True):
        response = post_action(admin, "restart", "worker:worker_09",
                               confirmed=confirmed)
        body = response.get_data(as_text=True)
        assert response.status_code == 404
        assert "no such process: worker:worker_09" in body
        assert "done" not in body
    assert audit_results(sql, "process_restarted") == [
        "failed: no such process: worker:worker_09"]


def test_start_that_fails_is_reported(
    admin: FlaskClient, sv: Supervisord, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    response = post_action(admin, "start", "broken")

    assert response.status_code == 409
    body = response.get_data(as_text=True)
    assert "did not reach RUNNING" in body
    assert "broken is" in body
    assert audit_results(sql, "process_started")[0].startswith("failed")


def test_slow_start_reports_still_starting_within_budget(
    admin: FlaskClient, sv: Supervisord, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    started = time.monotonic()
    response = post_action(admin, "start", "slowstart")
    elapsed = time.monotonic() - started

    assert response.status_code == 303
    assert elapsed < BUDGET
    page = admin.get("/processes").get_data(as_text=True)
    assert "still starting" in page
    assert "reload" in page
    assert "done" not in page
    assert audit_results(sql, "process_started")[0].startswith("pending")


def test_slow_stop_restart_finishes_in_background(
    admin: FlaskClient, sv: Supervisord, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    before = sv.client.process("slowstop").pid

    started = time.monotonic()
    response = post_action(admin, "restart", "slowstop")
    elapsed = time.monotonic() - started

    assert response.status_code == 303
    assert elapsed < BUDGET
    page = admin.get("/processes").get_data(as_text=True)
    assert "Not finished yet" in page
    assert "once they have stopped" in page
    assert processes.wait_for_background(30)
    after = sv.client.process("slowstop")
    assert after.state == "RUNNING"
    assert after.pid != before
    results = audit_results(sql, "process_restarted")
    assert results[0].startswith("pending")
    assert results[1].startswith("ok: slowstop RUNNING")


def test_own_process_stop_is_rejected(
    admin: FlaskClient, sv: Supervisord, monkeypatch: pytest.MonkeyPatch,
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    monkeypatch.setenv("SUPERVISOR_PROCESS_NAME", "web")
    monkeypatch.setenv("SUPERVISOR_GROUP_NAME", "web")

    response = post_action(admin, "stop", "web")

    assert response.status_code == 409
    assert "serves this panel" in response.get_data(as_text=True)
    assert sv.client.process("web").state == "RUNNING"
    assert audit_results(sql, "process_stopped")[0].startswith("rejected")


def test_own_process_restart_uses_autorestart(
    admin: FlaskClient, sv: Supervisord, monkeypatch: pytest.MonkeyPatch,
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    monkeypatch.setenv("SUPERVISOR_PROCESS_NAME", "web")
    monkeypatch.setenv("SUPERVISOR_GROUP_NAME", "web")
    before = sv.client.process("web").pid

    response = post_action(admin, "restart", "web")

    assert response.status_code == 303
    page = admin.get("/processes").get_data(as_text=True)
    assert "web is restarting" in page
    assert "not confirmed yet" in page
    wait_until(lambda: sv.client.process("web").state == "RUNNING"
               and sv.client.process("web").pid != before, 10,
               "supervisord to start web again")
    assert audit_results(sql, "process_restarted")[0].startswith("requested")


def test_group_restart_with_own_process_is_rejected(
    admin: FlaskClient, sv: Supervisord, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SUPERVISOR_PROCESS_NAME", "worker_00")
    monkeypatch.setenv("SUPERVISOR_GROUP_NAME", "worker")
    before = sv.client.process("worker:worker_01").pid

    response = post_action(admin, "restart", "worker:*")

    assert response.status_code == 409
    assert "restart worker:worker_00 on its own" in response.get_data(as_text=True)
    assert sv.client.process("worker:worker_01").pid == before


def test_local_database_stop_is_rejected(
    make_panel: Callable[..., Flask], sv: Supervisord
) -> None:
    client = logged_in_client(make_panel(sv.socket, LOCAL_DATABASE="true"), "admin")

    response = post_action(client, "stop", "postgres")

    assert response.status_code == 409
    assert "runs the database of this panel" in response.get_data(as_text=True)
    assert sv.client.process("postgres").state == "RUNNING"


@pytest.mark.parametrize(("action", "target"), [
    ("restart", "worker worker_00"),
    ("restart", "../etc"),
    ("restart", ""),
    ("reload", "web"),
])
def test_process_action_rejects_bad_input(
    admin: FlaskClient, action: str, target: str
) -> None:
    assert post_action(admin, action, target).status_code == 400


def test_process_action_without_csrf_changes_nothing(
    admin: FlaskClient, sv: Supervisord
) -> None:
    before = sv.client.process("worker:worker_00").pid

    response = admin.post("/processes/action", data={
        "action": "restart", "target": "worker:worker_00", "confirmed": "yes"})

    assert response.status_code in {303, 400}
    assert sv.client.process("worker:worker_00").pid == before


@pytest.fixture
def refused_socket() -> Iterator[Path]:
    """Yield a unix socket file with no listener: connect gets ECONNREFUSED."""
    folder = Path(tempfile.mkdtemp(prefix="sock-", dir="/tmp"))
    path = folder / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    yield path
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def silent_socket() -> Iterator[Path]:
    """Yield a unix socket that accepts connections but never responds."""
    folder = Path(tempfile.mkdtemp(prefix="sock-", dir="/tmp"))
    path = folder / "silent.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    yield path
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_missing_socket_is_a_clear_message(
    make_panel: Callable[..., Flask], tmp_path: Path
) -> None:
    client = logged_in_client(make_panel(tmp_path / "nothing.sock"), "admin")

    page = client.get("/processes")
    action = post_action(client, "restart", "worker:worker_00")

    assert page.status_code == 200
    assert "no socket there" in page.get_data(as_text=True)
    assert action.status_code == 503
    assert "cannot reach supervisord at" in action.get_data(as_text=True)


def test_refused_socket_is_a_clear_message(
    make_panel: Callable[..., Flask], refused_socket: Path
) -> None:
    client = logged_in_client(make_panel(refused_socket), "admin")

    page = client.get("/processes")
    action = post_action(client, "stop", "worker:*")

    assert page.status_code == 200
    assert "connection refused" in page.get_data(as_text=True)
    assert action.status_code == 503
    assert "connection refused" in action.get_data(as_text=True)


def test_mode_0000_socket_is_a_clear_message(
    make_panel: Callable[..., Flask], refused_socket: Path
) -> None:
    refused_socket.chmod(0)
    client = logged_in_client(make_panel(refused_socket), "admin")

    body = client.get("/processes").get_data(as_text=True)

    # As root the mode does not stop the connect, which is then refused.
    expected = "connection refused" if os.geteuid() == 0 else "permission denied"
    assert f"cannot reach supervisord at {refused_socket}: {expected}" in body


def test_silent_socket_times_out_within_budget(
    make_panel: Callable[..., Flask], silent_socket: Path
) -> None:
    client = logged_in_client(make_panel(silent_socket), "admin")

    started = time.monotonic()
    page = client.get("/processes")
    elapsed = time.monotonic() - started

    assert page.status_code == 200
    assert "no response within 0.6 s" in page.get_data(as_text=True)
    assert elapsed < BUDGET


def test_permission_denied_names_the_fix(supervisord: Supervisord) -> None:
    """Run the client as an unprivileged account against the 0700 root socket."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another account")
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from workers.supervision import SupervisorClient, SupervisorUnavailable
        try:
            SupervisorClient(Path({str(supervisord.socket)!r}), 2).processes()
        except SupervisorUnavailable as exc:
            print(exc)
        else:
            print("reachable")
    """)
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", script],
        cwd=PROJECT_DIR, env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)},
        capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"the interpreter does not run as nobody: {result.stderr[-300:]}")
    assert result.stdout.strip() == (
        f"cannot reach supervisord at {supervisord.socket}: permission denied; run "
        "the panel as the user that owns the socket")
