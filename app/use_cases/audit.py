"""The audit trail in the database: `record_event` appends to a tenant's hash chain in the caller's transaction
(collected, then appended at commit with the chain's head locked once, at the end); querying, streaming and
verifying what is stored. The pure part is app/audit_chain.py; see docs/compliance.md."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Generator, Iterable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Table, TextClause, and_, bindparam, insert, select, text, update
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, SessionTransaction

from app import metrics
from app.audit_chain import (
    GENESIS_HASH,
    ChainVerifier,
    Verification,
    canonical_fields,
    canonical_members,
    chain_of,
    format_timestamp,
    hash_members,
    plain_json,
    span,
)
from app.db import insert_for
from app.models import AuditChainHead, AuditEvent, AuditEventCategory, AuthFailureWindow, utcnow
from app.use_cases.errors import InvalidInput

SYSTEM_ACTOR = "system"
ANONYMOUS_ACTOR = "anonymous"


# ---- writing ---------------------------------------------------------------------------------------------------


_HEADS: Table = AuditChainHead.__table__  # type: ignore[assignment]
# Built once (their cache keys with them): they run for every transaction that records an event.
_LOCK_HEAD = select(_HEADS.c.seq, _HEADS.c.hash, _HEADS.c.occurred_at) \
    .where(_HEADS.c.chain_id == bindparam("head")).with_for_update()
_MOVE_HEAD = update(_HEADS).where(_HEADS.c.chain_id == bindparam("head")) \
    .values(seq=bindparam("seq"), hash=bindparam("hash"), occurred_at=bindparam("occurred_at"))
_MOVE_HEAD_CTE = _MOVE_HEAD.cte("moved_head")
# Events per transaction written with the head's move: a steady load's (1 or 2 a transaction: an intake, a verdict,
# a delivery). Past it the two statements cost less CPU (measured: 1.24 vs 1.50 ms a transaction of 2 events, even
# at 8, 7.2 vs 6.5 ms at 16: the text statement's parameters are processed one by one, the INSERT's as a batch).
_MOVING_HEAD_MAX_ROWS = 4
_EVENTS: Table = AuditEvent.__table__  # type: ignore[assignment]
_EVENT_CATEGORIES: Table = AuditEventCategory.__table__  # type: ignore[assignment]
# Every column the event object carries (the id is the database's): the attribute of each is named as its column.
_EVENT_COLUMNS = tuple(column.key for column in _EVENTS.columns if column.key != "id")
_INSERT_EVENTS = insert(_EVENTS)
_INSERT_EVENT_CATEGORIES = insert(_EVENT_CATEGORIES)


@dataclass(frozen=True)
class _Head:
    seq: int
    hash: str
    occurred_at: datetime | None


@functools.cache
def _insert_events_moving_head(count: int) -> TextClause:
    """`count` events' INSERT that moves a chain's head too (the `_MOVE_HEAD` parameters; each event's columns as
    `{column}_{index}`), built once per count. As SQL text with typed parameters: SQLAlchemy caches no compiled form
    of a multi-row VALUES, and compiling this one each time cost more CPU than the statement it saves."""
    statement = insert(_EVENTS).values(
        [{key: bindparam(f"{key}_{index}", type_=_EVENTS.c[key].type) for key in _EVENT_COLUMNS}
         for index in range(count)]
    ).add_cte(_MOVE_HEAD_CTE)
    # text() would read `:x::JSONB` (the JSON columns' cast) as two parameters: the same cast, spelled as CAST.
    sql = re.sub(r":(\w+)::(\w+)", r"CAST(:\1 AS \2)",
                 str(statement.compile(dialect=postgresql.dialect(paramstyle="named"))))  # type: ignore[no-untyped-call]
    return text(sql).bindparams(
        *(bindparam(f"{key}_{index}", type_=_EVENTS.c[key].type) for key in _EVENT_COLUMNS for index in range(count)),
        bindparam("head", type_=_HEADS.c.chain_id.type), bindparam("seq", type_=_HEADS.c.seq.type),
        bindparam("hash", type_=_HEADS.c.hash.type), bindparam("occurred_at", type_=_HEADS.c.occurred_at.type))


def _lock_head(session: Session, chain_id: str) -> _Head:
    """Lock the chain's head row until the caller's transaction ends, creating it race-free on first use."""
    # Plain statements on the transaction's connection: the head is never an object in the session, so none of the
    # ORM's per-statement work is needed (issue 15: it was most of this function's cost).
    connection = session.connection()
    locked = {"head": chain_id}
    # On PostgreSQL the row lock alone serializes the chain's writers, so a chain whose head exists (every chain
    # after its first event) is locked in one statement. SQLite has no row locks: there the write below takes the
    # database write lock first, which serializes every writer, chain or not.
    row = connection.execute(_LOCK_HEAD, locked).one_or_none() if connection.dialect.name == "postgresql" else None
    if row is None:
        connection.execute(
            insert_for(session)(_HEADS).values(chain_id=chain_id, seq=0, hash=GENESIS_HASH, occurred_at=None)
            .on_conflict_do_nothing(index_elements=["chain_id"])
        )
        row = connection.execute(_LOCK_HEAD, locked).one()
    return _Head(seq=row.seq, hash=row.hash, occurred_at=row.occurred_at)


def record_event(
    session: Session,
    *,
    tenant_id: str | None,
    action: str,
    actor: str,
    subject_type: str | None = None,
    subject_id: str | None = None,
    request_id: str | None = None,
    content_digest: str | None = None,
    details: dict[str, Any] | None = None,
    conversation_id: str | None = None,
    turn_id: str | None = None,
    decision: str | None = None,
    categories: Iterable[str] | None = None,
) -> AuditEvent:
    """Append an event to its tenant's chain (the system chain without a tenant), in the caller's transaction.

    The event is collected, not yet written: when the transaction commits, every event it collected is appended in
    one step (`_append_collected`), each chain's head locked once, at the very end of the transaction. A transaction
    that rolls back (or a savepoint that does) leaves no event. The returned event gets its `seq` and `hash` at
    commit; it is written as a row, never becomes an object of the session, and its `id` stays unset."""
    category_list = None if categories is None else sorted(set(categories))
    event = AuditEvent(
        tenant_id=tenant_id, chain_id=chain_of(tenant_id), occurred_at=utcnow(), action=action, actor=actor,
        subject_type=subject_type, subject_id=subject_id, request_id=request_id, content_digest=content_digest,
        conversation_id=conversation_id, turn_id=turn_id, decision=decision, categories=category_list,
        details=plain_json(details),
    )
    session.info.setdefault(_COLLECTED, []).append(event)
    metrics.audit_event_written(session, action, tenant_id)
    # What the caller added before the event goes out now (nothing is sent when nothing is pending), as it did when
    # the chain's head was locked here: callers read what the database fills in (ids, created_at, defaults) of the
    # objects their event is about.
    session.flush()
    return event


_COLLECTED = "audit_events_collected"
_SAVEPOINTS = "audit_events_savepoints"


def _append_collected(session: Session) -> None:
    """Before the outermost commit: append the transaction's events to their chains. Chains are locked in sorted
    order (two transactions touching the same chains never deadlock), each once; the events of one chain get
    consecutive seqs in the order they were recorded, each linked to the one before."""
    if session.in_nested_transaction():
        return
    collected: list[AuditEvent] = session.info.pop(_COLLECTED, [])
    session.info.pop(_SAVEPOINTS, None)
    if not collected:
        return
    # The transaction's other writes go out first, so the lock below is held only for the events and the commit.
    session.flush()
    # Serialized before any lock is taken; only `seq`, `prev_hash` (and a clamped time) are filled in under it.
    members = {id(event): canonical_members(canonical_fields(event)) for event in collected}
    by_chain: dict[str, list[AuditEvent]] = {}
    for event in collected:
        by_chain.setdefault(event.chain_id, []).append(event)
    categories: list[dict[str, object]] = []
    moves: list[dict[str, object]] = []
    for chain_id in sorted(by_chain):
        head = _lock_head(session, chain_id)
        seq, prev_hash, last_time = head.seq, head.hash, head.occurred_at
        for event in by_chain[chain_id]:
            # Time never goes backwards within a chain (a writer on a machine whose clock lags takes the head's
            # time), so `seq` order is time order and a time range is one `seq` range.
            own = members[id(event)]
            if last_time is not None and event.occurred_at < last_time:
                event.occurred_at = last_time
                own.update(canonical_members({"occurred_at": format_timestamp(last_time)}))
            seq += 1
            event.seq, event.prev_hash = seq, prev_hash
            own.update(canonical_members({"seq": seq, "prev_hash": prev_hash}))
            event.hash = hash_members(own)
            prev_hash, last_time = event.hash, event.occurred_at
            categories.extend({"chain_id": chain_id, "category": category, "seq": seq}
                              for category in event.categories or ())
        moves.append({"head": chain_id, "seq": seq, "hash": prev_hash, "occurred_at": last_time})
    # Written as rows, not through the unit of work: nothing reads the events back as objects of this session
    # (the returned ones keep their seq and hash), so the ORM's per-object flush work and the RETURNING of each id
    # are not needed (issue 15: the event INSERT was ~9 % of an intake's CPU).
    connection = session.connection()
    rows = [{key: getattr(event, key) for key in _EVENT_COLUMNS} for event in collected]
    if connection.dialect.name == "postgresql" and len(rows) <= _MOVING_HEAD_MAX_ROWS:
        # The last chain's head moves in the events' INSERT itself, a data-modifying CTE (which PostgreSQL runs
        # exactly once, to completion, whether or not the INSERT reads it): one statement and round trip fewer per
        # transaction that records events, usually all of its head moves (issue 15 item 2). SQLite has no such CTE.
        *earlier, last = moves
        for move in earlier:
            connection.execute(_MOVE_HEAD, move)
        connection.execute(_insert_events_moving_head(len(rows)), {
            **last, **{f"{key}_{index}": value for index, row in enumerate(rows) for key, value in row.items()}})
    else:
        for move in moves:
            connection.execute(_MOVE_HEAD, move)
        connection.execute(_INSERT_EVENTS, rows)
    if categories:
        connection.execute(_INSERT_EVENT_CATEGORIES, categories)


def _mark_savepoint(session: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:
        session.info.setdefault(_SAVEPOINTS, {})[transaction] = len(session.info.get(_COLLECTED, ()))


def _drop_rolled_back(session: Session, previous: SessionTransaction) -> None:
    """A rolled-back savepoint takes back the events recorded inside it; a rolled-back transaction, all of them."""
    if previous.nested:
        mark = session.info.get(_SAVEPOINTS, {}).pop(previous, None)
        if mark is not None and _COLLECTED in session.info:
            del session.info[_COLLECTED][mark:]
    elif previous.parent is None:
        session.info.pop(_COLLECTED, None)
        session.info.pop(_SAVEPOINTS, None)


def _forget(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_COLLECTED, None)
        session.info.pop(_SAVEPOINTS, None)


sqlalchemy_event.listen(Session, "before_commit", _append_collected)
sqlalchemy_event.listen(Session, "after_transaction_create", _mark_savepoint)
sqlalchemy_event.listen(Session, "after_soft_rollback", _drop_rolled_back)
sqlalchemy_event.listen(Session, "after_transaction_end", _forget)


def record_failed_authentication(
    session: Session, *, reason: str, key_id: str | None, tenant_id: str | None, client_address: str | None,
    request_id: str | None, method: str, route: str | None, window_seconds: int,
) -> None:
    """Count a failed authentication in its window, in a transaction of its own (the request's gate opens it): the
    window of the key (on its tenant's chain) when the id names a real key, else of the client address (on the system
    chain). The window's first failure is written at once as `auth.failed`; the others are only counted, and
    `summarize_auth_failures` writes them as one summary event when the window has closed. So a flood of bad keys
    writes two events per window and subject, and takes the chain's head lock no more often. Never the presented
    key; its id only when that id names a real key."""
    now = utcnow()
    subject_type, subject_id = ("api_key", key_id) if key_id else ("client_address", client_address or "unknown")
    insert = insert_for(session)(AuthFailureWindow).values(
        chain_id=chain_of(tenant_id), subject_type=subject_type, subject_id=subject_id,
        window_start=window_start(now, window_seconds), tenant_id=tenant_id, count=1, first_at=now, last_at=now,
    )
    count = session.execute(
        insert.on_conflict_do_update(
            index_elements=["chain_id", "subject_type", "subject_id", "window_start"],
            set_={"count": AuthFailureWindow.count + 1, "last_at": insert.excluded.last_at},
        ).returning(AuthFailureWindow.count)
    ).scalar_one()
    if count > 1:
        return
    record_event(
        session, tenant_id=tenant_id, action="auth.failed", actor=ANONYMOUS_ACTOR,
        subject_type="api_key" if key_id else None, subject_id=key_id, request_id=request_id,
        details={"reason": reason, "method": method, "route": route, "client_address": client_address},
    )


def window_start(moment: datetime, window_seconds: int) -> datetime:
    """The start of the failed-authentication window `moment` falls in (windows are aligned to the epoch)."""
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % window_seconds, UTC)


_SUMMARY_BATCH = 200


def summarize_auth_failures(session: Session, *, window_seconds: int, now: datetime | None = None) -> int:
    """Close the failed-authentication windows that have ended (a few seconds' grace for the API processes'
    clocks), in the caller's transaction: each window that counted more than its first failure becomes one
    `auth.failed` event with `summary: true`, the window's whole `count` (its first failure included, which has its
    own event) and its `first_at` and `last_at`; every closed window's row is deleted. Returns the events written."""
    now = now or utcnow()
    closed_before = now - timedelta(seconds=window_seconds + _CLOCK_GRACE_SECONDS)
    windows = list(session.scalars(
        select(AuthFailureWindow).where(AuthFailureWindow.window_start <= closed_before)
        .order_by(AuthFailureWindow.window_start).limit(_SUMMARY_BATCH).with_for_update(skip_locked=True)
    ))
    written = 0
    # One chain at a time, in one order: two sweeps lock chain heads in the same order and cannot deadlock.
    for window in sorted(windows, key=lambda w: (w.chain_id, w.window_start, w.subject_type, w.subject_id)):
        if window.count > 1:
            record_event(
                session, tenant_id=window.tenant_id, action="auth.failed", actor=ANONYMOUS_ACTOR,
                subject_type=window.subject_type, subject_id=window.subject_id,
                details={"summary": True, "count": window.count, "first_at": format_timestamp(window.first_at),
                         "last_at": format_timestamp(window.last_at),
                         "window_start": format_timestamp(window.window_start), "window_seconds": window_seconds},
            )
            written += 1
        session.delete(window)
    return written


_CLOCK_GRACE_SECONDS = 5


# ---- reading ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilter:
    start: datetime | None = None
    end: datetime | None = None
    action: str | None = None
    actor: str | None = None
    subject: str | None = None
    decision: str | None = None
    category: str | None = None
    conversation_id: str | None = None


@dataclass(frozen=True)
class AuditPage:
    events: list[AuditEvent]
    next_cursor: str | None


def seq_range(
    session: Session, chain_id: str, start: datetime | None, end: datetime | None
) -> tuple[int, int | None] | None:
    """The `seq` range (high None: no upper bound) of events with start <= occurred_at < end; None if there are none.

    Time is monotonic in `seq` within a chain, so each bound is one probe of the (chain_id, occurred_at, seq) index,
    and every filtered query afterwards walks an index in `seq` order instead of sorting a time range.
    """
    low: int | None = 1
    high: int | None = None
    if start is not None:
        low = session.scalar(
            select(AuditEvent.seq).where(AuditEvent.chain_id == chain_id, AuditEvent.occurred_at >= start)
            .order_by(AuditEvent.occurred_at, AuditEvent.seq).limit(1)
        )
    if low is None:
        return None
    if end is not None:
        high = session.scalar(
            select(AuditEvent.seq).where(AuditEvent.chain_id == chain_id, AuditEvent.occurred_at < end)
            .order_by(AuditEvent.occurred_at.desc(), AuditEvent.seq.desc()).limit(1)
        )
        if high is None or high < low:
            return None
    return low, high


def _conditions(chain_id: str, filters: AuditFilter, low: int, high: int | None) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [AuditEvent.chain_id == chain_id, AuditEvent.seq >= low]
    if high is not None:
        conditions.append(AuditEvent.seq <= high)
    if filters.start is not None:
        conditions.append(AuditEvent.occurred_at >= filters.start)
    if filters.end is not None:
        conditions.append(AuditEvent.occurred_at < filters.end)
    if filters.action is not None:
        conditions.append(AuditEvent.action == filters.action)
    if filters.actor is not None:
        conditions.append(AuditEvent.actor == filters.actor)
    if filters.subject is not None:
        conditions.append(AuditEvent.subject_id == filters.subject)
    if filters.decision is not None:
        conditions.append(AuditEvent.decision == filters.decision)
    if filters.conversation_id is not None:
        conditions.append(AuditEvent.conversation_id == filters.conversation_id)
    return conditions


def query_events(
    session: Session, tenant_id: str, filters: AuditFilter, *, limit: int, cursor: str | None
) -> AuditPage:
    """One page of the tenant's events, oldest first in `seq` order; stable while new events arrive."""
    chain_id = chain_of(tenant_id)
    after = decode_cursor(cursor) if cursor else 0
    bounds = seq_range(session, chain_id, filters.start, filters.end)
    if bounds is None:
        return AuditPage(events=[], next_cursor=None)
    low, high = max(bounds[0], after + 1), bounds[1]
    query = select(AuditEvent).where(*_conditions(chain_id, filters, low, high))
    if filters.category is not None:
        # The category index is ordered by seq too, so the join walks both indexes in step.
        query = query.join(
            AuditEventCategory,
            and_(AuditEventCategory.chain_id == AuditEvent.chain_id, AuditEventCategory.seq == AuditEvent.seq),
        ).where(AuditEventCategory.chain_id == chain_id, AuditEventCategory.category == filters.category,
                AuditEventCategory.seq >= low)
        if high is not None:
            query = query.where(AuditEventCategory.seq <= high)
    rows = list(session.scalars(query.order_by(AuditEvent.seq).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    return AuditPage(events=rows, next_cursor=encode_cursor(rows[-1].seq) if has_more and rows else None)


MAX_SEQ = 2**63 - 1  # PostgreSQL's bigint: no seq that reaches SQL may exceed it


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": seq}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after = raw["after"]
        # The next page starts at after + 1, which must still fit PostgreSQL's bigint (an integer beyond it would
        # fail in the driver: a 500, issue 17 item 6).
        if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < MAX_SEQ:
            raise ValueError("bad cursor")
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput("Invalid cursor.", param="cursor", code="invalid_cursor") from exc
    return after


def stream_events(
    session: Session, chain_id: str, *, start: datetime | None = None, end: datetime | None = None,
    start_seq: int | None = None, end_seq: int | None = None, batch_size: int = 1000,
) -> Generator[AuditEvent, None, None]:
    """The chain's events in `seq` order, fetched `batch_size` at a time through a server-side cursor, so a range of
    any size streams in constant memory."""
    bounds = seq_range(session, chain_id, start, end)
    if bounds is None:
        return
    low, high = bounds
    if start_seq is not None:
        low = max(low, start_seq)
    if end_seq is not None:
        high = end_seq if high is None else min(high, end_seq)
    query = (
        select(AuditEvent).where(*_conditions(chain_id, AuditFilter(start=start, end=end), low, high))
        .order_by(AuditEvent.seq).execution_options(yield_per=batch_size)
    )
    # Loaded events are not kept: the identity map holds them weakly, and nothing else refers to them.
    result = session.scalars(query)
    try:
        yield from result
    finally:
        result.close()  # also when the reader stops early: the server-side cursor must not outlive it


# ---- verifying -------------------------------------------------------------------------------------------------


def verify_chain(
    session: Session, chain_id: str, *, start_seq: int | None = None, end_seq: int | None = None,
    batch_size: int = 1000,
) -> Verification:
    """Recompute the stored chain (all of it, or start_seq..end_seq) and name the first broken event.

    Writers go on appending while a chain is verified, so the head the stream is checked against is read again
    after streaming, and the events appended meanwhile (up to that head) are verified too. Checking against the head
    read before streaming would call every event committed during the stream "inserted without the writer" (a false
    tamper alarm on any busy chain); reading it after the stream is sound, because the writer moves the head in the
    same transaction as its events, so every event up to a head that can be read has been committed.
    """
    first = start_seq or 1
    head_seq, _ = _chain_head(session, chain_id)
    if first > 1 and first > head_seq:
        # A range that starts past the head holds no event yet: nothing to verify, and nothing missing. Calling it
        # "deleted from the end" would be a false tamper alarm (issue 17 item 6); the full chain's check is unchanged.
        return Verification(chain=chain_id, count=0, first_seq=None, last_seq=None, head_hash=None, broken=None,
                            notes=[f"start_seq {first} is past the chain's head (seq {head_seq}): no events to verify"])
    anchor = None
    if first > 1:
        anchor = session.scalar(
            select(AuditEvent.hash).where(AuditEvent.chain_id == chain_id, AuditEvent.seq == first - 1)
        )
    verifier = ChainVerifier(first_seq=first if first <= head_seq else None, anchor_hash=anchor)
    _feed(verifier, session, chain_id, first, end_seq, batch_size)
    head_seq, head_hash = _chain_head(session, chain_id)
    seen = verifier.last_seq or first - 1
    until = head_seq if end_seq is None else min(end_seq, head_seq)
    if verifier.broken is None and seen < until:
        _feed(verifier, session, chain_id, seen + 1, until, batch_size)  # appended while the first stream ran
    if end_seq is None or end_seq >= head_seq:
        verifier.check_head(head_seq, head_hash)
    else:
        _check_range_end(verifier, first, end_seq)
    result = verifier.result()
    return Verification(chain=chain_id, count=result.count, first_seq=result.first_seq, last_seq=result.last_seq,
                        head_hash=result.head_hash, broken=result.broken, notes=result.notes)


def _chain_head(session: Session, chain_id: str) -> tuple[int, str]:
    """The chain's head as committed now (seq 0 and the genesis hash for a chain with no event yet)."""
    head = session.execute(
        select(AuditChainHead.seq, AuditChainHead.hash).where(AuditChainHead.chain_id == chain_id)
    ).one_or_none()
    return (head.seq, head.hash) if head is not None else (0, GENESIS_HASH)


def _feed(verifier: ChainVerifier, session: Session, chain_id: str, low: int, high: int | None,
          batch_size: int) -> None:
    with closing(stream_events(session, chain_id, start_seq=low, end_seq=high, batch_size=batch_size)) as events:
        for event in events:
            if not verifier.feed(canonical_fields(event), event.hash):
                break


def _check_range_end(verifier: ChainVerifier, first: int, end_seq: int) -> None:
    """A range that ends before the head must reach its end: events missing at its end were deleted."""
    last = verifier.last_seq or first - 1
    if verifier.broken is None and last < end_seq:
        verifier.mark_broken(last + 1, "missing", f"seq {span(last + 1, end_seq)} is missing (deleted)", None)
