"""Child processes of the benchmark: bench workers, the scheduler and gunicorn.

Every child starts through ``setpriv --pdeathsig TERM`` in its own session, so a
benchmark that dies takes its children with it, and writes its output to a log file
in the run's folder. ``stop()`` sends SIGTERM and waits; SIGKILL follows a child
that outlives the timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from workers.settings import PROJECT_DIR, SETTINGS

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 30.0  # seconds a child may take to stop after SIGTERM
POLL_INTERVAL = 0.05  # seconds between two looks at a condition


class Child:
    """One child process and its log file."""

    def __init__(self, name: str, process: subprocess.Popen[bytes],
                 log_path: Path) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """Return the child's process id."""
        return self.process.pid

    def running(self) -> bool:
        """Tell whether the child has not exited."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of the child's log, for error messages."""
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the child alone (not its group)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop the child with SIGTERM, then SIGKILL its group; return its status."""
        if self.running():
            self.kill(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %s) ignored SIGTERM for %g s; killing it",
                               self.name, self.pid, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()


def bench_environment(database_url: str, run_dir: Path,
                      **settings: str) -> dict[str, str]:
    """Return a child's environment: no inherited settings, then ``settings``."""
    names = {setting.name for setting in SETTINGS}
    environment = {
        name: value for name, value in os.environ.items()
        if name not in names and not name.startswith(("SUPERVISOR_", "BENCH_"))
    }
    environment.update({
        "DATABASE_URL": database_url,
        "SECRET_KEY": secrets.token_urlsafe(48),
        "VAR_DIR": str(run_dir),
        "SUPERVISOR_SOCKET": str(run_dir / "no-supervisor.sock"),
        "PYTHONUNBUFFERED": "1",
    })
    environment.update(settings)
    return environment


def start_child(name: str, command: list[str], environment: Mapping[str, str],
                run_dir: Path) -> Child:
    """Start ``command`` from the project folder with its output in a log file."""
    log_path = run_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", "--", *command],
            cwd=PROJECT_DIR, env=dict(environment), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return Child(name, process, log_path)


def bench_worker_command(kind: str, role: str = "worker",
                         concurrency: int | None = None) -> list[str]:
    """Return the command of one bench worker process."""
    command = [sys.executable, "-m", "bench.worker", kind, "--role", role]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    return command


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               children: Sequence[Child] = (),
               interval: float = POLL_INTERVAL) -> None:
    """Poll ``condition`` until it is true; raise TimeoutError naming ``what``.

    A child in ``children`` that exits while waiting raises RuntimeError with its
    log, since the condition can then no longer come true.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for child in children:
            if not child.running():
                raise RuntimeError(
                    f"{child.name} exited with status {child.process.returncode} "
                    f"while waiting for {what}:\n{child.log_tail()}"
                )
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout:g} s")


def rss_kib(pid: int) -> int:
    """Return the resident set size of process ``pid`` in KiB, from VmRSS."""
    status = Path(f"/proc/{pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line; is {pid} a zombie?")


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system) of process ``pid`` and its reaped children.

    Reaped children count because PostgreSQL's postmaster collects the CPU time of
    every backend that ended, so a connection that closed is not lost.
    """
    text = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which may contain spaces, start at "state";
    # utime, stime, cutime and cstime are fields 14 to 17 of proc(5).
    fields = text.rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """Return the CPU time of ``pid``, its reaped children and its live children."""
    total = cpu_seconds(pid)
    for child in child_pids(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(child)
    return total


def child_pids(pid: int) -> list[int]:
    """Return the ids of the direct children of process ``pid``."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(item) for item in path.read_text().split()]
    except FileNotFoundError:
        return []
