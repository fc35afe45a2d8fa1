"""Throughput and resilience against the fake upstream, with real worker processes: batches, the shared rate
limit, a batch whose answer is unusable for one text only, the cache, the circuit breaker with its fallback, and
each tenant's choice when no provider answers.

No test here measures time: each asserts what the upstream received and what the database holds.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update

from app.db import Database
from app.models import AuditEvent, Submission, utcnow
from app.use_cases import moderation
from app.use_cases.tenants import configure_tenant
from app.use_cases.verdicts import claim_submission, release_for_retry
from tests.conftest import TenantKey, issue_key
from tests.fake_upstream import ONE_BAD_RESULT, FakeUpstream, score_text
from tests.integration.conftest import WorkerProcess, openai_worker_env
from tests.integration.test_batched_messages import RecordingProvider
from tests.integration.test_pipeline import submit_batch, upstream_inputs, wait_all_final
from tests.integration.test_recovery import RECOVERY_TIMEOUT, assert_exactly_once, attempts, upstream_calls
from tests.lanes import integration_fixture

API_KEY = "sk-upstream-test"


def texts_for(label: str, count: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    words = ["kill", "idiot", "hate", "calm", "stupid"]
    return [f"{label} {run} #{i}: you {words[i % len(words)]} now" for i in range(count)]


def test_queued_texts_go_upstream_together_and_each_verdict_is_its_own(
    client: FlaskClient, tenant: TenantKey, database: Database, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    texts = texts_for("batched", 20)
    ids = submit_batch(client, tenant, texts)  # queued before any worker runs: a backlog
    worker = start_worker(concurrency=1, **openai_worker_env(fake_upstream, UPSTREAM_MAX_BATCH="8"))
    wait_all_final(database, ids, timeout=RECOVERY_TIMEOUT, worker=worker)

    assert_exactly_once(database, ids)
    assert upstream_calls(fake_upstream, texts) == Counter(texts)
    sizes = [len(inputs) for inputs in upstream_inputs(fake_upstream)]
    assert max(sizes) > 1 and all(size <= 8 for size in sizes), sizes
    assert len(sizes) < len(texts)
    for submission_id, text in zip(ids, texts, strict=True):
        verdict = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()["verdict"]
        # Matched back by position: each submission holds exactly its own text's scores.
        assert verdict["category_scores"] == score_text(text), (submission_id, text)
        assert verdict["provider"] == "openai" and verdict["cached"] is False and verdict["degraded"] is False


def test_a_result_unusable_for_one_text_retries_only_that_submission(
    client: FlaskClient, tenant: TenantKey, database: Database, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    texts = texts_for("one-bad", 4)
    ids = submit_batch(client, tenant, texts)
    fake_upstream.malformed_next(ONE_BAD_RESULT)
    worker = start_worker(concurrency=1, **openai_worker_env(fake_upstream, UPSTREAM_MAX_BATCH="8"))
    wait_all_final(database, ids, timeout=RECOVERY_TIMEOUT, worker=worker)

    assert_exactly_once(database, ids)
    first_inputs = upstream_inputs(fake_upstream)[0]
    assert len(first_inputs) > 1, "the texts were not batched"
    spoiled = first_inputs[0]
    calls = upstream_calls(fake_upstream, texts)
    assert calls[spoiled] == 2
    assert all(calls[text] == 1 for text in first_inputs[1:])
    tries = attempts(database, ids)
    assert tries[ids[texts.index(spoiled)]] == 2
    assert [tries[ids[texts.index(text)]] for text in first_inputs[1:]] == [1] * (len(first_inputs) - 1)


@integration_fixture
def limited_upstream() -> Iterator[FakeUpstream]:
    # Two requests in any 3-second window: a limit a backlog runs into many times within one test.
    with FakeUpstream(api_key=API_KEY, rpm=2, window=3) as upstream:
        yield upstream


def test_workers_share_the_limit_and_are_never_refused(
    client: FlaskClient, tenant: TenantKey, database: Database, limited_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    texts = texts_for("limited", 12)
    ids = submit_batch(client, tenant, texts)
    # The configured limit is far too generous: only the provider's headers tell the workers the real one.
    env = openai_worker_env(limited_upstream, UPSTREAM_MAX_BATCH="2", UPSTREAM_RPM="1000",
                            UPSTREAM_RATE_WINDOW_SECONDS="3")
    workers = [start_worker(concurrency=1, **env) for _ in range(2)]
    wait_all_final(database, ids, timeout=RECOVERY_TIMEOUT, worker=workers[0])

    assert_exactly_once(database, ids)
    assert upstream_calls(limited_upstream, texts) == Counter(texts)
    assert len(upstream_inputs(limited_upstream)) >= 6  # enough calls to run into the limit several times
    assert limited_upstream.rejected_429 == 0


def test_a_repeated_text_is_not_paid_for_twice(
    client: FlaskClient, tenant: TenantKey, other_tenant: TenantKey, database: Database, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(concurrency=1, **openai_worker_env(fake_upstream))
    text = f"cache {uuid.uuid4().hex}: I will kill you"

    def moderate(who: TenantKey, **extra: str) -> dict[str, object]:
        submission_id = submit_batch(client, who, [text])[0] if not extra else client.post(
            "/v1/submissions", json={"input": text, **extra}, headers=who.headers).get_json()["id"]
        wait_all_final(database, [submission_id], timeout=RECOVERY_TIMEOUT, worker=worker)
        body: dict[str, object] = client.get(f"/v1/submissions/{submission_id}", headers=who.headers).get_json()
        return body

    first, again = moderate(tenant), moderate(tenant)
    assert upstream_calls(fake_upstream, [text]) == {text: 1}
    first_verdict, again_verdict = first["verdict"], again["verdict"]
    assert isinstance(first_verdict, dict) and isinstance(again_verdict, dict)
    assert first_verdict["cached"] is False and again_verdict["cached"] is True
    assert again_verdict["category_scores"] == first_verdict["category_scores"] == score_text(text)
    assert again_verdict["decision"] == "block" and again_verdict["provider"] == "openai"
    assert again_verdict["degraded"] is False

    # Another tenant, or another model, is a different cache entry: asked again.
    other = moderate(other_tenant)["verdict"]
    assert isinstance(other, dict) and other["cached"] is False
    assert upstream_calls(fake_upstream, [text]) == {text: 2}
    chosen = moderate(tenant, model="text-moderation-stable")["verdict"]
    assert isinstance(chosen, dict) and chosen["cached"] is False
    assert upstream_calls(fake_upstream, [text]) == {text: 3}
    assert_exactly_once(database, [str(first["id"]), str(again["id"])])


# ---- circuit breaker, fallback, fail open / fail closed ---------------------------------------------------------


def test_an_open_circuit_hands_over_to_the_fallback_and_says_so(
    client: FlaskClient, tenant: TenantKey, database: Database, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    fake_upstream.fail_next(503, 50)  # an outage
    worker = start_worker(concurrency=1, **openai_worker_env(
        fake_upstream, CIRCUIT_FAILURE_THRESHOLD="2", CIRCUIT_RESET_SECONDS="300",
        MODERATION_FALLBACK_PROVIDER="local"))
    first = submit_batch(client, tenant, ["you are an idiot"])
    wait_all_final(database, first, timeout=RECOVERY_TIMEOUT, worker=worker)
    # Two failed calls opened the circuit; the third try went to the local engine instead.
    assert len(fake_upstream.requests) == 2
    later = submit_batch(client, tenant, ["have a lovely day"])
    wait_all_final(database, later, timeout=RECOVERY_TIMEOUT, worker=worker)
    assert len(fake_upstream.requests) == 2  # the open circuit is skipped at once: no call, no wait

    assert_exactly_once(database, first + later)
    for submission_id, decision in ((first[0], "block"), (later[0], "allow")):
        verdict = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()["verdict"]
        assert verdict["provider"] == "local" and verdict["degraded"] is True and verdict["cached"] is False
        assert verdict["decision"] == decision
    log = worker.log_path.read_text(errors="replace")
    assert '"upstream_circuit"' in log and '"new": "open"' in log


def test_total_failure_follows_each_tenants_failure_mode(
    client: FlaskClient, database: Database, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    tenants = {mode: issue_key(database) for mode in ("review", "block", "allow", "fail")}
    with database.transaction() as session:
        for mode in ("review", "block", "allow"):
            configure_tenant(session, tenants[mode].tenant_name, failure_mode=mode)
    fake_upstream.fail_next(503, 200)  # down for the whole test, and no fallback configured
    worker = start_worker(concurrency=1, **openai_worker_env(fake_upstream))
    ids = {mode: submit_batch(client, who, [f"{mode} {uuid.uuid4().hex}: I will kill you"])[0]
           for mode, who in tenants.items()}
    wait_all_final(database, list(ids.values()), timeout=RECOVERY_TIMEOUT, worker=worker)

    for mode in ("review", "block", "allow"):
        body = client.get(f"/v1/submissions/{ids[mode]}", headers=tenants[mode].headers).get_json()
        assert body["status"] == "completed", body
        verdict = body["verdict"]
        # Decided without any provider: said plainly, never passed off as a moderation result.
        assert (verdict["decision"], verdict["degraded"], verdict["provider"]) == (mode, True, "failsafe")
        assert verdict["model"] == ("fail-open" if mode == "allow" else "fail-closed")
        assert all(score is None for score in verdict["category_scores"].values())
    failed = client.get(f"/v1/submissions/{ids['fail']}", headers=tenants["fail"].headers).get_json()
    assert failed["status"] == "failed" and failed["verdict"] is None
    assert failed["error"]["code"] in {"upstream_error", "upstream_circuit_open"}

    decided = [i for mode, i in ids.items() if mode != "fail"]
    assert_exactly_once(database, decided)
    with database.transaction() as session:
        events = session.execute(select(AuditEvent.subject_id, AuditEvent.decision, AuditEvent.details)
                                 .where(AuditEvent.subject_id.in_(decided),
                                        AuditEvent.action == "verdict.decided")).tuples().all()
    assert {(subject, decision, details["degraded"]) for subject, decision, details in events} == {
        (ids[mode], mode, True) for mode in ("review", "block", "allow")}


def test_a_submission_given_back_for_a_retry_waits_for_its_due_time(
    client: FlaskClient, tenant: TenantKey, database: Database,
) -> None:
    # No worker: the claims are made here, as a worker's task would make them.
    (submission_id,) = submit_batch(client, tenant, [f"due {uuid.uuid4().hex}: have a lovely day"])
    with database.transaction() as session:
        first = claim_submission(session, submission_id, lease_seconds=60)
        assert first is not None
        assert release_for_retry(session, first, delay_seconds=120)
    # Its earlier message, still queued when a batch took it along, comes now: too soon, nothing is claimed.
    with database.transaction() as session:
        assert claim_submission(session, submission_id, lease_seconds=60) is None
        assert release_for_retry(session, first, delay_seconds=0) is False  # the old claim holds nothing any more
    # The retry's own message, due now, claims it.
    with database.transaction() as session:
        session.execute(update(Submission).where(Submission.id == submission_id).values(enqueued_at=utcnow()))
    with database.transaction() as session:
        second = claim_submission(session, submission_id, lease_seconds=60)
        assert second is not None and second.attempt == 2


def test_a_worker_waits_to_fill_a_batch_only_under_load(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(moderation.time, "sleep", sleeps.append)
    settings = app.extensions["verdict.settings"]
    model = f"linger-{uuid.uuid4().hex[:8]}"  # rows of other tests are for other models: never in these batches

    def submit_for_model(count: int) -> list[str]:
        response = client.post("/v1/submissions", headers=tenant.headers, json={
            "items": [{"input": f"{model} #{i}", "model": model} for i in range(count)]})
        assert response.status_code == 202
        return [item["id"] for item in response.get_json()["data"]]

    provider = RecordingProvider(max_batch=8)
    (alone,) = submit_for_model(1)
    assert moderation.moderate_submissions(database, provider, [alone], settings)[alone] == "completed"
    assert sleeps == []  # nothing else queued: no waiting at all

    ids = submit_for_model(3)
    assert moderation.moderate_submissions(database, provider, [ids[0]], settings)[ids[0]] == "completed"
    assert sleeps == [settings.batch_max_wait_ms / 1000]  # others were queued: one short wait for more
    assert provider.calls == [[f"{model} #0"], [f"{model} #0", f"{model} #1", f"{model} #2"]]
    # The other two were decided in that batch; their own messages find nothing left to do.
    for other in ids[1:]:
        assert moderation.moderate_submissions(database, provider, [other], settings)[other] == "skipped"
    assert_exactly_once(database, [alone, *ids])
