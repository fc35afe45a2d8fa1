"""The review console in-process (Flask's test client, real PostgreSQL and Redis): signing in with a review key only,
the session cookie's flags, no page without a session, CSRF on every form (sign-in included), the queue, an item
decided through the console, a claim that expired under the reviewer, the submission page, another tenant's reviewer,
and hostile input. The same in a real browser: tests/integration/test_console_browser.py."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, update
from werkzeug.test import TestResponse

from app.db import Database
from app.models import AuditEvent, ConsoleSession, ReviewItem, utcnow
from tests.conftest import TenantKey, issue_key
from tests.integration.test_reviews_api import queued_review

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(response: TestResponse) -> str:
    match = CSRF.search(response.get_data(as_text=True))
    assert match, response.get_data(as_text=True)[:2000]
    return match.group(1)


def sign_in(client: FlaskClient, key: TenantKey) -> TestResponse:
    page = client.get("/console/sign-in")
    return client.post("/console/sign-in", data={"csrf_token": csrf_of(page), "key": key.plaintext})


@pytest.fixture
def reviewer(database: Database, tenant: TenantKey) -> TenantKey:
    return issue_key(database, tenant_name=tenant.tenant_name, scopes=("review",), key_name="Ann Reviewer")


def page_csrf(client: FlaskClient) -> str:
    return csrf_of(client.get("/console/queue"))


def test_pages_without_a_session_redirect_to_sign_in(client: FlaskClient) -> None:
    for path in ("/console/queue", "/console/reviews/rev_x", "/console/submissions/sub_x", "/console/"):
        response = client.get(path)
        assert response.status_code in (302, 303), path
        assert "/console/sign-in" in response.headers["Location"] or response.headers["Location"].endswith(
            "/console/queue"), path
    for path in ("/console/claim-next", "/console/reviews/rev_x/decision", "/console/sign-out"):
        response = client.post(path, data={"decision": "allow", "reason": "x"})
        assert response.status_code == 303 and "/console/sign-in" in response.headers["Location"], path


def test_sign_in_gives_a_strict_httponly_session_and_never_echoes_the_key(
        client: FlaskClient, database: Database, reviewer: TenantKey) -> None:
    response = sign_in(client, reviewer)
    assert response.status_code == 303 and response.headers["Location"].endswith("/console/queue")
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith("verdict_console="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert reviewer.plaintext not in cookie
    queue = client.get("/console/queue")
    assert queue.status_code == 200
    body = queue.get_data(as_text=True)
    assert "Ann Reviewer" in body and reviewer.plaintext not in body
    assert "default-src 'none'" in queue.headers["Content-Security-Policy"]
    assert queue.headers["X-Frame-Options"] == "DENY" and queue.headers["Cache-Control"] == "no-store"
    with database.transaction() as session:
        stored = session.scalars(select(ConsoleSession).where(ConsoleSession.api_key_id == reviewer.key_id)).one()
        assert stored.token_hash not in cookie  # only the digest is stored, only the token is sent

    out = client.post("/console/sign-out", data={"csrf_token": page_csrf(client)})
    assert out.status_code == 303
    assert client.get("/console/queue").status_code in (302, 303)
    with database.transaction() as session:
        assert session.scalars(select(ConsoleSession).where(ConsoleSession.api_key_id == reviewer.key_id)).all() == []


def test_only_a_valid_review_key_signs_in(client: FlaskClient, database: Database, tenant: TenantKey) -> None:
    for key in (tenant.plaintext, "vk_0000000000000000_" + "A" * 43, "not a key", ""):
        page = client.get("/console/sign-in")
        response = client.post("/console/sign-in", data={"csrf_token": csrf_of(page), "key": key})
        assert response.status_code == 401, key
        assert "verdict_console=" not in " ".join(response.headers.getlist("Set-Cookie"))
        assert 'role="alert"' in response.get_data(as_text=True)
    with database.transaction() as session:
        reasons = [e.details["reason"] for e in session.scalars(
            select(AuditEvent).where(AuditEvent.tenant_id == tenant.tenant_id, AuditEvent.action == "auth.failed"))]
    assert reasons == ["missing_scope"]


def test_forms_without_their_csrf_token_are_refused(
        client: FlaskClient, database: Database, tenant: TenantKey, reviewer: TenantKey) -> None:
    # The sign-in form too: without the token its cookie pairs with, a valid key does not sign in.
    client.get("/console/sign-in")
    refused = client.post("/console/sign-in", data={"key": reviewer.plaintext})
    assert refused.status_code == 403 and "verdict_console=" not in " ".join(refused.headers.getlist("Set-Cookie"))
    sign_in(client, reviewer)
    _, review_id = queued_review(client, database, tenant)
    for data in ({}, {"csrf_token": "forged"}, {"csrf_token": ""}):
        for path in (f"/console/reviews/{review_id}/claim", "/console/claim-next", "/console/sign-out"):
            response = client.post(path, data=data)
            assert response.status_code == 403, (path, data)
    with database.transaction() as session:
        assert session.get(ReviewItem, review_id).status == "pending"  # type: ignore[union-attr]
    assert client.get("/console/queue").status_code == 200  # still signed in


def test_an_item_is_claimed_read_and_decided_in_the_console(
        client: FlaskClient, database: Database, tenant: TenantKey, reviewer: TenantKey) -> None:
    submission_id, review_id = queued_review(client, database, tenant, "you are a stupid bot", role="output",
                                             conversation_id="conv-console", turn_id="t9")
    sign_in(client, reviewer)
    queue = client.get("/console/queue").get_data(as_text=True)
    assert review_id in queue and 'data-count="pending">1<' in queue
    assert "stupid" not in queue  # the list shows no text

    claimed = client.post("/console/claim-next", data={"csrf_token": page_csrf(client)})
    assert claimed.status_code == 303 and claimed.headers["Location"].endswith(f"/console/reviews/{review_id}")
    page = client.get(f"/console/reviews/{review_id}")
    html = page.get_data(as_text=True)
    assert "you are a stupid bot" in html and 'id="decision-form"' in html
    assert '<meter min="0" max="1" low="0.5" high="0.8"' in html  # harassment's bar with its thresholds

    missing_reason = client.post(f"/console/reviews/{review_id}/decision",
                                 data={"csrf_token": csrf_of(page), "decision": "block", "reason": " "})
    assert missing_reason.status_code == 400 and "Give a reason" in missing_reason.get_data(as_text=True)
    decided = client.post(f"/console/reviews/{review_id}/decision",
                          data={"csrf_token": csrf_of(page), "decision": "block", "reason": "insults the user"})
    assert decided.status_code == 303  # then to the next item, or the queue when none is left
    polled = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()
    assert polled["final_decision"] == "block" and polled["review"]["decided_by"] == reviewer.key_id

    assert review_id not in client.get("/console/queue").get_data(as_text=True)  # pending: no longer
    for tab in ("decided", "all"):
        assert review_id in client.get(f"/console/queue?status={tab}").get_data(as_text=True), tab
    shown = client.get(f"/console/submissions/{submission_id}").get_data(as_text=True)
    assert 'id="final-decision"><strong>block</strong>' in shown
    for action in ("submission.received", "verdict.decided", "review.created", "review.claimed", "review.viewed",
                   "review.decided"):
        assert f"<td>{action}</td>" in shown, action


def test_a_claim_that_expired_under_the_reviewer_is_said_plainly(
        client: FlaskClient, database: Database, tenant: TenantKey, reviewer: TenantKey) -> None:
    _, review_id = queued_review(client, database, tenant)
    sign_in(client, reviewer)
    client.post(f"/console/reviews/{review_id}/claim", data={"csrf_token": page_csrf(client)})
    page = client.get(f"/console/reviews/{review_id}")
    with database.transaction() as session:
        session.execute(update(ReviewItem).where(ReviewItem.id == review_id)
                        .values(claim_expires_at=utcnow() - timedelta(seconds=5)))
    late = client.post(f"/console/reviews/{review_id}/decision",
                       data={"csrf_token": csrf_of(page), "decision": "allow", "reason": "fine"})
    assert late.status_code == 409
    html = late.get_data(as_text=True)
    assert "Your claim on this item expired" in html and 'role="alert"' in html
    assert 'id="claim-form"' in html  # and it may be claimed again at once
    with database.transaction() as session:
        assert session.get(ReviewItem, review_id).decision is None  # type: ignore[union-attr]


def test_another_tenants_reviewer_never_sees_the_item(
        client: FlaskClient, database: Database, tenant: TenantKey, other_tenant: TenantKey) -> None:
    submission_id, review_id = queued_review(client, database, tenant, "a stupid secret")
    stranger = issue_key(database, tenant_name=other_tenant.tenant_name, scopes=("review",))
    sign_in(client, stranger)
    assert review_id not in client.get("/console/queue?status=all").get_data(as_text=True)
    for path in (f"/console/reviews/{review_id}", f"/console/submissions/{submission_id}"):
        response = client.get(path)
        assert response.status_code == 404 and "secret" not in response.get_data(as_text=True), path
    taken = client.post("/console/claim-next", data={"csrf_token": page_csrf(client)})
    assert taken.headers["Location"].endswith("msg=queue_empty")


def test_a_revoked_key_ends_its_session(client: FlaskClient, database: Database, tenant: TenantKey,
                                        reviewer: TenantKey) -> None:
    sign_in(client, reviewer)
    assert client.get("/console/queue").status_code == 200
    assert client.delete(f"/v1/keys/{reviewer.key_id}", headers=tenant.headers).status_code == 200
    response = client.get("/console/queue")
    assert response.status_code == 303 and "msg=expired" in response.headers["Location"]


@pytest.mark.parametrize("query", ["status=bogus", "category=%00", "order=x", "limit=9999", "cursor=%ff%fe",
                                   "conversation_id=" + "c" * 500])
def test_hostile_queue_filters_fall_back_to_the_default_view(client: FlaskClient, reviewer: TenantKey,
                                                             query: str) -> None:
    sign_in(client, reviewer)
    response = client.get(f"/console/queue?{query}")
    assert response.status_code == 200, query
    assert "Traceback" not in response.get_data(as_text=True)


def test_hostile_ids_and_fields_are_refused_cleanly(client: FlaskClient, database: Database, tenant: TenantKey,
                                                    reviewer: TenantKey) -> None:
    sign_in(client, reviewer)
    csrf = page_csrf(client)
    for review_id in ("%00", "x" * 500, "<script>alert(1)</script>"):
        assert client.get(f"/console/reviews/{review_id}").status_code == 404
    _, review_id = queued_review(client, database, tenant)
    client.post(f"/console/reviews/{review_id}/claim", data={"csrf_token": csrf})
    for data in ({"decision": "maybe", "reason": "x"}, {"decision": "allow", "reason": "x" * 5000},
                 {"decision": "allow", "reason": "x", "correct_categories": "on", "categories": "made-up"}):
        response = client.post(f"/console/reviews/{review_id}/decision", data={"csrf_token": csrf, **data})
        assert response.status_code == 400, data
    script = client.post(f"/console/reviews/{review_id}/decision",
                         data={"csrf_token": csrf, "decision": "maybe", "reason": "<script>alert(1)</script>"})
    assert "<script>alert(1)</script>" not in script.get_data(as_text=True)  # escaped when echoed back
    assert client.get("/console/submissions?id=%3Cscript%3E").status_code in (302, 303)
