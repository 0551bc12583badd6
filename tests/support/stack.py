"""The real supervisord with the project's conf/supervisord.conf, for acceptance tests.

``Stack.start`` runs supervisord from the project folder with VAR_DIR (socket,
logs) in a temporary folder, WEB_BIND on a free loopback port and the caller's
DATABASE_URL and API_BASE_URL, so the postgres program is not included. It talks
to supervisord over XML-RPC on the unix socket, as supervisorctl does.

Every process the stack starts carries STACK_ID_VARIABLE in its environment.
``stop()`` shuts supervisord down and then kills any process still carrying the
stack's id, so a failed test leaves nothing running. Stacks that are still
running when the interpreter exits are stopped by an atexit handler.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from tests.support.postgres import free_port
from workers.launch import (
    SUPERVISOR_CONFIG,
    check_supervisor_config,
    supervisor_environment,
)
from workers.settings import PROJECT_DIR, SETTINGS, load_settings

logger = logging.getLogger(__name__)

STACK_ID_VARIABLE = "TEST_STACK_ID"
POLL_INTERVAL = 0.05  # seconds between two looks at supervisord's state
START_TIMEOUT = 60.0  # seconds for supervisord and its programs to come up
SHUTDOWN_MARGIN = 15.0  # seconds beyond the longest stopwaitsecs
LONG_RUNNING = ("web", "worker", "scheduler")

# Variables of the caller's environment that must not leak into a stack: every
# setting, and the ones supervisord sets for its own children.
_DROPPED_PREFIXES = ("SUPERVISOR_",)
_DROPPED_NAMES = frozenset(
    {setting.name for setting in SETTINGS}
    | {"LOCAL_DATABASE_PORT", "EXTRA_PROGRAMS_CONF", "PROJECT_DIR"}
)

_running: set[Stack] = set()


class StackError(RuntimeError):
    """supervisord or one of its programs did not reach the expected state."""


class Stack:
    """One running supervisord with the project's programs."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        environment: dict[str, str],
        var_dir: Path,
        owns_var_dir: bool,
    ) -> None:
        self.process = process
        self.environment = environment
        self.var_dir = var_dir
        self.socket_path = Path(environment["SUPERVISOR_SOCKET"])
        self.stack_id = environment[STACK_ID_VARIABLE]
        self._owns_var_dir = owns_var_dir
        self._stopped = False

    @classmethod
    def start(
        cls,
        env_overrides: Mapping[str, str],
        *,
        var_dir: Path | None = None,
        wait_for: Collection[str] | None = LONG_RUNNING,
        timeout: float = START_TIMEOUT,
    ) -> Stack:
        """Start supervisord and wait until the ``wait_for`` programs are RUNNING.

        ``wait_for`` names programs or groups ("worker" means every worker
        process); None returns as soon as supervisord answers. The setup program
        must also have exited with status 0 when ``wait_for`` is not None.
        """
        owns_var_dir = var_dir is None
        if var_dir is None:
            # A short folder, because a unix socket path is limited to 107 bytes.
            var_dir = Path(tempfile.mkdtemp(prefix="stack-", dir="/tmp"))
        (var_dir / "log").mkdir(parents=True, exist_ok=True)
        try:
            environment = _stack_environment(env_overrides, var_dir)
        except BaseException:
            if owns_var_dir:
                shutil.rmtree(var_dir, ignore_errors=True)
            raise

        command = [
            "setpriv",
            "--pdeathsig",
            "TERM",
            "--",
            sys.executable,
            "-m",
            "supervisor.supervisord",
            "-n",
            "-c",
            str(SUPERVISOR_CONFIG),
        ]
        with open(var_dir / "log" / "supervisord.out", "ab") as output:
            process = subprocess.Popen(
                command,
                cwd=PROJECT_DIR,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack = cls(process, environment, var_dir, owns_var_dir)
        _running.add(stack)
        try:
            stack.wait_for_supervisord(timeout)
            if wait_for is not None:
                stack.wait_state("setup", {"EXITED"}, timeout=timeout)
                stack.wait_running(wait_for, timeout=timeout)
        except BaseException:
            stack.stop(remove_var_dir=False)
            logger.error("stack start failed; logs:\n%s", stack.log_tails())
            stack.remove_var_dir()
            raise
        return stack

    @property
    def url(self) -> str:
        """Return the panel's base URL, without a trailing slash."""
        return f"http://{self.environment['WEB_BIND']}"

    @contextlib.contextmanager
    def rpc(self) -> Iterator[Any]:
        """Yield an XML-RPC proxy to supervisord; its connection closes after."""
        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        try:
            yield xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        finally:
            transport.close()

    def process_info(self, name: str) -> dict[str, Any]:
        """Return supervisord's getProcessInfo for a name like "worker:worker_00"."""
        with self.rpc() as proxy:
            info: dict[str, Any] = proxy.supervisor.getProcessInfo(name)
        return info

    def all_process_info(self) -> list[dict[str, Any]]:
        """Return supervisord's getAllProcessInfo."""
        with self.rpc() as proxy:
            infos: list[dict[str, Any]] = proxy.supervisor.getAllProcessInfo()
        return infos

    def supervisorctl(
        self, *args: str, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run supervisorctl against this stack and return its completed process."""
        command = [
            sys.executable,
            "-m",
            "supervisor.supervisorctl",
            "-c",
            str(SUPERVISOR_CONFIG),
            "-s",
            f"unix://{self.socket_path}",
            *args,
        ]
        return subprocess.run(
            command,
            cwd=PROJECT_DIR,
            env=self.environment,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the process ``name`` (not its group); return its pid."""
        pid = int(self.process_info(name)["pid"])
        if pid == 0:
            raise StackError(f"{name} is not running, so it cannot be signalled")
        os.kill(pid, sig)
        return pid

    def log(self, name: str) -> str:
        """Return the log of a program ("web", "worker:worker_01", "supervisord")."""
        file_name = name.rpartition(":")[2]
        path = self.var_dir / "log" / f"{file_name}.log"
        if not path.exists():
            return ""
        return path.read_text(errors="replace")

    def log_tails(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of every log file, for failure messages."""
        parts = []
        for path in sorted((self.var_dir / "log").glob("*")):
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def wait_for_supervisord(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until supervisord answers over XML-RPC in the RUNNING state."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self._raise_if_exited()
            try:
                with self.rpc() as proxy:
                    state = proxy.supervisor.getState()
                if state["statename"] == "RUNNING":
                    return
            except (OSError, xmlrpc.client.Error) as exc:
                last_error = exc
            time.sleep(POLL_INTERVAL)
        raise StackError(
            f"supervisord did not answer on {self.socket_path} within {timeout:g} s "
            f"(last error: {last_error})"
        )

    def wait_state(
        self, name: str, states: Collection[str], timeout: float = START_TIMEOUT
    ) -> dict[str, Any]:
        """Wait until process ``name`` is in one of ``states``; return its info."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self._raise_if_exited()
            info = self.process_info(name)
            if info["statename"] in states:
                if info["statename"] == "EXITED" and info["exitstatus"] != 0:
                    raise StackError(
                        f"{name} exited with status {info['exitstatus']}:\n"
                        f"{self.log(name)[-4000:]}"
                    )
                return info
            if info["statename"] == "FATAL":
                raise StackError(
                    f"{name} is FATAL (it failed to start):\n{self.log(name)[-4000:]}"
                )
            time.sleep(POLL_INTERVAL)
        raise StackError(
            f"{name} is {info.get('statename')}, not {'/'.join(states)}, after "
            f"{timeout:g} s:\n{self.log(name)[-4000:]}"
        )

    def wait_running(
        self, programs: Collection[str] = LONG_RUNNING, timeout: float = START_TIMEOUT
    ) -> None:
        """Wait until every process of the named programs or groups is RUNNING."""
        deadline = time.monotonic() + timeout
        names = self._process_names(programs)
        for name in names:
            remaining = max(deadline - time.monotonic(), POLL_INTERVAL)
            self.wait_state(name, {"RUNNING"}, timeout=remaining)

    def _process_names(self, programs: Collection[str]) -> list[str]:
        names = []
        infos = self.all_process_info()
        for program in programs:
            if ":" in program:
                names.append(program)
                continue
            matches = [
                f"{info['group']}:{info['name']}"
                for info in infos
                if info["group"] == program
            ]
            if not matches:
                raise StackError(f"supervisord has no program or group {program!r}")
            names.extend(matches)
        return names

    def _raise_if_exited(self) -> None:
        status = self.process.poll()
        if status is not None:
            output = self.var_dir / "log" / "supervisord.out"
            text = output.read_text(errors="replace") if output.exists() else ""
            raise StackError(f"supervisord exited with status {status}:\n{text}")

    def _shutdown_timeout(self) -> float:
        longest = max(
            int(self.environment.get(name, "0"))
            for name in (
                "WORKER_STOPWAITSECS",
                "SCHEDULER_STOPWAITSECS",
                "WEB_STOPWAITSECS",
            )
        )
        return longest + SHUTDOWN_MARGIN

    def stop(self, remove_var_dir: bool = True) -> None:
        """Shut supervisord down, then kill anything of this stack still running."""
        if self._stopped:
            if remove_var_dir:
                self.remove_var_dir()
            return
        self._stopped = True
        _running.discard(self)
        try:
            if self.process.poll() is None:
                self._request_shutdown()
                try:
                    self.process.wait(self._shutdown_timeout())
                except subprocess.TimeoutExpired:
                    logger.error(
                        "supervisord %s did not exit; killing it", self.process.pid
                    )
        finally:
            _kill_process_group(self.process.pid)
            self.process.wait()
            _kill_tagged_processes(self.stack_id)
        if remove_var_dir:
            self.remove_var_dir()

    def crash(self) -> None:
        """Kill supervisord and every process of this stack with SIGKILL at once.

        Nothing shuts down gracefully, as when a host loses power.
        """
        self._stopped = True
        _running.discard(self)
        pids = [pid for pid in _tagged_pids(self.stack_id) if pid != os.getpid()]
        for pid in [self.process.pid, *pids]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        _kill_tagged_processes(self.stack_id)

    def _request_shutdown(self) -> None:
        try:
            result = self.supervisorctl("shutdown", timeout=30)
        except subprocess.TimeoutExpired:
            logger.warning("supervisorctl shutdown timed out; sending SIGTERM")
        else:
            if result.returncode == 0:
                return
            logger.warning(
                "supervisorctl shutdown failed with status %s: %s",
                result.returncode,
                result.stdout + result.stderr,
            )
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)

    def remove_var_dir(self) -> None:
        """Delete the temporary VAR_DIR when this stack created it."""
        if self._owns_var_dir:
            shutil.rmtree(self.var_dir, ignore_errors=True)


def _stack_environment(
    env_overrides: Mapping[str, str], var_dir: Path
) -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in _DROPPED_NAMES and not name.startswith(_DROPPED_PREFIXES)
    }
    environment.update(
        {
            "VAR_DIR": str(var_dir),
            "WEB_BIND": f"127.0.0.1:{free_port()}",
            "SECRET_KEY": secrets.token_urlsafe(48),
            "ADMIN_USERNAME": "admin",
            "ADMIN_PASSWORD": secrets.token_urlsafe(18),
            "LOCAL_DATABASE": "false",
        }
    )
    environment.update(env_overrides)
    for required in ("DATABASE_URL", "API_BASE_URL"):
        if not environment.get(required):
            raise ValueError(
                f"Stack.start needs {required} in env_overrides: a test database "
                "and a test upstream, so the stack reaches nothing else"
            )
    settings = load_settings(environment)
    if settings.local_database:
        raise ValueError(
            "Stack.start does not run the local database; leave LOCAL_DATABASE unset"
        )
    environment = supervisor_environment(settings, environment)
    environment[STACK_ID_VARIABLE] = secrets.token_hex(8)
    problems = check_supervisor_config(settings, environment)
    if problems:
        raise StackError("supervisord's config is not usable:\n" + "\n".join(problems))
    return environment


def _kill_process_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tagged_pids(stack_id: str) -> list[int]:
    marker = f"{STACK_ID_VARIABLE}={stack_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _kill_tagged_processes(stack_id: str) -> None:
    """Kill every process (and its group) started with this stack's id."""
    deadline = time.monotonic() + 10.0
    while True:
        pids = [pid for pid in _tagged_pids(stack_id) if pid != os.getpid()]
        if not pids:
            return
        for pid in pids:
            logger.warning("killing process %s left behind by stack %s", pid, stack_id)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if group != os.getpgrp():
                    os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise StackError(f"processes {pids} of stack {stack_id} survived SIGKILL")
        time.sleep(POLL_INTERVAL)


@atexit.register
def _stop_leftover_stacks() -> None:
    for stack in list(_running):
        stack.stop()
