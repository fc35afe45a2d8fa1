"""The outbox's publisher on Redis (app/queue.py, issue 15): every message reaches its queue, named by its task, through
the default exchange without a queue declared per message; and kombu's channel sends through one Redis client of
its pool instead of building one per message (a new pool gets a new client)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from app.config import Settings
from app.outbox import DELIVER_WEBHOOK, MODERATE_SUBMISSION, Message
from app.queue import MODERATION_QUEUE, WEBHOOKS_QUEUE, RedisTransport, celery_config, celery_publisher
from tests.conftest import BROKER_KEY_PREFIX, make_settings


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    app = Celery("verdict-test-publisher", set_as_current=False)
    app.config_from_object(celery_config(settings))
    yield app
    app.close()


@pytest.fixture
def queues(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    names = [f"{BROKER_KEY_PREFIX}{MODERATION_QUEUE}", f"{BROKER_KEY_PREFIX}{WEBHOOKS_QUEUE}"]
    client.delete(*names)
    yield client
    client.delete(*names)
    client.close()


def queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    # kombu LPUSHes: the oldest message is the list's last entry.
    return [json.loads(raw) for raw in reversed(client.lrange(f"{BROKER_KEY_PREFIX}{queue}", 0, -1))]


def args_of(message: dict[str, Any]) -> Any:
    body = message["body"]
    return json.loads(base64.b64decode(body) if message["properties"]["body_encoding"] == "base64" else body)[0]


def test_every_message_reaches_its_queue_by_name(celery_app: Celery, queues: redis.Redis) -> None:
    publish = celery_publisher(celery_app)
    publish([Message(MODERATE_SUBMISSION, ("sub_1", "sub_2")), Message(DELIVER_WEBHOOK, ("whd_1",), countdown=30),
             Message(MODERATE_SUBMISSION, ("sub_3",))])
    moderation, webhooks = queued(queues, MODERATION_QUEUE), queued(queues, WEBHOOKS_QUEUE)
    assert [(m["headers"]["task"], args_of(m)) for m in moderation] == [
        (MODERATE_SUBMISSION, ["sub_1", "sub_2"]), (MODERATE_SUBMISSION, ["sub_3"])]
    assert [(m["headers"]["task"], args_of(m)) for m in webhooks] == [(DELIVER_WEBHOOK, ["whd_1"])]
    assert webhooks[0]["headers"]["eta"] is not None  # the countdown travels as Celery's eta
    # Through the default exchange, by the queue's name: what needs no declared binding.
    assert {m["properties"]["delivery_info"]["exchange"] for m in moderation + webhooks} == {""}
    assert [m["properties"]["delivery_info"]["routing_key"] for m in moderation] == [MODERATION_QUEUE] * 2


def test_a_channel_publishes_through_one_client_until_its_pool_changes(
    celery_app: Celery, queues: redis.Redis, monkeypatch: pytest.MonkeyPatch,
) -> None:
    created: list[object] = []
    build = kombu_redis.Channel._create_client

    def counting(channel: kombu_redis.Channel, asynchronous: bool = False) -> object:
        client = build(channel, asynchronous)
        if not asynchronous:
            created.append(client)
        return client

    monkeypatch.setattr(kombu_redis.Channel, "_create_client", counting)
    publish = celery_publisher(celery_app)
    for index in range(5):
        publish([Message(MODERATE_SUBMISSION, (f"sub_{index}",))])
    assert len(queued(queues, MODERATION_QUEUE)) == 5
    # kombu's own channel builds one per message. (None at all when kombu's process-wide producer pool hands this
    # app a channel another test already used, which keeps its client.)
    assert len(created) <= 1
    before = len(created)
    # A channel whose pool was dropped (as after a fork) builds a new client on the new pool, and it works.
    with celery_app.producer_or_acquire() as producer:
        producer.connection.default_channel._disconnect_pools()
    publish([Message(MODERATE_SUBMISSION, ("sub_after",))])
    assert len(created) == before + 1
    assert len(queued(queues, MODERATION_QUEUE)) == 6


def test_only_a_plain_redis_broker_gets_the_transport(redis_url: str, database_url: str) -> None:
    assert celery_config(make_settings(database_url, redis_url))["broker_transport"] == "app.queue:RedisTransport"
    assert RedisTransport.Channel.__mro__[1] is kombu_redis.Channel
    assert celery_config(make_settings(database_url, "sqla+sqlite:////tmp/broker.db"))["broker_transport"] is None
