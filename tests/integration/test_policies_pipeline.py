"""Policies through the real pipeline (Celery workers, PostgreSQL, Redis, the fake upstream): per-role thresholds,
a blocklist match (and a hostile pattern), a list change the cache cannot hide, the shadow decision and its report,
backtests answered at once and run as a job, and a policy changed while submissions are in flight."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select

from app import create_app
from app.db import Database
from app.models import Backtest, PolicyVersion, TenantPolicy, Verdict, utcnow
from tests.conftest import TenantKey, issue_key, make_settings
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import WorkerProcess, openai_worker_env, submit, wait_final

STRICT_SHADOW: dict[str, Any] = {"name": "strict", "categories": {"harassment": {"review": 0.3, "block": 0.5}}}
CHAT: dict[str, Any] = {
    "name": "chat",
    "input": {"harassment": {"review": 0.7, "block": 0.9}},
    "output": {"harassment": {"review": 0.4, "block": 0.9}},
    "blocklists": [{"list": "banned", "category": "hate", "decision": "block"}],
    "allowlists": [{"list": "medical", "categories": ["sexual"], "max_decision": "review"}],
    "shadow": "strict",
}


def put(client: FlaskClient, tenant: TenantKey, path: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = client.put(path, json=body, headers={**tenant.headers, **headers})
    assert response.status_code == 200, response.get_json()
    out: dict[str, Any] = response.get_json()
    return out


def post(client: FlaskClient, tenant: TenantKey, path: str, body: dict[str, Any], status: int = 201) -> Any:
    response = client.post(path, json=body, headers=tenant.headers)
    assert response.status_code == status, response.get_json()
    return response.get_json()


def verdict_of(client: FlaskClient, tenant: TenantKey, body: dict[str, Any]) -> dict[str, Any]:
    final = wait_final(client, tenant, submit(client, tenant, body)["id"])
    assert final["status"] == "completed", final
    verdict: dict[str, Any] = final["verdict"]
    return verdict


def set_up_chat(client: FlaskClient, tenant: TenantKey) -> None:
    put(client, tenant, "/v1/blocklists/banned", {"terms": ["frobnicate", "wibble wobble"],
                                                  "patterns": [r"\bzz+t\b", "(a+)+$"]})
    put(client, tenant, "/v1/allowlists/medical", {"terms": ["anatomy"]})
    post(client, tenant, "/v1/policies", STRICT_SHADOW)
    post(client, tenant, "/v1/policies", CHAT)


def test_roles_lists_shadow_report_and_backtests(
    client: FlaskClient, tenant: TenantKey, start_worker: Callable[..., WorkerProcess], fake_upstream: FakeUpstream,
    database_url: str, redis_url: str, database: Database,
) -> None:
    start_worker(**openai_worker_env(fake_upstream))
    set_up_chat(client, tenant)
    started = time.time()

    # Outputs go to review at a lower threshold than inputs: the same text (harassment 0.6) is allowed as an input.
    as_input = verdict_of(client, tenant, {"input": "you are stupid", "role": "input", "policy": "chat"})
    as_output = verdict_of(client, tenant, {"input": "you are stupid", "role": "output", "policy": "chat"})
    assert (as_input["decision"], as_output["decision"]) == ("allow", "review")
    assert as_input["policy"] == "chat" and as_input["policy_version"] == 1
    assert as_input["thresholds"]["harassment"] == {"review": 0.7, "block": 0.9}
    assert as_output["thresholds"]["harassment"] == {"review": 0.4, "block": 0.9}
    assert as_output["category_decisions"]["harassment"] == "review"
    # The shadow decided from the same scores (one provider call, no more), and was not acted on. The second
    # verdict reused the first's cached scores: scores do not depend on the role, decisions do.
    assert as_input["shadow"]["policy"] == "strict" and as_input["shadow"]["decision"] == "block"
    assert as_output["shadow"]["decision"] == "block" and as_output["cached"] is True
    assert fake_upstream.texts_seen() == ["you are stupid"]

    # A blocked term, spaced out and in look-alike letters; the verdict names the list, never the words.
    blocked = verdict_of(client, tenant, {"input": "well, F R O B N I C A T E it", "policy": "chat"})
    assert blocked["decision"] == "block" and blocked["categories"]["hate"] is True
    assert blocked["matches"] == [{"list": "banned", "list_version": 1, "category": "hate", "decision": "block",
                                   "text": 0, "count": 1}]
    homoglyph = verdict_of(client, tenant, {"input": "just frоbnicаte", "policy": "chat"})  # Cyrillic о and а
    assert homoglyph["decision"] == "block"
    # A hostile pattern, (a+)+$, meets a text built to make a backtracking engine take forever: RE2 answers.
    hostile = verdict_of(client, tenant, {"input": "a" * 5000 + "!", "policy": "chat"})
    assert hostile["decision"] == "block" and hostile["matches"][0]["count"] == 1

    # A list change is seen at once, although the same text's scores are cached.
    before = verdict_of(client, tenant, {"input": "the quux is here", "policy": "chat"})
    assert before["decision"] == "allow"
    put(client, tenant, "/v1/blocklists/banned", {"terms": ["frobnicate", "quux"], "patterns": [r"\bzz+t\b"]})
    after = verdict_of(client, tenant, {"input": "the quux is here", "policy": "chat"})
    assert after["decision"] == "block" and after["matches"][0]["list_version"] == 2

    # The shadow report: every chat verdict so far against its shadow decision.
    report = client.get("/v1/policies/chat/shadow-report", headers=tenant.headers).get_json()
    assert report["total"] == 7, report
    assert report["matrix"]["allow"]["block"] == 1  # the input "stupid": allowed, the shadow would block
    assert report["matrix"]["review"]["block"] == 1  # the output "stupid"
    assert report["matrix"]["block"]["allow"] == 4  # list matches: chat's lists, which the shadow does not use
    assert report["agreed"] == report["matrix"]["allow"]["allow"] == 1
    assert report["by_category"]["harassment"]["allow"]["block"] == 1
    assert report["shadow_versions"] == [{"policy": "strict", "version": 1, "verdicts": 7}]
    # A range with nothing in it.
    empty = client.get("/v1/policies/chat/shadow-report?start=2020-01-01T00:00:00Z&end=2020-01-02T00:00:00Z",
                       headers=tenant.headers).get_json()
    assert empty["total"] == 0 and empty["agreement_rate"] is None

    # A reviewer blocks the output "stupid" that the policy sent to review.
    reviewer = issue_key(database, tenant_name=tenant.tenant_name, scopes=("review",), key_name="Ann")
    claimed = client.post("/v1/reviews/claim-next", headers=reviewer.headers).get_json()
    assert claimed["role"] == "output", claimed  # the only text the policy sent to review
    decided = client.post(f"/v1/reviews/{claimed['id']}/decision", headers=reviewer.headers,
                          json={"decision": "block", "reason": "abusive"})
    assert decided.status_code == 200, decided.get_json()

    # A backtest of a candidate on the stored scores, answered at once (no provider call).
    seen = len(fake_upstream.texts_seen())
    window = {"start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started - 60)),
              "end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))}
    candidate = {**CHAT, "input": {"harassment": {"review": 0.5, "block": 0.55}},
                 "output": {"harassment": {"review": 0.4, "block": 0.55}}}
    result = post(client, tenant, "/v1/policies/chat/backtest", {"document": candidate, **window}, status=200)
    assert result["status"] == "completed" and result["id"] is None
    outcome = result["result"]
    assert outcome["total"] == 7 and outcome["skipped"] == 0
    assert outcome["matrix"]["allow"]["block"] == 1  # the input "stupid" would be blocked
    assert outcome["matrix"]["review"]["block"] == 1  # and the output "stupid" too, with no person asked
    # Scores only: the list matches are not re-made, so those verdicts would be allowed.
    assert outcome["matrix"]["block"]["allow"] == 4
    # Against the people: the one verdict a reviewer decided, the candidate decides as the reviewer did.
    assert outcome["reviewed"] == {"total": 1, "agreed": 1, "agreement_rate": 1.0,
                                   "matrix": {"allow": {"allow": 0, "review": 0, "block": 0},
                                              "block": {"allow": 0, "review": 0, "block": 1}}}
    assert len(fake_upstream.texts_seen()) == seen

    # A large one runs as a job on the worker: 202, then poll.
    jobs_app = create_app(make_settings(database_url, redis_url, backtest_sync_max_verdicts=0))
    jobs = jobs_app.test_client()
    queued = jobs.post("/v1/policies/chat/backtest", json={"version": 1, **window}, headers=tenant.headers)
    assert queued.status_code == 202, queued.get_json()
    job = queued.get_json()
    assert job["status"] in ("queued", "running") and queued.headers["Location"] == f"/v1/backtests/{job['id']}"
    deadline = time.monotonic() + 60
    while job["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
        job = jobs.get(f"/v1/backtests/{job['id']}", headers=tenant.headers).get_json()
    assert job["status"] == "completed", job
    # Version 1 is the policy that decided them all: the backtest agrees except where lists decided.
    assert job["result"]["total"] == 7 and job["result"]["matrix"]["block"]["allow"] == 4
    assert job["result"]["agreed"] == 3
    # Version 1 sends the reviewed output to a person again: no agreement with the reviewer, and no disagreement.
    assert job["result"]["reviewed"]["total"] == 1 and job["result"]["reviewed"]["agreed"] == 0
    assert job["result"]["reviewed"]["matrix"]["block"]["review"] == 1

    # A backtest abandoned by a dead worker (running for an hour) and one whose message was lost are taken up again
    # by the beat sweep and completed.
    with database.transaction() as session:
        stored = session.get(Backtest, job["id"])
        assert stored is not None
        abandoned = [Backtest(tenant_id=tenant.tenant_id, policy_name="chat", request=stored.request, status=status,
                              created_at=utcnow() - timedelta(hours=1),
                              started_at=utcnow() - timedelta(hours=1) if status == "running" else None)
                     for status in ("running", "queued")]
        session.add_all(abandoned)
        session.flush()
        abandoned_ids = [b.id for b in abandoned]
    deadline = time.monotonic() + 60
    while True:
        with database.transaction() as session:
            statuses = [session.get(Backtest, i).status for i in abandoned_ids]  # type: ignore[union-attr]
        if statuses == ["completed", "completed"]:
            break
        assert time.monotonic() < deadline, statuses
        time.sleep(0.5)


def test_a_policy_changed_while_submissions_are_in_flight(
    client: FlaskClient, tenant: TenantKey, start_worker: Callable[..., WorkerProcess], fake_upstream: FakeUpstream,
    database: Database,
) -> None:
    # One text per provider call, each taking a while: submissions are still queued when the policy changes.
    fake_upstream.latency = 0.3
    start_worker(concurrency=1, **openai_worker_env(fake_upstream, UPSTREAM_MAX_BATCH="1"))
    v1 = {"name": "tuned", "output": {"harassment": {"review": 0.4, "block": 0.9}}}
    v2 = {"name": "tuned", "output": {"harassment": {"review": 0.7, "block": 0.9}}}
    post(client, tenant, "/v1/policies", v1)
    first = [submit(client, tenant, {"input": f"you are stupid {i}", "role": "output", "policy": "tuned"})["id"]
             for i in range(8)]
    # Once the first verdict is in (the rest still queued or in the provider), version 2 is written.
    wait_final(client, tenant, first[0])
    put(client, tenant, "/v1/policies/tuned", v2, **{"If-Match": '"1"'})
    later = [submit(client, tenant, {"input": f"you are stupid {i}", "role": "output", "policy": "tuned"})["id"]
             for i in range(8, 12)]
    verdicts = [wait_final(client, tenant, s)["verdict"] for s in first + later]

    expected = {1: ("review", {"review": 0.4, "block": 0.9}), 2: ("allow", {"review": 0.7, "block": 0.9})}
    for verdict in verdicts:
        decision, thresholds = expected[verdict["policy_version"]]
        # Each verdict names the version it was decided under: its thresholds and its decision are that version's.
        assert verdict["thresholds"]["harassment"] == thresholds and verdict["decision"] == decision, verdict
    versions = [v["policy_version"] for v in verdicts]
    assert versions[0] == 1 and all(v == 2 for v in versions[8:]), versions
    assert 2 in versions[1:8], f"no submission in flight took up version 2: {versions}"
    with database.transaction() as session:
        policy = session.scalars(select(TenantPolicy).where(TenantPolicy.tenant_id == tenant.tenant_id,
                                                            TenantPolicy.name == "tuned")).one()
        changed_at = session.scalars(select(PolicyVersion.created_at).where(
            PolicyVersion.policy_id == policy.id, PolicyVersion.version == 2)).one()
        rows = session.scalars(select(Verdict).where(Verdict.tenant_id == tenant.tenant_id)).all()
        # A verdict under version 2 was decided after version 2 existed.
        assert all(row.created_at >= changed_at for row in rows if row.policy_version == 2)
        assert {row.policy_version for row in rows} == {1, 2}
