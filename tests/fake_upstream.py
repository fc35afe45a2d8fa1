"""A fake OpenAI-compatible moderation API: a real HTTP server for tests and benchmarks.

`FakeUpstream` runs a stdlib `ThreadingHTTPServer` on 127.0.0.1 (an ephemeral port by default) in a daemon
thread and answers `POST /v1/moderations` and `POST /v1/moderate` in the exact OpenAI moderation response
shape. Scores are deterministic: every word of `TRIGGERS` found in a text (whole word, case-insensitive) sets
its categories to the listed scores, every other category of `CATEGORIES` scores `UNTRIGGERED_SCORE`, and a
category is flagged when its score is at least `FLAG_THRESHOLD`.

The test thread scripts misbehaviour while the server runs: `fail_next` (error statuses, optionally with
Retry-After), `malformed_next` (broken 200 answers), `hang_next` (slow answers, to trigger client timeouts) and
`latency`. `fault_rate` (0..1) makes that share of moderation calls fail at random, without a script: an even mix of
429 (with Retry-After), 500, 502, 503 and a hang of `fault_hang` seconds (longer than a client's timeout, so the
client times out); `faults` counts what it did. Optional `api_key`, `max_batch`, `rpm` and `tpm` make it enforce a
bearer key, a batch limit and a provider-style sliding 60-second rate limit. Every request is recorded in `requests`.

Scripted behaviours (`fail_next`, `malformed_next`, `hang_next`) share one FIFO queue: each request to a
moderation path takes the next scripted action, if any, in the order the calls made them.

Standalone, for manual testing and benchmarks:

    python -m tests.fake_upstream --port 8089 [--latency 0.05] [--rpm 60] [--tpm 100000] [--api-key KEY]
        [--fault-rate 0.3] [--fault-hang 5]

Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import random
import re
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Literal, cast

__all__ = [
    "CATEGORIES",
    "DEFAULT_MODEL",
    "FLAG_THRESHOLD",
    "MALFORMED_KINDS",
    "MODERATION_PATHS",
    "ONE_BAD_RESULT",
    "RANDOM_FAULTS",
    "TRIGGERS",
    "UNTRIGGERED_SCORE",
    "FakeUpstream",
    "RecordedRequest",
    "estimate_tokens",
    "main",
    "score_text",
]

CATEGORIES: Final[tuple[str, ...]] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)

# word (lower case) -> the category scores it sets. A text containing several trigger words gets, per
# category, the highest score any of them sets.
TRIGGERS: Final[dict[str, dict[str, float]]] = {
    "kill": {"violence": 0.97, "harassment/threatening": 0.9},
    "hate": {"hate": 0.92},
    "suicide": {"self-harm": 0.95, "self-harm/intent": 0.9},
    "bomb": {"illicit/violent": 0.93, "illicit": 0.9},
    "nude": {"sexual": 0.91},
    "idiot": {"harassment": 0.88},
    "gore": {"violence/graphic": 0.9},
    # The remaining categories, so every one of the 13 can be triggered.
    "exterminate": {"hate/threatening": 0.9, "hate": 0.8},
    "overdose": {"self-harm/instructions": 0.9, "self-harm": 0.7},
    "underage": {"sexual/minors": 0.95, "sexual": 0.8},
    # Mild: flagged (>= 0.5) but well under the block thresholds a policy would use: a "review" band.
    "stupid": {"harassment": 0.6},
}

UNTRIGGERED_SCORE: Final[float] = 0.0001
FLAG_THRESHOLD: Final[float] = 0.5
DEFAULT_MODEL: Final[str] = "omni-moderation-latest"
MODERATION_PATHS: Final[frozenset[str]] = frozenset({"/v1/moderations", "/v1/moderate"})
MALFORMED_KINDS: Final[frozenset[str]] = frozenset({"not_json", "wrong_shape", "short", "bad_scores"})
# Only the first result is broken (its scores are strings): the rest of the batch is usable.
ONE_BAD_RESULT: Final[str] = "one_bad_result"
WINDOW_SECONDS: Final[float] = 60.0
# The random faults of `fault_rate`, drawn with equal odds: an HTTP status, or "timeout" (a hang of `fault_hang`).
RANDOM_FAULTS: Final[tuple[int | str, ...]] = (429, 500, 502, 503, "timeout")
_DESCRIPTION: Final[str] = "A fake OpenAI-compatible moderation API, for tests and benchmarks."

_WORD_RE: Final[re.Pattern[str]] = re.compile(r"[a-z0-9]+")
_HTML_GARBAGE: Final[bytes] = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)
_ERROR_TYPES: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    408: ("server_error", "timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


def score_text(text: str) -> dict[str, float]:
    """The deterministic category scores of one text: all 13 categories, in `CATEGORIES` order."""
    scores = dict.fromkeys(CATEGORIES, UNTRIGGERED_SCORE)
    for word in set(_WORD_RE.findall(text.lower())):
        for category, score in TRIGGERS.get(word, {}).items():
            scores[category] = max(scores[category], score)
    return scores


def estimate_tokens(texts: Sequence[str]) -> int:
    """Estimated tokens of a request: ceil(len(text) / 4), summed over the texts."""
    return sum(math.ceil(len(text) / 4) for text in texts)


def _moderation_result(text: str) -> dict[str, Any]:
    scores = score_text(text)
    categories = {category: score >= FLAG_THRESHOLD for category, score in scores.items()}
    return {
        "flagged": any(categories.values()),
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": {category: ["text"] for category in CATEGORIES},
    }


def _error_body(
    status: int, message: str, *, type_: str | None = None, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    default_type, default_code = _ERROR_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", f"http_{status}")
    )
    return {
        "error": {
            "message": message,
            "type": type_ or default_type,
            "param": param,
            "code": code or default_code,
        }
    }


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}"


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received, recorded before it was answered."""

    method: str
    path: str  # without the query string
    headers: dict[str, str]  # lower-case names; the last value wins when a header is repeated
    json: Any | None  # the parsed JSON body, or None when the body is empty or not JSON
    received_at: float  # time.monotonic() when the request line and body had been read
    body: bytes = b""
    query: str = ""


@dataclass(frozen=True)
class _Fail:
    status: int
    retry_after: float | None
    body: str | None


@dataclass(frozen=True)
class _Malformed:
    kind: str


@dataclass(frozen=True)
class _Hang:
    seconds: float
    then_fail: int | None = None  # answer this status after the hang instead of a normal answer


_Action = _Fail | _Malformed | _Hang


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), headers=dict(headers or {}))


def _error_reply(
    status: int,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> _Reply:
    return _json_reply(status, _error_body(status, message, type_=type_, code=code, param=param), headers)


class _BadRequestBody(Exception):
    pass


class _Stopping(Exception):
    """The server is stopping while a handler waits: drop the connection without an answer."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # server_close() joins the handler threads; stop() first shuts their sockets down so none of them lingers.
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() resolves the host's FQDN, which can stall on a machine with slow DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open client connection, so idle keep-alive handler threads finish."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout, closed connection) is expected here, not an error worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeUpstream/1.0"
    # The headers and the body leave in two writes: with Nagle's algorithm on, the body waits for the client's
    # delayed ACK of the headers (about 40 ms on Linux), which a real provider does not add to every answer.
    disable_nagle_algorithm = True
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests must not get a line on stderr per request."""

    @property
    def upstream(self) -> FakeUpstream:
        return cast(_Server, self.server).upstream

    def do_POST(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size_line = self.rfile.readline(65537)
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError as exc:
                    raise _BadRequestBody("malformed chunked body") from exc
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError as exc:
            raise _BadRequestBody("invalid Content-Length") from exc
        if length < 0:
            raise _BadRequestBody("invalid Content-Length")
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        request_id = f"req_{uuid.uuid4().hex}"
        path, _, query = self.path.partition("?")
        try:
            body = self._read_body()
        except _BadRequestBody as exc:
            self.close_connection = True
            self._send(_error_reply(400, str(exc)), request_id)
            return
        try:
            parsed: Any | None = json.loads(body) if body else None
        except ValueError:
            parsed = None
        recorded = RecordedRequest(
            method=self.command,
            path=path,
            headers={name.lower(): value for name, value in self.headers.items()},
            json=parsed,
            received_at=time.monotonic(),
            body=body,
            query=query,
        )
        upstream = self.upstream
        upstream._record(recorded)
        try:
            reply = upstream._handle(recorded)
        except _Stopping:
            self.close_connection = True
            return
        except Exception:  # a bug in the fake itself: answer 500 and show it, rather than drop the connection
            traceback.print_exc()
            reply = _error_reply(500, "fake upstream internal error")
        self._send(reply, request_id)

    def _send(self, reply: _Reply, request_id: str) -> None:
        headers = {"X-Request-ID": request_id, **self.upstream._rate_limit_headers(), **reply.headers}
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in headers.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply.body)
            self.wfile.flush()
        except (ConnectionError, TimeoutError):
            self.close_connection = True


class FakeUpstream:
    """A real OpenAI-compatible moderation server on a local port, scriptable from the test thread."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        latency: float = 0.0,
        rpm: int | None = None,
        tpm: int | None = None,
        max_batch: int | None = None,
        window: float = WINDOW_SECONDS,
        host: str = "127.0.0.1",
        port: int = 0,
        fault_rate: float = 0.0,
        fault_hang: float = 5.0,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError("fault_rate must be between 0 and 1")
        if fault_hang < 0 or not math.isfinite(fault_hang):
            raise ValueError("fault_hang must be a finite number of seconds, at least 0")
        # Random faults (the chaos run's flaky provider): plain attributes, read once per request.
        self.fault_rate = float(fault_rate)
        self.fault_hang = float(fault_hang)
        self._random = random.Random(seed)  # noqa: S311 - a test double's dice, not cryptography
        self._faults: collections.Counter[str] = collections.Counter()
        if rpm is not None and rpm < 1:
            raise ValueError("rpm must be at least 1")
        if tpm is not None and tpm < 1:
            raise ValueError("tpm must be at least 1")
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not window > 0:
            raise ValueError("window must be a positive number of seconds")
        # The rate-limit window: a provider's minute, shorter in tests that must see it roll over.
        self.window = float(window)
        # Configuration: plain attributes, safe to change while the server runs (read once per request).
        self.api_key = api_key
        self.rpm = rpm
        self.tpm = tpm
        self.max_batch = max_batch
        self.host = host
        self._requested_port = port
        self._lock = threading.Lock()
        self._latency = 0.0
        self.latency = latency
        self._script: collections.deque[_Action] = collections.deque()
        self._requests: list[RecordedRequest] = []
        self._texts: list[str] = []
        self._generation = 0  # counts reset() calls
        self._request_window: collections.deque[float] = collections.deque()
        self._token_window: collections.deque[tuple[float, int]] = collections.deque()
        self._rejected_429 = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        """Bind the socket and serve in a daemon thread. Returns self."""
        if self._server is not None:
            raise RuntimeError("FakeUpstream is already running")
        self._stopping.clear()
        server = _Server((self.host, self._requested_port), self)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-upstream", daemon=True
        )
        self._server = server
        self._thread = thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: wake sleeping handlers, close every connection and the socket, join the threads."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeUpstream is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The server root, e.g. "http://127.0.0.1:54321"."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as base URL, e.g. "http://127.0.0.1:54321/v1"."""
        return f"{self.url}/v1"

    # -- controls --------------------------------------------------------------------------------------------

    @property
    def latency(self) -> float:
        """Seconds every moderation request waits before it is answered."""
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError("latency must be a finite number of seconds, at least 0")
        with self._lock:
            self._latency = float(seconds)

    def fail_next(
        self, status: int, count: int = 1, *, retry_after: float | None = None, body: str | None = None
    ) -> None:
        """The next `count` moderation requests answer `status` with an OpenAI-style error (or the raw
        `body`), with a Retry-After header when `retry_after` is given."""
        if not 100 <= status <= 599:
            raise ValueError(f"not an HTTP status: {status}")
        if retry_after is not None and (retry_after < 0 or not math.isfinite(retry_after)):
            raise ValueError("retry_after must be a finite number of seconds, at least 0")
        self._enqueue(_Fail(status, retry_after, body), count)

    def malformed_next(self, kind: str, count: int = 1) -> None:
        """The next `count` moderation requests that would succeed get a broken 200 answer instead.

        kinds: "not_json" (text/html garbage), "wrong_shape" (JSON without "results"), "short" (one result
        fewer than inputs), "bad_scores" (scores are strings), and ONE_BAD_RESULT (only the first result's
        scores are strings).
        """
        if kind not in MALFORMED_KINDS | {ONE_BAD_RESULT}:
            raise ValueError(f"unknown malformed kind {kind!r}; expected one of {sorted(MALFORMED_KINDS)}")
        self._enqueue(_Malformed(kind), count)

    def hang_next(self, seconds: float, count: int = 1) -> None:
        """The next `count` moderation requests wait `seconds` (on top of `latency`) before being answered."""
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError("seconds must be a finite number, at least 0")
        self._enqueue(_Hang(float(seconds)), count)

    def reset(self) -> None:
        """Forget scripted behaviour, latency, the request log, the texts seen, the rate-limit windows and
        `rejected_429`. Configuration (api_key, rpm, tpm, max_batch) is kept."""
        with self._lock:
            self._generation += 1
            self._script.clear()
            self._latency = 0.0
            self._requests.clear()
            self._texts.clear()
            self._request_window.clear()
            self._token_window.clear()
            self._rejected_429 = 0
            self._faults.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received (any path), in arrival order. A snapshot: a new list on each access."""
        with self._lock:
            return list(self._requests)

    @property
    def faults(self) -> dict[str, int]:
        """How many random faults (`fault_rate`) of each kind were served: "429", "500", "502", "503", "timeout"."""
        with self._lock:
            return dict(self._faults)

    @property
    def rejected_429(self) -> int:
        """How many requests the rpm/tpm limit refused with 429 (scripted 429s are not counted)."""
        with self._lock:
            return self._rejected_429

    def texts_seen(self) -> list[str]:
        """Every input text of the moderation requests answered a well-formed 200, flattened, in order."""
        with self._lock:
            return list(self._texts)

    # -- internals (called from handler threads) -------------------------------------------------------------

    def _enqueue(self, action: _Action, count: int) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._script.extend([action] * count)

    def _random_fault(self) -> _Action:
        """One fault of RANDOM_FAULTS (the lock is held). A timeout hangs and then answers 504, should the client
        still be waiting."""
        fault = self._random.choice(RANDOM_FAULTS)
        self._faults[str(fault)] += 1
        if fault == "timeout":
            return _Hang(self.fault_hang, then_fail=504)
        return _Fail(int(fault), 1.0 if fault == 429 else None, None)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _sleep(self, seconds: float) -> None:
        # Interruptible, so stop() never waits for a scripted hang to run out.
        if seconds > 0 and self._stopping.wait(seconds):
            raise _Stopping

    def _handle(self, request: RecordedRequest) -> _Reply:
        if request.path not in MODERATION_PATHS:
            return _error_reply(404, f"Unknown URL: {request.method} {request.path}", code="unknown_url")
        if request.method != "POST":
            return _error_reply(
                405,
                f"Method {request.method} not allowed on {request.path}; use POST",
                code="method_not_allowed",
                headers={"Allow": "POST"},
            )

        with self._lock:
            action = self._script.popleft() if self._script else None
            if action is None and self.fault_rate > 0 and self._random.random() < self.fault_rate:
                action = self._random_fault()
            latency = self._latency
            generation = self._generation
        self._sleep(latency)
        if isinstance(action, _Hang):
            self._sleep(action.seconds)
            if action.then_fail is not None:
                return _error_reply(action.then_fail, "Timed out.")
        if isinstance(action, _Fail):
            return self._scripted_failure(action)

        api_key = self.api_key
        if api_key is not None:
            authorization = request.headers.get("authorization", "")
            if authorization != f"Bearer {api_key}":
                message = (
                    "You didn't provide an API key." if not authorization else "Incorrect API key provided."
                )
                return _error_reply(401, message, code="invalid_api_key")

        payload = request.json
        if not isinstance(payload, dict):
            return _error_reply(400, "The request body must be a JSON object.", code="invalid_json")
        model = payload.get("model", DEFAULT_MODEL)
        if model is None:
            model = DEFAULT_MODEL
        if not isinstance(model, str):
            return _error_reply(400, "'model' must be a string.", param="model", code="invalid_type")
        if "input" not in payload:
            return _error_reply(
                400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
            )
        raw_input = payload["input"]
        if isinstance(raw_input, str):
            texts = [raw_input]
        elif isinstance(raw_input, list) and raw_input and all(isinstance(item, str) for item in raw_input):
            texts = cast(list[str], raw_input)
        else:
            return _error_reply(
                400,
                "'input' must be a string or a non-empty array of strings.",
                param="input",
                code="invalid_type",
            )
        max_batch = self.max_batch
        if max_batch is not None and len(texts) > max_batch:
            return _error_reply(
                400,
                f"Too many inputs: {len(texts)}; at most {max_batch} per request.",
                param="input",
                code="batch_too_large",
            )

        tokens = estimate_tokens(texts)
        limited = self._admit(tokens)
        if limited is not None:
            return limited

        results = [_moderation_result(text) for text in texts]
        response: dict[str, Any] = {
            "id": f"modr-{uuid.uuid4().hex}",
            "model": model,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        if isinstance(action, _Malformed):
            return self._malformed(action.kind, response)
        with self._lock:
            # A request that outlived a reset() (a hang its client gave up on) belongs to the test before it.
            if generation == self._generation:
                self._texts.extend(texts)
        return _json_reply(200, response)

    def _scripted_failure(self, action: _Fail) -> _Reply:
        headers: dict[str, str] = {}
        if action.retry_after is not None:
            headers["Retry-After"] = _format_seconds(action.retry_after)
        if action.body is not None:
            try:
                json.loads(action.body)
                content_type = "application/json"
            except ValueError:
                content_type = "text/plain; charset=utf-8"
            return _Reply(action.status, action.body.encode(), content_type, headers)
        return _error_reply(action.status, f"Scripted failure: HTTP {action.status}.", headers=headers)

    @staticmethod
    def _malformed(kind: str, response: dict[str, Any]) -> _Reply:
        if kind == "not_json":
            return _Reply(200, _HTML_GARBAGE, "text/html; charset=utf-8")
        if kind == "wrong_shape":
            shaped = {key: value for key, value in response.items() if key != "results"}
            shaped["data"] = response["results"]
            return _json_reply(200, shaped)
        if kind == "short":
            return _json_reply(200, {**response, "results": response["results"][:-1]})
        if kind == ONE_BAD_RESULT:
            first, *rest = response["results"]
            spoiled = {**first, "category_scores": {c: str(s) for c, s in first["category_scores"].items()}}
            return _json_reply(200, {**response, "results": [spoiled, *rest]})
        # "bad_scores"
        results = [
            {**result, "category_scores": {c: str(s) for c, s in result["category_scores"].items()}}
            for result in response["results"]
        ]
        return _json_reply(200, {**response, "results": results})

    def _purge_windows(self, now: float) -> None:
        horizon = now - self.window
        while self._request_window and self._request_window[0] <= horizon:
            self._request_window.popleft()
        while self._token_window and self._token_window[0][0] <= horizon:
            self._token_window.popleft()

    def _admit(self, tokens: int) -> _Reply | None:
        """Count the request against rpm/tpm; None when admitted, else the 429 to answer."""
        rpm, tpm = self.rpm, self.tpm
        with self._lock:
            now = time.monotonic()
            self._purge_windows(now)
            if rpm is not None and len(self._request_window) >= rpm:
                # Wait until enough of the oldest requests have left the window for one more to fit.
                leaving = self._request_window[len(self._request_window) - rpm]
                wait = leaving + self.window - now
                kind: Literal["requests", "tokens"] = "requests"
                detail = f"Limit {rpm}, Used {len(self._request_window)}, Requested 1."
            elif tpm is not None and sum(n for _, n in self._token_window) + tokens > tpm:
                kind = "tokens"
                used = sum(n for _, n in self._token_window)
                detail = f"Limit {tpm}, Used {used}, Requested {tokens}."
                if tokens > tpm:
                    wait = self.window  # can never fit; the provider still says 429
                else:
                    freed, wait = 0, 0.0
                    for at, n in self._token_window:
                        freed += n
                        wait = at + self.window - now
                        if used - freed + tokens <= tpm:
                            break
            else:
                self._request_window.append(now)
                self._token_window.append((now, tokens))
                return None
            self._rejected_429 += 1
        retry_after = max(1, math.ceil(wait))
        unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        return _error_reply(
            429,
            f"Rate limit reached on {unit}: {detail} Please try again in {retry_after}s.",
            headers={"Retry-After": str(retry_after)},
            type_=kind,
            code="rate_limit_exceeded",
        )

    def _rate_limit_headers(self) -> dict[str, str]:
        rpm, tpm = self.rpm, self.tpm
        if rpm is None and tpm is None:
            return {}
        with self._lock:
            self._purge_windows(time.monotonic())
            used_requests = len(self._request_window)
            used_tokens = sum(n for _, n in self._token_window)
        headers: dict[str, str] = {}
        if rpm is not None:
            headers["X-RateLimit-Limit-Requests"] = str(rpm)
            headers["X-RateLimit-Remaining-Requests"] = str(max(0, rpm - used_requests))
        if tpm is not None:
            headers["X-RateLimit-Limit-Tokens"] = str(tpm)
            headers["X-RateLimit-Remaining-Tokens"] = str(max(0, tpm - used_tokens))
        return headers


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until Ctrl-C (SIGINT)."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_upstream", description=_DESCRIPTION)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port (default: 8089)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--rpm", type=int, default=None, help="requests per 60-second window")
    parser.add_argument("--tpm", type=int, default=None, help="estimated tokens per 60-second window")
    parser.add_argument("--max-batch", type=int, default=None, help="most inputs per request")
    parser.add_argument("--window", type=float, default=WINDOW_SECONDS, help="rate-limit window in seconds")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of calls that fail at random (0..1)")
    parser.add_argument("--fault-hang", type=float, default=5.0, help="seconds a random timeout fault hangs")
    args = parser.parse_args(argv)
    upstream = FakeUpstream(
        api_key=args.api_key,
        latency=args.latency,
        rpm=args.rpm,
        tpm=args.tpm,
        max_batch=args.max_batch,
        window=args.window,
        host=args.host,
        port=args.port,
        fault_rate=args.fault_rate,
        fault_hang=args.fault_hang,
    )
    with upstream:
        print(f"fake upstream serving on {upstream.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        # What a benchmark running the fake in a process of its own reads back (the counts are the same as the
        # in-process `requests` and `rejected_429`).
        print(f"fake upstream stopped: requests={len(upstream.requests)} rejected_429={upstream.rejected_429}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
