"""What the real HTTP server answers before and around Flask (issue 17, items 4 and 5), against `verdict api`
(gunicorn) over raw sockets and http.client, since a client library would refuse to send most of these requests:

- a body over MAX_REQUEST_BYTES is refused with 413 and the JSON envelope whether or not it says its length
  (chunked), and is never cut to the limit and accepted;
- gunicorn's own errors (a request line too long, CR/LF/NUL in a header, a malformed request) are the JSON envelope
  too, and no answer says `Server: gunicorn`.
"""

from __future__ import annotations

import http.client
import json
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from app.db import Database
from tests.conftest import TenantKey, issue_key
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import openai_worker_env, worker_env
from tests.integration.processes import ApiProcess
from tests.lanes import integration_fixture

MIB = 1024 * 1024  # MAX_REQUEST_BYTES' default


@integration_fixture(scope="module")
def server(database_url: str, redis_url: str, fake_upstream_module: FakeUpstream,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    env = worker_env(database_url, redis_url, **openai_worker_env(fake_upstream_module))
    process = ApiProcess(env, tmp_path_factory.mktemp("http-server") / "api.log")
    yield process
    process.kill()


@integration_fixture(scope="module")
def fake_upstream_module() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key="sk-upstream-test") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def key(database: Database) -> TenantKey:
    return issue_key(database)


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def post_chunked(server: ApiProcess, key: TenantKey, data: bytes,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """POST /v1/submissions with a chunked body (no Content-Length), as http.client sends an iterable."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("POST", "/v1/submissions", body=chunks(data), encode_chunked=True,
                           headers={"Authorization": f"Bearer {key.plaintext}", "Content-Type": "application/json",
                                    "Transfer-Encoding": "chunked", **(headers or {})})
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(body)
    finally:
        connection.close()


def padded_object(size: int) -> bytes:
    """A valid JSON submission of exactly `size` bytes (padded with spaces)."""
    head = b'{"input": "a body of no stated length"}'
    return head + b" " * (size - len(head))


def assert_too_large(status: int, body: Any) -> None:
    assert status == 413, body
    assert body["error"]["type"] == "request_too_large" and body["error"]["code"] == "request_too_large", body


def test_a_chunked_body_whose_first_mib_is_valid_json_is_refused_not_cut(server: ApiProcess,
                                                                         key: TenantKey) -> None:
    # Before the fix: 202, the first MiB taken as the whole body and the other 4 MB dropped without a word.
    status, _, body = post_chunked(server, key, padded_object(MIB) + b"x" * (4 * MIB))
    assert_too_large(status, body)


def test_a_chunked_body_past_the_limit_is_413_not_a_json_error(server: ApiProcess, key: TenantKey) -> None:
    # Before the fix: 400 invalid_json "at column 1048577": the parser saw the body cut at the limit.
    text = b"a" * (1_300_000)
    status, _, body = post_chunked(server, key, b'{"input": "' + text + b'"}')
    assert_too_large(status, body)


def test_a_chunked_body_one_byte_over_is_refused_and_one_of_exactly_the_limit_is_read_whole(
        server: ApiProcess, key: TenantKey) -> None:
    status, _, body = post_chunked(server, key, padded_object(MIB + 1))
    assert_too_large(status, body)
    status, _, body = post_chunked(server, key, padded_object(MIB))
    assert status == 202 and body["status"] == "queued", body


def test_an_over_limit_chunked_body_with_an_idempotency_key_is_refused_and_not_kept(server: ApiProcess,
                                                                                     key: TenantKey) -> None:
    # The idempotency fingerprint reads the body before the view: it must not read a cut one either.
    idempotency = {"Idempotency-Key": str(uuid.uuid4())}
    status, _, body = post_chunked(server, key, padded_object(MIB) + b"x" * MIB, idempotency)
    assert_too_large(status, body)
    status, headers, body = post_chunked(server, key, padded_object(1000), idempotency)
    assert status == 202 and "idempotent-replayed" not in headers, body


def test_a_body_over_the_limit_with_its_length_is_413(server: ApiProcess, key: TenantKey) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("POST", "/v1/submissions", body=padded_object(MIB + 300_000),
                           headers={"Authorization": f"Bearer {key.plaintext}", "Content-Type": "application/json"})
        response = connection.getresponse()
        assert_too_large(response.status, json.loads(response.read()))
    finally:
        connection.close()


# ---- item 5: the server's own answers ---------------------------------------------------------------------------


def raw_request(server: ApiProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as it is and read the answer until the server closes or the length is read."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:length]


def assert_envelope(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, body
    assert headers.get("content-type", "").startswith("application/json"), (headers, body)
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"type", "message", "param", "code"} and error["message"], error
    assert "gunicorn" not in headers.get("server", "").lower(), headers
    return error


HOSTILE_HEADERS = {
    "cr": b"X-Test: a\rb\r\n",
    "nul": b"X-Test: a\x00b\r\n",
    "lf-inside-a-name": b"X-Te\nst: a\r\n",
    "space-before-colon": b"X-Test : a\r\n",
    "no-colon": b"X-Test\r\n",
}


@pytest.mark.parametrize("header", HOSTILE_HEADERS.values(), ids=HOSTILE_HEADERS.keys())
def test_a_malformed_header_is_a_json_400(server: ApiProcess, header: bytes) -> None:
    status, headers, body = raw_request(
        server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + header + b"Connection: close\r\n\r\n")
    error = assert_envelope(status, headers, body, 400)
    assert error["type"] == "invalid_request_error"


def test_a_long_path_reaches_the_api_and_a_longer_request_line_is_a_json_414(server: ApiProcess) -> None:
    # 3,000 characters (gunicorn's HTML 414 before): Flask sees it, and it is simply an unknown route.
    status, headers, body = raw_request(
        server, b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert assert_envelope(status, headers, body, 404)["code"] == "unknown_route"
    # Past the server's longest request line, the server answers itself, in the same shape.
    status, headers, body = raw_request(
        server, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert assert_envelope(status, headers, body, 414)["code"] == "uri_too_long"


@pytest.mark.parametrize("request_line", [b"NOT A REQUEST\r\n", b"GET / HTTP/9.9\r\n", b"G\x00T / HTTP/1.1\r\n"],
                         ids=["garbage", "bad-version", "nul-in-method"])
def test_a_malformed_request_line_is_a_json_400(server: ApiProcess, request_line: bytes) -> None:
    status, headers, body = raw_request(server, request_line + b"Host: x\r\nConnection: close\r\n\r\n")
    assert_envelope(status, headers, body, 400)


def test_no_answer_names_gunicorn(server: ApiProcess, key: TenantKey) -> None:
    for request in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b"GET /v1/submissions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
        status, headers, _ = raw_request(server, request)
        assert status in (200, 401, 404)
        assert headers.get("server") == "verdict", headers
