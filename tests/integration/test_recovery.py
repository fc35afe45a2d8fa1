"""Nothing is lost and every verdict is recorded exactly once: killed workers, racing workers, duplicate messages,
a broker that lost its messages or was down when the API tried to send them.

Recovery comes from the beat sweep (embedded in every test worker): it re-sends queued rows older than
REQUEUE_AFTER_SECONDS (3 s here) and rows whose claim lease (10 s here) ran out. The row, not the message, is the
source of truth; the fencing token on the claim keeps a second holder from recording a second verdict.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update

from app import create_app
from app.db import Database
from app.models import Submission, utcnow
from app.moderation.policy import DEFAULT_POLICY
from app.moderation.providers import ModelInfo, ProviderResult, TextScores
from app.moderation.taxonomy import CATEGORIES
from app.outbox import MODERATE_SUBMISSION
from app.use_cases.moderation import moderate_submissions
from app.use_cases.verdicts import claim_submission, fail_submission, record_verdict, release_for_retry
from tests.conftest import BROKER_KEY_PREFIX, TenantKey, flush_redis, make_settings
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import FINAL, WorkerProcess, openai_worker_env, submit
from tests.integration.test_pipeline import (
    event_counts,
    submit_batch,
    upstream_inputs,
    verdict_counts,
    wait_all_final,
)

THREAT = "I will kill you"
RECOVERY_TIMEOUT = 90  # generous: a killed claim needs its 10 s lease to run out before the sweep sends it again


def statuses(database: Database, ids: Sequence[str]) -> dict[str, str]:
    with database.transaction() as session:
        return dict(session.execute(
            select(Submission.id, Submission.status).where(Submission.id.in_(ids))).tuples().all())


def attempts(database: Database, ids: Sequence[str]) -> dict[str, int]:
    with database.transaction() as session:
        return dict(session.execute(
            select(Submission.id, Submission.attempts).where(Submission.id.in_(ids))).tuples().all())


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def assert_exactly_once(database: Database, ids: Sequence[str]) -> None:
    """Every submission completed, with one verdict row and one event of each kind: none lost, none doubled."""
    assert set(statuses(database, ids).values()) == {"completed"}
    assert verdict_counts(database, ids) == Counter(ids)
    events = event_counts(database, ids)
    for submission_id in ids:
        for action in ("submission.received", "moderation.completed", "verdict.decided"):
            assert events[(submission_id, action)] == 1, (submission_id, action, events)
        assert events[(submission_id, "moderation.failed")] == 0


def upstream_calls(upstream: FakeUpstream, texts: Sequence[str]) -> Counter[str]:
    """How many moderation requests the upstream received for each of `texts`."""
    wanted = set(texts)
    return Counter(t for inputs in upstream_inputs(upstream) for t in inputs if t in wanted)


def skipped_runs(worker: WorkerProcess) -> int:
    """How many moderation task runs this worker finished as `skipped` (a duplicate or redelivered message)."""
    log = worker.log_path.read_text(errors="replace")
    return len(re.findall(r"moderation\.moderate_submission\[[^\]]+\] succeeded in [0-9.e-]+s: 'skipped'", log))


def finished_runs(worker: WorkerProcess) -> int:
    """How many moderation task runs this worker finished, whatever their outcome (a doorbell's too: with the test
    Redis broker, the API's message for new submissions is the doorbell, app/doorbell.py)."""
    log = worker.log_path.read_text(errors="replace")
    return len(re.findall(r"moderation\.moderate_(?:submission|queued)\[[^\]]+\] succeeded in", log))


def texts_for(label: str, count: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"{label} {run} #{i}: " + (THREAT if i % 2 else "have a lovely day") for i in range(count)]


def test_sigkill_mid_work_loses_nothing_and_decides_once(
    client: FlaskClient, tenant: TenantKey, database: Database, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    fake_upstream.latency = 1.5  # keeps work in flight when the kill comes
    first = start_worker(concurrency=2, **openai_worker_env(fake_upstream))
    texts = texts_for("crash", 20)
    ids = submit_batch(client, tenant, texts)

    wait_for(lambda: "processing" in statuses(database, ids).values() and sum(upstream_calls(
        fake_upstream, texts).values()) >= 1, "a submission in flight at the upstream")
    first.kill()
    at_kill = statuses(database, ids)
    assert len(at_kill) == len(ids)
    assert [s for s in at_kill.values() if s not in FINAL], "everything was done before the kill"
    in_flight = [i for i, s in at_kill.items() if s == "processing"]
    assert in_flight, at_kill  # claims held by the dead worker: only their expired lease brings them back

    fake_upstream.latency = 0
    second = start_worker(concurrency=2, **openai_worker_env(fake_upstream))
    wait_all_final(database, ids, timeout=RECOVERY_TIMEOUT, worker=second)

    assert_exactly_once(database, ids)
    # The dead worker's claims were taken over, not ignored: each of those rows was claimed again.
    assert all(attempts(database, in_flight)[i] >= 2 for i in in_flight)
    # Every text got its answer from the upstream (some were asked twice: the first answer went to a dead worker).
    calls = upstream_calls(fake_upstream, texts)
    assert set(calls) == set(texts)
    for submission_id, text in zip(ids, texts, strict=True):
        body = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()
        assert body["verdict"]["decision"] == ("block" if text.endswith(THREAT) else "allow")


def test_two_workers_racing_on_the_same_submissions(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    fake_upstream.latency = 0.2  # long enough for the copies of a message to find the first claim still working
    workers = [start_worker(concurrency=2, **openai_worker_env(fake_upstream)) for _ in range(2)]
    texts = texts_for("race", 30)
    celery = app.extensions["celery"]
    ids = []
    for text in texts:
        submission_id = submit(client, tenant, {"input": text})["id"]
        ids.append(submission_id)
        # Two more messages right behind the API's own, so both workers go for the same row at the same time.
        for _ in range(2):
            celery.send_task(MODERATE_SUBMISSION, args=[submission_id])

    wait_all_final(database, ids, timeout=RECOVERY_TIMEOUT, worker=workers[0])

    assert_exactly_once(database, ids)
    assert upstream_calls(fake_upstream, texts) == Counter(texts)  # the losers never even asked the upstream
    assert set(attempts(database, ids).values()) == {1}
    for worker in workers:  # both really took part
        assert "moderation.moderate_submission[" in worker.log_path.read_text(errors="replace")


def test_duplicate_messages_are_skipped(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    fake_upstream.latency = 0.5  # so duplicates arrive while the first claim is still working
    worker = start_worker(concurrency=4, **openai_worker_env(fake_upstream))
    texts = texts_for("duplicate", 5)
    ids = submit_batch(client, tenant, texts)
    celery = app.extensions["celery"]
    for submission_id in ids:
        for _ in range(4):
            celery.send_task(MODERATE_SUBMISSION, args=[submission_id])

    wait_all_final(database, ids, timeout=RECOVERY_TIMEOUT, worker=worker)
    assert_exactly_once(database, ids)
    assert upstream_calls(fake_upstream, texts) == Counter(texts)
    assert set(attempts(database, ids).values()) == {1}

    # More duplicates after the verdicts: each is consumed and skipped, and changes nothing.
    for submission_id in ids:
        for _ in range(3):
            celery.send_task(MODERATE_SUBMISSION, args=[submission_id])
    # The API's one message (its doorbell) for the five and the 20 + 15 copies: every one consumed. A copy that came
    # first may have decided its row (and the others with it, in its batch); every other copy was skipped.
    wait_for(lambda: finished_runs(worker) >= 36, "every duplicate message to be consumed")
    assert skipped_runs(worker) >= 35 - len(ids)
    assert_exactly_once(database, ids)
    assert upstream_calls(fake_upstream, texts) == Counter(texts)
    assert set(attempts(database, ids).values()) == {1}


def test_broker_lost_its_messages(
    client: FlaskClient, tenant: TenantKey, database: Database, redis_url: str, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    texts = texts_for("lost", 10)
    ids = submit_batch(client, tenant, texts)  # no worker yet: the messages wait in Redis
    broker = redis.Redis.from_url(redis_url)
    queue_key = f"{BROKER_KEY_PREFIX}moderation"
    try:
        assert broker.llen(queue_key) == 1  # one message names the ten (a provider call's worth)
        flush_redis(redis_url)  # a Redis restart, with nothing kept on disk
        assert broker.llen(queue_key) == 0
    finally:
        broker.close()
    assert set(statuses(database, ids).values()) == {"queued"}

    worker = start_worker(**openai_worker_env(fake_upstream))
    wait_all_final(database, ids, timeout=RECOVERY_TIMEOUT, worker=worker)

    assert_exactly_once(database, ids)
    assert upstream_calls(fake_upstream, texts) == Counter(texts)
    assert '"requeued_stalled"' in worker.log_path.read_text(errors="replace")


def test_broker_down_at_submit_time(
    app: Flask, tenant: TenantKey, database: Database, database_url: str, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    dead_broker_app = create_app(make_settings(database_url, "redis://127.0.0.1:1/0"))
    try:
        dead_broker_client = dead_broker_app.test_client()
        text = f"broker down {uuid.uuid4().hex}: have a lovely day"
        request_id = f"broker-down-{uuid.uuid4().hex}"

        def post() -> tuple[int, str]:
            response = dead_broker_client.post("/v1/submissions", json={"input": text},
                                               headers={**tenant.headers, "X-Request-ID": request_id})
            return response.status_code, response.get_json()["id"]

        # The API answers (it does not hang on the broker); the bound only keeps a hang from stalling the run.
        with ThreadPoolExecutor(max_workers=1) as pool:
            status, submission_id = pool.submit(post).result(timeout=30)
        assert status == 202
        # The row and its audit event are committed although nothing reached the broker.
        assert statuses(database, [submission_id]) == {submission_id: "queued"}
        assert event_counts(database, [submission_id])[(submission_id, "submission.received")] == 1

        worker = start_worker(**openai_worker_env(fake_upstream))
        wait_all_final(database, [submission_id], timeout=RECOVERY_TIMEOUT, worker=worker)
        assert_exactly_once(database, [submission_id])
        assert upstream_calls(fake_upstream, [text]) == {text: 1}
    finally:
        dead_broker_app.extensions["verdict.db"].engine.dispose()
        app.extensions["celery"].set_default()  # create_app made the dead-broker Celery app the default


class _CountingProvider:
    """A provider that answers every text with the same scores and counts its calls."""

    name = "counting"
    max_batch = 32

    def __init__(self) -> None:
        self.calls = 0

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="counting-1", provider=self.name, judged_categories=list(CATEGORIES))]

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        self.calls += 1
        return _result(len(texts))


def _result(count: int) -> ProviderResult:
    scores = {c: (0.9 if c == "violence" else 0.01) for c in CATEGORIES}
    return ProviderResult(provider="counting", model="counting-1", results=[TextScores(scores=dict(scores))] * count,
                          judged=frozenset(CATEGORIES), latency_ms=7)


def test_live_claim_is_skipped_and_a_stale_holder_cannot_record(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database
) -> None:
    submission_id = submit(client, tenant, {"input": f"claims {uuid.uuid4().hex}: kill"})["id"]  # no worker runs

    with database.transaction() as session:
        first = claim_submission(session, submission_id, lease_seconds=10)
    assert first is not None and first.attempt == 1
    # A second claim while the first one's lease is live gets nothing...
    with database.transaction() as session:
        assert claim_submission(session, submission_id, lease_seconds=10) is None
    # ...and so does a whole task run: skipped, without asking the provider.
    provider = _CountingProvider()
    outcome = moderate_submissions(database, provider, [submission_id],
                                   app.extensions["verdict.settings"])[submission_id]
    assert outcome == "skipped"
    assert provider.calls == 0

    # The first holder stalls past its lease; a new claim takes over with a new fencing token.
    with database.transaction() as session:
        session.execute(update(Submission).where(Submission.id == submission_id)
                        .values(claimed_at=utcnow() - timedelta(seconds=60)))
    with database.transaction() as session:
        second = claim_submission(session, submission_id, lease_seconds=10)
    assert second is not None and second.token != first.token and second.attempt == 2

    # The stale holder can neither record, fail nor release the submission.
    with database.transaction() as session:
        assert record_verdict(session, first, _result(1), DEFAULT_POLICY) is None
    with database.transaction() as session:
        assert fail_submission(session, first, code="upstream_error", message="late") is False
    with database.transaction() as session:
        assert release_for_retry(session, first, delay_seconds=0) is False
    # The current holder wins, once.
    with database.transaction() as session:
        verdict = record_verdict(session, second, _result(1), DEFAULT_POLICY)
        assert verdict is not None and verdict.decision == "block"
    with database.transaction() as session:
        assert record_verdict(session, second, _result(1), DEFAULT_POLICY) is None
        assert claim_submission(session, submission_id, lease_seconds=10) is None

    assert_exactly_once(database, [submission_id])
    with database.transaction() as session:
        row = session.get(Submission, submission_id)
        assert row is not None
        assert (row.status, row.claim_token, row.attempts, row.error_code) == ("completed", None, 2, None)
