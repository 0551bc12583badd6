"""A small upstream API on loopback for the local setup, so jobs have something to call.

`make run` starts it as the `demo_api` program when API_BASE_URL is not set, on the
default API_BASE_URL (http://127.0.0.1:8001). `GET /jokes/random` returns a joke in
the shape of the api.chucknorris.io response. Two paths let you watch failures and long
jobs from the panel: `/status/CODE` answers with that HTTP status (for example
`/status/404` fails a `call_api` job at once, `/status/503` makes it retry), and
`/slow/SECONDS` echoes the request after that many seconds (at most 600). Any other
path echoes the request as JSON.
"""

from __future__ import annotations

import json
import random
import re
import signal
import sys
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JOKES = (
    "The queue never loses a job; it only postpones it.",
    "A worker once finished a job before it was deferred. It was retried anyway.",
    "Exponential backoff waited so long that the outage apologised.",
    "The scheduler does not sleep; it waits for the next tick.",
    "Idempotency keys exist because the second request always comes.",
)
STATUS_PATH = re.compile(r"/status/([1-5][0-9][0-9])")
SLOW_PATH = re.compile(r"/slow/([0-9]+(?:\.[0-9]+)?)")
MAX_SLOW_SECONDS = 600.0
TRICKLE_INTERVAL = 1.0  # seconds between two spaces of a slow response


class DemoHandler(BaseHTTPRequestHandler):
    """Return a joke for /jokes/random and echo every other request."""

    server_version = "demo-api"

    def _send(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if parts.path == "/jokes/random":
            category = urllib.parse.parse_qs(parts.query).get("category", [None])[0]
            self._send(200, {
                "id": uuid.uuid4().hex,
                "value": random.choice(JOKES),
                "categories": [category] if category else [],
            })
            return
        status = STATUS_PATH.fullmatch(parts.path)
        if status:
            code = int(status.group(1))
            self._send(code, {"status": code, "path": parts.path})
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        echo = {"method": self.command, "path": parts.path, "query": parts.query,
                "json": body}
        slow = SLOW_PATH.fullmatch(parts.path)
        if slow:
            self._send_slowly(echo, min(float(slow.group(1)), MAX_SLOW_SECONDS))
            return
        self._send(200, echo)

    def _send_slowly(self, payload: object, seconds: float) -> None:
        """Send the headers now and ``payload`` after ``seconds``.

        A space goes out every TRICKLE_INTERVAL seconds meanwhile (JSON allows
        leading whitespace), so a client's read timeout, HTTP_TIMEOUT for the
        workers, does not end the request before the job timeout does.
        """
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(TRICKLE_INTERVAL, remaining))
            self.wfile.write(b" ")
            self.wfile.flush()
        self.wfile.write(json.dumps(payload).encode())
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write("demo_api: " + (format % args) + "\n")
        sys.stdout.flush()


def main() -> None:
    """Serve on the host and port of the URL given as the first argument."""
    url = urllib.parse.urlsplit(sys.argv[1])
    server = ThreadingHTTPServer((url.hostname or "127.0.0.1", url.port or 80),
                                 DemoHandler)
    server.daemon_threads = True
    # supervisord stops the program with SIGTERM; exit 0 so that it counts as a
    # clean stop rather than a kill.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"demo_api: listening on {sys.argv[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
