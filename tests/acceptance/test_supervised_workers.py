"""Worker processes under the real supervisord: restarts, signals, logs and schema.

Each test starts the project's conf/supervisord.conf unchanged, with short
timeouts in place of the production ones (a 3 s graceful shutdown instead of
30 s, holds of seconds instead of minutes), which keeps what each step proves.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.faults import (
    defer_job,
    events,
    fleet_settings,
    job,
    query,
    wait_for_status,
    wait_until,
)
from tests.support.forms import form_fields
from tests.support.stack import Stack
from tests.support.upstream import Upstream
from workers.launch import load_supervisor_config
from workers.startup import EXIT_CONFIG
from workers.supervision import ProcessActionFailed, SupervisorClient

SHUTDOWN = 3  # seconds, WORKER_SHUTDOWN_TIMEOUT in these tests
FAST = {
    "HEARTBEAT_INTERVAL": "1",
    "STALLED_JOB_THRESHOLD": "5",
    "STALLED_JOB_CHECK_INTERVAL": "2",
    "WORKER_SHUTDOWN_TIMEOUT": str(SHUTDOWN),
    "SCHEDULER_SHUTDOWN_TIMEOUT": "2",
    "JOB_TIMEOUT": "90",
    "HTTP_TIMEOUT": "60",
}
WORKERS_ONLY = ("worker", "scheduler")


def parse_time(text: str) -> datetime.datetime:
    """Parse a supervisord log timestamp such as '2026-01-01 12:00:00,123'."""
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


def start(stack_factory: Callable[..., Stack], database_url: str,
          upstream: Upstream, **overrides: str) -> Stack:
    """Start a stack running the workers and the scheduler (the panel may fail)."""
    settings = {"DATABASE_URL": database_url, "API_BASE_URL": upstream.url,
                **FAST, **overrides}
    return stack_factory(settings, wait_for=WORKERS_ONLY)


def worker_pids(stack: Stack) -> dict[str, int]:
    return {
        f"worker:{info['name']}": info["pid"]
        for info in stack.all_process_info() if info["group"] == "worker"
    }


def alive(pid: int) -> bool:
    """Return whether ``pid`` is a running process (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def supervisord_log(stack: Stack) -> str:
    return stack.log("supervisord")


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def stop_seconds(log: str) -> float:
    """Return the seconds from a worker's SIGTERM to its "stopped" line, in its log.

    The times come from the worker's own log lines, so the restart's start-up
    (supervisord's startsecs) and the load of the machine running supervisorctl
    do not count.
    """
    received = stopped = None
    for line in log.splitlines():
        match = LOG_TIME.match(line)
        if match is None:
            continue
        moment = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if received is None and "Received SIGTERM: warm shutdown" in line:
            received = moment
        elif received is not None and re.search(r"Worker \S+ stopped$",
                                                line.rstrip().split(" [")[0]):
            stopped = moment
            break
    assert received is not None and stopped is not None, log[-3000:]
    return (stopped - received).total_seconds()


@pytest.mark.parametrize("hold", [1.5, 8.0], ids=["finishes", "requeued"])
def test_group_restart_keeps_job(
    database_url: str, upstream: Upstream, stack_factory: Callable[..., Stack],
    hold: float,
) -> None:
    upstream.hold("/slow", seconds=hold, times=1)
    stack = start(stack_factory, database_url, upstream)
    settings = fleet_settings(database_url, upstream.url)
    job_id = defer_job(settings, "call_api", method="GET", path="/slow")
    upstream.wait_for_count("/slow", 1, timeout=20)
    before = worker_pids(stack)

    result = stack.supervisorctl("restart", "worker:*")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_status(database_url, job_id, "succeeded", timeout=30)
    holder = max(stop_seconds(stack.log(name)) for name in before)

    after = worker_pids(stack)
    assert set(after) == set(before)
    assert all(after[name] != before[name] for name in before)
    assert not [pid for pid in before.values() if alive(pid)]
    assert "SIGKILL" not in supervisord_log(stack)
    kinds = [event["type"] for event in events(database_url, job_id)]
    assert "aborted" not in kinds
    assert kinds.count("succeeded") == 1
    if hold < SHUTDOWN:
        assert upstream.count("/slow") == 1
        # The worker that held the job stopped once the job ended, before its
        # shutdown timeout.
        assert holder < SHUTDOWN
    else:
        # Aborted at the end of the graceful shutdown and run again.
        assert upstream.count("/slow") == 2
        assert SHUTDOWN - 0.5 <= holder <= SHUTDOWN + 10
        # One attempt interrupted by the shutdown, one that succeeded.
        assert job(database_url, job_id)["attempts"] == 2


def test_log_rotation_keeps_programs(
    database_url: str, upstream: Upstream, stack_factory: Callable[..., Stack],
) -> None:
    upstream.hold("/slow", seconds=6, times=1)
    stack = start(stack_factory, database_url, upstream, WORKER_PROCESSES="1")
    settings = fleet_settings(database_url, upstream.url)
    name = "worker:worker_00"
    started = stack.process_info(name)["start"]
    job_id = defer_job(settings, "call_api", method="GET", path="/slow")
    upstream.wait_for_count("/slow", 1, timeout=20)

    log_path = stack.var_dir / "log" / "worker_00.log"
    rotated = log_path.with_name("worker_00.log.1")
    log_path.rename(rotated)
    os.kill(stack.process.pid, signal.SIGUSR2)
    wait_until(log_path.exists, 1.0, "supervisord to reopen the worker log")
    joke = defer_job(settings, "fetch_joke")
    wait_for_status(database_url, joke, "succeeded", timeout=10)
    wait_until(lambda: f"Job {joke} " in log_path.read_text(), 2,
               "the new job's lines in the new log file")
    assert f"Job {joke} " not in rotated.read_text()

    wait_for_status(database_url, job_id, "succeeded", timeout=20)
    assert stack.process_info(name)["start"] == started
    assert upstream.count("/slow") == 1
    (attempt,) = query(database_url, "SELECT * FROM job_attempts WHERE job_id = %s",
                       (job_id,))
    assert attempt["outcome"] == "succeeded"


def test_sighup_reload_loses_no_job(
    database_url: str, upstream: Upstream, stack_factory: Callable[..., Stack],
) -> None:
    upstream.hold("/slow", seconds=30, times=1)
    stack = start(stack_factory, database_url, upstream, WORKER_PROCESSES="1")
    settings = fleet_settings(database_url, upstream.url)
    job_id = defer_job(settings, "call_api", method="GET", path="/slow")
    upstream.wait_for_count("/slow", 1, timeout=20)
    before = stack.process_info("worker:worker_00")["pid"]

    os.kill(stack.process.pid, signal.SIGHUP)

    def restarted() -> bool:
        try:
            info = stack.process_info("worker:worker_00")
        except (OSError, xmlrpc.client.Fault):
            return False  # supervisord is reloading
        return info["pid"] not in (0, before) and info["statename"] == "RUNNING"

    wait_until(restarted, SHUTDOWN + 30, "the worker to be restarted by the reload",
               interval=0.2)
    wait_for_status(database_url, job_id, "succeeded", timeout=30)
    kinds = [event["type"] for event in events(database_url, job_id)]
    assert "aborted" not in kinds
    assert kinds.count("succeeded") == 1


def latest_health(database_url: str, after: float) -> dict[str, Any] | None:
    rows = query(
        database_url,
        "SELECT details FROM health_checks WHERE checked_at > to_timestamp(%s) "
        "ORDER BY id DESC LIMIT 1",
        (after,),
    )
    return rows[0]["details"] if rows else None


def test_process_states_and_restarts(
    database_url: str, upstream: Upstream, stack_factory: Callable[..., Stack],
) -> None:
    stack = start(stack_factory, database_url, upstream,
                  HEALTH_CHECK_CRON="* * * * * */2")
    stopped = stack.supervisorctl("stop", "worker:worker_01")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    since = time.time()
    details = wait_until(lambda: latest_health(database_url, since), 15,
                         "a health check after the stop")
    control = details["process_control"]
    assert control["reachable"] is True
    assert control["processes"]["worker:worker_01"] == "STOPPED"
    assert control["processes"]["worker:worker_00"] == "RUNNING"
    status = stack.supervisorctl("status")
    assert status.returncode == 3  # any process not running; not an outage

    client = SupervisorClient(stack.socket_path)
    with pytest.raises(ProcessActionFailed) as raised:
        client.act("restart", "worker:worker_09")
    assert "no such process: worker:worker_09" in str(raised.value)

    info = stack.process_info("worker:worker_00")
    os.kill(info["pid"], signal.SIGTERM)
    startsecs = 3
    restarted = wait_until(
        lambda: (now := stack.process_info("worker:worker_00"))["statename"]
        == "RUNNING" and now["pid"] != info["pid"] and now,
        startsecs + 5 + 2, "worker_00 to run again with a new pid",
    )
    assert restarted["pid"] != info["pid"]
    assert "exit status 0" in supervisord_log(stack)


def test_schema_behind_code_goes_fatal(
    database_url: str, upstream: Upstream, stack_factory: Callable[..., Stack],
) -> None:
    settings = fleet_settings(database_url, upstream.url)
    job_id = defer_job(settings, "fetch_joke")
    before = events(database_url, job_id)
    query(database_url, "DROP FUNCTION procrastinate_fetch_job_v2")
    stack = stack_factory(
        {"DATABASE_URL": database_url, "API_BASE_URL": upstream.url, **FAST,
         "WORKER_PROCESSES": "1"},
        wait_for=None,
    )
    names = ["worker:worker_00", "scheduler"]
    for name in names:
        wait_until(lambda name=name: stack.process_info(name)["statename"]
                   == "FATAL", 120, f"{name} to be FATAL")
    fatal_at = time.monotonic()

    log = supervisord_log(stack)
    options = load_supervisor_config(stack.environment)
    for name in ("worker_00", "scheduler"):
        (config,) = [
            process for group in options.process_group_configs
            for process in group.process_configs if process.name == name
        ]
        spawns = re.findall(rf"(\S+ \S+) INFO spawned: '{name}'", log)
        exits = re.findall(
            rf"(\S+ \S+) WARN exited: {name} \(exit status {EXIT_CONFIG}; "
            r"not expected\)", log,
        )
        assert len(exits) == len(spawns)
        # supervisord counts a start as failed only when the process exits
        # within startsecs; a start slowed past it by a busy machine counts as
        # a run and is restarted once more.
        slow = len(re.findall(rf"success: {name} entered RUNNING", log))
        assert len(spawns) <= config.startretries + 1 + slow, (name, len(spawns), slow)
        assert slow <= 2, f"{name} took longer than startsecs {slow} times"
        lifetimes = sorted(
            (parse_time(end) - parse_time(start)).total_seconds()
            for start, end in zip(spawns, exits)
        )
        assert lifetimes[len(lifetimes) // 2] < config.startsecs
        assert "gave up: " + name + " entered FATAL state" in log
        program_log = stack.log(name)
        assert "missing function procrastinate_fetch_job_v2" in program_log
        assert "python -m workers.schema apply" in program_log

    # Not started again afterwards.
    wait_until(lambda: time.monotonic() - fatal_at > 5, 6, "a quiet period",
               interval=0.5)
    later = supervisord_log(stack)
    assert len(re.findall(r"spawned: 'worker_00'", later)) == len(
        re.findall(r"spawned: 'worker_00'", log)
    )
    row = job(database_url, job_id)
    assert row["status"] == "todo"
    assert row["attempts"] == 0
    assert events(database_url, job_id) == before


def gunicorn_pids(master: int) -> set[int]:
    """Return the gunicorn master's pid and its children's."""
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == master:
            children.add(int(entry.name))
    return {master} | children


def slow_post(stack: Stack, path: str, cookie: str, body: bytes,
              seconds: float) -> bytes:
    """POST ``body`` in small pieces spread over ``seconds``; return the response."""
    host, port = stack.environment["WEB_BIND"].rsplit(":", 1)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\nCookie: {cookie}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    pieces = 20
    size = max(1, len(body) // pieces + 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        for start in range(0, len(body), size):
            sock.sendall(body[start:start + size])
            time.sleep(seconds / pieces)  # the slow client under test
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_web_restart_finishes_slow_post(
    database_url: str, upstream: Upstream, stack_factory: Callable[..., Stack],
) -> None:
    stack = stack_factory({"DATABASE_URL": database_url, "API_BASE_URL": upstream.url,
                           **FAST, "WEB_WORKERS": "2"})
    client = httpx.Client(base_url=stack.url, timeout=10.0)
    login = form_fields(client.get("/login").text)
    login.update(username="admin", password=stack.environment["ADMIN_PASSWORD"])
    assert client.post("/login", data=login).status_code == 302
    fields = form_fields(client.get("/defer/fetch_joke").text)
    cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
    client.close()
    old = gunicorn_pids(stack.process_info("web")["pid"])
    assert len(old) == 3

    restart: list[subprocess.CompletedProcess[str]] = []
    restarter = threading.Timer(
        2.0, lambda: restart.append(stack.supervisorctl("restart", "web"))
    )
    restarter.start()
    try:
        response = slow_post(stack, "/defer/fetch_joke", cookie,
                             urllib.parse.urlencode(fields).encode(), seconds=6.0)
    finally:
        restarter.join(60)
    status_line = response.split(b"\r\n", 1)[0]
    assert status_line.split()[1] in (b"302", b"303"), response[:500]
    location = re.search(rb"Location: \S*/jobs/(\d+)", response)
    assert location, response[:500]
    job(database_url, int(location.group(1)))

    assert restart and restart[0].returncode == 0, restart
    stack.wait_running(["web"])
    assert "Address already in use" not in stack.log("web")
    assert "SIGKILL" not in supervisord_log(stack)
    assert not [pid for pid in old if alive(pid)]
