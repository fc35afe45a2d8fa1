"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records what it gets and answers as told.

`WebhookReceiver` runs a stdlib `ThreadingHTTPServer` in a daemon thread. Every request is recorded (`requests`)
before it is answered. The test thread scripts the answers: `status` (default 200), `script(...)` for the next
answers in order, `hold_next()` to keep the next request in flight until `release()` (then it is answered as usual;
used to kill a worker mid-delivery), and `stop()` / `start()` to take the receiver down and bring it back on the
same port.

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    received_at: float = 0.0  # time.time() when the request was read (the benchmark's webhook latency)
    peer: tuple[str, int] | None = None  # the sender's address and port: one per connection it opened

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() looks up the host's FQDN, which can stall on a machine with slow DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A sender that gave up (timeout, killed worker) is expected here, not an error worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # As in tests/fake_upstream.py: without it each answer waits ~40 ms for the sender's delayed ACK (Nagle).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Silent."""

    def do_POST(self) -> None:
        receiver = cast(_Server, self.server).receiver
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = ReceivedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                  time.time(), (str(self.client_address[0]), int(self.client_address[1])))
        answer = receiver._take(request)
        if answer is None:  # held, then the receiver stopped: drop the connection without an answer
            self.close_connection = True
            return
        try:
            self.send_response(answer.status)
            self.send_header("Content-Length", str(len(answer.body)))
            for name, value in answer.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:
            self.close_connection = True


class WebhookReceiver:
    """A real HTTP webhook receiver on a local port, scriptable from the test thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.status = 200
        self.requests: list[ReceivedRequest] = []
        self._script: deque[Answer] = deque()
        self._hold = False
        self._released = threading.Event()
        self._changed = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> WebhookReceiver:
        """Listen (again, on the same port once it has one)."""
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), self)
        self.port = server.server_port
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until `start()`."""
        with self._changed:
            server, self._server = self._server, None
        self._released.set()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    # ---- scripting ---------------------------------------------------------------------------------------------

    def script(self, *answers: Answer | int) -> None:
        """The next answers, in order (a bare int is a status with an empty body); then `status` again."""
        with self._changed:
            self._script.extend(a if isinstance(a, Answer) else Answer(a) for a in answers)

    def hold_next(self) -> None:
        """Keep the next request waiting until `release()` (then answer it) or `stop()` (then drop it)."""
        with self._changed:
            self._hold = True
            self._released.clear()

    def release(self) -> None:
        self._released.set()

    def _take(self, request: ReceivedRequest) -> Answer | None:
        with self._changed:
            self.requests.append(request)
            hold, self._hold = self._hold, False
            self._changed.notify_all()
        if hold:
            self._released.wait(timeout=120)
        with self._changed:
            if self._server is None:
                return None  # stopped while holding: drop the connection unanswered
            return self._script.popleft() if self._script else Answer(self.status)

    # ---- waiting -----------------------------------------------------------------------------------------------

    def wait_for(self, count: int, timeout: float = 60) -> list[ReceivedRequest]:
        """Wait until at least `count` requests arrived; all of them so far."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"receiver got {len(self.requests)} requests, expected {count}")
                self._changed.wait(timeout=left)
            return list(self.requests)

    def is_down(self) -> bool:
        """True when nothing listens on the port (the receiver is really down)."""
        with contextlib.closing(socket.socket()) as probe:
            probe.settimeout(1)
            return probe.connect_ex((self.host, self.port)) != 0
