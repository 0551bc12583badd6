"""Scriptable loopback HTTP/1.1 server that replaces the upstream API in tests.

Use it in-process (``with Upstream() as up:``) or as a subprocess
(``python -m tests.support.upstream --port 0 --ready-file PATH``) scripted over
``/_control/`` JSON endpoints through :class:`UpstreamProcess`. Rules are matched
in the order they were added. Recorded times come from ``time.monotonic()``, which
on Linux is one system-wide clock, so they compare across processes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import fnmatch
import http
import itertools
import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONTROL_PREFIX = "/_control/"
RULE_KINDS = ("respond", "hold", "drip", "redirect", "retry_after", "reset")
JOKE_TEMPLATES = (
    "A {topic} job retried so often that the queue gave it a loyalty card.",
    "The {topic} worker promised to finish later, and it is still promising.",
    "Why did the {topic} request wait? Its upstream was holding the line.",
)
_MAX_HEADER_FIELDS = 200
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_T = TypeVar("_T")


# Data model: header fields, rules, recorded requests and shared state.
class Headers(Mapping[str, str]):
    """Request header fields with case-insensitive lookup.

    Lookup joins repeated fields with ", ", and ``get_all`` returns them separately.
    """

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self.fields = [(name, value) for name, value in fields]

    def get_all(self, name: str) -> list[str]:
        """Return every value of the field ``name``, in the order received."""
        target = name.lower()
        return [value for key, value in self.fields if key.lower() == target]

    def __getitem__(self, name: str) -> str:
        values = self.get_all(name)
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for name, _ in self.fields:
            if name.lower() not in seen:
                seen.add(name.lower())
                yield name

    def __len__(self) -> int:
        return len({name.lower() for name, _ in self.fields})

    def __repr__(self) -> str:
        return f"Headers({self.fields!r})"


@dataclasses.dataclass
class Rule:
    """Scripted behaviour for requests whose path matches a glob pattern.

    ``status`` is the response status (for ``hold``, the status sent after the
    wait). ``times`` limits the rule to its first N matches. ``json=None`` sends
    ``{}`` for ``respond`` and ``hold``.
    """

    kind: str
    path: str
    method: str | None = None
    times: int | None = None
    status: int = 200
    json: Any = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    interval: float = 0.0
    total_seconds: float = 0.0
    location: str = ""
    value: str = ""
    used: int = 0

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(
                f"invalid rule kind {self.kind!r}; use one of {RULE_KINDS}"
            )
        if not self.path.startswith(("/", "*")):
            raise ValueError(f"invalid rule path {self.path!r}; it must start with /")
        if self.times is not None and self.times < 1:
            raise ValueError(f"invalid times={self.times!r}; use None or a count >= 1")
        if self.kind == "retry_after" and self.status not in (429, 503):
            raise ValueError(
                f"invalid retry_after status {self.status}; use 429 or 503"
            )
        if self.kind == "redirect" and not (300 <= self.status < 400 and self.location):
            raise ValueError(
                f"invalid redirect status {self.status} or location {self.location!r};"
                " use a 3xx status and a non-empty location"
            )
        if self.kind == "drip" and not (self.interval > 0 and self.total_seconds >= 0):
            raise ValueError(
                f"invalid drip interval={self.interval} total_seconds="
                f"{self.total_seconds}; use interval > 0 and total_seconds >= 0"
            )
        if self.seconds < 0:
            raise ValueError(f"invalid hold seconds={self.seconds}; use a value >= 0")

    def matches(self, method: str, path: str) -> bool:
        """Return whether this rule applies to the request and has uses left."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.times is not None and self.used >= self.times:
            return False
        return fnmatch.fnmatchcase(path, self.path)

    def to_dict(self) -> dict[str, Any]:
        """Return the rule as the JSON object accepted by POST /_control/rules."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """Build a rule from a JSON object, raising ValueError on unknown fields."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown rule fields {unknown}; use only {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"invalid rule {dict(data)!r}: {exc}") from exc


@dataclasses.dataclass
class RecordedRequest:
    """One request seen by the server, with monotonic-clock timestamps.

    ``ended_at`` is set just before the last response byte is written, or when the
    connection closes first. ``status`` is None when no response was completed
    (reset, client closed early, server closed). ``closed_at`` is when the server
    saw the client close early.
    """

    method: str
    path: str
    query_string: str
    headers: Headers
    body: bytes
    started_at: float
    id: int = 0
    connection: int = 0
    ended_at: float | None = None
    status: int | None = None
    rule: str = "default"
    client_closed: bool = False
    closed_at: float | None = None

    @property
    def query(self) -> dict[str, list[str]]:
        """Parsed query string, blank values kept."""
        return parse_qs(self.query_string, keep_blank_values=True)

    def json(self) -> Any:
        """Parse the request body as JSON."""
        return json.loads(self.body)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form, as sent by GET /_control/requests."""
        data = dataclasses.asdict(self)
        data["headers"] = [list(pair) for pair in self.headers.fields]
        data["body"] = self.body.decode("utf-8", errors="replace")
        data["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecordedRequest:
        """Rebuild a record from the output of ``to_dict``."""
        fields = dict(data)
        fields["headers"] = Headers(tuple(pair) for pair in fields["headers"])
        fields["body"] = base64.b64decode(fields.pop("body_base64"))
        return cls(**fields)


class _State:
    """Rules, records and per-path counters, shared between threads under a lock."""

    def __init__(self) -> None:
        self.condition = threading.Condition()  # reentrant, so predicates may query
        self.rules: list[Rule] = []
        self.records: list[RecordedRequest] = []
        self.open: dict[str, int] = {}
        self.max_open: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.closed = False
        self._ids = itertools.count(1)

    def add_rules(self, rules: Iterable[Rule]) -> None:
        with self.condition:
            self.rules.extend(dataclasses.replace(rule, used=0) for rule in rules)

    def clear(self) -> None:
        with self.condition:
            self.rules.clear()
            self.records.clear()
            self.counts.clear()
            self.max_open = {path: n for path, n in self.open.items() if n}

    def begin(self, record: RecordedRequest) -> Rule | None:
        """Record a request's arrival and return the first matching rule."""
        with self.condition:
            record.id = next(self._ids)
            self.records.append(record)
            path = record.path
            self.counts[path] = self.counts.get(path, 0) + 1
            self.open[path] = self.open.get(path, 0) + 1
            self.max_open[path] = max(self.max_open.get(path, 0), self.open[path])
            self.condition.notify_all()
            for rule in self.rules:
                if rule.matches(record.method, path):
                    rule.used += 1
                    record.rule = rule.kind
                    return dataclasses.replace(rule)
            return None

    def finish(self, record: RecordedRequest, **changes: Any) -> None:
        """Apply ``changes`` and mark the request ended; later calls do nothing."""
        with self.condition:
            if record.ended_at is not None:
                return
            for name, value in changes.items():
                setattr(record, name, value)
            record.ended_at = time.monotonic()
            self.open[record.path] -= 1
            self.condition.notify_all()

    def snapshot(
        self, path: str | None = None, method: str | None = None
    ) -> list[RecordedRequest]:
        with self.condition:
            return [
                dataclasses.replace(record)
                for record in self.records
                if (path is None or record.path == path)
                and (method is None or record.method.upper() == method.upper())
            ]

    def stats(self) -> dict[str, Any]:
        with self.condition:
            busy = {path for path, open_count in self.open.items() if open_count}
            paths = {
                path: {
                    "count": self.counts.get(path, 0),
                    "open": self.open.get(path, 0),
                    "max_concurrent": self.max_open.get(path, 0),
                }
                for path in sorted(set(self.counts) | busy)
            }
            return {"total": len(self.records), "paths": paths}

    def wait_until(
        self, check: Callable[[], _T | None], timeout: float, description: str
    ) -> _T:
        """Block until ``check`` returns a non-None value, on the condition variable."""
        deadline = time.monotonic() + timeout
        with self.condition:
            while True:
                result = check()
                if result is not None:
                    return result
                if self.closed:
                    raise RuntimeError(
                        f"upstream server closed while waiting for {description}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = ", ".join(
                        f"{r.method} {r.path} -> {r.status}" for r in self.records[-5:]
                    )
                    raise TimeoutError(
                        f"timed out after {timeout} s waiting for {description}; "
                        f"{len(self.records)} requests recorded, last: [{seen}]"
                    )
                self.condition.wait(remaining)

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()


# Rule-building methods shared by the in-process server and the subprocess.
class _Scripting:
    """Rule-building and counter methods shared by the in-process and remote servers."""

    def add_rules(self, rules: Iterable[Rule]) -> None:
        """Append rules after the existing ones."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Return ``{"total": n, "paths": {path: {count, open, max_concurrent}}}``."""
        raise NotImplementedError

    def respond(
        self,
        path: str,
        status: int = 200,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Respond to matching requests at once with ``status`` and a JSON body."""
        rule = Rule("respond", path, method, times, status, json, dict(headers or {}))
        self.add_rules([rule])

    def hold(
        self,
        path: str,
        seconds: float,
        then_status: int = 200,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Wait ``seconds`` before responding, ending early if either side closes."""
        rule = Rule(
            "hold", path, method, times, then_status, json, dict(headers or {}),
            seconds=seconds,
        )
        self.add_rules([rule])

    def drip(
        self,
        path: str,
        interval: float,
        total_seconds: float,
        status: int = 200,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Send headers at once, then one body byte every ``interval`` seconds."""
        rule = Rule(
            "drip", path, method, times, status,
            interval=interval, total_seconds=total_seconds,
        )
        self.add_rules([rule])

    def redirect(
        self,
        path: str,
        status: int,
        location: str,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Respond with a 3xx ``status`` and a Location header."""
        rule = Rule("redirect", path, method, times, status, location=location)
        self.add_rules([rule])

    def retry_after(
        self,
        path: str,
        status: int,
        value: str,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Respond 429 or 503 with ``Retry-After: value`` (seconds or an HTTP date)."""
        self.add_rules([Rule("retry_after", path, method, times, status, value=value)])

    def reset(
        self, path: str, method: str | None = None, times: int | None = None
    ) -> None:
        """Close the connection with a TCP reset instead of responding."""
        self.add_rules([Rule("reset", path, method, times)])

    def count(self, path: str) -> int:
        """Return how many requests for ``path`` were recorded."""
        return int(self.stats()["paths"].get(path, {}).get("count", 0))

    def open_count(self, path: str) -> int:
        """Return how many requests for ``path`` are being served right now."""
        return int(self.stats()["paths"].get(path, {}).get("open", 0))

    def max_concurrent(self, path: str) -> int:
        """Return the maximum number of requests for ``path`` served at once."""
        return int(self.stats()["paths"].get(path, {}).get("max_concurrent", 0))


# HTTP/1.1 wire handling on asyncio streams.
class _BadRequest(Exception):
    """The client sent bytes that are not a valid HTTP/1.x request."""


class _Connection:
    """Stream pair that can watch for the client closing without losing data."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.pending = bytearray()  # bytes read while watching for EOF, not yet parsed
        self._eof_watch: asyncio.Task[None] | None = None

    async def readline(self) -> bytes:
        newline = self.pending.find(b"\n")
        if newline >= 0:
            line = bytes(self.pending[: newline + 1])
            del self.pending[: newline + 1]
            return line
        head = bytes(self.pending)
        self.pending.clear()
        try:
            return head + await self.reader.readline()
        except ValueError as exc:  # the line is longer than the reader's limit
            raise _BadRequest(f"request line or header field too long: {exc}") from exc

    async def readexactly(self, size: int) -> bytes:
        head = bytes(self.pending[:size])
        del self.pending[:size]
        if len(head) < size:
            head += await self.reader.readexactly(size - len(head))
        return head

    async def _read_until_eof(self) -> None:
        while chunk := await self.reader.read(65536):
            self.pending += chunk

    async def sleep_unless_closed(self, seconds: float) -> bool:
        """Sleep ``seconds``, returning False early when the client closes."""
        if self._eof_watch is None:
            self._eof_watch = asyncio.ensure_future(self._read_until_eof())
        done, _ = await asyncio.wait({self._eof_watch}, timeout=seconds)
        return not done

    async def stop_watching(self) -> None:
        """Cancel the EOF watch and wait, so the reader is free for the next read."""
        watch, self._eof_watch = self._eof_watch, None
        if watch is None:
            return
        if not watch.done():
            watch.cancel()
            await asyncio.wait({watch})
        if not watch.cancelled():
            watch.exception()  # a reset counts as a close, so only retrieve it

    def abort_with_reset(self) -> None:
        """Close the socket with SO_LINGER 0 so the client receives a TCP RST."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            linger = struct.pack("ii", 1, 0)  # on, zero seconds
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        self.writer.transport.abort()


async def _read_request(
    conn: _Connection, connection_id: int
) -> tuple[RecordedRequest, bool] | None:
    """Read one request and return it with its keep-alive flag, or None at EOF."""
    line = await conn.readline()
    while line in (b"\r\n", b"\n"):  # RFC 9112 section 2.2 allows leading blank lines
        line = await conn.readline()
    if not line:
        return None

    started_at = time.monotonic()
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"invalid request line {line[:100]!r}")
    method, target, version = parts

    fields: list[tuple[str, str]] = []
    while True:
        raw = await conn.readline()
        if not raw:
            raise asyncio.IncompleteReadError(raw, None)
        if raw in (b"\r\n", b"\n"):
            break
        name, colon, value = raw.decode("latin-1").partition(":")
        if not colon or not name.strip() or len(fields) >= _MAX_HEADER_FIELDS:
            raise _BadRequest(f"invalid or excess header field {raw[:100]!r}")
        fields.append((name.strip(), value.strip()))
    headers = Headers(fields)
    body = await _read_body(conn, headers)

    url = urlsplit(target)
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection and (
        version == "HTTP/1.1" or "keep-alive" in connection
    )
    record = RecordedRequest(
        method=method,
        path=url.path or "/",
        query_string=url.query,
        headers=headers,
        body=body,
        started_at=started_at,
        connection=connection_id,
    )
    return record, keep_alive


async def _read_body(conn: _Connection, headers: Headers) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size_line = await conn.readline()
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError as exc:
                raise _BadRequest(
                    f"invalid chunk size line {size_line[:100]!r}"
                ) from exc
            if size == 0:
                break
            chunks.append(await conn.readexactly(size))
            await conn.readexactly(2)  # CRLF after the chunk data
        while (await conn.readline()) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields are ignored
        return b"".join(chunks)
    length = headers.get("content-length")
    if length is None:
        return b""
    if not length.isdigit():
        raise _BadRequest(f"invalid Content-Length {length!r}")
    return await conn.readexactly(int(length))


def _encode_head(
    status: int, headers: Mapping[str, str], length: int, keep_alive: bool
) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    merged = {"content-length": ("Content-Length", str(length))}
    if not keep_alive:
        merged["connection"] = ("Connection", "close")
    for name, value in headers.items():
        merged[name.lower()] = (name, value)
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in merged.values()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _default_payload(record: RecordedRequest) -> Any:
    """Build the body for requests that match no rule."""
    if record.path == "/jokes/random":
        category = record.query.get("category", [""])[0]
        text = random.choice(JOKE_TEMPLATES).format(topic=category or "plain")
        return {
            "id": uuid.uuid4().hex,
            "value": text,
            "categories": [category] if category else [],
        }
    try:
        parsed = json.loads(record.body) if record.body else None
    except ValueError:
        parsed = None
    return {
        "method": record.method,
        "path": record.path,
        "query": record.query,
        "json": parsed,
        "body": record.body.decode("utf-8", errors="replace"),
    }


# In-process server.
class Upstream(_Scripting):
    """In-process upstream server running an asyncio loop in a background thread."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._state = _State()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connection_ids = itertools.count(1)

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, timeout: float = 5.0) -> Upstream:
        """Start listening in a background thread and return self."""
        if self._thread is not None:
            raise RuntimeError("Upstream was already started; create a new instance")
        self._thread = threading.Thread(target=self._run, name="upstream", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"upstream server did not start within {timeout} s")
        if self._start_error is not None:
            raise RuntimeError(
                f"upstream server failed to listen on {HOST}:{self.port}"
            ) from self._start_error
        return self

    def close(self, timeout: float = 1.0) -> None:
        """Stop the server, aborting open connections, within ``timeout`` seconds."""
        self._state.close()
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning(
                "upstream server thread still running %.1f s after close", timeout
            )

    def add_rules(self, rules: Iterable[Rule]) -> None:
        """Append rules after the existing ones."""
        self._state.add_rules(rules)

    def clear(self) -> None:
        """Drop all rules and recorded requests, keeping the counts of open requests."""
        self._state.clear()

    def stats(self) -> dict[str, Any]:
        """Return ``{"total": n, "paths": {path: {count, open, max_concurrent}}}``."""
        return self._state.stats()

    def requests(
        self, path: str | None = None, method: str | None = None
    ) -> list[RecordedRequest]:
        """Return copies of the recorded requests, optionally filtered."""
        return self._state.snapshot(path, method)

    def wait_for(
        self, predicate: Callable[[RecordedRequest], bool], timeout: float = 5.0
    ) -> RecordedRequest:
        """Block until a recorded request satisfies ``predicate`` and return a copy.

        The predicate runs under the server lock after every arrival and state
        change, so it is evaluated as each request arrives, ends or is closed.
        """

        def check() -> RecordedRequest | None:
            for record in self._state.records:
                if predicate(record):
                    return dataclasses.replace(record)
            return None

        description = "a request matching the predicate"
        return self._state.wait_until(check, timeout, description)

    def wait_for_count(
        self, path: str, count: int, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Block until at least ``count`` requests for ``path`` have arrived."""

        def check() -> list[RecordedRequest] | None:
            found = self._state.snapshot(path)
            return found if len(found) >= count else None

        return self._state.wait_until(check, timeout, f"{count} request(s) to {path}")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except OSError as exc:
            self._start_error = exc
            self._started.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(
            self._serve_connection, HOST, self.port, backlog=1024
        )
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        logger.info("upstream server listening on %s", self.url)
        await self._stop.wait()
        server.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=0.5)
        await server.wait_closed()
        await asyncio.sleep(0)  # lets aborted transports run connection_lost
        logger.info("upstream server on %s stopped", self.url)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(reader, writer)
        connection_id = next(self._connection_ids)
        try:
            while await self._serve_request(conn, connection_id):
                pass
        except asyncio.CancelledError:
            # The server is closing. A task that ends cancelled makes the
            # start_server done-callback raise, so end normally instead.
            pass
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.debug("connection %d closed mid-request: %r", connection_id, exc)
        except _BadRequest as exc:
            logger.warning("rejected request on connection %d: %s", connection_id, exc)
            writer.write(_encode_head(400, {}, 0, keep_alive=False))
        finally:
            self._tasks.discard(task)
            await conn.stop_watching()
            if self._stop is not None and self._stop.is_set():
                writer.transport.abort()
            else:
                writer.close()

    async def _serve_request(self, conn: _Connection, connection_id: int) -> bool:
        """Serve one request and return whether to keep the connection open."""
        parsed = await _read_request(conn, connection_id)
        if parsed is None:
            return False
        record, keep_alive = parsed
        if record.path.startswith(CONTROL_PREFIX):
            status, payload = await self._control(record)
            await self._send(conn, record, status, payload, {}, keep_alive)
            return keep_alive
        rule = self._state.begin(record)
        try:
            return await self._apply(conn, record, rule, keep_alive)
        finally:
            self._state.finish(record)
            await conn.stop_watching()

    async def _apply(
        self,
        conn: _Connection,
        record: RecordedRequest,
        rule: Rule | None,
        keep_alive: bool,
    ) -> bool:
        if rule is None:
            payload = _default_payload(record)
            await self._send(conn, record, 200, payload, {}, keep_alive)
            return keep_alive
        if rule.kind == "reset":
            self._state.finish(record)
            conn.abort_with_reset()
            return False
        if rule.kind == "drip":
            return await self._drip(conn, record, rule, keep_alive)
        if rule.kind == "hold" and not await conn.sleep_unless_closed(rule.seconds):
            self._mark_client_closed(record)
            return False
        headers = dict(rule.headers)
        payload: Any = {} if rule.json is None else rule.json
        if rule.kind == "redirect":
            headers["Location"] = rule.location
            payload = None
        elif rule.kind == "retry_after":
            headers["Retry-After"] = rule.value
            payload = {"error": "upstream asks the client to retry later"}
        await self._send(conn, record, rule.status, payload, headers, keep_alive)
        return keep_alive

    def _mark_client_closed(self, record: RecordedRequest) -> None:
        self._state.finish(record, client_closed=True, closed_at=time.monotonic())

    async def _send(
        self,
        conn: _Connection,
        record: RecordedRequest,
        status: int,
        payload: Any,
        headers: Mapping[str, str],
        keep_alive: bool,
    ) -> None:
        body = b"" if payload is None else json.dumps(payload).encode("utf-8")
        if body:
            headers = {"Content-Type": "application/json", **headers}
        if record.method == "HEAD" or status in (204, 304):
            body = b""
        if not record.path.startswith(CONTROL_PREFIX):
            # Finish before writing, so a client holding the response sees it ended.
            self._state.finish(record, status=status)
        conn.writer.write(_encode_head(status, headers, len(body), keep_alive) + body)
        await conn.writer.drain()

    async def _drip(
        self, conn: _Connection, record: RecordedRequest, rule: Rule, keep_alive: bool
    ) -> bool:
        size = int(rule.total_seconds / rule.interval + 1e-9)
        headers = {"Content-Type": "application/octet-stream"}
        if size == 0:
            self._state.finish(record, status=rule.status)
        conn.writer.write(_encode_head(rule.status, headers, size, keep_alive))
        await conn.writer.drain()
        for sent in range(1, size + 1):
            if not await conn.sleep_unless_closed(rule.interval):
                self._mark_client_closed(record)
                return False
            if sent == size:
                self._state.finish(record, status=rule.status)
            conn.writer.write(b".")
            await conn.writer.drain()
        return keep_alive

    async def _control(self, record: RecordedRequest) -> tuple[int, Any]:
        """Run a /_control/ endpoint and return its status and JSON payload."""
        endpoint = (record.method, record.path[len(CONTROL_PREFIX) :])
        query = {name: values[0] for name, values in record.query.items()}
        try:
            if endpoint == ("POST", "rules"):
                data = json.loads(record.body or b"[]")
                items = [data] if isinstance(data, dict) else data
                rules = [Rule.from_dict(item) for item in items]
                self._state.add_rules(rules)
                return 200, {"added": len(rules)}
            if endpoint == ("POST", "reset"):
                self._state.clear()
                return 200, {"cleared": True}
            if endpoint == ("GET", "requests"):
                found = self._state.snapshot(query.get("path"), query.get("method"))
                return 200, {"requests": [r.to_dict() for r in found]}
            if endpoint == ("GET", "stats"):
                return 200, self._state.stats()
            if endpoint == ("GET", "wait"):
                return await self._control_wait(query)
        except (ValueError, TypeError, KeyError) as exc:
            return 400, {"error": f"invalid {record.method} {record.path}: {exc}"}
        return 404, {
            "error": f"unknown control endpoint {record.method} {record.path}; use "
            "POST rules, POST reset, GET requests, GET stats or GET wait"
        }

    async def _control_wait(self, query: Mapping[str, str]) -> tuple[int, Any]:
        path, count = query["path"], int(query.get("count", "1"))
        timeout = float(query.get("timeout", "5"))
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(
                None, self.wait_for_count, path, count, timeout
            )
        except TimeoutError as exc:
            return 504, {"error": str(exc)}
        return 200, {"requests": [r.to_dict() for r in found]}


# Subprocess mode: the client-side wrapper and the command-line entry point.
class UpstreamProcess(_Scripting):
    """Upstream server in a child process, scripted over its /_control/ endpoints."""

    def __init__(self, cwd: Path = _PROJECT_ROOT, ready_timeout: float = 10.0) -> None:
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> UpstreamProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> UpstreamProcess:
        """Start the child process and wait until it writes its URL."""
        self._tmpdir = tempfile.TemporaryDirectory(prefix="upstream-")
        ready_file = Path(self._tmpdir.name) / "url"
        command = [sys.executable, "-m", "tests.support.upstream", "--port", "0"]
        command += ["--ready-file", str(ready_file)]
        self._process = subprocess.Popen(command, cwd=self.cwd)
        deadline = time.monotonic() + self.ready_timeout
        # NOTE: polls because the ready file is the only signal the child gives.
        while not ready_file.exists():
            code = self._process.poll()
            if code is not None:
                self.close()
                raise RuntimeError(
                    f"upstream process exited with code {code} before writing "
                    f"{ready_file}; run {' '.join(command)} in {self.cwd} to see why"
                )
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(
                    f"upstream process wrote no {ready_file} within "
                    f"{self.ready_timeout} s; raise ready_timeout if the host is slow"
                )
            time.sleep(0.02)
        self.url = ready_file.read_text().strip()
        self._client = httpx.Client(base_url=self.url, timeout=10.0)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child with SIGTERM, killing it after ``timeout`` seconds."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("upstream process %d ignored SIGTERM", self._process.pid)
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    @property
    def returncode(self) -> int | None:
        """Exit status of the child, or None while it runs or before start."""
        return None if self._process is None else self._process.poll()

    def _call(
        self, method: str, endpoint: str, timeout: float = 10.0, **kwargs: Any
    ) -> Any:
        if self._client is None:
            raise RuntimeError("UpstreamProcess is not running; call start() first")
        response = self._client.request(
            method, CONTROL_PREFIX + endpoint, timeout=timeout, **kwargs
        )
        if response.status_code == 504:
            raise TimeoutError(response.json()["error"])
        if response.status_code != 200:
            raise RuntimeError(
                f"{method} {CONTROL_PREFIX}{endpoint} failed with "
                f"{response.status_code}: {response.text}"
            )
        return response.json()

    def add_rules(self, rules: Iterable[Rule]) -> None:
        """Append rules after the existing ones."""
        self._call("POST", "rules", json=[rule.to_dict() for rule in rules])

    def clear(self) -> None:
        """Drop all rules and recorded requests in the child."""
        self._call("POST", "reset")

    def stats(self) -> dict[str, Any]:
        """Return ``{"total": n, "paths": {path: {count, open, max_concurrent}}}``."""
        return dict(self._call("GET", "stats"))

    def requests(
        self, path: str | None = None, method: str | None = None
    ) -> list[RecordedRequest]:
        """Return the recorded requests, optionally filtered."""
        params = {}
        if path is not None:
            params["path"] = path
        if method is not None:
            params["method"] = method
        data = self._call("GET", "requests", params=params)
        return [RecordedRequest.from_dict(item) for item in data["requests"]]

    def wait_for_count(
        self, path: str, count: int, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Block until at least ``count`` requests for ``path`` have arrived."""
        params = {"path": path, "count": str(count), "timeout": str(timeout)}
        data = self._call("GET", "wait", timeout=timeout + 5.0, params=params)
        return [RecordedRequest.from_dict(item) for item in data["requests"]]


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        description=f"Run the scriptable upstream test server on {HOST}."
    )
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port to listen on; 0 picks a free one"
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="file that receives the server URL once the server is listening",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with Upstream(port=args.port) as upstream:
        if args.ready_file is not None:
            partial = args.ready_file.with_name(args.ready_file.name + ".partial")
            partial.write_text(upstream.url + "\n")
            os.replace(partial, args.ready_file)  # readers never see a partial URL
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
