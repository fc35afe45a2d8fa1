"""One HTTP attempt of a webhook delivery, sent to the addresses the SSRF guard checked (no re-resolving, no redirects,
no proxies), keeping a short excerpt of the answer. See docs/webhooks.md."""

from __future__ import annotations

import functools
import os
import ssl
import threading
import time
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote, urlsplit

import httpx
import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from app.webhooks.url_guard import DEFAULT_PORTS, Network, Resolver, UnsafeUrl, check_url, system_resolver

EXCERPT_CHARS = 256
_EXCERPT_READ_BYTES = 4 * EXCERPT_CHARS
USER_AGENT = "Verdict-Webhooks/1"
# What a path keeps as it is when the rest of it is percent-encoded (as httpx did).
_PATH_SAFE = "/?&=%:@!$'()*+,;~-._[]"


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The TLS settings of every attempt (httpx's defaults: the certifi CAs, verified), built once per process:
    loading the CA bundle costs tens of milliseconds of CPU, which a new client per attempt paid every time."""
    return httpx.create_ssl_context(trust_env=False)


# Receivers whose keep-alive connections a process keeps (the least recently used name is forgotten past it).
_CLIENTS_KEPT = 64
# (scheme, name) -> (checked address, port) -> its connections.
_clients: dict[tuple[str, str], dict[tuple[str, int], urllib3.HTTPConnectionPool]] = {}
_clients_lock = threading.Lock()
# A forked process must not share its parent's sockets: it opens its own.
os.register_at_fork(after_in_child=_clients.clear)


def _pool(scheme: str, server_name: str, address: str, port: int) -> urllib3.HTTPConnectionPool:
    """This process's connections for one receiver name to one checked address: kept alive and reused by the next
    attempts to the same name (a new connection for every attempt cost both sides a TCP handshake and the receiver
    often a thread). Never shared across names: a TLS connection stays with the name its certificate was verified for
    (SNI and the host name check are that name, whatever address the socket goes to). urllib3 (not httpx, the rest of
    the stack's client) for this one hot path: about half the CPU per attempt (docs/webhooks.md, "Delivery"). It
    reads no proxy from the environment and follows no redirect (`urlopen` is told so); no retries."""
    key = (scheme, server_name)
    with _clients_lock:
        pools = _clients.pop(key, None)
        if pools is None:
            pools = {}
            if len(_clients) >= _CLIENTS_KEPT:
                # Forgotten, not closed: another thread may be sending through it; its sockets close when it goes.
                _clients.pop(next(iter(_clients)))
        _clients[key] = pools  # the most recently used last
        pool = pools.get((address, port))
        if pool is None:
            if scheme == "https":
                pool = urllib3.HTTPSConnectionPool(address, port, maxsize=8, block=False, retries=False,
                                                   ssl_context=_tls_context(), server_hostname=server_name,
                                                   assert_hostname=server_name)
            else:
                pool = urllib3.HTTPConnectionPool(address, port, maxsize=8, block=False, retries=False)
            pools[(address, port)] = pool
        return pool


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    latency_ms: int
    # None when the receiver answered 2xx; otherwise a short, content-free reason.
    error: str | None
    response_excerpt: str | None
    # No answer within the timeout (connecting or reading): the receiver may still have taken the request.
    timed_out: bool = False

    @property
    def succeeded(self) -> bool:
        return self.error is None

    @property
    def gone(self) -> bool:
        """The receiver answered 410 Gone: it asks for no more deliveries."""
        return self.status_code == 410


def send(
    url: str, body: bytes, headers: Mapping[str, str], *, allowed: Sequence[Network], timeout: float,
    resolve: Resolver = system_resolver, ports: Collection[int] | None = DEFAULT_PORTS,
) -> AttemptResult:
    started = time.perf_counter()

    def result(status_code: int | None, error: str | None, excerpt: str | None = None, *,
               timed_out: bool = False) -> AttemptResult:
        return AttemptResult(status_code=status_code, latency_ms=round((time.perf_counter() - started) * 1000),
                             error=error, response_excerpt=excerpt, timed_out=timed_out)

    try:
        target = check_url(url, allowed, resolve, ports=ports)
    except UnsafeUrl as exc:
        return result(None, f"refused: the URL {exc.message}"[:200])

    parts = urlsplit(url)
    # The name as sent in SNI, checked against the certificate and in Host: ASCII (IDNA for an international one).
    server_name = target.host if target.host.isascii() else target.host.encode("idna").decode("ascii")
    netloc = parts.netloc if parts.netloc.isascii() else (
        server_name if parts.port is None else f"{server_name}:{parts.port}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not path.isascii() or any(c <= " " for c in path):
        path = quote(path, safe=_PATH_SAFE)
    # The original Host (urllib3 then sends no Host of its own: the socket goes to a checked address).
    request_headers = {"Host": netloc, "Content-Type": "application/json", "User-Agent": USER_AGENT, **headers}
    step = urllib3.Timeout(connect=timeout, read=timeout)
    # No retries here: a failed attempt goes back to its row, due later.
    last_error = "connection failed"
    for address in target.addresses:
        pool = _pool(target.scheme, server_name, address.split("%", 1)[0], target.port)
        try:
            response = pool.urlopen("POST", path, body=body, headers=request_headers, retries=False, redirect=False,
                                    timeout=step, preload_content=False, release_conn=False, assert_same_host=False)
        except NewConnectionError:  # before ConnectTimeoutError: urllib3 makes it a subclass of it
            last_error = "connection failed"
            continue
        except ConnectTimeoutError:
            last_error = "connection timed out"
            continue  # the next checked address may answer
        except SSLError:
            last_error = "connection failed"  # as a refused connection: the certificate did not match the name
            continue
        except Urllib3Timeout:
            return result(None, "timed out", timed_out=True)
        except HTTPError as exc:
            return result(None, f"request failed ({type(exc).__name__})")
        try:
            excerpt = _read_excerpt(response)
        except HTTPError:
            excerpt = None
        finally:
            if not cast(urllib3.HTTPResponse, response).isclosed():
                response.close()  # the answer was not read to its end: its connection is not reused
            response.release_conn()
        return result(response.status, _status_error(response.status), excerpt)
    return result(None, last_error, timed_out=last_error == "connection timed out")


def _status_error(status: int) -> str | None:
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status} (redirects are not followed)"
    return f"HTTP {status}"


def _read_excerpt(response: urllib3.BaseHTTPResponse) -> str | None:
    raw = response.read(_EXCERPT_READ_BYTES)
    if not raw:
        return None
    text = raw[:_EXCERPT_READ_BYTES].decode("utf-8", errors="replace")
    # Keep it printable: it is shown in the API and must not carry NULs (PostgreSQL refuses them) or control codes.
    cleaned = "".join(c if c in " \t" or unicodedata.category(c)[0] not in "CZ" else " " for c in text)
    return cleaned[:EXCERPT_CHARS].strip() or None
