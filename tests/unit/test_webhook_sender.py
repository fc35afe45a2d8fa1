"""One delivery attempt against a real local receiver: the connection goes to the checked address with the
original Host (and, over TLS, the original name for SNI and the certificate check), redirects are not followed,
proxies are not used, and only a short excerpt of the answer is kept."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.webhooks import sender
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


# ---- TLS: verified against the URL's name (SNI and the certificate check), whatever checked address it goes to ----


@integration_fixture
def tls_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, list[str | None]]]:
    """An HTTPS receiver on 127.0.0.1 with a certificate for `hooks.test` only, from a CA the sender is made to trust;
    the port and the SNI names it was sent."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.now(UTC)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(key.public_key())
          .serial_number(1).not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks.test")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("hooks.test")]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    client_context = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    monkeypatch.setattr(sender, "_tls_context", lambda: client_context)
    monkeypatch.setattr(sender, "_clients", {})
    names: list[str | None] = []
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server_context.sni_callback = lambda sock, name, ctx: names.append(name)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            """Silent."""

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_port, names
    finally:
        server.shutdown()
        server.server_close()


def test_tls_is_verified_against_the_urls_name_sent_by_sni(tls_receiver: tuple[int, list[str | None]]) -> None:
    port, names = tls_receiver
    result = send(f"https://hooks.test:{port}/in", b"{}", HEADERS, allowed=LOOPBACK, timeout=5, ports=None,
                  resolve=dns({"hooks.test": ["127.0.0.1"]}))
    assert result.succeeded, result
    assert names == ["hooks.test"]


def test_a_certificate_for_another_name_is_refused(tls_receiver: tuple[int, list[str | None]]) -> None:
    port, names = tls_receiver
    result = send(f"https://other.test:{port}/in", b"{}", HEADERS, allowed=LOOPBACK, timeout=5, ports=None,
                  resolve=dns({"other.test": ["127.0.0.1"]}))
    assert not result.succeeded and result.status_code is None and result.error == "connection failed"
    assert names == ["other.test"]
