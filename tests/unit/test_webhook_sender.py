"""One delivery attempt against a real local receiver: the connection goes to the checked address with the
original Host, redirects are not followed, proxies are not used, and only a short excerpt of the answer is kept."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from ipaddress import ip_network

import pytest

from app.webhooks.sender import EXCERPT_CHARS, send
from tests.lanes import integration_fixture
from tests.webhook_receiver import Answer, WebhookReceiver

LOOPBACK = (ip_network("127.0.0.0/8"),)
HEADERS = {"webhook-id": "msg_1", "webhook-timestamp": "1", "webhook-signature": "v1,x"}


@integration_fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


def dns(table: dict[str, Sequence[str]]) -> Callable[[str, int], Sequence[str]]:
    def resolve(host: str, port: int) -> Sequence[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    return resolve


def test_success_sends_the_body_and_headers(receiver: WebhookReceiver) -> None:
    result = send(receiver.url, b'{"a":1}', HEADERS, allowed=LOOPBACK, timeout=5)
    assert result.succeeded and result.status_code == 200 and result.error is None
    request = receiver.wait_for(1)[0]
    assert request.body == b'{"a":1}'
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == "msg_1" and request.headers["webhook-signature"] == "v1,x"


def test_connects_to_the_checked_address_with_the_original_host(receiver: WebhookReceiver) -> None:
    resolve = dns({"hooks.test": ["127.0.0.1"]})
    result = send(f"http://hooks.test:{receiver.port}/in?x=1", b"{}", HEADERS, allowed=LOOPBACK, timeout=5,
                  resolve=resolve)
    assert result.succeeded
    request = receiver.wait_for(1)[0]
    assert request.headers["host"] == f"hooks.test:{receiver.port}" and request.path == "/in?x=1"


def test_a_name_that_now_resolves_privately_is_refused_without_connecting(receiver: WebhookReceiver) -> None:
    # DNS rebinding: whatever the name resolved to at registration, it is checked again right before connecting.
    result = send(f"http://hooks.test:{receiver.port}/", b"{}", HEADERS, allowed=LOOPBACK, timeout=5,
                  resolve=dns({"hooks.test": ["10.0.0.1"]}))
    assert not result.succeeded and result.status_code is None
    assert result.error is not None and result.error.startswith("refused:") and "private" in result.error
    assert receiver.requests == []


def test_loopback_is_refused_unless_allowed(receiver: WebhookReceiver) -> None:
    result = send(receiver.url, b"{}", HEADERS, allowed=(), timeout=5)
    assert result.error is not None and "loopback" in result.error
    assert receiver.requests == []


def test_the_next_checked_address_is_tried_when_one_refuses(receiver: WebhookReceiver) -> None:
    # Nothing listens on 127.0.0.2 (the receiver binds 127.0.0.1 only).
    result = send(f"http://hooks.test:{receiver.port}/", b"{}", HEADERS, allowed=LOOPBACK, timeout=5,
                  resolve=dns({"hooks.test": ["127.0.0.2", "127.0.0.1"]}))
    assert result.succeeded and len(receiver.requests) == 1


def test_redirects_are_not_followed(receiver: WebhookReceiver) -> None:
    receiver.script(Answer(302, headers=(("Location", "http://169.254.169.254/latest/meta-data/"),)))
    result = send(receiver.url, b"{}", HEADERS, allowed=LOOPBACK, timeout=5)
    assert not result.succeeded and result.status_code == 302
    assert result.error is not None and "redirect" in result.error
    assert len(receiver.requests) == 1


def test_only_a_short_printable_excerpt_of_the_answer_is_kept(receiver: WebhookReceiver) -> None:
    receiver.script(Answer(500, body=b"E\x00rr\x1b[31m\n" + b"x" * 100_000))
    result = send(receiver.url, b"{}", HEADERS, allowed=LOOPBACK, timeout=5)
    assert result.status_code == 500 and result.error == "HTTP 500"
    assert result.response_excerpt is not None and len(result.response_excerpt) <= EXCERPT_CHARS
    assert result.response_excerpt.startswith("E rr [31m") and "\x00" not in result.response_excerpt


def test_gone_is_reported(receiver: WebhookReceiver) -> None:
    receiver.script(410)
    result = send(receiver.url, b"{}", HEADERS, allowed=LOOPBACK, timeout=5)
    assert result.gone and not result.succeeded


def test_connection_refused_and_timeouts_are_errors_not_exceptions(receiver: WebhookReceiver) -> None:
    receiver.hold_next()
    timed_out = send(receiver.url, b"{}", HEADERS, allowed=LOOPBACK, timeout=0.5)
    receiver.release()
    assert timed_out.status_code is None and timed_out.error == "timed out"
    receiver.stop()
    assert receiver.is_down()
    refused = send(receiver.url, b"{}", HEADERS, allowed=LOOPBACK, timeout=5)
    assert refused.status_code is None and refused.error == "connection failed"


def test_proxies_from_the_environment_are_not_used(receiver: WebhookReceiver,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy would resolve the name itself, past the guard; nothing listens on this one either.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert send(receiver.url, b"{}", HEADERS, allowed=LOOPBACK, timeout=5).succeeded


def test_attempts_to_one_receiver_reuse_its_connection_and_names_never_share_one(receiver: WebhookReceiver) -> None:
    for _ in range(3):
        assert send(receiver.url, b"{}", HEADERS, allowed=LOOPBACK, timeout=5).succeeded
    # Another name for the same address gets a connection of its own (a TLS one is bound to the name it verified).
    other = send(f"http://hooks.test:{receiver.port}/", b"{}", HEADERS, allowed=LOOPBACK, timeout=5,
                 resolve=dns({"hooks.test": ["127.0.0.1"]}))
    assert other.succeeded
    peers = [request.peer for request in receiver.wait_for(4)]
    assert peers[0] == peers[1] == peers[2], peers
    assert peers[3] != peers[0], peers


def test_a_kept_connection_the_receiver_dropped_is_replaced(receiver: WebhookReceiver) -> None:
    assert send(receiver.url, b"{}", HEADERS, allowed=LOOPBACK, timeout=5).succeeded
    receiver.stop()
    receiver.start()
    assert send(receiver.url, b"{}", HEADERS, allowed=LOOPBACK, timeout=5).succeeded
