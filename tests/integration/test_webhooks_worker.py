"""Webhooks through real worker processes (embedded beat included), to real receivers: verified by the Python and
the JavaScript Standard Webhooks libraries, redelivered after the receiver comes back, dead after repeated 500s and
redelivered by hand, a 410, duplicate tasks sending once, and a worker SIGKILLed mid-delivery losing nothing; and a
verdict's webhooks sent by the moderation task itself: with no `webhooks` consumer, past a hanging receiver, and
with the worker killed between the verdict's commit and the receiver's answer.

Workers run with a short retry schedule and sweep (WEBHOOK_ENV); timing never decides a result, only how soon it
arrives."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from standardwebhooks import Webhook

from app.config import Settings
from app.outbox import DELIVER_WEBHOOK
from app.use_cases.webhook_deliveries import ABANDONED_ERROR
from tests.conftest import TenantKey
from tests.integration.conftest import WorkerProcess, submit, wait_final
from tests.integration.webhook_support import (
    api_settings,
    create_callback_secret,
    create_endpoint,
    deliveries,
    receiver,
)
from tests.interop.standardwebhooks_js import verify_with_js
from tests.webhook_receiver import WebhookReceiver

__all__ = ["api_settings", "receiver"]  # fixtures used by name below

WEBHOOK_ENV = {
    "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    "WEBHOOK_RETRY_SCHEDULE": "1,1,1,1,1,1,1,1",
    "WEBHOOK_SWEEP_INTERVAL_SECONDS": "0.5",
    "WEBHOOK_TIMEOUT_SECONDS": "2",
    "WEBHOOK_LEASE_SECONDS": "14",
    "MODERATION_PROVIDER": "local",
}


def wait_delivery(client: FlaskClient, tenant: TenantKey, endpoint_id: str,
                  done: Callable[[dict[str, Any]], bool], timeout: float = 90) -> dict[str, Any]:
    """Poll the endpoint's delivery log until one delivery satisfies `done`."""
    deadline = time.monotonic() + timeout
    while True:
        found = [d for d in deliveries(client, tenant, endpoint_id) if done(d)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no delivery of {endpoint_id} matched: {deliveries(client, tenant, endpoint_id)}")
        time.sleep(0.2)


def succeeded(delivery: dict[str, Any]) -> bool:
    return delivery["status"] == "succeeded"


def test_verdict_events_arrive_verified_by_the_standard_library(
    client: FlaskClient, tenant: TenantKey, api_settings: Settings, receiver: WebhookReceiver,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(**WEBHOOK_ENV)
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url)
    with WebhookReceiver() as callback_receiver:
        _, callback_secret = create_callback_secret(client, tenant)
        accepted = submit(client, tenant, {"input": "you are a fucking idiot", "metadata": {"ticket": 7},
                                           "callback_url": callback_receiver.url})
        body = wait_final(client, tenant, accepted["id"])
        assert body["verdict"]["decision"] == "block"
        for server, key in ((receiver, secret), (callback_receiver, callback_secret)):
            received = server.wait_for(2)
            payloads = [Webhook(key).verify(r.body, r.headers) for r in received]
            # And by an implementation that shares no code with the one Verdict signs with.
            assert verify_with_js(key, received) == payloads
            assert sorted(p["type"] for p in payloads) == ["submission.completed", "submission.flagged"]
            for payload in payloads:
                assert payload["data"]["id"] == accepted["id"]
                assert payload["data"]["verdict"] == body["verdict"]  # what GET /v1/submissions/{id} shows
                assert payload["data"]["metadata"] == {"ticket": 7}
            assert all(b"idiot" not in r.body for r in received)
    wait_delivery(client, tenant, endpoint_id,
                  lambda d: d["event_type"] == "submission.flagged" and succeeded(d))


def test_a_receiver_down_for_a_while_gets_the_delivery_once_it_is_back(
    client: FlaskClient, tenant: TenantKey, api_settings: Settings, receiver: WebhookReceiver,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url, events=["submission.completed"])
    receiver.stop()
    assert receiver.is_down()
    start_worker(**WEBHOOK_ENV)
    accepted = submit(client, tenant, {"input": "have a lovely day"})
    wait_final(client, tenant, accepted["id"])
    failing = wait_delivery(client, tenant, endpoint_id, lambda d: d["attempt_count"] >= 2)
    assert {a["error"] for a in failing["attempts"]} == {"connection failed"}

    receiver.start()  # the same port
    delivered = wait_delivery(client, tenant, endpoint_id, succeeded)
    [request] = receiver.wait_for(1)
    assert request.webhook_id == delivered["id"] == failing["id"]
    assert Webhook(secret).verify(request.body, request.headers)["data"]["id"] == accepted["id"]
    assert delivered["attempts"][-1]["status_code"] == 200
    assert [a["status_code"] for a in delivered["attempts"][:-1]] == [None] * (len(delivered["attempts"]) - 1)


def test_repeated_500s_end_dead_and_a_redelivery_by_hand_gets_through(
    client: FlaskClient, tenant: TenantKey, api_settings: Settings, receiver: WebhookReceiver,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(**{**WEBHOOK_ENV, "WEBHOOK_RETRY_SCHEDULE": "0.5,0.5"})
    receiver.status = 500
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url)
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    dead = wait_delivery(client, tenant, endpoint_id, lambda d: d["status"] == "dead")
    assert [a["status_code"] for a in dead["attempts"]] == [500, 500, 500]
    assert len(receiver.requests) == 3

    receiver.status = 200
    assert client.post(f"/v1/deliveries/{delivery_id}/redeliver", headers=tenant.headers).status_code == 202
    delivered = wait_delivery(client, tenant, endpoint_id, succeeded)
    assert [a["status_code"] for a in delivered["attempts"]] == [500, 500, 500, 200]
    received = receiver.wait_for(4)
    assert {r.webhook_id for r in received} == {delivery_id}
    Webhook(secret).verify(received[-1].body, received[-1].headers)


def test_410_disables_the_endpoint(client: FlaskClient, tenant: TenantKey, api_settings: Settings,
                                   receiver: WebhookReceiver, start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker(**WEBHOOK_ENV)
    receiver.status = 410
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers)
    dead = wait_delivery(client, tenant, endpoint_id, lambda d: d["status"] == "dead")
    assert [a["status_code"] for a in dead["attempts"]] == [410]
    assert client.get(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers).get_json()["status"] == "disabled"


def skipped_lines(worker: WorkerProcess, delivery_id: str) -> int:
    count = 0
    for line in worker.log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "webhook_delivery_skipped" and entry.get("delivery_id") == delivery_id:
            count += 1
    return count


def test_duplicate_tasks_send_a_delivery_once(
    app: Flask, client: FlaskClient, tenant: TenantKey, api_settings: Settings, receiver: WebhookReceiver,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # A timeout longer than the test's hold, so the held attempt stays in flight until released.
    env = {**WEBHOOK_ENV, "WEBHOOK_TIMEOUT_SECONDS": "30", "WEBHOOK_LEASE_SECONDS": "90"}
    workers = [start_worker(concurrency=2, **env), start_worker(concurrency=2, **env)]
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    receiver.hold_next()  # the first attempt stays in flight while the duplicates arrive
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    receiver.wait_for(1)
    celery_app: Celery = app.extensions["celery"]
    for _ in range(6):
        celery_app.send_task(DELIVER_WEBHOOK, args=[delivery_id])
    deadline = time.monotonic() + 60
    while sum(skipped_lines(w, delivery_id) for w in workers) < 6:
        assert time.monotonic() < deadline, "the duplicate tasks did not run"
        time.sleep(0.2)
    receiver.release()
    wait_delivery(client, tenant, endpoint_id, succeeded)
    assert [r.webhook_id for r in receiver.requests] == [delivery_id]


def test_a_worker_killed_mid_delivery_loses_nothing(
    client: FlaskClient, tenant: TenantKey, api_settings: Settings, receiver: WebhookReceiver,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    doomed = start_worker(**WEBHOOK_ENV)
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url)
    receiver.hold_next()
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    receiver.wait_for(1)  # the worker is inside the attempt now
    doomed.kill()
    receiver.release()

    start_worker(**WEBHOOK_ENV)
    delivered = wait_delivery(client, tenant, endpoint_id, succeeded)
    assert delivered["id"] == delivery_id
    assert [a["error"] for a in delivered["attempts"]] == [ABANDONED_ERROR, None]
    received = receiver.wait_for(2)
    # At least once, never lost: the receiver saw the same webhook-id twice and can deduplicate on it.
    assert [r.webhook_id for r in received] == [delivery_id, delivery_id]
    Webhook(secret).verify(received[-1].body, received[-1].headers)


# ---- sent by the moderation task itself (WEBHOOK_INLINE_SECONDS, on by default) --------------------------------


def test_a_verdicts_webhooks_arrive_with_no_webhooks_worker(
    client: FlaskClient, tenant: TenantKey, api_settings: Settings, receiver: WebhookReceiver,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Nothing consumes the `webhooks` queue (its messages, the sweep's included, stay there): the moderation task
    # sends the verdict's deliveries itself, right after the verdict commits.
    start_worker(queues="moderation", **WEBHOOK_ENV)
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url)
    accepted = submit(client, tenant, {"input": "you are a fucking idiot"})
    wait_final(client, tenant, accepted["id"])
    received = receiver.wait_for(2)
    assert sorted(Webhook(secret).verify(r.body, r.headers)["type"] for r in received) == [
        "submission.completed", "submission.flagged"]
    logged = [wait_delivery(client, tenant, endpoint_id, lambda d, t=t: d["event_type"] == t and succeeded(d))
              for t in ("submission.completed", "submission.flagged")]
    assert [[a["status_code"] for a in d["attempts"]] for d in logged] == [[200], [200]]


def test_a_hanging_receiver_is_handed_to_the_webhooks_queue_without_holding_moderation(
    client: FlaskClient, tenant: TenantKey, api_settings: Settings, receiver: WebhookReceiver,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # One pool process: the `webhooks` task that delivers can only run once the moderation task has returned, and
    # the receiver holds the inline attempt's request until the end of the test.
    start_worker(concurrency=1, **{**WEBHOOK_ENV, "WEBHOOK_INLINE_SECONDS": "1"})
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url, events=["submission.completed"])
    receiver.hold_next()
    try:
        accepted = submit(client, tenant, {"input": "have a lovely day"})
        assert wait_final(client, tenant, accepted["id"])["status"] == "completed"
        delivered = wait_delivery(client, tenant, endpoint_id, succeeded)
        # The unanswered inline attempt was not counted: the queue's attempt is the first recorded.
        assert [a["status_code"] for a in delivered["attempts"]] == [200]
        received = receiver.wait_for(2)
        assert [r.webhook_id for r in received] == [delivered["id"]] * 2  # deduplicated on webhook-id
        Webhook(secret).verify(received[1].body, received[1].headers)
        # Moderation goes on, the held request still unanswered; this receiver's next delivery goes by message.
        second = submit(client, tenant, {"input": "thank you so much"})
        assert wait_final(client, tenant, second["id"])["status"] == "completed"
        wait_delivery(client, tenant, endpoint_id, lambda d: succeeded(d) and d["id"] != delivered["id"])
    finally:
        receiver.release()


def test_a_worker_killed_after_the_verdict_commits_and_before_its_webhook_is_answered_loses_nothing(
    client: FlaskClient, tenant: TenantKey, api_settings: Settings, receiver: WebhookReceiver,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # A budget long enough for the test to kill the worker while it waits for the receiver.
    env = {**WEBHOOK_ENV, "WEBHOOK_INLINE_SECONDS": "10", "WEBHOOK_TIMEOUT_SECONDS": "10",
           "WEBHOOK_LEASE_SECONDS": "30"}
    doomed = start_worker(**env)
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url, events=["submission.completed"])
    receiver.hold_next()
    accepted = submit(client, tenant, {"input": "have a lovely day"})
    receiver.wait_for(1)  # the verdict is committed and the moderation task is inside the inline attempt
    doomed.kill()
    receiver.release()
    assert client.get(f"/v1/submissions/{accepted['id']}", headers=tenant.headers).get_json()["status"] == "completed"

    start_worker(**env)
    delivered = wait_delivery(client, tenant, endpoint_id, succeeded)
    # The dead task's claim ran out; the sweep recorded the attempt as abandoned and the retry got through.
    assert [a["error"] for a in delivered["attempts"]] == [ABANDONED_ERROR, None]
    received = receiver.wait_for(2)
    assert [r.webhook_id for r in received] == [delivered["id"]] * 2
    Webhook(secret).verify(received[-1].body, received[-1].headers)
