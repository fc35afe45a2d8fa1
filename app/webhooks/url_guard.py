"""The SSRF guard: a webhook URL must be absolute http(s) and resolve only to public addresses, unless
WEBHOOK_ALLOWED_NETWORKS opens a network; checked on registration and before every attempt. See docs/webhooks.md."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from urllib.parse import urlsplit

import httpx

IPAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
# host, port -> the addresses (as text) a connection could go to.
Resolver = Callable[[str, int], Sequence[str]]

# Metadata services that answer on addresses the general rules below would not all catch: Azure's wire server is
# a public address, and the rest are named so that a reader sees them refused on purpose.
CLOUD_METADATA = frozenset(ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
    "169.254.170.2",  # AWS ECS task metadata
    "168.63.129.16",  # Azure wire server
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud
    "fd00:ec2::254",  # AWS over IPv6
))
_NAT64 = IPv6Network("64:ff9b::/96")
# The ports a webhook may reach on a public host unless WEBHOOK_ALLOWED_PORTS says otherwise: the web's own. Any other
# port would let a tenant probe third parties' hosts through Verdict (connection refused and timed out are told apart
# in the delivery log). Addresses in WEBHOOK_ALLOWED_NETWORKS are the operator's own and may use any port.
DEFAULT_PORTS = frozenset({80, 443})
# Lookups of callback hosts run on this many threads per process, shared by every request (app/use_cases:
# check_callback_urls), so a request's hosts resolve side by side and stuck lookups cannot pile up threads.
RESOLVER_THREADS = 8


class UnsafeUrl(Exception):
    """A URL Verdict will not send to. The message is for the client and names no resolved address."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Target:
    """A URL that passed the guard, with the addresses that were checked (connect to these, and only these)."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def system_resolver(host: str, port: int) -> Sequence[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str, allowed: Sequence[Network], resolve: Resolver = system_resolver,
              ports: Collection[int] | None = DEFAULT_PORTS) -> Target:
    """The URL's target if it is safe to send to now; `UnsafeUrl` otherwise. `ports`: those a public address may be
    reached on (None: any)."""
    try:
        parts = urlsplit(url)
        httpx.URL(url)  # a strict parser (RFC 3986, IDNA): a URL that passes here is well formed
    except (ValueError, httpx.InvalidURL) as exc:
        raise UnsafeUrl("is not a valid URL", code="invalid_url") from exc
    if parts.scheme not in {"http", "https"}:
        raise UnsafeUrl("must be an http or https URL", code="invalid_url")
    host = parts.hostname
    if not host:
        raise UnsafeUrl("must be an absolute URL with a host", code="invalid_url")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl("must not carry credentials (user:password@)", code="invalid_url")
    try:
        port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeUrl("has an invalid port", code="invalid_url") from exc
    if not 0 < port < 65536:
        raise UnsafeUrl("has an invalid port", code="invalid_url")
    try:
        addresses = tuple(resolve(host, port))
    except ResolutionTimedOut as exc:
        raise UnsafeUrl("names a host that did not resolve in time", code="unresolvable_host") from exc
    except (OSError, UnicodeError) as exc:
        raise UnsafeUrl("names a host that does not resolve", code="unresolvable_host") from exc
    if not addresses:
        raise UnsafeUrl("names a host that does not resolve", code="unresolvable_host")
    for address in addresses:
        problem = address_problem(address, allowed)
        if problem is not None:
            raise UnsafeUrl(f"resolves to a {problem} address, which webhooks may not reach", code="unsafe_url")
    if ports is not None and port not in ports and not all(_in_networks(a, allowed) for a in addresses):
        listed = ", ".join(str(p) for p in sorted(ports)) or "none"
        raise UnsafeUrl(f"uses port {port}; webhooks reach public hosts on these ports only: {listed}",
                        code="unsafe_port")
    return Target(url=url, scheme=parts.scheme, host=host, port=port, addresses=addresses)


def _in_networks(address: str, allowed: Sequence[Network]) -> bool:
    """Whether `address` (or the IPv4 address inside it) is in one of the operator's networks."""
    try:
        ip = ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return any(candidate in network for candidate in [*_embedded_ipv4(ip), ip] for network in allowed
               if candidate.version == network.version)


class ResolutionTimedOut(OSError):
    """A host's lookup did not finish within the request's time for lookups."""


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_resolver_pool() -> None:
    """In a forked child: the parent's threads are not there (a pool made before the fork would never run a
    lookup); the child makes its own pool on first use."""
    global _pool, _pool_lock  # noqa: PLW0603 - one pool per process
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_resolver_pool)


def _resolver_pool() -> ThreadPoolExecutor:
    global _pool  # noqa: PLW0603 - one pool per process, made on first use (after a fork, in the child)
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=RESOLVER_THREADS, thread_name_prefix="verdict-resolve")
        return _pool


def resolve_once(urls: Iterable[str], resolve: Resolver, *, timeout: float) -> Resolver:
    """Look up every distinct host of `urls` once, side by side, all within `timeout` seconds in total; the answer
    is a resolver that answers from those lookups (a host not looked up in time raises ResolutionTimedOut, one that
    failed raises its error again), for `check_url` to use on each URL."""
    futures: dict[str, Future[Sequence[str]]] = {}
    pool = _resolver_pool()
    for url in urls:
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError:
            continue  # check_url refuses it without a lookup
        if host and host not in futures:
            futures[host] = pool.submit(resolve, host, port or (443 if parts.scheme == "https" else 80))
    wait_for(futures.values(), timeout=timeout)
    for future in futures.values():
        future.cancel()  # those not started never will be; one started ends on its own, unheard

    def answer(host: str, port: int) -> Sequence[str]:
        future = futures.get(host)
        if future is None:
            return resolve(host, port)
        if not future.done() or future.cancelled():
            raise ResolutionTimedOut(f"no answer within {timeout:g} s")
        return future.result()

    return answer


def address_problem(address: str, allowed: Sequence[Network]) -> str | None:
    """Why a webhook may not connect to `address` ("loopback", "private", ...), or None if it may."""
    try:
        ip = ip_address(address.split("%", 1)[0])  # an IPv6 zone (`fe80::1%eth0`) is not part of the address
    except ValueError:
        return "malformed"
    # The embedded IPv4 address first: it is where the connection goes, and it names the problem best.
    if _in_networks(address, allowed):
        return None
    candidates = [*_embedded_ipv4(ip), ip]
    for candidate in candidates:
        problem = _classify(candidate)
        if problem is not None:
            return problem
    return None


def _embedded_ipv4(ip: IPAddress) -> list[IPv4Address]:
    # An IPv6 address can carry an IPv4 one that the connection really reaches; each must pass on its own.
    if not isinstance(ip, IPv6Address):
        return []
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64:
        found.append(IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def _classify(ip: IPAddress) -> str | None:
    if ip in CLOUD_METADATA:
        return "cloud metadata"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-public"
    return None
