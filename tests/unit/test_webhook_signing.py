"""Webhook signatures are Standard Webhooks signatures: checked against the specification's published example, by
hand with `hmac`, and by the `standardwebhooks` libraries for Python and for JavaScript (which share no code),
including the two signatures of a rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from app.webhooks.signing import generate_secret, signature_header, signed_headers
from tests.interop.standardwebhooks_js import check_with_js, verify_with_js
from tests.webhook_receiver import ReceivedRequest

BODY = '{"type":"submission.completed","data":{"id":"sub_1"}}'


def test_secrets_are_whsec_base64_of_32_random_bytes() -> None:
    secret = generate_secret()
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]+={0,2}", secret)
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert generate_secret() != secret


def test_signature_matches_the_specification_example() -> None:
    # The example of the Standard Webhooks specification (and its reference test suites).
    header = signature_header(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"], "msg_p5jXN8AQM9LWM0D4loKWxJek",
                              datetime.fromtimestamp(1614265330, UTC), '{"test": 2432232314}')
    assert header == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_is_hmac_sha256_of_id_timestamp_body() -> None:
    secret = generate_secret()
    now = datetime.now(UTC)
    headers = signed_headers([secret], "msg_abc", now, BODY)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = hmac.new(key, f"msg_abc.{int(now.timestamp())}.{BODY}".encode(), hashlib.sha256).digest()
    assert headers == {"webhook-id": "msg_abc", "webhook-timestamp": str(int(now.timestamp())),
                       "webhook-signature": "v1," + base64.b64encode(expected).decode()}


def test_the_standardwebhooks_library_verifies_and_rejects_tampering() -> None:
    secret = generate_secret()
    headers = signed_headers([secret], "msg_abc", datetime.now(UTC), BODY)
    assert Webhook(secret).verify(BODY.encode(), headers) == {"type": "submission.completed",
                                                               "data": {"id": "sub_1"}}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace("sub_1", "sub_2").encode(), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY.encode(), headers)
    with pytest.raises(WebhookVerificationError):  # the id is signed too
        Webhook(secret).verify(BODY.encode(), {**headers, "webhook-id": "msg_other"})


def test_during_a_rotation_both_secrets_verify() -> None:
    new, old = generate_secret(), generate_secret()
    headers = signed_headers([new, old], "msg_abc", datetime.now(UTC), BODY)
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    Webhook(new).verify(BODY.encode(), headers)
    Webhook(old).verify(BODY.encode(), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY.encode(), headers)


def test_a_stale_timestamp_is_refused_by_receivers() -> None:
    # Each attempt is signed with its own time: a receiver refuses one older than five minutes (replays).
    secret = generate_secret()
    headers = signed_headers([secret], "msg_abc", datetime.now(UTC) - timedelta(minutes=10), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.encode(), headers)


def test_signing_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        signature_header([], "msg_abc", datetime.now(UTC), BODY)


@pytest.mark.integration
def test_the_javascript_library_verifies_both_rotation_secrets_and_rejects_tampering() -> None:
    # An implementation that shares no code with the Python library Verdict signs with.
    new, old = generate_secret(), generate_secret()
    headers = signed_headers([new, old], "msg_abc", datetime.now(UTC), BODY)
    signed = ReceivedRequest("POST", "/", headers, BODY.encode())
    tampered = ReceivedRequest("POST", "/", headers, BODY.replace("sub_1", "sub_2").encode())
    other_id = ReceivedRequest("POST", "/", {**headers, "webhook-id": "msg_other"}, BODY.encode())
    assert verify_with_js(new, [signed]) == verify_with_js(old, [signed]) == [json.loads(BODY)]
    results = check_with_js(new, [tampered, other_id])
    assert [r["ok"] for r in results] == [False, False]
    assert [r["ok"] for r in check_with_js(generate_secret(), [signed])] == [False]
