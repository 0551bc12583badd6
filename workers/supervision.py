"""supervisord's XML-RPC interface over its unix socket.

Every failure to reach supervisord becomes ``SupervisorUnavailable`` with a message an
operator can act on, and every process action checks the state that results instead of
trusting a return value.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import socket
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from workers.errors import FleetError

DEFAULT_TIMEOUT = 5.0  # seconds for one XML-RPC call
RUNNING_STATES = frozenset({"RUNNING"})


class SupervisorUnavailable(FleetError):
    """supervisord cannot be reached, or it refused the request."""


class ProcessActionFailed(FleetError):
    """A start, stop or restart did not reach the expected state."""


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


class _TimeoutTransport(SupervisorTransport):
    """SupervisorTransport whose unix socket has a timeout."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__(None, None, serverurl=f"unix://{socket_path}")
        self._timeout = timeout

    def _get_connection(self) -> http.client.HTTPConnection:
        connection = super()._get_connection()
        connection.timeout = self._timeout
        return connection


class SupervisorClient:
    """Talk to one supervisord through its unix socket."""

    def __init__(self, socket_path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _proxy(self) -> Any:
        transport = _TimeoutTransport(str(self.socket_path), self.timeout)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def _call(self, method: str, *args: Any) -> Any:
        shown = self._shown_path()
        try:
            return getattr(self._proxy().supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            raise _fault_error(fault, args) from None
        except PermissionError:
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {shown}: permission denied; run the "
                "panel as the user that owns the socket"
            ) from None
        except FileNotFoundError:
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {shown}: no socket there; is the stack "
                "running (make run)?"
            ) from None
        except ConnectionRefusedError:
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {shown}: connection refused; "
                "supervisord is not running"
            ) from None
        except (TimeoutError, socket.timeout):
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {shown}: no answer within "
                f"{self.timeout:g} s"
            ) from None
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, "") or str(exc)
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {shown}: {exc.strerror or reason}"
            ) from None
        except (xmlrpc.client.ProtocolError, http.client.HTTPException) as exc:
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {shown}: {exc}"
            ) from None

    def _shown_path(self) -> str:
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
        names = [info.name for info in self.processes()]
        if target.endswith(":*"):
            group = target[:-2]
            matched = [name for name in names if name.split(":", 1)[0] == group]
        else:
            matched = [name for name in names if name == target]
        if not matched:
            raise ProcessActionFailed(f"no such process: {target}")
        return matched

    def act(self, action: str, target: str, wait: float = 30.0) -> list[ProcessInfo]:
        """Start, stop or restart ``target`` and return the states that result."""
        if action not in {"start", "stop", "restart"}:
            raise ProcessActionFailed(f"unknown action {action!r}")
        names = self.resolve(target)
        group = target[:-2] if target.endswith(":*") else None
        before = {name: self.process(name).pid for name in names}
        if action in {"stop", "restart"}:
            self._stop(group, names)
        if action in {"start", "restart"}:
            self._start(group, names)
        return self._check(action, names, before, wait)

    def _stop(self, group: str | None, names: list[str]) -> None:
        if group:
            self._call("stopProcessGroup", group, True)
            return
        for name in names:
            if self.process(name).state in {"STOPPED", "EXITED", "FATAL"}:
                continue
            self._call("stopProcess", name, True)

    def _start(self, group: str | None, names: list[str]) -> None:
        if group:
            self._call("startProcessGroup", group, True)
            return
        for name in names:
            if self.process(name).state == "RUNNING":
                continue
            self._call("startProcess", name, True)

    def _check(
        self, action: str, names: list[str], before: dict[str, int], wait: float
    ) -> list[ProcessInfo]:
        expected = "STOPPED" if action == "stop" else "RUNNING"
        deadline = time.monotonic() + wait
        while True:
            infos = [self.process(name) for name in names]
            bad = [info for info in infos if info.state != expected]
            if not bad or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if bad:
            shown = ", ".join(f"{info.name} is {info.state}" for info in bad)
            raise ProcessActionFailed(f"{action} did not reach {expected}: {shown}")
        if action == "restart":
            unchanged = [info.name for info in infos if info.pid == before[info.name]]
            if unchanged:
                raise ProcessActionFailed(
                    f"restart left the same pid for {', '.join(unchanged)}"
                )
        return infos


def _fault_error(fault: xmlrpc.client.Fault, args: tuple[Any, ...]) -> Exception:
    text = fault.faultString or ""
    target = args[0] if args else ""
    if "BAD_NAME" in text:
        return ProcessActionFailed(f"no such process: {target}")
    if "ALREADY_STARTED" in text or "NOT_RUNNING" in text:
        return ProcessActionFailed(f"{target}: {text}")
    if "SPAWN_ERROR" in text or "ABNORMAL_TERMINATION" in text:
        return ProcessActionFailed(f"{target} failed to start: {text}")
    return SupervisorUnavailable(f"supervisord rejected the request: {text}")
