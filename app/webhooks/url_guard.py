"""The SSRF guard: a webhook URL must be absolute http(s) and resolve only to public addresses, unless
WEBHOOK_ALLOWED_NETWORKS opens a network; checked on registration and before every attempt. See docs/webhooks.md."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
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


def check_url(url: str, allowed: Sequence[Network], resolve: Resolver = system_resolver) -> Target:
    """The URL's target if it is safe to send to now; `UnsafeUrl` otherwise."""
    try:
        parts = urlsplit(url)
        httpx.URL(url)  # what the sender will parse, so a URL that passes here can be sent
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
    except (OSError, UnicodeError) as exc:
        raise UnsafeUrl("names a host that does not resolve", code="unresolvable_host") from exc
    if not addresses:
        raise UnsafeUrl("names a host that does not resolve", code="unresolvable_host")
    for address in addresses:
        problem = address_problem(address, allowed)
        if problem is not None:
            raise UnsafeUrl(f"resolves to a {problem} address, which webhooks may not reach", code="unsafe_url")
    return Target(url=url, scheme=parts.scheme, host=host, port=port, addresses=addresses)


def address_problem(address: str, allowed: Sequence[Network]) -> str | None:
    """Why a webhook may not connect to `address` ("loopback", "private", ...), or None if it may."""
    try:
        ip = ip_address(address.split("%", 1)[0])  # an IPv6 zone (`fe80::1%eth0`) is not part of the address
    except ValueError:
        return "malformed"
    # The embedded IPv4 address first: it is where the connection goes, and it names the problem best.
    candidates = [*_embedded_ipv4(ip), ip]
    if any(candidate in network for candidate in candidates for network in allowed
           if candidate.version == network.version):
        return None
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
