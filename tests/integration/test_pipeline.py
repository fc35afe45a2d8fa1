"""The asynchronous pipeline end to end: in-process API → PostgreSQL → Redis → real worker process → provider."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app.db import Database
from app.models import AuditEvent, Submission, Verdict
from app.moderation.policy import DEFAULT_POLICY
from app.moderation.taxonomy import CATEGORIES
from tests.conftest import TenantKey, flush_redis
from tests.fake_upstream import MALFORMED_KINDS, MODERATION_PATHS, TRIGGERS, FakeUpstream, score_text
from tests.integration.conftest import (
    FINAL,
    WorkerProcess,
    openai_worker_env,
    submit,
    wait_final,
    worker_env,
)
from tests.lanes import integration_fixture


def test_submission_completes_through_openai_compatible_provider(
    client: FlaskClient, tenant: TenantKey, fake_upstream: FakeUpstream, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(**openai_worker_env(fake_upstream))
    accepted = submit(client, tenant, {"input": ["I will kill you", "have a nice day"], "role": "output",
                                       "conversation_id": "conv-1", "turn_id": "t-2", "metadata": {"k": "v"}})
    body = wait_final(client, tenant, accepted["id"])

    assert body["status"] == "completed"
    verdict = body["verdict"]
    assert verdict["decision"] == "block"
    assert verdict["categories"]["violence"] is True
    assert verdict["category_scores"]["violence"] == 0.97
    assert verdict["provider"] == "openai"
    assert verdict["model"] == "omni-moderation-latest"
    assert verdict["not_judged"] == []
    assert [r["decision"] for r in verdict["results"]] == ["block", "allow"]
    assert body["metadata"] == {"k": "v"} and body["role"] == "output" and body["conversation_id"] == "conv-1"
    assert fake_upstream.texts_seen() == ["I will kill you", "have a nice day"]
    assert fake_upstream.requests[0].headers["authorization"] == "Bearer sk-upstream-test"


def test_submission_completes_through_local_engine(
    client: FlaskClient, tenant: TenantKey, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(MODERATION_PROVIDER="local")
    accepted = submit(client, tenant, {"input": "you are a fucking idiot"})
    body = wait_final(client, tenant, accepted["id"])

    verdict = body["verdict"]
    assert body["status"] == "completed"
    assert verdict["provider"] == "local"
    assert verdict["decision"] == "block"
    assert verdict["category_scores"]["harassment"] > 0.8
    assert [r["provider"] for r in verdict["results"]] == ["local"]
    # What the engine cannot judge is reported as not judged, never as zero.
    assert "sexual/minors" in verdict["not_judged"] and verdict["category_scores"]["sexual/minors"] is None
    assert verdict["categories"]["sexual/minors"] is None


# --- helpers -----------------------------------------------------------------------------------------------------

NEUTRAL = "have a lovely day"


def wait_all_final(database: Database, ids: Sequence[str], *, timeout: float = 90,
                   worker: WorkerProcess | None = None) -> dict[str, str]:
    """Poll the database until every submission is completed or failed; the statuses by id."""
    deadline = time.monotonic() + timeout
    while True:
        with database.transaction() as session:
            found = dict(session.execute(
                select(Submission.id, Submission.status).where(Submission.id.in_(ids))).tuples().all())
        if len(found) == len(ids) and all(status in FINAL for status in found.values()):
            return found
        if time.monotonic() > deadline:
            pending = Counter(found.get(i, "missing") for i in ids)
            tail = worker.log_tail() if worker else ""
            raise AssertionError(f"not all final after {timeout}s: {dict(pending)}\n{tail}")
        time.sleep(0.2)


def verdict_counts(database: Database, ids: Sequence[str]) -> Counter[str]:
    with database.transaction() as session:
        return Counter(session.scalars(select(Verdict.submission_id).where(Verdict.submission_id.in_(ids))))


def event_counts(database: Database, ids: Sequence[str]) -> Counter[tuple[str, str]]:
    """(subject id, action) -> how many audit events."""
    with database.transaction() as session:
        rows = session.execute(select(AuditEvent.subject_id, AuditEvent.action)
                               .where(AuditEvent.subject_id.in_(ids))).tuples().all()
    return Counter((str(subject), action) for subject, action in rows)


def upstream_inputs(upstream: FakeUpstream) -> list[list[str]]:
    """The `input` of every moderation request the fake received, in order."""
    return [r.json["input"] for r in upstream.requests
            if r.path in MODERATION_PATHS and isinstance(r.json, dict) and isinstance(r.json.get("input"), list)]


def requests_for(upstream: FakeUpstream, text: str) -> int:
    return sum(1 for inputs in upstream_inputs(upstream) if text in inputs)


def submit_batch(client: FlaskClient, tenant: TenantKey, texts: Sequence[str], *,
                 request_id: str | None = None) -> list[str]:
    headers = dict(tenant.headers)
    if request_id:
        headers["X-Request-ID"] = request_id
    response = client.post("/v1/submissions", json={"items": [{"input": t} for t in texts]}, headers=headers)
    assert response.status_code == 202, response.get_json()
    if request_id:
        assert response.headers["X-Request-ID"] == request_id
    ids = [item["id"] for item in response.get_json()["data"]]
    assert len(ids) == len(texts) and len(set(ids)) == len(ids)
    return ids


def expected_decision(text: str) -> str:
    """What the default policy makes of the fake upstream's scores: every trigger word but "stupid" scores at or
    above its category's block threshold, "stupid" lands in the review band, anything else is allowed."""
    words = set(text.lower().split())
    if words & (set(TRIGGERS) - {"stupid"}):
        return "block"
    if "stupid" in words:
        return "review"
    return "allow"


def drain_pending(database: Database, timeout: float = 30) -> None:
    """Wait (bounded) until no submission anywhere in the database is still waiting for a worker.

    Rows an earlier test left queued are picked up by the sweep of whatever worker runs next; letting the shared
    worker finish them first keeps them from consuming the upstream's scripted failures meant for this class.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with database.transaction() as session:
            pending = session.scalar(select(func.count()).select_from(Submission)
                                     .where(Submission.status.in_(["queued", "processing"])))
        if not pending:
            return
        time.sleep(0.2)


# --- one worker on the OpenAI-compatible provider, shared by the tests of this class ------------------------------


@integration_fixture(scope="class")
def shared_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key="sk-upstream-test") as upstream:
        yield upstream


@integration_fixture(scope="class", serial=True)
def shared_worker(database_url: str, redis_url: str, database: Database, shared_upstream: FakeUpstream,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    flush_redis(redis_url)
    log_path = tmp_path_factory.mktemp("openai-worker") / "worker.log"
    worker = WorkerProcess(worker_env(database_url, redis_url, **openai_worker_env(shared_upstream)), log_path,
                           concurrency=4)
    worker.start()
    try:
        drain_pending(database)
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def upstream(shared_upstream: FakeUpstream, shared_worker: WorkerProcess) -> FakeUpstream:
    """The shared fake upstream, with no scripted behaviour, latency or request log left by an earlier test."""
    shared_upstream.reset()
    return shared_upstream


@dataclass(frozen=True)
class UpstreamCase:
    name: str
    script: Callable[[FakeUpstream], None]
    status: str
    error_code: str | None
    requests: int  # how many upstream calls the submission costs in all


def _malformed_kinds(*kinds: str) -> Callable[[FakeUpstream], None]:
    def script(upstream: FakeUpstream) -> None:
        for kind in kinds:
            upstream.malformed_next(kind)
    return script


UPSTREAM_CASES = [
    UpstreamCase("429-retry-after-once", lambda u: u.fail_next(429, retry_after=1), "completed", None, 2),
    UpstreamCase("500-twice", lambda u: u.fail_next(500, 2), "completed", None, 3),
    UpstreamCase("503-three-times", lambda u: u.fail_next(503, 3), "failed", "upstream_error", 3),
    UpstreamCase("400-once-not-retried", lambda u: u.fail_next(400), "failed", "upstream_refused", 1),
    *[UpstreamCase(f"malformed-{kind}-once", _malformed_kinds(kind), "completed", None, 2)
      for kind in sorted(MALFORMED_KINDS)],
    UpstreamCase("malformed-three-times", _malformed_kinds("not_json", "short", "bad_scores"), "failed",
                 "upstream_malformed", 3),
    UpstreamCase("hang-past-client-timeout", lambda u: u.hang_next(5), "completed", None, 2),
    # Slow, but within the client's 2 s timeout: answered on the first attempt (no task time limit cuts it off).
    UpstreamCase("slow-within-client-timeout", lambda u: u.hang_next(1.5), "completed", None, 1),
]


class TestThroughOpenAICompatibleProvider:
    def test_batch_of_100_each_verdict_matches_its_own_text(
        self, client: FlaskClient, tenant: TenantKey, database: Database, upstream: FakeUpstream,
        shared_worker: WorkerProcess,
    ) -> None:
        run = uuid.uuid4().hex[:8]
        words = sorted(TRIGGERS)
        # Every third item carries a trigger word (all eleven of them in turn); the rest are harmless.
        texts = [f"item {i} of {run}: " + (f"you {words[(i // 3) % len(words)]} now" if i % 3 == 0 else NEUTRAL)
                 for i in range(100)]
        ids = submit_batch(client, tenant, texts)

        statuses = wait_all_final(database, ids, worker=shared_worker)
        assert set(statuses.values()) == {"completed"}
        # Each text went upstream exactly once.
        seen = Counter(t for inputs in upstream_inputs(upstream) for t in inputs if f" of {run}: " in t)
        assert seen == Counter(texts)

        decisions: Counter[str] = Counter()
        for submission_id, text in zip(ids, texts, strict=True):
            response = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers)
            body = response.get_json()
            verdict = body["verdict"]
            # The verdict carries exactly the scores of this submission's own text, so none got crossed.
            assert verdict["category_scores"] == score_text(text), (submission_id, text)
            assert verdict["decision"] == expected_decision(text), (submission_id, text)
            assert verdict["flagged"] is (verdict["decision"] != "allow")
            for category, score in TRIGGERS.get(text.split()[-2], {}).items():
                assert verdict["categories"][category] is (score >= 0.5)
            decisions[verdict["decision"]] += 1
        assert decisions == {"block": 31, "review": 3, "allow": 66}

        with database.transaction() as session:
            contents = dict(session.execute(
                select(Submission.id, Submission.content).where(Submission.id.in_(ids))).tuples().all())
        assert [contents[i] for i in ids] == [[t] for t in texts]
        assert verdict_counts(database, ids) == Counter(ids)

    def test_audit_events_of_a_completed_submission(
        self, client: FlaskClient, tenant: TenantKey, database: Database, upstream: FakeUpstream,
        shared_worker: WorkerProcess,
    ) -> None:
        canary = f"zq{uuid.uuid4().hex}"
        batch_texts = [f"{canary} first: I will kill the lights", f"{canary} second: Grüße aus Köln 👋",
                       f"{canary} third: {NEUTRAL}"]
        batch_request_id = f"audit-batch-{uuid.uuid4().hex}"
        batch_ids = submit_batch(client, tenant, batch_texts, request_id=batch_request_id)
        single_text = [f"{canary} fourth: you are stupid", f"{canary} fifth: second text of one submission"]
        single_request_id = f"audit-single-{uuid.uuid4().hex}"
        response = client.post("/v1/submissions", json={"input": single_text},
                               headers={**tenant.headers, "X-Request-ID": single_request_id})
        assert response.status_code == 202
        single_id = response.get_json()["id"]
        ids = [*batch_ids, single_id]
        texts = {**{i: [t] for i, t in zip(batch_ids, batch_texts, strict=True)}, single_id: single_text}
        request_ids = {**dict.fromkeys(batch_ids, batch_request_id), single_id: single_request_id}

        assert set(wait_all_final(database, ids, worker=shared_worker).values()) == {"completed"}

        with database.transaction() as session:
            events = list(session.scalars(select(AuditEvent).where(AuditEvent.subject_id.in_(ids))
                                          .order_by(AuditEvent.id)))
            # Read every column while the session is open.
            rows = [{c.key: getattr(e, c.key) for c in AuditEvent.__table__.columns} for e in events]

        by_subject: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        for row in rows:
            by_subject[row["subject_id"]].append(row)
        for submission_id in ids:
            mine = by_subject[submission_id]
            assert Counter(r["action"] for r in mine) == {
                "submission.received": 1, "moderation.completed": 1, "verdict.decided": 1}, mine
            # In the order things happened.
            assert [r["action"] for r in mine] == ["submission.received", "moderation.completed", "verdict.decided"]
            digest = hashlib.sha256(json.dumps(texts[submission_id], ensure_ascii=False,
                                               separators=(",", ":")).encode()).hexdigest()
            for row in mine:
                expected_actor = tenant.key_id if row["action"] == "submission.received" else "worker"
                assert row["actor"] == expected_actor, row
                assert row["tenant_id"] == tenant.tenant_id
                assert row["subject_type"] == "submission"
                assert row["request_id"] == request_ids[submission_id]
                assert row["content_digest"] == digest
            decided = next(r for r in mine if r["action"] == "verdict.decided")
            assert decided["decision"] == ("block" if "kill" in texts[submission_id][0] else
                                                      "review" if "stupid" in texts[submission_id][0] else "allow")
        assert len({rows_[0]["content_digest"] for rows_ in by_subject.values()}) == len(ids)

        # No column of any event holds the content, or any recognisable piece of it.
        forbidden = [canary, "Grüße", "Köln", "kill the lights", "stupid", "second text of one submission"]
        for row in rows:
            for column, value in row.items():
                rendered = json.dumps(value, default=str, ensure_ascii=False)
                for piece in forbidden:
                    assert piece not in rendered, (column, row)

    def test_verdict_provenance(
        self, client: FlaskClient, tenant: TenantKey, database: Database, upstream: FakeUpstream,
        shared_worker: WorkerProcess,
    ) -> None:
        default_model = submit(client, tenant, {"input": f"provenance {uuid.uuid4().hex}: {NEUTRAL}"})["id"]
        chosen_model = submit(client, tenant, {"input": f"provenance {uuid.uuid4().hex}: I hate mondays",
                                               "model": "text-moderation-stable"})["id"]
        expected_thresholds = {c: {"review": 0.2, "block": 0.5}
                               if c in {"sexual/minors", "self-harm/intent", "self-harm/instructions"}
                               else {"review": 0.5, "block": 0.8} for c in CATEGORIES}
        assert DEFAULT_POLICY.thresholds_json() == expected_thresholds

        for submission_id, model, decision in [(default_model, "omni-moderation-latest", "allow"),
                                               (chosen_model, "text-moderation-stable", "block")]:
            body = wait_final(client, tenant, submission_id)
            assert body["status"] == "completed"
            verdict = body["verdict"]
            assert verdict["decision"] == decision
            assert verdict["provider"] == "openai"
            assert verdict["model"] == model
            assert verdict["policy"] == "default" and verdict["policy_version"] == 1
            assert verdict["thresholds"] == expected_thresholds
            assert verdict["cached"] is False and verdict["degraded"] is False
            assert isinstance(verdict["latency_ms"], int) and not isinstance(verdict["latency_ms"], bool)
            assert verdict["latency_ms"] >= 0
            assert verdict["not_judged"] == []
            assert body["error"] is None
            with database.transaction() as session:
                row = session.scalars(select(Verdict).where(Verdict.submission_id == submission_id)).one()
                assert (row.provider, row.model, row.policy_name, row.policy_version, row.cached, row.degraded) == (
                    "openai", model, "default", 1, False, False)
                assert row.thresholds == expected_thresholds and row.latency_ms == verdict["latency_ms"]
        # The model the client chose is the one asked for upstream.
        assert sorted(r.json["model"] for r in upstream.requests) == ["omni-moderation-latest",
                                                                      "text-moderation-stable"]

    @pytest.mark.parametrize("case", UPSTREAM_CASES, ids=[c.name for c in UPSTREAM_CASES])
    def test_upstream_misbehaviour(
        self, case: UpstreamCase, client: FlaskClient, tenant: TenantKey, database: Database,
        upstream: FakeUpstream, shared_worker: WorkerProcess,
    ) -> None:
        text = f"{case.name} {uuid.uuid4().hex}: {NEUTRAL}"
        case.script(upstream)
        submission_id = submit(client, tenant, {"input": text})["id"]
        body = wait_final(client, tenant, submission_id, timeout=60)

        assert body["status"] == case.status, body
        assert requests_for(upstream, text) == case.requests
        counts = event_counts(database, [submission_id])
        with database.transaction() as session:
            submission = session.get(Submission, submission_id)
            assert submission is not None
            assert submission.attempts == case.requests
            assert submission.claim_token is None
        if case.status == "completed":
            assert body["error"] is None
            assert body["verdict"]["decision"] == "allow"
            assert verdict_counts(database, [submission_id]) == {submission_id: 1}
            assert counts[(submission_id, "verdict.decided")] == 1
            assert counts[(submission_id, "moderation.failed")] == 0
        else:
            assert body["verdict"] is None
            assert body["error"]["code"] == case.error_code
            assert text not in body["error"]["message"]
            assert verdict_counts(database, [submission_id]) == {}
            assert counts[(submission_id, "verdict.decided")] == 0
            assert counts[(submission_id, "moderation.failed")] == 1
        # Every scripted answer went to this submission: no other request reached the upstream meanwhile.
        assert len(upstream.requests) == case.requests
        assert upstream.texts_seen() == ([text] if case.status == "completed" else [])


def test_batch_of_100_through_local_engine(
    client: FlaskClient, tenant: TenantKey, database: Database, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(concurrency=4, MODERATION_PROVIDER="local")
    texts = [f"you are a fucking idiot number {i}" if i % 4 == 0 else f"thank you for the lovely dinner, item {i}"
             for i in range(100)]
    ids = submit_batch(client, tenant, texts)

    assert set(wait_all_final(database, ids, worker=worker).values()) == {"completed"}
    assert verdict_counts(database, ids) == Counter(ids)
    # Each verdict holds its own text's scores: the same engine, scoring that text alone in this process, agrees.
    # (What the engine should say of insults is the behaviour tests' business, tests/unit/test_engine_behaviour.py.)
    from app.moderation.local_engine import LocalEngine

    alone = LocalEngine()
    harassment: dict[bool, list[float]] = {True: [], False: []}
    for submission_id, text in zip(ids, texts, strict=True):
        verdict = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()["verdict"]
        assert verdict["provider"] == "local"
        expected = alone.moderate([text]).results[0].scores
        scores = {c: s for c, s in verdict["category_scores"].items() if s is not None}
        assert scores == pytest.approx(expected, abs=1e-5), (submission_id, text)
        harassment["idiot" in text].append(verdict["category_scores"]["harassment"])
    # The insults and the thanks are told apart in every case.
    assert min(harassment[True]) > max(harassment[False])


def test_wrong_upstream_key_fails_without_retry(
    client: FlaskClient, tenant: TenantKey, database: Database, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(**openai_worker_env(fake_upstream, UPSTREAM_API_KEY="wrong"))
    text = f"wrong key {uuid.uuid4().hex}: {NEUTRAL}"
    submission_id = submit(client, tenant, {"input": text})["id"]
    body = wait_final(client, tenant, submission_id)

    assert body["status"] == "failed"
    assert body["error"]["code"] == "upstream_refused"
    assert body["verdict"] is None
    mine = [r for r in fake_upstream.requests if isinstance(r.json, dict) and r.json.get("input") == [text]]
    assert len(mine) == 1
    assert mine[0].headers["authorization"] == "Bearer wrong"
    assert verdict_counts(database, [submission_id]) == {}
    assert event_counts(database, [submission_id])[(submission_id, "moderation.failed")] == 1


def test_cascade_sends_only_uncertain_texts_upstream(
    client: FlaskClient, tenant: TenantKey, fake_upstream: FakeUpstream, start_worker: Callable[..., WorkerProcess]
) -> None:
    from app.moderation.local_engine import LocalEngine

    confident, uncertain = "have a lovely day, thank you", "I will kill you"
    local = LocalEngine()
    tops = {t: max(local.moderate([t]).results[0].scores.values()) for t in (confident, uncertain)}
    assert tops[confident] < tops[uncertain]
    # The band holds the second text's local score and not the first's, whatever the shipped model's exact scores.
    env = openai_worker_env(fake_upstream, MODERATION_PROVIDER="cascade",
                            CASCADE_BAND_LOW=str((tops[confident] + tops[uncertain]) / 2), CASCADE_BAND_HIGH="1.0")
    start_worker(**env)
    accepted = submit(client, tenant, {"input": [confident, uncertain]})
    verdict = wait_final(client, tenant, accepted["id"])["verdict"]

    assert fake_upstream.texts_seen() == [uncertain]
    assert verdict["provider"] == "cascade"
    assert [r["provider"] for r in verdict["results"]] == ["local", "openai"]
    assert verdict["results"][1]["category_scores"]["violence"] == 0.97  # the fake upstream's score, not ours
    assert verdict["results"][1]["decision"] == "block"
    assert verdict["results"][0]["category_scores"]["sexual/minors"] is None  # the engine does not judge it
