"""supervisord's XML-RPC interface over its unix socket.

Every failure to reach supervisord becomes ``SupervisorUnavailable`` with a message an
operator can act on, and every process action checks the state that results instead of
trusting a return value.

Actions never block inside supervisord: start and stop are sent with ``wait=False``
and the client polls the states itself until a deadline. An action that has not
finished by then raises ``ProcessActionPending`` (a ``ProcessActionFailed``), so a
caller can never mistake it for a success.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import socket
import time
import xmlrpc.client
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from workers.errors import FleetError

DEFAULT_TIMEOUT = 5.0  # seconds for one XML-RPC call
POLL_INTERVAL = 0.1  # seconds between two looks at the states during an action
ACTIONS = ("start", "stop", "restart")
RUNNING_STATES = frozenset({"RUNNING"})
# The states supervisord calls RUNNING_STATES, the ones a stop applies to.
ACTIVE_STATES = frozenset({"RUNNING", "STARTING", "BACKOFF"})
# States in which a process is not running, the outcome a stop waits for.
STOPPED_STATES = frozenset({"STOPPED", "EXITED", "FATAL"})


class SupervisorUnavailable(FleetError):
    """supervisord cannot be reached, or it refused the request."""


class ProcessActionFailed(FleetError):
    """A start, stop or restart did not reach the expected state."""


class ProcessActionPending(ProcessActionFailed):
    """A start, stop or restart was sent but had not finished by the deadline."""

    def __init__(
        self,
        message: str,
        phase: str,
        names: list[str],
        before: dict[str, ProcessInfo],
        infos: list[ProcessInfo],
    ) -> None:
        super().__init__(message)
        self.phase = phase  # "stopping" or "starting"
        self.names = names
        self.before = before
        self.infos = infos


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """One supervisord process, named as `supervisorctl status` names it."""

    name: str
    group: str
    state: str
    pid: int
    started: float
    stopped: float
    now: float
    exit_status: int
    description: str
    spawn_error: str

    @property
    def uptime_seconds(self) -> float | None:
        """Return the seconds since the process started, while it runs."""
        if self.state != "RUNNING" or not self.started:
            return None
        return max(0.0, self.now - self.started)

    @classmethod
    def from_rpc(cls, info: dict[str, Any]) -> ProcessInfo:
        """Build from a getProcessInfo dict."""
        group, name = info["group"], info["name"]
        return cls(
            name=name if group == name else f"{group}:{name}",
            group=group,
            state=info["statename"],
            pid=info["pid"],
            started=info["start"],
            stopped=info["stop"],
            now=info["now"],
            exit_status=info["exitstatus"],
            description=info["description"],
            spawn_error=info.get("spawnerr", ""),
        )


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket whose connect, send and receive have a timeout."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        # "localhost" only fills the Host header; the socket path is what connects.
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        """Open the unix socket with the connection's timeout."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _TimeoutTransport(SupervisorTransport):
    """SupervisorTransport whose unix socket has a timeout.

    SupervisorTransport's own unix connection opens its socket without a timeout,
    and its constructor stores the connection factory on the instance, so the
    factory is replaced here after the constructor ran.
    """

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__(None, None, serverurl=f"unix://{socket_path}")
        self._get_connection = (  # type: ignore[method-assign]
            lambda: _UnixConnection(socket_path, timeout)
        )


class SupervisorClient:
    """Talk to one supervisord through its unix socket."""

    def __init__(self, socket_path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _call(
        self, method: str, *args: Any, tolerated: Collection[str] = ()
    ) -> Any:
        """Call one supervisor.* method. Faults named in ``tolerated`` return None."""
        where = self._display_path()
        transport = _TimeoutTransport(str(self.socket_path), self.timeout)
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            return getattr(proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            if any(name in (fault.faultString or "") for name in tolerated):
                return None
            raise _fault_error(fault, args) from None
        except PermissionError:
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {where}: permission denied; run the "
                "panel as the user that owns the socket"
            ) from None
        except FileNotFoundError:
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {where}: no socket there; is the stack "
                "running (make run)?"
            ) from None
        except ConnectionRefusedError:
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {where}: connection refused; "
                "supervisord is not running"
            ) from None
        except (TimeoutError, socket.timeout):
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {where}: no response within "
                f"{self.timeout:g} s"
            ) from None
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, "") or str(exc)
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {where}: {exc.strerror or reason}"
            ) from None
        except (xmlrpc.client.ProtocolError, http.client.HTTPException) as exc:
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {where}: {exc}"
            ) from None
        finally:
            transport.close()

    def _display_path(self) -> str:
        try:
            return str(self.socket_path.relative_to(Path.cwd()))
        except ValueError:
            return str(self.socket_path)

    def processes(self) -> list[ProcessInfo]:
        """Return every process supervisord manages."""
        return [ProcessInfo.from_rpc(info) for info in self._call("getAllProcessInfo")]

    def process(self, name: str) -> ProcessInfo:
        """Return one process by its `supervisorctl status` name."""
        return ProcessInfo.from_rpc(self._call("getProcessInfo", name))

    def resolve(self, target: str) -> list[str]:
        """Return the process names a name or group pattern ('worker:*') means."""
        return list(self._resolve_infos(target))

    def _resolve_infos(self, target: str) -> dict[str, ProcessInfo]:
        infos = self.processes()
        if target.endswith(":*"):
            group = target[:-2]
            matched = {info.name: info for info in infos if info.group == group}
        else:
            matched = {info.name: info for info in infos if info.name == target}
        if not matched:
            raise ProcessActionFailed(f"no such process: {target}")
        return matched

    def signal(self, name: str, signal_name: str) -> None:
        """Send a signal such as 'TERM' to one process through supervisord."""
        self._call("signalProcess", name, signal_name)

    def act(self, action: str, target: str, wait: float = 30.0) -> list[ProcessInfo]:
        """Start, stop or restart ``target`` and return the states that result.

        A start or restart succeeds when every process is RUNNING (a one-shot
        program may instead have exited 0), and a stop when none is running any
        more: STOPPED, or EXITED or FATAL when it had already ended. The states are
        polled for at most ``wait`` seconds, plus the calls under way at the
        deadline (each bounded by the client's timeout). ProcessActionPending is
        raised when the processes are still stopping or starting then.
        """
        if action not in ACTIONS:
            raise ProcessActionFailed(
                f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}"
            )
        deadline = time.monotonic() + wait
        before = self._resolve_infos(target)
        names = list(before)
        group = target[:-2] if target.endswith(":*") else None

        if action in {"stop", "restart"}:
            self._stop(group, before)
            infos = self._poll(names, _is_stopped, deadline)
            waiting = [info for info in infos if not _is_stopped(info)]
            if waiting:
                raise ProcessActionPending(
                    f"{action} of {target} sent, but {_describe(waiting)} after "
                    f"{wait:g} s; reload to check",
                    "stopping", names, before, infos,
                )
            if action == "stop":
                return infos
        self._start(group, names)
        return self._check_started(action, target, names, before, deadline, wait)

    def finish_restart(
        self, names: list[str], before: dict[str, ProcessInfo], wait: float
    ) -> list[ProcessInfo]:
        """Start ``names`` once they have stopped, completing a pending restart."""
        deadline = time.monotonic() + wait
        infos = self._poll(names, _is_stopped, deadline)
        waiting = [info for info in infos if not _is_stopped(info)]
        if waiting:
            raise ProcessActionFailed(
                f"restart gave up after {wait:g} s: {_describe(waiting)}"
            )
        self._start(None, names)
        target = ", ".join(names)
        return self._check_started("restart", target, names, before, deadline, wait)

    def _stop(self, group: str | None, before: dict[str, ProcessInfo]) -> None:
        if group:
            self._call("stopProcessGroup", group, False)
            return
        for name, info in before.items():
            if info.state in ACTIVE_STATES:
                self._call("stopProcess", name, False, tolerated=("NOT_RUNNING",))

    def _start(self, group: str | None, names: list[str]) -> None:
        if group:
            self._call("startProcessGroup", group, False)
            return
        for name in names:
            self._call("startProcess", name, False, tolerated=("ALREADY_STARTED",))

    def _poll(
        self,
        names: list[str],
        done: Callable[[ProcessInfo], bool],
        deadline: float,
    ) -> list[ProcessInfo]:
        """Poll until ``done`` holds for every process of ``names``, or the deadline."""
        expected = set(names)
        while True:
            infos = [info for info in self.processes() if info.name in expected]
            missing = expected - {info.name for info in infos}
            if missing:
                raise ProcessActionFailed(
                    f"no such process: {', '.join(sorted(missing))}"
                )
            if all(done(info) for info in infos) or time.monotonic() >= deadline:
                return infos
            time.sleep(POLL_INTERVAL)

    def _check_started(
        self,
        action: str,
        target: str,
        names: list[str],
        before: dict[str, ProcessInfo],
        deadline: float,
        wait: float,
    ) -> list[ProcessInfo]:
        def settled(info: ProcessInfo) -> bool:
            return info.state == "RUNNING" or _ran_to_completion(info, before) or \
                info.state in {"FATAL", "EXITED", "STOPPED"}

        infos = self._poll(names, settled, deadline)
        failed = [
            info for info in infos
            if info.state in {"FATAL", "EXITED", "STOPPED"}
            and not _ran_to_completion(info, before)
        ]
        if failed:
            raise ProcessActionFailed(
                f"{action} of {target} did not reach RUNNING: "
                + "; ".join(_failure_text(info) for info in failed)
            )
        waiting = [info for info in infos if not settled(info)]
        if waiting:
            raise ProcessActionPending(
                f"{action} of {target} sent, but {_describe(waiting)} after "
                f"{wait:g} s (still starting); reload to check",
                "starting", names, before, infos,
            )
        if action == "restart":
            unchanged = [
                info.name for info in infos
                if info.state == "RUNNING" and before[info.name].pid
                and info.pid == before[info.name].pid
            ]
            if unchanged:
                raise ProcessActionFailed(
                    f"restart left the same pid for {', '.join(unchanged)}"
                )
        return infos


def _is_stopped(info: ProcessInfo) -> bool:
    return info.state in STOPPED_STATES


def _ran_to_completion(info: ProcessInfo, before: dict[str, ProcessInfo]) -> bool:
    """Tell whether a one-shot program such as setup started again and exited 0."""
    earlier = before.get(info.name)
    return (
        info.state == "EXITED"
        and info.exit_status == 0
        and earlier is not None
        and info.started > earlier.started
    )


def _describe(infos: list[ProcessInfo]) -> str:
    return ", ".join(f"{info.name} is {info.state}" for info in infos)


def _failure_text(info: ProcessInfo) -> str:
    text = f"{info.name} is {info.state}"
    if info.state == "EXITED":
        text += f" (exit status {info.exit_status})"
    detail = info.spawn_error or info.description
    if detail:
        text += f": {detail}"
    return text


def _fault_error(fault: xmlrpc.client.Fault, args: tuple[Any, ...]) -> Exception:
    text = fault.faultString or ""
    target = args[0] if args else ""
    if "BAD_NAME" in text:
        return ProcessActionFailed(f"no such process: {target}")
    if "ALREADY_STARTED" in text or "NOT_RUNNING" in text:
        return ProcessActionFailed(f"{target}: {text}")
    if "SPAWN_ERROR" in text or "ABNORMAL_TERMINATION" in text:
        return ProcessActionFailed(f"{target} failed to start: {text}")
    if "BAD_SIGNAL" in text:
        return ProcessActionFailed(f"{target}: supervisord rejected the signal: {text}")
    return SupervisorUnavailable(f"supervisord rejected the request: {text}")
