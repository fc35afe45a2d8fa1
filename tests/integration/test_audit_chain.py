"""The audit hash chain in PostgreSQL: how `record_event` appends, and how verification finds and locates every kind
of tampering done directly in SQL (an altered field, a deleted event, two events swapped, the newest events cut off).
Also the events of failed authentication, on the key's tenant chain or the system chain."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, text

from app.audit_chain import SYSTEM_CHAIN, canonical_fields, hash_fields
from app.db import Database
from app.models import AuditChainHead, AuditEvent, AuthFailureWindow, utcnow
from app.use_cases import audit
from app.use_cases.audit import record_event, verify_chain
from app.use_cases.keys import revoke_key
from tests.conftest import TenantKey, issue_key


def append(database: Database, tenant_id: str | None, count: int, **fields: Any) -> None:
    for number in range(count):
        with database.transaction() as session:
            record_event(session, tenant_id=tenant_id, action="test.event", actor="tester", subject_type="thing",
                         subject_id=f"thing_{number}", details={"n": number}, **fields)


def sql(database: Database, statement: str, **params: Any) -> None:
    with database.engine.begin() as connection:
        connection.execute(text(statement), params)


def verify(database: Database, chain_id: str, **kwargs: Any) -> Any:
    with database.transaction() as session:
        return verify_chain(session, chain_id, **kwargs)


def events_of(database: Database, chain_id: str) -> list[AuditEvent]:
    with database.transaction() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.chain_id == chain_id)
                                    .order_by(AuditEvent.seq)))


def test_events_form_a_gapless_chain_per_tenant(database: Database, tenant: TenantKey,
                                                other_tenant: TenantKey) -> None:
    append(database, tenant.tenant_id, 3)
    append(database, other_tenant.tenant_id, 2)
    mine = events_of(database, tenant.tenant_id)
    # tenant.created and key.created came first, from issuing the key.
    assert [e.seq for e in mine] == [1, 2, 3, 4, 5]
    assert [e.action for e in mine[:2]] == ["tenant.created", "key.created"]
    assert mine[0].prev_hash == "0" * 64
    assert all(later.prev_hash == earlier.hash for earlier, later in zip(mine, mine[1:], strict=False))
    assert [e.seq for e in events_of(database, other_tenant.tenant_id)] == [1, 2, 3, 4]
    result = verify(database, tenant.tenant_id)
    assert result.ok and result.count == 5 and result.head_hash == mine[-1].hash
    with database.transaction() as session:
        head = session.get(AuditChainHead, tenant.tenant_id)
        assert head is not None and (head.seq, head.hash) == (5, mine[-1].hash)


def test_a_rolled_back_event_leaves_no_gap(database: Database, tenant: TenantKey) -> None:
    with database.session() as session:
        session.begin()
        record_event(session, tenant_id=tenant.tenant_id, action="test.rolled_back", actor="tester")
        session.rollback()
    append(database, tenant.tenant_id, 1)
    assert [e.action for e in events_of(database, tenant.tenant_id)][-1] == "test.event"
    assert [e.seq for e in events_of(database, tenant.tenant_id)] == [1, 2, 3]
    assert verify(database, tenant.tenant_id).ok


def test_one_transactions_events_are_appended_together_and_a_rolled_back_savepoint_takes_its_own_back(
        database: Database, tenant: TenantKey, other_tenant: TenantKey) -> None:
    # Events are collected and appended at commit, each chain's head locked once (issue 15): the order they were
    # recorded in is their seq order, two tenants' events in one transaction land on their own chains, and events
    # recorded inside a savepoint that rolls back are dropped while the rest commit, with no gap.
    with database.transaction() as session:
        record_event(session, tenant_id=tenant.tenant_id, action="test.first", actor="tester")
        record_event(session, tenant_id=other_tenant.tenant_id, action="test.other", actor="tester")
        savepoint = session.begin_nested()
        record_event(session, tenant_id=tenant.tenant_id, action="test.undone", actor="tester")
        savepoint.rollback()
        with session.begin_nested():
            record_event(session, tenant_id=tenant.tenant_id, action="test.kept", actor="tester",
                         categories=["b", "a"])
        returned = record_event(session, tenant_id=tenant.tenant_id, action="test.last", actor="tester")
    mine = events_of(database, tenant.tenant_id)
    assert [(e.seq, e.action) for e in mine[2:]] == [(3, "test.first"), (4, "test.kept"), (5, "test.last")]
    assert (returned.seq, returned.hash) == (5, mine[-1].hash)
    assert [e.action for e in events_of(database, other_tenant.tenant_id)][-1] == "test.other"
    assert verify(database, tenant.tenant_id).ok and verify(database, other_tenant.tenant_id).ok
    with database.transaction() as session:
        assert list(session.scalars(text("SELECT category FROM audit_event_categories WHERE chain_id = :c AND seq = 4"
                                         " ORDER BY category"), {"c": tenant.tenant_id})) == ["a", "b"]


def test_time_never_goes_backwards_within_a_chain(database: Database, tenant: TenantKey) -> None:
    # A writer whose clock lags behind the head's takes the head's time, so seq order stays time order.
    ahead = utcnow() + timedelta(minutes=5)
    sql(database, "UPDATE audit_chain_heads SET occurred_at = :t WHERE chain_id = :c", t=ahead, c=tenant.tenant_id)
    append(database, tenant.tenant_id, 1)
    assert events_of(database, tenant.tenant_id)[-1].occurred_at == ahead
    assert verify(database, tenant.tenant_id).ok


def test_details_are_hashed_as_the_database_returns_them(database: Database, tenant: TenantKey) -> None:
    with database.transaction() as session:
        record_event(session, tenant_id=tenant.tenant_id, action="test.details", actor="tester",
                     details={"whole": 2.0, "tiny": 1e-7, "pair": (1, 2), "text": "Köln 👋"})
    for bad in ({"bad": math.nan}, {"bad": 2**60}):
        with pytest.raises(ValueError), database.transaction() as session:
            record_event(session, tenant_id=tenant.tenant_id, action="test.details", actor="tester", details=bad)
    assert events_of(database, tenant.tenant_id)[-1].details == {"whole": 2, "tiny": 1e-7, "pair": [1, 2],
                                                                 "text": "Köln 👋"}
    assert verify(database, tenant.tenant_id).ok


TAMPERING = [
    pytest.param("action = 'test.other'", id="action"),
    pytest.param("actor = 'key_0000000000000000'", id="actor"),
    pytest.param("subject_type = 'other'", id="subject_type"),
    pytest.param("subject_id = 'thing_99'", id="subject_id"),
    pytest.param("request_id = 'req_forged'", id="request_id"),
    pytest.param("content_digest = repeat('0', 64)", id="content_digest"),
    pytest.param("conversation_id = 'conv-forged'", id="conversation_id"),
    pytest.param("turn_id = 'turn-forged'", id="turn_id"),
    pytest.param("decision = 'allow'", id="decision"),
    pytest.param("categories = '[\"hate\"]'::jsonb", id="categories"),
    pytest.param("details = '{\"n\": 99}'::jsonb", id="details"),
    pytest.param("occurred_at = occurred_at + interval '1 microsecond'", id="occurred_at"),
    pytest.param("tenant_id = NULL", id="tenant_id"),
    pytest.param("hash = repeat('1', 64)", id="hash"),
]


@pytest.mark.parametrize("assignment", TAMPERING)
def test_an_event_altered_in_sql_is_found_and_located(database: Database, tenant: TenantKey,
                                                      assignment: str) -> None:
    append(database, tenant.tenant_id, 4, conversation_id="conv-1", turn_id="t-1", decision="block")
    assert verify(database, tenant.tenant_id).ok
    sql(database, f"UPDATE audit_events SET {assignment} WHERE chain_id = :c AND seq = 4", c=tenant.tenant_id)
    result = verify(database, tenant.tenant_id)
    assert not result.ok
    assert (result.broken.seq, result.broken.code) == (4, "hash_mismatch")
    assert result.count == 3


def test_an_altered_prev_hash_is_found(database: Database, tenant: TenantKey) -> None:
    append(database, tenant.tenant_id, 3)
    sql(database, "UPDATE audit_events SET prev_hash = repeat('2', 64) WHERE chain_id = :c AND seq = 3",
        c=tenant.tenant_id)
    result = verify(database, tenant.tenant_id)
    assert (result.broken.seq, result.broken.code) == (3, "hash_mismatch")


def test_an_altered_and_rehashed_event_is_found_at_the_next_link(database: Database, tenant: TenantKey) -> None:
    append(database, tenant.tenant_id, 3)
    # Someone who alters an event and stores a hash recomputed to match is caught by the next event's prev_hash.
    third = events_of(database, tenant.tenant_id)[2]
    third.details = {"n": 42}
    sql(database, "UPDATE audit_events SET details = '{\"n\": 42}'::jsonb, hash = :h WHERE chain_id = :c AND seq = 3",
        h=hash_fields(canonical_fields(third)), c=tenant.tenant_id)
    result = verify(database, tenant.tenant_id)
    assert (result.broken.seq, result.broken.code) == (4, "prev_hash_mismatch")


def test_a_deleted_event_is_found_and_named(database: Database, tenant: TenantKey) -> None:
    append(database, tenant.tenant_id, 4)
    sql(database, "DELETE FROM audit_events WHERE chain_id = :c AND seq = 4", c=tenant.tenant_id)
    result = verify(database, tenant.tenant_id)
    assert (result.broken.seq, result.broken.code) == (5, "missing")
    assert "seq 4 is missing" in result.broken.reason


def test_events_cut_off_the_end_are_found(database: Database, tenant: TenantKey) -> None:
    append(database, tenant.tenant_id, 4)
    sql(database, "DELETE FROM audit_events WHERE chain_id = :c AND seq >= 5", c=tenant.tenant_id)
    result = verify(database, tenant.tenant_id)
    assert (result.broken.seq, result.broken.code) == (5, "missing")
    assert "deleted from the end" in result.broken.reason


def test_two_events_with_swapped_seq_are_found(database: Database, tenant: TenantKey) -> None:
    append(database, tenant.tenant_id, 4)
    sql(database, "UPDATE audit_events SET seq = -seq WHERE chain_id = :c AND seq IN (3, 4)", c=tenant.tenant_id)
    sql(database, "UPDATE audit_events SET seq = CASE seq WHEN -3 THEN 4 ELSE 3 END WHERE chain_id = :c AND seq < 0",
        c=tenant.tenant_id)
    result = verify(database, tenant.tenant_id)
    assert (result.broken.seq, result.broken.code) == (3, "hash_mismatch")


def test_an_event_moved_to_another_chain_leaves_a_gap(database: Database, tenant: TenantKey,
                                                      other_tenant: TenantKey) -> None:
    append(database, tenant.tenant_id, 3)
    sql(database, "UPDATE audit_events SET chain_id = :o, seq = 1000 WHERE chain_id = :c AND seq = 3",
        c=tenant.tenant_id, o=other_tenant.tenant_id)
    assert (verify(database, tenant.tenant_id).broken.seq, verify(database, tenant.tenant_id).broken.code) == (
        4, "missing")
    # In the other chain it is an intruder after a gap.
    assert (verify(database, other_tenant.tenant_id).broken.seq,
            verify(database, other_tenant.tenant_id).broken.code) == (1000, "missing")


def test_a_range_is_verified_from_its_anchor(database: Database, tenant: TenantKey) -> None:
    append(database, tenant.tenant_id, 6)
    result = verify(database, tenant.tenant_id, start_seq=3, end_seq=5)
    assert result.ok and (result.count, result.first_seq, result.last_seq) == (3, 3, 5)
    sql(database, "UPDATE audit_events SET hash = repeat('4', 64) WHERE chain_id = :c AND seq = 2",
        c=tenant.tenant_id)
    # The range itself is intact, but its first link points at an event that no longer matches.
    result = verify(database, tenant.tenant_id, start_seq=3, end_seq=5)
    assert (result.broken.seq, result.broken.code) == (3, "prev_hash_mismatch")
    assert verify(database, tenant.tenant_id, start_seq=4).ok
    sql(database, "DELETE FROM audit_events WHERE chain_id = :c AND seq = 5", c=tenant.tenant_id)
    result = verify(database, tenant.tenant_id, start_seq=4, end_seq=5)
    assert (result.broken.seq, result.broken.code) == (5, "missing")


def test_a_range_past_the_head_is_empty_and_ok(database: Database, tenant: TenantKey) -> None:
    append(database, tenant.tenant_id, 5)
    head = events_of(database, tenant.tenant_id)[-1].seq
    for start_seq in (head + 1, 100_000, 2**63 - 1):
        result = verify(database, tenant.tenant_id, start_seq=start_seq)
        assert result.ok and result.count == 0, (start_seq, result.broken)
    assert verify(database, "ten_nobody", start_seq=3).ok
    # Past the head stays quiet, but events cut off the end are still found by the ranges that reach them.
    sql(database, "DELETE FROM audit_events WHERE chain_id = :c AND seq >= :s", c=tenant.tenant_id, s=head - 1)
    assert (verify(database, tenant.tenant_id, start_seq=head - 1).broken.code) == "missing"
    assert verify(database, tenant.tenant_id).broken.code == "missing"


def test_an_event_inserted_past_the_head_without_the_writer_is_found(database: Database, tenant: TenantKey) -> None:
    append(database, tenant.tenant_id, 3)
    head = events_of(database, tenant.tenant_id)[-1].seq
    # A well-formed event one seq past the head, linked to the newest event and hashed as the writer would hash it,
    # inserted without moving the head: every link holds, so only the head check can tell.
    columns = [c.name for c in AuditEvent.__table__.columns if c.name not in ("id", "seq", "prev_hash", "hash")]
    sql(database, f"INSERT INTO audit_events (seq, prev_hash, hash, {', '.join(columns)}) "
        f"SELECT seq + 1, hash, '', {', '.join(columns)} FROM audit_events WHERE chain_id = :c AND seq = :s",
        c=tenant.tenant_id, s=head)
    forged = events_of(database, tenant.tenant_id)[-1]
    sql(database, "UPDATE audit_events SET hash = :h WHERE chain_id = :c AND seq = :s",
        h=hash_fields(canonical_fields(forged)), c=tenant.tenant_id, s=head + 1)
    result = verify(database, tenant.tenant_id)
    assert result.broken is not None
    assert (result.broken.seq, result.broken.code) == (head + 1, "head_mismatch"), result.broken
    assert "inserted without going through the writer" in result.broken.reason


def appending_while_streaming(monkeypatch: pytest.MonkeyPatch, database: Database, tenant_id: str, count: int,
                              when: str) -> None:
    """Make the verifier's first stream append `count` events from another transaction, before its query runs or
    after it has read its last row, as a writer does on a busy chain."""
    original = audit.stream_events
    calls = []

    def stream(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        if len(calls) == 1 and when == "before-stream":
            append(database, tenant_id, count)
        yield from original(*args, **kwargs)
        if len(calls) == 1 and when == "after-stream":
            append(database, tenant_id, count)

    monkeypatch.setattr(audit, "stream_events", stream)


@pytest.mark.parametrize("when", ["before-stream", "after-stream"])
@pytest.mark.parametrize("bounded", [False, True], ids=["whole-chain", "range-past-the-old-head"])
def test_events_appended_while_a_chain_is_verified_are_not_a_tamper_alarm(
        database: Database, tenant: TenantKey, monkeypatch: pytest.MonkeyPatch, when: str, bounded: bool) -> None:
    append(database, tenant.tenant_id, 3)
    head = events_of(database, tenant.tenant_id)[-1].seq
    # A range ending past the head read at the start, but before the head at the end (4 appended, end at +2).
    appending_while_streaming(monkeypatch, database, tenant.tenant_id, 4 if bounded else 2, when)
    result = verify(database, tenant.tenant_id, **({"start_seq": 2, "end_seq": head + 2} if bounded else {}))
    assert result.ok, result.broken
    assert (result.first_seq, result.last_seq) == (2 if bounded else 1, head + 2)
    if not bounded:
        assert result.head_hash == events_of(database, tenant.tenant_id)[-1].hash


def test_an_empty_chain_verifies(database: Database) -> None:
    result = verify(database, "ten_nobody")
    assert result.ok and result.count == 0 and result.head_hash is None


# ---- failed authentication -------------------------------------------------------------------------------------


def auth_failures(database: Database, chain_id: str) -> list[AuditEvent]:
    with database.transaction() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.chain_id == chain_id,
                                                             AuditEvent.action == "auth.failed")
                                    .order_by(AuditEvent.seq)))


def assert_no_secret(events: list[AuditEvent], secret: str) -> None:
    for event in events:
        rendered = " ".join(str(getattr(event, c.key)) for c in AuditEvent.__table__.columns)
        assert secret not in rendered and secret.split("_")[-1] not in rendered


def test_a_wrong_secret_for_a_real_key_is_audited_on_its_tenant_chain(client: FlaskClient, database: Database,
                                                                     tenant: TenantKey) -> None:
    forged = tenant.plaintext[:-4] + ("AAAA" if not tenant.plaintext.endswith("AAAA") else "BBBB")
    response = client.get("/v1/submissions", headers={"Authorization": f"Bearer {forged}",
                                                      "X-Request-ID": "req-auth-fail-1"})
    assert response.status_code == 401
    (event,) = auth_failures(database, tenant.tenant_id)
    assert (event.actor, event.subject_type, event.subject_id) == ("anonymous", "api_key", tenant.key_id)
    assert event.request_id == "req-auth-fail-1"
    assert event.details == {"reason": "wrong_secret", "method": "GET", "route": "/v1/submissions",
                             "client_address": client.environ_base["REMOTE_ADDR"]}
    assert_no_secret([event], forged)
    assert verify(database, tenant.tenant_id).ok


def test_a_revoked_key_is_audited_with_its_reason(client: FlaskClient, database: Database) -> None:
    revoked = issue_key(database)
    with database.transaction() as session:
        revoke_key(session, revoked.key_id)
    assert client.get("/v1/submissions", headers=revoked.headers).status_code == 401
    (event,) = auth_failures(database, revoked.tenant_id)
    assert event.details["reason"] == "revoked" and event.subject_id == revoked.key_id
    assert_no_secret([event], revoked.plaintext)


def test_an_unknown_key_is_audited_on_the_system_chain(client: FlaskClient, database: Database) -> None:
    before = len(auth_failures(database, SYSTEM_CHAIN))
    unknown = "vk_" + "0123456789abcdef" + "_" + "A" * 43
    assert client.get("/v1/submissions", headers={"Authorization": f"Bearer {unknown}"}).status_code == 401
    assert client.get("/v1/submissions", headers={"Authorization": "Bearer not-a-key"}).status_code == 401
    events = auth_failures(database, SYSTEM_CHAIN)[before:]
    # The address's second failure in the window is counted, not written: its summary follows when the window
    # closes (tests/integration/test_auth_throttling.py).
    assert [(e.tenant_id, e.subject_id, e.details["reason"]) for e in events] == [(None, None, "unknown_key")]
    with database.transaction() as session:
        assert session.scalar(select(AuthFailureWindow.count).where(
            AuthFailureWindow.subject_id == client.environ_base["REMOTE_ADDR"])) == 2
    assert_no_secret(events, unknown)
    assert_no_secret(events, "not-a-key")
    assert verify(database, SYSTEM_CHAIN).ok


def test_a_request_without_a_key_is_refused_without_an_event(client: FlaskClient, database: Database) -> None:
    before = len(auth_failures(database, SYSTEM_CHAIN))
    assert client.get("/v1/submissions").status_code == 401
    assert len(auth_failures(database, SYSTEM_CHAIN)) == before
