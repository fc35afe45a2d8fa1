"""The SSRF guard: http(s) only, no credentials, and every resolved address public unless the operator allows its
network; IPv4 and IPv6, IPv4 inside IPv6, names that resolve to private addresses, and cloud metadata."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Sequence
from ipaddress import ip_network
from typing import get_args

import pytest

from app.schemas.webhooks import SubscribableEvent
from app.webhooks.events import SUBSCRIBABLE_EVENTS
from app.webhooks.url_guard import UnsafeUrl, address_problem, check_url, resolve_once

LOOPBACK = (ip_network("127.0.0.0/8"),)


def dns(table: dict[str, Sequence[str]]) -> Callable[[str, int], Sequence[str]]:
    """A resolver answering from `table` (a name it does not know does not resolve)."""
    def resolve(host: str, port: int) -> Sequence[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    return resolve


PUBLIC_DNS = dns({"hooks.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]})


@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.1.2.3:8080/hook", "loopback"),
    ("http://[::1]/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),  # IPv4-mapped IPv6
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[::ffff:169.254.169.254]/", "cloud metadata"),
    ("http://[fd00:ec2::254]/", "cloud metadata"),
    ("http://168.63.129.16/", "cloud metadata"),  # Azure's wire server is a public address
    ("http://10.0.0.1/hook", "private"),
    ("http://172.16.5.4/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://[fc00::1]/hook", "private"),
    ("http://100.64.0.1/hook", "non-public"),  # shared address space (CGNAT)
    ("http://169.254.1.1/hook", "link-local"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://224.0.0.1/hook", "multicast"),
    ("http://[ff02::1]/hook", "multicast"),
    ("http://0.0.0.0/hook", "unspecified"),
    ("http://[::]/hook", "unspecified"),
    ("http://240.0.0.1/hook", "private"),  # reserved class E (Python files it under private)
    ("http://[2002:a00:1::]/hook", "private"),  # 6to4 carrying 10.0.0.1
])
def test_non_public_addresses_are_refused(url: str, problem: str) -> None:
    with pytest.raises(UnsafeUrl) as refused:
        check_url(url, ())
    assert refused.value.code == "unsafe_url"
    assert problem in refused.value.message


def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    with pytest.raises(UnsafeUrl, match="private"):
        check_url("https://intranet.example.com/hook", (), dns({"intranet.example.com": ["10.1.2.3"]}))


def test_a_name_resolving_to_public_and_private_addresses_is_refused() -> None:
    # Any address the connection could go to must pass, or DNS round-robin could still reach the private one.
    resolve = dns({"mixed.example.com": ["93.184.216.34", "192.168.0.10"]})
    with pytest.raises(UnsafeUrl, match="private"):
        check_url("https://mixed.example.com/hook", (), resolve)


def test_localhost_is_refused_with_the_system_resolver() -> None:
    with pytest.raises(UnsafeUrl, match="loopback"):
        check_url("http://localhost:8080/hook", ())


def test_numeric_spellings_of_loopback_are_refused_after_resolution() -> None:
    # 2130706433 and 127.1 are 127.0.0.1 to the C resolver; the guard judges what they resolve to.
    for url in ("http://2130706433/hook", "http://127.1/hook", "http://0x7f000001/hook"):
        with pytest.raises(UnsafeUrl):
            check_url(url, ())


def test_public_addresses_pass_and_are_the_ones_to_connect_to() -> None:
    target = check_url("https://hooks.example.com/verdict?x=1", (), PUBLIC_DNS)
    assert target.host == "hooks.example.com" and target.port == 443 and target.scheme == "https"
    assert target.addresses == ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946")
    assert check_url("http://8.8.8.8:80/", ()).port == 80
    assert check_url("http://8.8.8.8:8080/", (), ports=None).port == 8080  # WEBHOOK_ALLOWED_PORTS=*


def test_allowed_networks_open_loopback_and_nothing_else() -> None:
    assert check_url("http://127.0.0.1:9000/hook", LOOPBACK).addresses == ("127.0.0.1",)
    assert check_url("http://[::ffff:127.0.0.1]:9000/hook", LOOPBACK).port == 9000
    for url in ("http://[::1]/hook", "http://10.0.0.1/hook", "http://169.254.169.254/"):
        with pytest.raises(UnsafeUrl):
            check_url(url, LOOPBACK)
    assert address_problem("10.9.8.7", (ip_network("10.0.0.0/8"),)) is None


@pytest.mark.parametrize(("url", "code"), [
    ("ftp://hooks.example.com/x", "invalid_url"),
    ("file:///etc/passwd", "invalid_url"),
    ("gopher://hooks.example.com:70/", "invalid_url"),
    ("hooks.example.com/hook", "invalid_url"),
    ("https:///hook", "invalid_url"),
    ("https://user:pass@hooks.example.com/hook", "invalid_url"),
    ("https://hooks.example.com:99999/hook", "invalid_url"),
    ("https://hooks.example.com:0/hook", "invalid_url"),
    ("https://[::1/hook", "invalid_url"),
    ("https://nowhere.invalid/hook", "unresolvable_host"),
])
def test_malformed_and_unresolvable_urls_are_refused(url: str, code: str) -> None:
    with pytest.raises(UnsafeUrl) as refused:
        check_url(url, LOOPBACK, PUBLIC_DNS)
    assert refused.value.code == code


def test_refusals_never_name_the_resolved_address() -> None:
    with pytest.raises(UnsafeUrl) as refused:
        check_url("https://intranet.example.com/", (), dns({"intranet.example.com": ["10.1.2.3"]}))
    assert "10.1.2.3" not in refused.value.message


def test_schema_events_match_the_events_verdict_raises() -> None:
    assert get_args(SubscribableEvent) == SUBSCRIBABLE_EVENTS


# ---- issue 17, item 7: ports, and callback hosts looked up once within one time bound ----------------------------


@pytest.mark.parametrize("url", ["http://hooks.example.com:22/", "https://hooks.example.com:8443/hook",
                                 "http://hooks.example.com:6379/", "http://93.184.216.34:25/"])
def test_a_public_host_on_another_port_than_80_or_443_is_refused(url: str) -> None:
    # Before: any port, and the delivery log told "connection refused" from "timed out": a port scanner.
    with pytest.raises(UnsafeUrl) as refused:
        check_url(url, (), dns({"hooks.example.com": ["93.184.216.34"], "93.184.216.34": ["93.184.216.34"]}))
    assert refused.value.code == "unsafe_port" and "80, 443" in refused.value.message
    assert check_url("https://hooks.example.com:80/", (), PUBLIC_DNS).port == 80  # odd, but the web's own port


def test_allowed_ports_are_the_operators_and_its_own_networks_take_any_port() -> None:
    assert check_url("https://hooks.example.com:8443/", (), PUBLIC_DNS, ports={443, 8443}).port == 8443
    with pytest.raises(UnsafeUrl):
        check_url("https://hooks.example.com:443/", (), PUBLIC_DNS, ports={8443})
    # Addresses in WEBHOOK_ALLOWED_NETWORKS are the operator's own receivers: any port.
    assert check_url("http://127.0.0.1:9000/hook", LOOPBACK).port == 9000
    assert check_url("http://[::ffff:127.0.0.1]:9000/hook", LOOPBACK).port == 9000
    mixed = dns({"half.example.com": ["127.0.0.1", "93.184.216.34"]})
    with pytest.raises(UnsafeUrl) as refused:  # one public address is enough to need an allowed port
        check_url("http://half.example.com:9000/", LOOPBACK, mixed)
    assert refused.value.code == "unsafe_port"


def test_resolve_once_looks_each_host_up_once_side_by_side() -> None:
    calls: list[str] = []
    started = threading.Barrier(3, timeout=10)

    def counting(host: str, port: int) -> Sequence[str]:
        calls.append(host)
        started.wait()  # three distinct hosts: their lookups run at the same time, or this never passes
        return ["93.184.216.34"]

    urls = [f"https://h{i % 3}.example.com/hook/{i}" for i in range(100)]
    resolve = resolve_once(urls, counting, timeout=10)
    for url in urls:
        check_url(url, (), resolve)
    assert sorted(calls) == ["h0.example.com", "h1.example.com", "h2.example.com"]


def test_resolve_once_bounds_the_time_of_all_lookups_together() -> None:
    release = threading.Event()

    def stuck(host: str, port: int) -> Sequence[str]:
        if host.startswith("slow"):
            release.wait(30)
        return ["93.184.216.34"]

    try:
        urls = ["https://fast.example.com/", *(f"https://slow{i}.example.com/" for i in range(20))]
        resolve = resolve_once(urls, stuck, timeout=0.5)
        assert check_url(urls[0], (), resolve).addresses == ("93.184.216.34",)
        with pytest.raises(UnsafeUrl) as refused:
            check_url(urls[1], (), resolve)
        assert refused.value.code == "unresolvable_host" and "in time" in refused.value.message
    finally:
        release.set()


def test_resolve_once_keeps_a_hosts_failure() -> None:
    resolve = resolve_once(["https://nowhere.invalid/"], PUBLIC_DNS, timeout=5)
    with pytest.raises(UnsafeUrl) as refused:
        check_url("https://nowhere.invalid/", (), resolve)
    assert refused.value.code == "unresolvable_host"


@pytest.mark.integration  # it forks (tests/lanes.py)
def test_a_forked_child_looks_hosts_up_on_threads_of_its_own() -> None:
    # The parent's pool exists (and has threads) before the fork; the child has none of those threads, so with the
    # parent's pool its lookups would never run and every URL would fail as not resolved in time.
    resolve_once(["https://before-fork.example.com/"], lambda host, port: ["93.184.216.34"], timeout=5)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if the lookup ran
        code = 1
        try:
            resolve = resolve_once(["https://child.example.com/"], lambda host, port: ["93.184.216.34"], timeout=5)
            code = 0 if check_url("https://child.example.com/", (), resolve).addresses == ("93.184.216.34",) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
