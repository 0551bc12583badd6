"""The panel under the real gunicorn: forks, signing keys, budgets and throttling.

Each test starts ``gunicorn -c conf/gunicorn.conf.py wsgi:app`` on a free
loopback port against a fresh database, drives it with httpx clients (one cookie
jar each) and reads gunicorn's log and ``pg_stat_activity``.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support.panel import PASSWORDS, build_panel
from tests.support.postgres import free_port
from webpanel import db
from workers.settings import PROJECT_DIR

START_TIMEOUT = 60.0  # seconds for gunicorn to answer its first request
STOP_TIMEOUT = 30.0  # seconds for a graceful stop before SIGKILL
DB_PASSWORD_MARK = "acceptance-db-password"
KEY_64 = secrets.token_urlsafe(48)  # 64 characters
BROKEN_CONNECTION_WORDS = ("SSL", "bad record mac", "protocol", "couldn't get a "
                           "connection", "server closed the connection")


class FormParser(HTMLParser):
    """Collect the fields of each POST form, as a browser would submit them."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self._select: str | None = None
        self._first_option: str | None = None
        self._textarea: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Record forms, inputs, selected options and textareas."""
        values = {name: value or "" for name, value in attrs}
        fields = self.forms[-1][1] if self.forms else {}
        if tag == "form" and values.get("method", "").lower() == "post":
            self.forms.append((values.get("action", ""), {}))
        elif tag == "input" and "name" in values and self.forms:
            kind = values.get("type", "text")
            if kind not in {"checkbox", "radio", "submit"} or "checked" in values:
                fields[values["name"]] = values.get("value", "")
        elif tag == "select" and self.forms:
            self._select = values.get("name")
            self._first_option = None
        elif tag == "option" and self._select is not None:
            value = values.get("value", "")
            if self._first_option is None:
                self._first_option = value
                fields.setdefault(self._select, value)
            if "selected" in values:
                fields[self._select] = value
        elif tag == "textarea" and self.forms:
            self._textarea = values.get("name")
            fields[self._textarea or ""] = ""

    def handle_endtag(self, tag: str) -> None:
        """Close selects and textareas."""
        if tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None

    def handle_data(self, data: str) -> None:
        """Keep a textarea's text as its value."""
        if self._textarea is not None and self.forms:
            self.forms[-1][1][self._textarea] += data


def post_form(html: str, action_part: str) -> tuple[str, dict[str, str]]:
    """Return the action and fields of the POST form whose action contains a part."""
    parser = FormParser()
    parser.feed(html)
    for action, fields in parser.forms:
        if action_part in action:
            return action, fields
    raise AssertionError(f"no POST form with {action_part!r} in its action")


class Gunicorn:
    """One gunicorn process running the panel, with its log in a file."""

    def __init__(self, env: dict[str, str], var_dir: Path,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.var_dir = var_dir
        self.log_path = var_dir / f"web-{self.port}.log"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(var_dir),
            "WEB_BIND": f"127.0.0.1:{self.port}",
            "VAR_DIR": str(var_dir),
            "API_BASE_URL": "http://127.0.0.1:9",
            "SUPERVISOR_SOCKET": str(var_dir / "absent.sock"),
            "LOG_LEVEL": "info",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """Return the panel's URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Gunicorn:
        """Start gunicorn; return at once."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(PROJECT_DIR / ".venv" / "bin" / "gunicorn"), "-c",
                 str(PROJECT_DIR / "conf" / "gunicorn.conf.py"), "wsgi:app"],
                cwd=PROJECT_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self) -> Gunicorn:
        """Wait until the login page answers, failing if gunicorn exits."""
        deadline = time.monotonic() + START_TIMEOUT
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.process.returncode}:"
                                     f"\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/login", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling a server that is still starting
        raise AssertionError(f"gunicorn did not answer within {START_TIMEOUT} s:\n"
                             f"{self.log()[-3000:]}")

    def wait_exit(self, timeout: float) -> int:
        """Wait for gunicorn to exit on its own and return its exit status."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop gunicorn gracefully, or kill it after STOP_TIMEOUT."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    @property
    def pid(self) -> int:
        """Return the master's pid."""
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> set[int]:
        """Return the pids of the master's worker processes."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        return {int(pid) for pid in children.split()}

    def log(self) -> str:
        """Return gunicorn's log so far."""
        return self.log_path.read_text(errors="replace")


GunicornFactory = Callable[..., Gunicorn]


@pytest.fixture
def gunicorn_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[GunicornFactory]:
    """Yield a function that starts gunicorn; every server stops after the test."""
    servers: list[Gunicorn] = []

    def start(env: dict[str, str], port: int | None = None) -> Gunicorn:
        server = Gunicorn(env, tmp_path, port).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    if getattr(getattr(request.node, "report_call", None), "failed", False):
        for server in servers:
            name = server.log_path.name
            print(f"--- gunicorn log {name} ---\n{server.log()[-5000:]}")


@pytest.fixture
def web_database(database_url: str) -> str:
    """Return a fresh database with one account per role."""
    build_panel(database_url)
    db.close_process_pool()
    return database_url


def web_env(database_url: str, **overrides: str) -> dict[str, str]:
    """Return the settings of a 4-worker panel on ``database_url``."""
    return {"DATABASE_URL": database_url, "SECRET_KEY": KEY_64, "WEB_WORKERS": "4",
            **overrides}


def log_in(client: httpx.Client, role: str) -> None:
    """Log ``client`` in with ``role``'s account."""
    page = client.get("/login")
    action, fields = post_form(page.text, "")
    fields.update(username=role, password=PASSWORDS[role])
    response = client.post(action or "/login", data=fields)
    assert response.status_code == 302, response.text[:300]


def job_count(database_url: str) -> int:
    """Return the number of fetch_joke jobs."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM procrastinate_jobs "
                           "WHERE task_name = 'fetch_joke'").fetchone()
    assert row is not None
    return int(row[0])


def web_backends(database_url: str) -> list[tuple[int, str]]:
    """Return backend pid and application_name of every panel connection."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE application_name LIKE 'web:%%'").fetchall()


def _defer_once(client: httpx.Client, form: tuple[str, dict[str, str]],
                start: threading.Barrier) -> tuple[int, float, str]:
    action, fields = form
    start.wait()
    started = time.monotonic()
    response = client.post(action, data=fields)
    return (response.status_code, time.monotonic() - started,
            response.headers.get("Location", ""))


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_concurrent_defers_with_and_without_preload(
    gunicorn_factory: GunicornFactory, web_database: str,
    preload: bool,
) -> None:
    extra = {"GUNICORN_CMD_ARGS": "--preload"} if preload else {}
    server = gunicorn_factory(web_env(web_database, **extra)).wait_ready()
    count = 40
    clients = [httpx.Client(base_url=server.base_url, timeout=30)
               for _ in range(count)]
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda client: log_in(client, "operator"), clients))
            forms = list(pool.map(
                lambda client: post_form(client.get("/defer/fetch_joke").text,
                                         "/defer/fetch_joke"), clients))
        samples: list[list[tuple[int, str]]] = []
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.is_set():
                samples.append(web_backends(web_database))
                stop_sampling.wait(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        barrier = threading.Barrier(count, timeout=30)
        with ThreadPoolExecutor(max_workers=count) as pool:
            results = list(pool.map(lambda pair: _defer_once(*pair, barrier),
                                    [(client, form) for client, form
                                     in zip(clients, forms)]))
        stop_sampling.set()
        sampler.join(timeout=10)
    finally:
        for client in clients:
            client.close()

    statuses = [status for status, _, _ in results]
    assert statuses == [303] * count, statuses
    assert all(location.startswith("/jobs/") for _, _, location in results)
    slowest = max(seconds for _, seconds, _ in results)
    assert slowest < 5.0, f"the slowest defer took {slowest:.2f} s"
    assert job_count(web_database) == count

    workers = server.worker_pids()
    assert len(workers) == 4
    samples.append(web_backends(web_database))
    names_by_backend: dict[int, set[str]] = {}
    for snapshot in samples:
        for backend, name in snapshot:
            names_by_backend.setdefault(backend, set()).add(name)
    assert names_by_backend, "no panel connection seen in pg_stat_activity"
    for backend, names in names_by_backend.items():
        assert len(names) == 1, f"backend {backend} served {names}"
        owner = int(next(iter(names)).split(":")[1])
        assert owner != server.pid, f"the master opened backend {backend}"
        assert owner in workers, f"backend {backend} belongs to {owner}, not a worker"
    log = server.log()
    for words in BROKEN_CONNECTION_WORDS:
        assert words not in log, f"gunicorn's log mentions {words!r}"
    assert "Traceback" not in log


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_missing_secret_key_stops_startup(
    gunicorn_factory: GunicornFactory, web_database: str,
    preload: bool,
) -> None:
    url = web_database.replace("postgresql://postgres:",
                               f"postgresql://postgres:{DB_PASSWORD_MARK}")
    env = web_env(url)
    del env["SECRET_KEY"]
    if preload:
        env["GUNICORN_CMD_ARGS"] = "--preload"
    server = gunicorn_factory(env)
    status = server.wait_exit(timeout=START_TIMEOUT)
    log = server.log()
    assert status != 0
    assert "SECRET_KEY is not set" in log
    assert "secrets.token_urlsafe(48)" in log
    assert DB_PASSWORD_MARK not in log


def test_hundred_fresh_logins_pass_csrf(
    gunicorn_factory: GunicornFactory, web_database: str,
) -> None:
    server = gunicorn_factory(web_env(
        web_database, GUNICORN_CMD_ARGS="--access-logformat '%(p)s %(r)s %(s)s'",
    )).wait_ready()

    def login_and_defer(_: int) -> int:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            log_in(client, "operator")
            action, fields = post_form(client.get("/defer/fetch_joke").text,
                                       "/defer/fetch_joke")
            return client.post(action, data=fields).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(login_and_defer, range(100)))
    assert statuses.count(303) == 100, statuses
    assert job_count(web_database) == 100
    serving = set(re.findall(r"^<(\d+)> POST /defer/fetch_joke", server.log(),
                             re.MULTILINE))
    assert len(serving) >= 2, f"every defer was served by {serving}"


def test_open_form_survives_key_rotation(
    gunicorn_factory: GunicornFactory, web_database: str,
) -> None:
    old = gunicorn_factory(web_env(web_database, WEB_WORKERS="2")).wait_ready()
    with httpx.Client(base_url=old.base_url, timeout=30) as client:
        log_in(client, "operator")
        action, fields = post_form(client.get("/defer/fetch_joke").text,
                                   "/defer/fetch_joke")
        fields["priority"] = "7"
        old.stop()
        new_key = secrets.token_urlsafe(48)
        new = gunicorn_factory(web_env(
            web_database, WEB_WORKERS="2", SECRET_KEY=new_key,
            SECRET_KEY_FALLBACKS=KEY_64), port=old.port).wait_ready()
        response = client.post(action, data=fields)
        assert response.status_code == 303, response.text[:500]
        assert client.get("/account").status_code == 200
        assert new.port == old.port
    with psycopg.connect(web_database) as conn:
        row = conn.execute("SELECT priority FROM procrastinate_jobs").fetchone()
    assert row == (7,)


def test_lock_out_across_workers(
    gunicorn_factory: GunicornFactory, web_database: str,
) -> None:
    server = gunicorn_factory(web_env(web_database)).wait_ready()
    for _ in range(5):
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            page = client.get("/login")
            action, fields = post_form(page.text, "")
            fields.update(username="operator", password="wrong-password")
            assert client.post(action or "/login", data=fields).status_code == 400
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        page = client.get("/login")
        action, fields = post_form(page.text, "")
        fields.update(username="operator", password=PASSWORDS["operator"])
        response = client.post(action or "/login", data=fields)
    assert response.status_code == 400
    assert "Too many failed logins" in response.text


def test_locked_table_gives_503_within_budget(
    gunicorn_factory: GunicornFactory, web_database: str,
) -> None:
    budget = 2.0
    server = gunicorn_factory(web_env(
        web_database, WEB_WORKERS="2", WEB_TIMEOUT="6",
        WEB_REQUEST_BUDGET=str(budget))).wait_ready()
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        log_in(client, "operator")
        action, fields = post_form(client.get("/defer/fetch_joke").text,
                                   "/defer/fetch_joke")
        with psycopg.connect(web_database) as locker:
            locker.execute("LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE")
            locked_at = time.monotonic()
            answers = []
            # Hold the lock past gunicorn's timeout, so a request without a
            # budget would be killed as WORKER TIMEOUT.
            while time.monotonic() - locked_at < 8:
                for method, path in (("GET", "/jobs"), ("GET", "/"),
                                     ("POST", action)):
                    started = time.monotonic()
                    response = client.request(
                        method, path, data=fields if method == "POST" else None)
                    answers.append((method, path, response.status_code,
                                    time.monotonic() - started, response.text))
        for method, path, status, seconds, body in answers:
            assert status == 503, f"{method} {path}: {status}"
            assert seconds < budget + 1.5, f"{method} {path} took {seconds:.1f} s"
            # The job list words its own message ("took too long to load").
            assert "did not answer in time" in body or "took too long" in body, \
                f"{method} {path}: {body[-600:]}"
            assert "Traceback" not in body
        assert job_count(web_database) == 0
        # With the lock gone, the same form goes through.
        fresh_action, fresh = post_form(client.get("/defer/fetch_joke").text,
                                        "/defer/fetch_joke")
        assert client.post(fresh_action, data=fresh).status_code == 303
    assert job_count(web_database) == 1
    with psycopg.connect(web_database) as conn:
        row = conn.execute("SELECT count(*) FROM audit_log "
                           "WHERE cardinality(job_ids) > 0").fetchone()
    assert row is not None
    assert row[0] <= 1  # at most the defer that went through
    assert "WORKER TIMEOUT" not in server.log()
