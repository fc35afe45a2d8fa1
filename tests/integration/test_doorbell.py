"""The doorbell (app/doorbell.py): with a Redis broker, new submissions ring one "claim what is queued" message, rung
only when none is pending, instead of sending a message each; the worker that answers it claims the oldest queued
call's worth and rings again if rows are left. Exactly once, nothing stranded, far fewer messages than POSTs.

In-process tests run the worker's command as its task does, on the test PostgreSQL database and Redis, with a
doorbell of their own (its own key) in front of a recorder; the last ones run real Celery worker processes.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import update

from app import create_app
from app.config import Settings
from app.db import Database
from app.doorbell import CLIENT_OPTIONS, DOORBELL_MESSAGE, Doorbell, build_doorbell
from app.extensions import CELERY, DOORBELL
from app.models import Submission, utcnow
from app.outbox import MODERATE_QUEUED, MODERATE_SUBMISSION, Message
from app.use_cases import moderation
from tests.conftest import BROKER_KEY_PREFIX, TenantKey, make_settings
from tests.integration.conftest import WorkerProcess, retire_leftovers, submit, wait_final
from tests.integration.test_batched_messages import RecordingProvider
from tests.integration.test_recovery import assert_exactly_once, wait_for


@pytest.fixture
def bell(redis_url: str) -> Iterator[Doorbell]:
    """A doorbell of this test's own (its own key, so nothing else rings it), with a long TTL unless a test says."""
    client = redis.Redis.from_url(redis_url)
    doorbell = Doorbell(client, prefix=f"{BROKER_KEY_PREFIX}{uuid.uuid4().hex[:8]}:", ttl_ms=60_000)
    yield doorbell
    client.delete(doorbell.key)
    client.close()


@pytest.fixture
def published(database: Database, bell: Doorbell) -> Iterator[list[Message]]:
    """What the doorbell publishes (nothing reaches the broker), in order; the queue starts empty of earlier rows."""
    retire_leftovers(database)
    recorded: list[Message] = []
    saved = database.outbox.publisher
    database.outbox.publisher = bell.publisher(recorded.extend)
    yield recorded
    database.outbox.publisher = saved


def one_text(client: FlaskClient, tenant: TenantKey, text: str) -> str:
    submission_id: str = submit(client, tenant, {"input": text})["id"]
    return submission_id


def answer(database: Database, settings: Settings, provider: RecordingProvider, bell: Doorbell,
           before: Callable[[], object] | None = None) -> dict[str, str]:
    """One doorbell message, consumed as the worker's task does (`before` runs just before the DEL)."""
    def answer_doorbell() -> None:
        if before is not None:
            before()
        bell.answer()

    return moderation.moderate_submissions(database, provider, [], settings, answer_doorbell=answer_doorbell)


def drain(database: Database, settings: Settings, provider: RecordingProvider, bell: Doorbell,
          published: list[Message]) -> int:
    """Consume the published doorbells (and what they ring) until none is left; how many were consumed."""
    consumed = 0
    while published:
        message = published.pop(0)
        assert message == DOORBELL_MESSAGE, message  # never a per-submission message while Redis answers
        answer(database, settings, provider, bell)
        consumed += 1
        assert consumed < 100, "the doorbell rings forever"
    return consumed


def test_a_burst_is_moderated_exactly_once_with_a_message_per_batch(
    database: Database, settings: Settings, client: FlaskClient, tenant: TenantKey, bell: Doorbell,
    published: list[Message],
) -> None:
    ids = [one_text(client, tenant, f"doorbell burst #{i}") for i in range(20)]
    # The first POST rang; the 19 others found the doorbell pending and sent nothing.
    assert published == [DOORBELL_MESSAGE]
    provider = RecordingProvider(max_batch=4)
    # Each answer claims a call's worth (oldest first) and rings again while rows are left: 5 batches, no ring after
    # the last (it left nothing), and the doorbell is free again for the next POST.
    assert drain(database, settings, provider, bell, published) == 5
    assert [len(call) for call in provider.calls] == [4, 4, 4, 4, 4]
    assert [text for call in provider.calls for text in call] == [f"doorbell burst #{i}" for i in range(20)]
    assert_exactly_once(database, ids)
    assert answer(database, settings, provider, bell) == {}  # a doorbell that finds nothing rings nothing
    assert published == []
    later = one_text(client, tenant, "doorbell after the burst")
    assert published == [DOORBELL_MESSAGE]
    assert drain(database, settings, provider, bell, published) == 1
    assert_exactly_once(database, [later])


def test_a_row_committed_while_the_doorbell_is_answered_is_never_stranded(
    database: Database, settings: Settings, client: FlaskClient, tenant: TenantKey, bell: Doorbell,
    published: list[Message],
) -> None:
    first = one_text(client, tenant, "doorbell race #0")
    assert published == [DOORBELL_MESSAGE]
    published.clear()
    provider = RecordingProvider(max_batch=8)
    racing: list[str] = []
    # Committed just before the worker's DEL: it found the doorbell pending and rang nothing, so this very answer
    # must take it (its SELECT follows the DEL).
    statuses = answer(database, settings, provider, bell,
                      before=lambda: racing.append(one_text(client, tenant, "doorbell race #1")))
    assert published == []
    assert statuses == dict.fromkeys([first, *racing], "completed")
    # Committed just after the DEL (while the worker reads the queue or asks the provider): it rings for itself.
    statuses = moderation.moderate_submissions(
        database, provider, [], settings,
        answer_doorbell=lambda: (bell.answer(), racing.append(one_text(client, tenant, "doorbell race #2"))))
    assert published == [DOORBELL_MESSAGE]
    # That answer may already have taken it (it committed before the SELECT); then its doorbell finds nothing.
    drain(database, settings, provider, bell, published)
    assert_exactly_once(database, [first, *racing])


def test_a_lost_doorbell_is_recovered_by_the_next_post_after_the_ttl_and_by_the_sweep(
    database: Database, settings: Settings, client: FlaskClient, tenant: TenantKey, redis_url: str,
    published: list[Message],
) -> None:
    client_ = redis.Redis.from_url(redis_url)
    short = Doorbell(client_, prefix=f"{BROKER_KEY_PREFIX}{uuid.uuid4().hex[:8]}:", ttl_ms=300)
    database.outbox.publisher = short.publisher(published.extend)
    try:
        # Rung, but its message never left (the sender died between the SET and the publish).
        assert short.ring()
        stranded = one_text(client, tenant, "doorbell lost #0")
        assert published == []
        # The key expires by itself; the next POST rings, and its doorbell takes the stranded row too.
        wait_for(lambda: not client_.exists(short.key), "the doorbell's key to expire", timeout=10)
        second = one_text(client, tenant, "doorbell lost #1")
        assert published == [DOORBELL_MESSAGE]
        published.clear()
        provider = RecordingProvider(max_batch=8)
        assert moderation.moderate_submissions(database, provider, [], settings, answer_doorbell=short.answer) \
            == dict.fromkeys([stranded, second], "completed")

        # Lost again, and no POST comes: the row still says it was dispatched, so the sweep sends it on, as any
        # message the broker lost, once REDISPATCH_AFTER_SECONDS have passed (the row is aged instead of waiting).
        assert short.ring()
        alone = one_text(client, tenant, "doorbell lost #2")
        assert published == []
        aged = utcnow() - timedelta(seconds=settings.redispatch_after_seconds + 1)
        with database.transaction() as session:
            session.execute(update(Submission).where(Submission.id == alone)
                            .values(enqueued_at=aged, dispatched_at=aged))
        with database.transaction() as session:
            assert moderation.requeue_stalled(session, settings) == 1
        assert published == [Message(MODERATE_SUBMISSION, (alone,))]  # the sweep's own message, not a doorbell
        assert moderation.moderate_submissions(database, provider, [alone], settings) == {alone: "completed"}
        assert_exactly_once(database, [stranded, second, alone])
    finally:
        client_.delete(short.key)
        client_.close()


def test_redis_errors_at_ring_time_fall_back_to_the_submissions_own_messages(
    database: Database, client: FlaskClient, tenant: TenantKey, published: list[Message],
) -> None:
    # A Redis nobody listens on (a closed port): every ring fails.
    unreachable = Doorbell(redis.Redis.from_url("redis://127.0.0.1:1/0", **CLIENT_OPTIONS), prefix="", ttl_ms=1000)
    database.outbox.publisher = unreachable.publisher(published.extend)
    first = one_text(client, tenant, "doorbell down #0")
    second = one_text(client, tenant, "doorbell down #1")
    assert published == [Message(MODERATE_SUBMISSION, (first,), ring=True),
                         Message(MODERATE_SUBMISSION, (second,), ring=True)]
    published.clear()
    # A worker's ring again (it names no ids) still goes out as a doorbell message.
    unreachable.publisher(published.extend)([moderation.RING_AGAIN])
    assert published == [DOORBELL_MESSAGE]


def test_a_doorbell_whose_publish_failed_is_free_for_the_next_post(
    database: Database, client: FlaskClient, tenant: TenantKey, bell: Doorbell, published: list[Message],
) -> None:
    refused: list[Message] = []

    def broker_down(messages: Any) -> None:
        refused.extend(messages)
        raise ConnectionError("broker down")

    database.outbox.publisher = bell.publisher(broker_down)
    lost = one_text(client, tenant, "doorbell refused #0")
    assert refused == [DOORBELL_MESSAGE]
    # The row is marked undispatched (the sweep re-sends it after REQUEUE_AFTER_SECONDS) and the doorbell is free.
    with database.transaction() as session:
        assert session.get(Submission, lost).dispatched_at is None  # type: ignore[union-attr]
    database.outbox.publisher = bell.publisher(published.extend)
    one_text(client, tenant, "doorbell refused #1")
    assert published == [DOORBELL_MESSAGE]


def test_the_embedded_default_broker_keeps_a_message_per_submission(
    database_url: str, tmp_path: Path, tenant: TenantKey, monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(database_url, f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    assert build_doorbell(settings) is None
    assert build_doorbell(make_settings(database_url, "redis://127.0.0.1:6379/15", doorbell_ttl_ms=0)) is None
    embedded = create_app(settings)
    assert embedded.extensions[DOORBELL] is None
    sent: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(embedded.extensions[CELERY], "send_task",
                        lambda name, args, **_: sent.append((name, args)))
    http = embedded.test_client()
    ids = [one_text(http, tenant, f"embedded #{i}") for i in range(3)]
    assert sent == [(MODERATE_SUBMISSION, [submission_id]) for submission_id in ids]
    retire_leftovers(embedded.extensions["verdict.db"])


def consumed_tasks(worker: WorkerProcess) -> Counter[str]:
    """The moderation tasks the worker ran, by name, from its log (Celery's `Task NAME[id] succeeded` lines)."""
    text = worker.log_path.read_text(errors="replace")
    return Counter(re.findall(r"Task (moderation\.moderate_\w+)\[[^\]]+\] succeeded", text))


def test_real_workers_take_a_backlog_with_far_fewer_messages_than_posts(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # A backlog: 60 one-text POSTs while no worker runs ring one doorbell (another if it outlived its TTL).
    ids = [one_text(client, tenant, f"doorbell backlog #{i}") for i in range(60)]
    # No sweep may rescue a stranded row here (REDISPATCH_AFTER_SECONDS far beyond the test's wait): every row must
    # be reached by the doorbells alone.
    worker = start_worker(concurrency=2, REDISPATCH_AFTER_SECONDS="600", REQUEUE_AFTER_SECONDS="600")
    for submission_id in ids:
        wait_final(client, tenant, submission_id)
    assert_exactly_once(database, ids)
    wait_for(lambda: consumed_tasks(worker)[MODERATE_QUEUED] > 0, "the worker's task lines")
    tasks = consumed_tasks(worker)
    assert tasks[MODERATE_SUBMISSION] == 0  # no per-submission message: nothing left to skip
    assert tasks[MODERATE_QUEUED] <= len(ids) // 4, tasks  # a few doorbells (and their rings again), not 60
    # POSTs that race the workers answering doorbells, from several threads: none is stranded, none doubled.
    with ThreadPoolExecutor(max_workers=4) as pool:
        racing = list(pool.map(lambda i: one_text(app.test_client(), tenant, f"doorbell racing #{i}"), range(40)))
    for submission_id in racing:
        wait_final(client, tenant, submission_id)
    assert_exactly_once(database, racing)
    assert consumed_tasks(worker)[MODERATE_SUBMISSION] == 0
