"""`/v1/reviews` in-process against real PostgreSQL and Redis: the queue a `review` verdict opens, its filters,
orders, cursors and counts; reading an item (text for scope `review` only, each read audited; masked and erased
submissions); claims (409 for another reviewer, expiry, extend, release); the decision (claimant only, once); the
admin override; what the submission then shows; hostile and malformed input. The verdicts are recorded by the
worker's own use case (`record_verdict`) on submissions the API took in; tests/integration/test_reviews_worker.py
runs the same loop through a real worker."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update

from app.config import Settings
from app.db import Database
from app.extensions import PROVIDER
from app.models import AuditEvent, ReviewItem, WebhookDelivery, utcnow
from app.moderation.policy import DEFAULT_POLICY
from app.moderation.providers import ProviderResult, TextScores
from app.moderation.taxonomy import CATEGORIES
from app.use_cases.reviews import queue_depth, release_expired_claims
from app.use_cases.status import deployment_status
from app.use_cases.verdicts import claim_submission, record_verdict
from tests.conftest import TenantKey, issue_key
from tests.integration.test_metrics_endpoint import scrape, value
from tests.integration.webhook_support import api_settings

__all__ = ["api_settings"]  # a fixture, used by name

REVIEW_SCORES = {"harassment": 0.6}  # between the default policy's review (0.5) and block (0.8) thresholds


def submit(client: FlaskClient, tenant: TenantKey, text: str, **fields: Any) -> str:
    response = client.post("/v1/submissions", json={"input": text, **fields}, headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    submission_id: str = response.get_json()["id"]
    return submission_id


def decide_by_machine(database: Database, submission_id: str, scores: dict[str, float]) -> None:
    """What a worker does with the provider's answer: claim the submission and record the verdict."""
    full = {c: scores.get(c, 0.001) for c in CATEGORIES}
    with database.transaction() as session:
        claim = claim_submission(session, submission_id, lease_seconds=60)
        assert claim is not None
        outcome = ProviderResult(provider="test", model="test-model", results=[TextScores(scores=full)],
                                 judged=frozenset(full), latency_ms=3)
        assert record_verdict(session, claim, outcome, DEFAULT_POLICY) is not None


def queued_review(client: FlaskClient, database: Database, tenant: TenantKey, text: str = "you are a bit stupid",
                  scores: dict[str, float] | None = None, **fields: Any) -> tuple[str, str]:
    """(submission id, review id) of a submission the machine sent to review."""
    submission_id = submit(client, tenant, text, **fields)
    decide_by_machine(database, submission_id, scores or REVIEW_SCORES)
    body = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()
    assert body["verdict"]["decision"] == "review", body
    assert body["review"]["status"] == "pending" and body["final_decision"] is None
    return submission_id, body["review"]["id"]


@pytest.fixture
def desk(database: Database, tenant: TenantKey) -> dict[str, TenantKey]:
    """Two reviewers and an admin of `tenant`."""
    return {name: issue_key(database, tenant_name=tenant.tenant_name, scopes=scopes)
            for name, scopes in (("ann", ("review",)), ("bob", ("review",)), ("admin", ("admin",)))}


def post(client: FlaskClient, key: TenantKey, path: str, body: Any = None) -> Any:
    return client.post(path, json=body, headers=key.headers) if body is not None else client.post(
        path, headers=key.headers)


def actions(database: Database, tenant_id: str, subject_id: str) -> list[tuple[str, str]]:
    with database.transaction() as session:
        return [(e.action, e.actor) for e in session.scalars(
            select(AuditEvent).where(AuditEvent.tenant_id == tenant_id, AuditEvent.subject_id == subject_id)
            .order_by(AuditEvent.seq))]


def test_a_review_verdict_queues_the_submission_and_the_claimant_decides_it_once(
        client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey]) -> None:
    submission_id, review_id = queued_review(client, database, tenant, metadata={"ticket": 1})
    ann, bob = desk["ann"], desk["bob"]

    listed = client.get("/v1/reviews", headers=ann.headers).get_json()
    assert [i["id"] for i in listed["data"]] == [review_id]
    assert listed["counts"] == {"pending": 1, "claimed": 0, "decided": 0}
    assert "text" not in listed["data"][0]
    assert listed["data"][0]["categories"] == ["harassment"] and listed["data"][0]["priority"] == 0.6

    # Deciding without a claim, or someone else's claim, is refused.
    decision = {"decision": "block", "reason": "a personal insult"}
    assert post(client, ann, f"/v1/reviews/{review_id}/decision", decision).get_json()["error"]["code"] == \
        "not_claimed"
    claimed = post(client, ann, f"/v1/reviews/{review_id}/claim")
    assert claimed.status_code == 200, claimed.get_json()
    assert claimed.get_json()["status"] == "claimed" and claimed.get_json()["claimed_by"] == ann.key_id
    refused = post(client, bob, f"/v1/reviews/{review_id}/claim")
    assert refused.status_code == 409 and refused.get_json()["error"]["code"] == "claimed_by_another"
    refused = post(client, bob, f"/v1/reviews/{review_id}/decision", decision)
    assert refused.status_code == 409 and refused.get_json()["error"]["code"] == "claimed_by_another"
    assert client.get("/v1/reviews?status=claimed", headers=bob.headers).get_json()["counts"]["claimed"] == 1

    decided = post(client, ann, f"/v1/reviews/{review_id}/decision", {**decision, "categories": ["harassment"]})
    assert decided.status_code == 200, decided.get_json()
    assert decided.get_json()["final_decision"] == "block"
    again = post(client, ann, f"/v1/reviews/{review_id}/decision", {"decision": "allow", "reason": "changed mind"})
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "already_decided"

    submission = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()
    assert submission["verdict"]["decision"] == "review"  # the machine verdict stays
    assert submission["final_decision"] == "block"
    assert submission["review"]["decision"] == "block" and submission["review"]["decided_by"] == ann.key_id
    assert submission["review"]["reason"] == "a personal insult"
    assert actions(database, tenant.tenant_id, review_id) == [
        ("review.created", "worker"), ("review.claimed", ann.key_id), ("review.decided", ann.key_id)]
    with database.transaction() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.subject_id == review_id,
                                                         AuditEvent.action == "review.decided")).one()
        assert event.decision == "block" and event.categories == ["harassment"]
        assert "stupid" not in json.dumps(event.details) and "insult" not in json.dumps(event.details)
    listed = client.get("/v1/reviews?status=decided", headers=ann.headers).get_json()
    assert listed["counts"] == {"pending": 0, "claimed": 0, "decided": 1}


def test_reading_an_item_shows_text_and_context_to_reviewers_only_and_is_audited(
        client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey]) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    question = submit(client, tenant, "what do you think of me?", role="input", conversation_id=conversation,
                      turn_id="t1")
    decide_by_machine(database, question, {})
    _, review_id = queued_review(client, database, tenant, "honestly, you are a bit stupid", role="output",
                                 conversation_id=conversation, turn_id="t1")
    read = client.get(f"/v1/reviews/{review_id}", headers=desk["ann"].headers)
    assert read.status_code == 200, read.get_json()
    body = read.get_json()
    assert body["text"] == ["honestly, you are a bit stupid"]
    assert body["submission"]["verdict"]["thresholds"]["harassment"] == {"review": 0.5, "block": 0.8}
    assert [(t["submission_id"], t["led_to_this"], t["text"]) for t in body["context"]] == [
        (question, True, ["what do you think of me?"])]
    assert read.headers["Cache-Control"] == "no-store"
    assert ("review.viewed", desk["ann"].key_id) in actions(database, tenant.tenant_id, review_id)

    # Keys without the scope never read the text: the tenant's all-purpose key (no `review`) and an admin key.
    for key in (tenant, desk["admin"]):
        refused = client.get(f"/v1/reviews/{review_id}", headers=key.headers)
        assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "missing_scope"
        assert "stupid" not in refused.get_data(as_text=True)


def test_masked_text_is_shown_masked_and_erased_text_not_at_all(
        client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey]) -> None:
    _, masked = queued_review(client, database, tenant, "you are stupid, mail me at jo@example.com", mask=True)
    text = client.get(f"/v1/reviews/{masked}", headers=desk["ann"].headers).get_json()["text"][0]
    assert "jo@example.com" not in text and "stupid" in text

    submission_id, erased = queued_review(client, database, tenant, "stupid and private")
    assert post(client, desk["ann"], f"/v1/reviews/{erased}/claim").status_code == 200
    assert post(client, desk["ann"], f"/v1/reviews/{erased}/decision",
                {"decision": "allow", "reason": "quoted: stupid and private"}).status_code == 200
    assert client.delete(f"/v1/data/{submission_id}", headers=tenant.headers).status_code == 200
    body = client.get(f"/v1/reviews/{erased}", headers=desk["ann"].headers).get_json()
    assert body["text"] is None and body["reason"] is None  # the reason may quote the text: erased with it
    assert body["decision"] == "allow" and body["final_decision"] == "allow"
    assert "private" not in json.dumps(body)


def test_claims_expire_extend_and_release(
        client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey]) -> None:
    _, review_id = queued_review(client, database, tenant)
    ann, bob = desk["ann"], desk["bob"]
    first = post(client, ann, f"/v1/reviews/{review_id}/claim").get_json()
    extended = post(client, ann, f"/v1/reviews/{review_id}/extend").get_json()
    assert extended["claim_expires_at"] >= first["claim_expires_at"]
    assert post(client, bob, f"/v1/reviews/{review_id}/extend").status_code == 409
    assert post(client, bob, f"/v1/reviews/{review_id}/release").status_code == 409

    # The claim runs out: the item is pending again, Ann's decision is refused, Bob may take it over.
    with database.transaction() as session:
        session.execute(update(ReviewItem).where(ReviewItem.id == review_id)
                        .values(claim_expires_at=utcnow() - timedelta(seconds=1)))
    assert client.get("/v1/reviews?status=pending", headers=bob.headers).get_json()["counts"]["pending"] >= 1
    late = post(client, ann, f"/v1/reviews/{review_id}/decision", {"decision": "allow", "reason": "fine"})
    assert late.status_code == 409 and late.get_json()["error"]["code"] == "claim_expired"
    taken = post(client, bob, f"/v1/reviews/{review_id}/claim")
    assert taken.status_code == 200 and taken.get_json()["claimed_by"] == bob.key_id
    released = post(client, bob, f"/v1/reviews/{review_id}/release").get_json()
    assert released["status"] == "pending" and released["claimed_by"] is None
    assert [a for a, _ in actions(database, tenant.tenant_id, review_id)] == [
        "review.created", "review.claimed", "review.claim_extended", "review.released", "review.claimed",
        "review.released"]
    with database.transaction() as session:
        expired = session.scalars(select(AuditEvent).where(
            AuditEvent.subject_id == review_id, AuditEvent.action == "review.released").order_by(AuditEvent.seq)
        ).first()
        assert expired is not None and expired.details["reason"] == "expired"
        assert expired.details["claimed_by"] == ann.key_id


def test_claim_next_takes_the_highest_score_first_and_reviewers_get_different_items(
        client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey]) -> None:
    _, low = queued_review(client, database, tenant, "mildly stupid", {"harassment": 0.55})
    _, high = queued_review(client, database, tenant, "very stupid", {"harassment": 0.75})
    _, hate = queued_review(client, database, tenant, "hateful-ish", {"hate": 0.65})
    by_priority = [i["id"] for i in client.get("/v1/reviews", headers=desk["ann"].headers).get_json()["data"]]
    assert by_priority == [high, hate, low]
    by_age = [i["id"] for i in client.get("/v1/reviews?order=age", headers=desk["ann"].headers).get_json()["data"]]
    assert by_age == [low, high, hate]
    only_hate = client.get("/v1/reviews?category=hate", headers=desk["ann"].headers).get_json()
    assert [i["id"] for i in only_hate["data"]] == [hate] and only_hate["counts"]["pending"] == 1

    assert post(client, desk["ann"], "/v1/reviews/claim-next").get_json()["id"] == high
    assert post(client, desk["bob"], "/v1/reviews/claim-next").get_json()["id"] == hate
    assert post(client, desk["bob"], "/v1/reviews/claim-next", {"order": "age"}).get_json()["id"] == low
    empty = post(client, desk["ann"], "/v1/reviews/claim-next")
    assert empty.status_code == 404 and empty.get_json()["error"]["code"] == "queue_empty"


def test_pages_follow_the_cursor_in_both_orders(
        client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey]) -> None:
    made = [queued_review(client, database, tenant, f"stupid {n}", {"harassment": 0.5 + n / 100})[1]
            for n in range(5)]
    for order, expected in (("priority", list(reversed(made))), ("age", made)):
        seen: list[str] = []
        url = f"/v1/reviews?order={order}&limit=2"
        while True:
            page = client.get(url, headers=desk["ann"].headers).get_json()
            seen += [i["id"] for i in page["data"]]
            if not page["has_more"]:
                break
            url = f"/v1/reviews?order={order}&limit=2&cursor={page['next_cursor']}"
        assert seen == expected, order


def test_an_admin_override_is_a_separate_audited_action_and_sends_review_decided_again(
        client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey],
        api_settings: Settings) -> None:
    # No worker runs here: the deliveries are only written (tests/integration/test_reviews_worker.py sends them).
    endpoint = client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/verdict",
                                                 "events": ["review.decided"]}, headers=tenant.headers)
    assert endpoint.status_code == 201, endpoint.get_json()
    submission_id, review_id = queued_review(client, database, tenant)
    premature = post(client, desk["admin"], f"/v1/reviews/{review_id}/override",
                     {"decision": "allow", "reason": "appeal"})
    assert premature.status_code == 409 and premature.get_json()["error"]["code"] == "not_decided"
    post(client, desk["ann"], f"/v1/reviews/{review_id}/claim")
    post(client, desk["ann"], f"/v1/reviews/{review_id}/decision", {"decision": "block", "reason": "insult"})
    # A reviewer cannot override; an admin can.
    assert post(client, desk["ann"], f"/v1/reviews/{review_id}/override",
                {"decision": "allow", "reason": "appeal"}).status_code == 403
    overridden = post(client, desk["admin"], f"/v1/reviews/{review_id}/override",
                      {"decision": "allow", "reason": "appeal upheld: banter between friends"})
    assert overridden.status_code == 200, overridden.get_json()
    submission = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()
    assert submission["final_decision"] == "allow"
    assert submission["review"]["decision"] == "block"  # the reviewer's decision stays on record
    assert submission["review"]["override"]["decision"] == "allow"
    assert [a for a, _ in actions(database, tenant.tenant_id, review_id)][-1] == "review.overridden"
    with database.transaction() as session:
        payloads = [json.loads(d.payload) for d in session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.submission_id == submission_id,
                                          WebhookDelivery.event_type == "review.decided")
            .order_by(WebhookDelivery.created_at))]
    assert [p["data"]["final_decision"] for p in payloads] == ["block", "allow"]
    assert all(p["type"] == "review.decided" and "stupid" not in json.dumps(p) for p in payloads)


def test_another_tenant_never_sees_the_queue_or_its_items(
        client: FlaskClient, database: Database, tenant: TenantKey, other_tenant: TenantKey,
        desk: dict[str, TenantKey]) -> None:
    _, review_id = queued_review(client, database, tenant)
    stranger = issue_key(database, tenant_name=other_tenant.tenant_name, scopes=("review", "admin"))
    assert client.get("/v1/reviews", headers=stranger.headers).get_json()["data"] == []
    for method, path in (("GET", f"/v1/reviews/{review_id}"), ("POST", f"/v1/reviews/{review_id}/claim"),
                         ("POST", f"/v1/reviews/{review_id}/release"), ("POST", f"/v1/reviews/{review_id}/extend")):
        response = client.open(path, method=method, headers=stranger.headers)
        assert response.status_code == 404, (path, response.get_json())
    assert post(client, stranger, f"/v1/reviews/{review_id}/decision",
                {"decision": "allow", "reason": "x"}).status_code == 404
    assert post(client, stranger, "/v1/reviews/claim-next").status_code == 404


def test_a_review_key_names_its_reviewer(client: FlaskClient, tenant: TenantKey) -> None:
    unnamed = client.post("/v1/keys", json={"scopes": ["review"]}, headers=tenant.headers)
    assert unnamed.status_code == 400 and unnamed.get_json()["error"]["code"] == "review_key_needs_name"
    named = client.post("/v1/keys", json={"scopes": ["review"], "name": "Ann Reviewer"}, headers=tenant.headers)
    assert named.status_code == 201 and named.get_json()["scopes"] == ["review"]


@pytest.mark.parametrize(("body", "param"), [
    ({"decision": "maybe", "reason": "x"}, "decision"),
    ({"decision": "allow"}, "reason"),
    ({"decision": "allow", "reason": "   "}, "reason"),
    ({"decision": "allow", "reason": "x" * 1001}, "reason"),
    ({"decision": "allow", "reason": 7}, "reason"),
    ({"decision": ["allow"], "reason": "x"}, "decision"),
    ({"decision": "allow", "reason": "x", "categories": ["made-up"]}, "categories[0]"),
    ({"decision": "allow", "reason": "x", "categories": "harassment"}, "categories"),
    ({"decision": "allow", "reason": "x", "extra": 1}, "extra"),
])
def test_malformed_decisions_are_refused_naming_the_field(
        client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey], body: dict[str, Any],
        param: str) -> None:
    _, review_id = queued_review(client, database, tenant)
    post(client, desk["ann"], f"/v1/reviews/{review_id}/claim")
    response = post(client, desk["ann"], f"/v1/reviews/{review_id}/decision", body)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["param"] == param
    assert client.get(f"/v1/reviews/{review_id}", headers=desk["ann"].headers).get_json()["status"] == "claimed"


@pytest.mark.parametrize("query", [
    "status=open", "order=random", "limit=0", "limit=101", "limit=x", "category=nonsense", "role=system",
    "created_after=yesterday", "created_before=0.5", "cursor=%00", "cursor=bm90LWEtY3Vyc29y", "unknown=1",
    "conversation_id=" + "c" * 129,
])
def test_malformed_queries_are_a_400(client: FlaskClient, desk: dict[str, TenantKey], query: str) -> None:
    response = client.get(f"/v1/reviews?{query}", headers=desk["ann"].headers)
    assert response.status_code == 400, (query, response.get_json())
    assert response.get_json()["error"]["type"] == "invalid_request_error"


def test_hostile_ids_and_bodies_are_refused_cleanly(client: FlaskClient, desk: dict[str, TenantKey]) -> None:
    for review_id in ("rev_nope", "%00", "x" * 300, "..%2F..%2Fetc", "' OR 1=1 --"):
        assert client.get(f"/v1/reviews/{review_id}", headers=desk["ann"].headers).status_code == 404
    oversized = client.post("/v1/reviews/claim-next", data="{" + " " * 2_000_000 + "}",
                            content_type="application/json", headers=desk["ann"].headers)
    assert oversized.status_code == 413
    not_json = client.post("/v1/reviews/claim-next", data="order=age", content_type="text/plain",
                           headers=desk["ann"].headers)
    assert not_json.status_code == 415
    wrong = client.post("/v1/reviews/claim-next", json={"order": 3}, headers=desk["ann"].headers)
    assert wrong.status_code == 400 and wrong.get_json()["error"]["param"] == "order"


def test_the_figures_give_queue_depth_and_time_to_decision(
        client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey]) -> None:
    empty = client.get("/v1/reviews/stats", headers=desk["ann"].headers).get_json()
    assert empty["counts"] == {"pending": 0, "claimed": 0, "decided": 0}
    assert empty["time_to_decision_seconds"]["p50"] is None and empty["oldest_pending_at"] is None
    _, first = queued_review(client, database, tenant)
    queued_review(client, database, tenant)
    # The first item waited ten minutes before Ann decided it.
    with database.transaction() as session:
        session.execute(update(ReviewItem).where(ReviewItem.id == first)
                        .values(created_at=utcnow() - timedelta(minutes=10)))
    post(client, desk["ann"], f"/v1/reviews/{first}/claim")
    post(client, desk["ann"], f"/v1/reviews/{first}/decision", {"decision": "allow", "reason": "banter"})
    stats = client.get("/v1/reviews/stats?window=3600", headers=desk["ann"].headers).get_json()
    assert stats["counts"] == {"pending": 1, "claimed": 0, "decided": 1}
    assert stats["decided_in_window"] == 1
    assert 590 < stats["time_to_decision_seconds"]["p50"] < 700
    assert stats["oldest_pending_age_seconds"] is not None and stats["oldest_pending_age_seconds"] >= 0
    assert client.get("/v1/reviews/stats?window=1", headers=desk["ann"].headers).status_code == 400


def test_the_beat_sweep_releases_expired_claims_and_audits_each(
        client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey]) -> None:
    _, lapsed = queued_review(client, database, tenant)
    _, live = queued_review(client, database, tenant)
    for review_id in (lapsed, live):
        assert post(client, desk["ann"], f"/v1/reviews/{review_id}/claim").status_code == 200
    with database.transaction() as session:
        session.execute(update(ReviewItem).where(ReviewItem.id == lapsed)
                        .values(claim_expires_at=utcnow() - timedelta(seconds=1)))
    with database.transaction() as session:
        assert release_expired_claims(session) >= 1
    with database.transaction() as session:
        assert session.get(ReviewItem, lapsed).status == "pending"  # type: ignore[union-attr]
        assert session.get(ReviewItem, live).claimed_by == desk["ann"].key_id  # type: ignore[union-attr]
        released = session.scalars(select(AuditEvent).where(AuditEvent.subject_id == lapsed,
                                                            AuditEvent.action == "review.released")).one()
        assert (released.actor, released.details["reason"]) == ("system", "expired")
        assert released.details["claimed_by"] == desk["ann"].key_id
    with database.transaction() as session:
        assert release_expired_claims(session) == 0  # nothing twice
    assert post(client, desk["bob"], f"/v1/reviews/{lapsed}/claim").status_code == 200
    assert [a for a, _ in actions(database, tenant.tenant_id, lapsed)].count("review.released") == 1


def test_the_review_queue_and_time_to_decision_show_in_metrics_and_status(
        app: Flask, client: FlaskClient, database: Database, tenant: TenantKey, desk: dict[str, TenantKey]) -> None:
    before = scrape(client)
    _, review_id = queued_review(client, database, tenant)
    opened = scrape(client)
    assert value(opened, "verdict_review_queue_depth", status="pending") == value(
        before, "verdict_review_queue_depth", status="pending") + 1
    assert value(opened, "verdict_review_oldest_pending_age_seconds") >= 0
    with database.transaction() as session:
        depth = queue_depth(session)
        snapshot = deployment_status(session, app.extensions[PROVIDER], shared=False, with_audit_heads=False)
    assert snapshot.reviews is not None and snapshot.reviews.counts == depth.counts and depth.counts["pending"] >= 1

    ann = desk["ann"]
    assert post(client, ann, f"/v1/reviews/{review_id}/claim").status_code == 200
    claimed = scrape(client)
    assert value(claimed, "verdict_review_queue_depth", status="claimed") == value(
        opened, "verdict_review_queue_depth", status="claimed") + 1
    decided = post(client, ann, f"/v1/reviews/{review_id}/decision", {"decision": "allow", "reason": "banter"})
    assert decided.status_code == 200, decided.get_json()
    after = scrape(client)
    assert value(after, "verdict_review_decision_seconds_count", decision="allow") == value(
        claimed, "verdict_review_decision_seconds_count", decision="allow") + 1
    assert value(after, "verdict_review_queue_depth", status="decided") == value(
        claimed, "verdict_review_queue_depth", status="decided") + 1
