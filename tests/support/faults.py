"""Run workers for fault tests, in this process or as child processes, and watch jobs.

``InProcessWorker`` runs a ``FleetWorker`` on its own event loop in a thread, so a
test can register test-only tasks on the product's App and read the pool directly.
``WorkerProcess`` runs ``python -m workers.worker`` (or the scheduler) as a child
process that can be signalled and killed like a supervisord program. The ``wait_*``
helpers poll the database with a short interval until a condition holds or a
timeout expires, and name the condition in the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import procrastinate
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from workers.app import build_app
from workers.runner import FleetWorker
from workers.settings import PROJECT_DIR, Settings, load_settings

POLL_INTERVAL = 0.05  # seconds between two looks at the database or a log
_T = TypeVar("_T")


def fleet_environment(
    database_url: str, api_base_url: str, **overrides: str
) -> dict[str, str]:
    """Return the settings a test worker runs with: fast, and isolated from var/."""
    environment = {
        "DATABASE_URL": database_url,
        "API_BASE_URL": api_base_url,
        "SUPERVISOR_SOCKET": "/nonexistent/supervisor.sock",
        "HEARTBEAT_INTERVAL": "1",
        "STALLED_JOB_THRESHOLD": "7",
        "STALLED_JOB_CHECK_INTERVAL": "2",
        "RETRY_BASE_DELAY": "0.2",
        "RETRY_MAX_DELAY": "1",
        "WORKER_SHUTDOWN_TIMEOUT": "5",
        "SCHEDULER_SHUTDOWN_TIMEOUT": "2",
        "JOB_TIMEOUT": "30",
        "HTTP_TIMEOUT": "5",
        "WORKER_CONCURRENCY": "4",
        "LOG_LEVEL": "INFO",
    }
    environment.update(overrides)
    return environment


def fleet_settings(
    database_url: str, api_base_url: str, **overrides: str
) -> Settings:
    """Return validated settings built by ``fleet_environment``."""
    return load_settings(fleet_environment(database_url, api_base_url, **overrides))


def wait_until(
    check: Callable[[], _T | None | bool],
    timeout: float,
    description: str,
    interval: float = POLL_INTERVAL,
) -> _T:
    """Call ``check`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {description}")
        time.sleep(interval)


def query(url: str, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
          ) -> list[dict[str, Any]]:
    """Run one statement in autocommit mode and return its rows as dicts."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cursor = conn.execute(sql, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def job(url: str, job_id: int) -> dict[str, Any]:
    """Return the procrastinate_jobs row of ``job_id``."""
    rows = query(url, "SELECT * FROM procrastinate_jobs WHERE id = %s", (job_id,))
    assert rows, f"job {job_id} does not exist"
    return rows[0]


def events(url: str, job_id: int) -> list[dict[str, Any]]:
    """Return the events of ``job_id`` in order."""
    return query(
        url,
        "SELECT type, at FROM procrastinate_events WHERE job_id = %s ORDER BY id",
        (job_id,),
    )


def attempts(url: str, job_id: int) -> list[dict[str, Any]]:
    """Return the job_attempts rows of ``job_id`` in order."""
    return query(
        url, "SELECT * FROM job_attempts WHERE job_id = %s ORDER BY id", (job_id,)
    )


def wait_for_status(
    url: str, job_id: int, statuses: set[str] | str, timeout: float
) -> dict[str, Any]:
    """Wait until ``job_id`` has one of ``statuses``; return its row."""
    wanted = {statuses} if isinstance(statuses, str) else statuses

    def check() -> dict[str, Any] | None:
        row = job(url, job_id)
        return row if row["status"] in wanted else None

    try:
        return wait_until(check, timeout, f"job {job_id} to be {'/'.join(wanted)}")
    except TimeoutError as exc:
        row = job(url, job_id)
        outcomes = [
            (item["outcome"], item["error_message"]) for item in attempts(url, job_id)
        ]
        raise TimeoutError(
            f"{exc}; it is {row['status']} after {row['attempts']} attempts, "
            f"attempt outcomes: {outcomes}"
        ) from None


def wait_all_finished(url: str, job_ids: Sequence[int], timeout: float) -> None:
    """Wait until no job of ``job_ids`` is todo or doing."""

    def check() -> bool:
        rows = query(
            url,
            "SELECT count(*) AS n FROM procrastinate_jobs "
            "WHERE id = ANY(%s) AND status IN ('todo', 'doing')",
            (list(job_ids),),
        )
        return rows[0]["n"] == 0

    wait_until(check, timeout, f"{len(job_ids)} jobs to finish", interval=0.2)


class InProcessWorker:
    """A FleetWorker on its own event loop in a background thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        app: procrastinate.App | None = None,
        role: str = "worker",
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.fleet_worker = FleetWorker(
            settings,
            role,
            queues if queues is not None else settings.worker_queues,
            concurrency or settings.worker_concurrency,
            settings.worker_shutdown_timeout,
            app=app,
        )
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = asyncio.run(
                self.fleet_worker.run(install_signal_handlers=False)
            )
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def start(self, timeout: float = 15.0) -> InProcessWorker:
        """Start the thread and wait until the worker has its Procrastinate id."""
        self._thread.start()
        wait_until(
            lambda: self.fleet_worker.worker_id is not None or not self.alive,
            timeout,
            "the in-process worker to register",
        )
        if self.error is not None:
            raise RuntimeError("the in-process worker failed to start") from self.error
        return self

    @property
    def alive(self) -> bool:
        """Return whether the worker thread still runs."""
        return self._thread.is_alive()

    @property
    def worker_id(self) -> int | None:
        """Return the Procrastinate worker id of this worker."""
        return self.fleet_worker.worker_id

    def stop(self, timeout: float = 60.0) -> int | None:
        """Ask for a warm shutdown, wait for it and return the exit code."""
        if self._thread.is_alive():
            self.fleet_worker.request_stop()
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the in-process worker did not stop within {timeout} s")
        if self.error is not None:
            raise RuntimeError("the in-process worker failed") from self.error
        return self.exit_code

    def __enter__(self) -> InProcessWorker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class WorkerProcess:
    """``python -m workers.worker`` (or ``workers.scheduler``) as a child process."""

    def __init__(
        self,
        environment: Mapping[str, str],
        log_dir: Path,
        role: str = "worker",
        name: str | None = None,
    ) -> None:
        self.role = role
        self.name = name or role
        self.log_path = log_dir / f"{self.name}.log"
        env = {
            key: value for key, value in os.environ.items()
            if not key.startswith("SUPERVISOR_")
        }
        env.update(environment)
        # supervisord's name for the process, as the worker reads it.
        env["SUPERVISOR_PROCESS_NAME"] = self.name
        self.environment = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the child process, appending its output to ``log_path``."""
        if self.process is not None:
            raise RuntimeError(f"{self.name} was already started")
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"workers.{self.role}"],
                cwd=PROJECT_DIR,
                env=self.environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        """Return the child's pid."""
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        """Return everything the child has written so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float, count: int = 1) -> str:
        """Wait until ``pattern`` (a regex) matched ``count`` times; return the log."""

        def check() -> str | None:
            text = self.log()
            if len(re.findall(pattern, text)) >= count:
                return text
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode} before "
                    f"logging {pattern!r}:\n{text[-4000:]}"
                )
            return None

        try:
            return wait_until(check, timeout, f"{self.name} to log {pattern!r}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; log:\n{self.log()[-4000:]}") from None

    def wait_registered(self, timeout: float = 20.0) -> int:
        """Wait for the 'registered as Procrastinate worker N' line; return N."""
        text = self.wait_for_log(r"registered as Procrastinate worker \d+", timeout)
        found = re.findall(r"registered as Procrastinate worker (\d+)", text)
        return int(found[-1])

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child."""
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the child to exit and return its exit code."""
        assert self.process is not None
        return self.process.wait(timeout)

    def close(self) -> None:
        """Kill the child and its process group if it still runs."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> WorkerProcess:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def worker_processes(
    environment: Mapping[str, str], log_dir: Path, count: int, role: str = "worker"
) -> Iterator[list[WorkerProcess]]:
    """Start ``count`` child processes logging into ``log_dir``; kill them after."""
    processes = [
        WorkerProcess(environment, log_dir, role, f"{role}_{index:02d}")
        for index in range(count)
    ]
    try:
        for process in processes:
            process.start()
        yield processes
    finally:
        for process in processes:
            process.close()


def defer_jobs(
    settings: Settings,
    task_name: str,
    arguments: Sequence[Mapping[str, Any]],
    **configure: Any,
) -> list[int]:
    """Defer one ``task_name`` job per argument mapping; return their ids in order.

    A task the product does not register (a test-only task) goes to the
    ``api_calls`` queue unless ``configure`` names another.
    """
    app = build_app(settings, "test")
    with app.open():
        if task_name in app.tasks:
            deferrer = app.tasks[task_name].configure(**configure)
        else:
            configure.setdefault("queue", "api_calls")
            deferrer = app.configure_task(name=task_name, **configure)
        return [deferrer.defer(**dict(kwargs)) for kwargs in arguments]


def insert_job(url: str, task_name: str, arguments: Mapping[str, Any],
               queue: str = "api_calls") -> int:
    """Insert a job with SQL alone, as a client without the product's checks would."""
    rows = query(
        url,
        "SELECT (procrastinate_defer_jobs_v1(ARRAY[ROW(%s, %s, 0, NULL, NULL, "
        "%s::jsonb, NULL)::procrastinate_job_to_defer_v1]))[1] AS id",
        (queue, task_name, Jsonb(dict(arguments))),
    )
    return int(rows[0]["id"])


def defer_job(settings: Settings, task_name: str, **kwargs: Any) -> int:
    """Defer one ``task_name`` job with ``kwargs`` as its arguments; return its id."""
    return defer_jobs(settings, task_name, [kwargs])[0]
