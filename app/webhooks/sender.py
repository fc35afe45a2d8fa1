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

import httpx

from app.webhooks.url_guard import DEFAULT_PORTS, Network, Resolver, UnsafeUrl, check_url, system_resolver

EXCERPT_CHARS = 256
_EXCERPT_READ_BYTES = 4 * EXCERPT_CHARS
USER_AGENT = "Verdict-Webhooks/1"


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The TLS settings of every attempt (httpx's defaults: the certifi CAs, verified), built once per process:
    loading the CA bundle costs tens of milliseconds of CPU, which a new client per attempt paid every time."""
    return httpx.create_ssl_context(trust_env=False)


# Receivers whose keep-alive connections a process keeps (the least recently used name is forgotten past it).
_CLIENTS_KEPT = 64
_clients: dict[tuple[str, str], httpx.Client] = {}
_clients_lock = threading.Lock()
# A forked process must not share its parent's sockets: it opens its own.
os.register_at_fork(after_in_child=_clients.clear)


def _client(scheme: str, server_name: str) -> httpx.Client:
    """This process's client for one receiver name: its connections are kept alive and reused by the next attempts
    to the same name (a new connection for every attempt cost both sides a TCP handshake and the receiver often a
    thread). Never shared across names: a TLS connection stays with the name its certificate was verified for, and
    the pool inside is keyed by the checked address the request goes to. No proxies from the environment (a proxy
    would resolve the name itself), no redirects; the timeout is each request's own."""
    key = (scheme, server_name)
    with _clients_lock:
        client = _clients.pop(key, None)
        if client is None:
            client = httpx.Client(follow_redirects=False, trust_env=False, verify=_tls_context(),
                                  limits=httpx.Limits(max_connections=16, max_keepalive_connections=8,
                                                      keepalive_expiry=5.0))
            if len(_clients) >= _CLIENTS_KEPT:
                # Forgotten, not closed: another thread may be sending through it; its sockets close when it goes.
                _clients.pop(next(iter(_clients)))
        _clients[key] = client  # the most recently used last
        return client


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

    parsed = httpx.URL(url)
    request_headers = {"Host": parsed.netloc.decode("ascii"), "Content-Type": "application/json",
                       "User-Agent": USER_AGENT, **headers}
    extensions = {"sni_hostname": parsed.raw_host.decode("ascii")} if target.scheme == "https" else {}
    # No retries here: a failed attempt goes back to its row, due later.
    client = _client(target.scheme, parsed.raw_host.decode("ascii"))
    last_error = "connection failed"
    for address in target.addresses:
        request = client.build_request("POST", parsed.copy_with(host=address.split("%", 1)[0]),
                                       content=body, headers=request_headers, extensions=extensions,
                                       timeout=httpx.Timeout(timeout, pool=timeout))
        try:
            response = client.send(request, stream=True)
        except httpx.ConnectTimeout:
            last_error = "connection timed out"
            continue  # the next checked address may answer
        except httpx.ConnectError:
            last_error = "connection failed"
            continue
        except httpx.TimeoutException:
            return result(None, "timed out", timed_out=True)
        except httpx.HTTPError as exc:
            return result(None, f"request failed ({type(exc).__name__})")
        try:
            excerpt = _read_excerpt(response)
        except httpx.HTTPError:
            excerpt = None
        finally:
            response.close()
        return result(response.status_code, _status_error(response.status_code), excerpt)
    return result(None, last_error, timed_out=last_error == "connection timed out")


def _status_error(status: int) -> str | None:
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status} (redirects are not followed)"
    return f"HTTP {status}"


def _read_excerpt(response: httpx.Response) -> str | None:
    raw = b""
    for chunk in response.iter_bytes():
        raw += chunk
        if len(raw) >= _EXCERPT_READ_BYTES:
            break
    if not raw:
        return None
    text = raw[:_EXCERPT_READ_BYTES].decode("utf-8", errors="replace")
    # Keep it printable: it is shown in the API and must not carry NULs (PostgreSQL refuses them) or control codes.
    cleaned = "".join(c if c in " \t" or unicodedata.category(c)[0] not in "CZ" else " " for c in text)
    return cleaned[:EXCERPT_CHARS].strip() or None
