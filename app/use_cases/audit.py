"""The audit trail: appending events to a per-tenant hash chain, and reading, exporting and verifying it.

Writing. Callers add events inside their own transaction, so a state change and its record commit together or not at
all. Each chain (`chain_id`: the tenant id, or `system` for events of no tenant, such as a failed authentication with
an unknown key) has one `audit_chain_heads` row; `record_event` locks it (`SELECT … FOR UPDATE` on PostgreSQL, the
database write lock on SQLite) until the caller commits, so writers of one chain queue up and `seq` is gapless and
never forks. The unique constraint on (chain_id, seq) backs that up. Take the lock last: call `record_event` after
the transaction's other writes, keep the transaction short, and append to one chain per transaction.

Canonical form (version 1). An event's hash is the lowercase hex SHA-256 of the RFC 8785 (JSON Canonicalization
Scheme) serialization of this object: keys sorted, no whitespace, UTF-8, numbers as ECMAScript prints them:

    {"action", "actor", "categories", "chain", "content_digest", "conversation_id", "decision", "details",
     "occurred_at", "prev_hash", "request_id", "seq", "subject_id", "subject_type", "tenant_id", "turn_id", "v"}

Every key is present (null when empty); `v` is 1; `occurred_at` is UTC as `YYYY-MM-DDTHH:MM:SS.ffffffZ`;
`categories` is a sorted list or null; `prev_hash` is the previous event's hash, or 64 zeros for `seq` 1. An NDJSON
export line is exactly this object plus `"hash"`, so anyone can re-verify a chain offline with any RFC 8785 library.
Events hold digests of content, never content, so erasing content never touches the chain.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import rfc8785
from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.errors import InvalidRequest
from app.models import AuditChainHead, AuditEvent, AuditEventCategory, utcnow

SYSTEM_ACTOR = "system"
ANONYMOUS_ACTOR = "anonymous"
SYSTEM_CHAIN = "system"
GENESIS_HASH = "0" * 64
CANONICAL_VERSION = 1
CANONICAL_KEYS = (
    "action", "actor", "categories", "chain", "content_digest", "conversation_id", "decision", "details",
    "occurred_at", "prev_hash", "request_id", "seq", "subject_id", "subject_type", "tenant_id", "turn_id", "v",
)


def content_digest(texts: Sequence[str]) -> str:
    """SHA-256 over the texts as a JSON list: identifies content in the audit trail without holding it."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def chain_of(tenant_id: str | None) -> str:
    return tenant_id if tenant_id is not None else SYSTEM_CHAIN


def format_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_fields(event: Any) -> dict[str, Any]:
    """The object an event's hash covers, from an AuditEvent or a row with the same attribute names."""
    categories = event.categories
    return {
        "v": CANONICAL_VERSION,
        "chain": event.chain_id,
        "tenant_id": event.tenant_id,
        "seq": event.seq,
        "prev_hash": event.prev_hash,
        "occurred_at": format_timestamp(event.occurred_at),
        "action": event.action,
        "actor": event.actor,
        "subject_type": event.subject_type,
        "subject_id": event.subject_id,
        "request_id": event.request_id,
        "content_digest": event.content_digest,
        "conversation_id": event.conversation_id,
        "turn_id": event.turn_id,
        "decision": event.decision,
        "categories": None if categories is None else list(categories),
        "details": event.details if event.details is not None else {},
    }


def canonical_bytes(fields: Mapping[str, Any]) -> bytes:
    return rfc8785.dumps(dict(fields))


def hash_fields(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(fields)).hexdigest()


def export_line(event: Any) -> bytes:
    """One NDJSON export line: the canonical object plus its hash, itself in canonical form."""
    fields = canonical_fields(event)
    fields["hash"] = event.hash
    return canonical_bytes(fields) + b"\n"


CSV_COLUMNS = (
    "seq", "occurred_at", "action", "actor", "subject_type", "subject_id", "request_id", "content_digest",
    "conversation_id", "turn_id", "decision", "categories", "details", "tenant_id", "chain", "v", "prev_hash", "hash",
)
# A spreadsheet runs a cell that starts with one of these as a formula; client-chosen ids must not get that far.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_lines(events: Iterable[Any]) -> Iterator[str]:
    """A CSV export, a header and then a line per event: for reading in a spreadsheet. Verify with NDJSON, which
    carries the canonical form exactly (a CSV cell that looks like a formula is prefixed with `'`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    yield buffer.getvalue()
    for event in events:
        buffer.seek(0)
        buffer.truncate()
        fields = canonical_fields(event)
        fields["hash"] = event.hash
        fields["categories"] = " ".join(fields["categories"] or ())
        fields["details"] = json.dumps(fields["details"], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        writer.writerow([_csv_cell(fields[column]) for column in CSV_COLUMNS])
        yield buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


# ---- writing ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Head:
    seq: int
    hash: str
    occurred_at: datetime | None


def _lock_head(session: Session, chain_id: str) -> _Head:
    """Lock the chain's head row until the caller's transaction ends, creating it race-free on first use."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    # On SQLite this write also takes the database write lock, which serializes every writer, chain or not.
    session.execute(
        insert(AuditChainHead).values(chain_id=chain_id, seq=0, hash=GENESIS_HASH, occurred_at=None)
        .on_conflict_do_nothing(index_elements=["chain_id"])
    )
    row = session.execute(
        select(AuditChainHead.seq, AuditChainHead.hash, AuditChainHead.occurred_at)
        .where(AuditChainHead.chain_id == chain_id).with_for_update()
    ).one()
    return _Head(seq=row.seq, hash=row.hash, occurred_at=row.occurred_at)


_SAFE_INTEGER = 2**53 - 1


def _plain_json(details: Mapping[str, Any] | None) -> dict[str, Any]:
    """Details as the database will give them back, so the hash covers what is stored: JSON types only (tuples
    become lists), finite numbers, integral floats as integers (jsonb returns `2.0` as `2`), and integers that RFC
    8785 can print exactly."""
    plain: dict[str, Any] = json.loads(json.dumps(dict(details or {}), allow_nan=False), parse_float=_json_float,
                                       parse_int=_json_int)
    return plain


def _json_float(literal: str) -> float | int:
    value = float(literal)
    return _json_int(str(int(value))) if value.is_integer() else value


def _json_int(literal: str) -> int:
    value = int(literal)
    if abs(value) > _SAFE_INTEGER:
        raise ValueError("audit details may hold integers up to 2**53 - 1 only")
    return value


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
    """Append an event to its tenant's chain (the system chain without a tenant), in the caller's transaction."""
    chain_id = chain_of(tenant_id)
    head = _lock_head(session, chain_id)
    # Time never goes backwards within a chain (a writer on a machine whose clock lags takes the head's time), so
    # `seq` order is time order and a time range is one `seq` range.
    now = utcnow()
    occurred_at = now if head.occurred_at is None or now > head.occurred_at else head.occurred_at
    category_list = None if categories is None else sorted(set(categories))
    event = AuditEvent(
        tenant_id=tenant_id, chain_id=chain_id, seq=head.seq + 1, prev_hash=head.hash, occurred_at=occurred_at,
        action=action, actor=actor, subject_type=subject_type, subject_id=subject_id, request_id=request_id,
        content_digest=content_digest, conversation_id=conversation_id, turn_id=turn_id, decision=decision,
        categories=category_list, details=_plain_json(details),
    )
    event.hash = hash_fields(canonical_fields(event))
    session.execute(
        update(AuditChainHead).where(AuditChainHead.chain_id == chain_id)
        .values(seq=event.seq, hash=event.hash, occurred_at=occurred_at)
        .execution_options(synchronize_session=False)
    )
    session.add(event)
    for category in category_list or ():
        session.add(AuditEventCategory(chain_id=chain_id, category=category, seq=event.seq))
    return event


def record_failed_authentication(
    session: Session, *, reason: str, key_id: str | None, tenant_id: str | None, request_id: str | None,
    method: str, route: str | None,
) -> None:
    """`auth.failed`, in its own transaction: on the key's tenant chain if the key exists, else the system chain.

    Never the presented key; its id only when that id names a real key.
    """
    session.rollback()
    record_event(
        session, tenant_id=tenant_id, action="auth.failed", actor=ANONYMOUS_ACTOR,
        subject_type="api_key" if key_id else None, subject_id=key_id, request_id=request_id,
        details={"reason": reason, "method": method, "route": route},
    )
    session.commit()


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


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": seq}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after = raw["after"]
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ValueError("bad cursor")
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidRequest("Invalid cursor.", param="cursor", code="invalid_cursor") from exc
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


@dataclass(frozen=True)
class ChainBreak:
    """The first place a chain does not hold, and why."""

    seq: int | None
    code: str
    reason: str
    line: int | None = None


@dataclass(frozen=True)
class Verification:
    chain: str | None
    count: int
    first_seq: int | None
    last_seq: int | None
    head_hash: str | None
    broken: ChainBreak | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken is None


class ChainVerifier:
    """Recomputes a chain event by event, in `seq` order, and stops at the first link that does not hold.

    The same checks serve the database (`verify_chain`) and an export file (`verify_export`): each event's hash
    must match its canonical form (else it was altered), `seq` must go up by one (else events were deleted or
    reordered), and `prev_hash` must be the previous event's hash (else an event was altered and re-hashed, or
    replaced).
    """

    def __init__(self, *, first_seq: int | None = None, anchor_hash: str | None = None) -> None:
        # first_seq: the seq the range must start with; anchor_hash: the hash of the event before it, if known.
        self.expected_first = first_seq
        self.anchor = GENESIS_HASH if first_seq == 1 else anchor_hash
        self.chain: str | None = None
        self.count = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.last_hash: str | None = None
        self.broken: ChainBreak | None = None
        self.notes: list[str] = []

    def feed(self, fields: Mapping[str, Any], stored_hash: Any, *, line: int | None = None) -> bool:
        """Check one event (its canonical fields and the hash stored with it); False once the chain is broken."""
        if self.broken is not None:
            return False
        seq = fields.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return self.mark_broken(None, "malformed", "the event has no integer seq", line)
        if self.chain is None:
            self.chain = fields.get("chain")
        elif fields.get("chain") != self.chain:
            return self.mark_broken(seq, "chain_mismatch", f"event belongs to chain {fields.get('chain')!r}, "
                               f"not {self.chain!r}", line)
        if self.last_seq is None:
            if self.expected_first is not None and seq != self.expected_first:
                missing = _span(self.expected_first, seq - 1)
                return self.mark_broken(seq, "missing", f"the range should start at seq {self.expected_first}, "
                                   f"but seq {missing} is missing", line)
            if seq == 1:
                self.anchor = GENESIS_HASH
        elif seq != self.last_seq + 1:
            if seq <= self.last_seq:
                return self.mark_broken(seq, "out_of_order", f"seq {seq} follows seq {self.last_seq}: events were "
                                   "reordered or duplicated", line)
            return self.mark_broken(seq, "missing", f"seq {_span(self.last_seq + 1, seq - 1)} is missing "
                               "(deleted)", line)
        try:
            computed = hash_fields(fields)
        except (TypeError, ValueError, rfc8785.CanonicalizationError) as exc:
            return self.mark_broken(seq, "malformed", f"the event cannot be canonicalized ({exc})", line)
        if computed != stored_hash:
            return self.mark_broken(seq, "hash_mismatch", "the event's content does not match its stored hash: the "
                               "event (or its hash) was altered", line)
        expected_prev = self.last_hash if self.last_seq is not None else self.anchor
        if expected_prev is not None and fields.get("prev_hash") != expected_prev:
            before = self.last_seq if self.last_seq is not None else seq - 1
            return self.mark_broken(seq, "prev_hash_mismatch", f"prev_hash is not the hash of seq {before}: an event "
                               "was altered and re-hashed, or replaced", line)
        if self.last_seq is None and expected_prev is None:
            self.notes.append(f"the range starts at seq {seq}; its link to seq {seq - 1} was not checked")
        self.count += 1
        self.first_seq = seq if self.first_seq is None else self.first_seq
        self.last_seq = seq
        self.last_hash = stored_hash
        return True

    def check_head(self, head_seq: int, head_hash: str) -> None:
        """The chain's newest event must be the one its head row names (else events were cut off the end)."""
        if self.broken is not None:
            return
        last = self.last_seq or 0
        if last < head_seq:
            self.mark_broken(last + 1, "missing", f"the chain head is at seq {head_seq}, but events "
                        f"{_span(last + 1, head_seq)} are missing (deleted from the end)", None)
        elif last > head_seq:
            self.mark_broken(head_seq + 1, "head_mismatch", f"events after the chain head (seq {head_seq}) were "
                        "inserted without going through the writer", None)
        elif head_seq > 0 and self.last_hash != head_hash:
            self.mark_broken(last, "head_mismatch", f"seq {last} is not the event the chain head recorded: it was "
                        "altered and re-hashed", None)

    def result(self) -> Verification:
        return Verification(chain=self.chain, count=self.count, first_seq=self.first_seq, last_seq=self.last_seq,
                            head_hash=self.last_hash, broken=self.broken, notes=list(self.notes))

    def mark_broken(self, seq: int | None, code: str, reason: str, line: int | None) -> bool:
        self.broken = ChainBreak(seq=seq, code=code, reason=reason, line=line)
        return False


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"


def verify_chain(
    session: Session, chain_id: str, *, start_seq: int | None = None, end_seq: int | None = None,
    batch_size: int = 1000,
) -> Verification:
    """Recompute the stored chain (all of it, or start_seq..end_seq) and name the first broken event."""
    first = start_seq or 1
    head = session.execute(
        select(AuditChainHead.seq, AuditChainHead.hash).where(AuditChainHead.chain_id == chain_id)
    ).one_or_none()
    head_seq, head_hash = (head.seq, head.hash) if head is not None else (0, GENESIS_HASH)
    anchor = None
    if first > 1:
        anchor = session.scalar(
            select(AuditEvent.hash).where(AuditEvent.chain_id == chain_id, AuditEvent.seq == first - 1)
        )
    verifier = ChainVerifier(first_seq=first if first <= head_seq else None, anchor_hash=anchor)
    with closing(stream_events(session, chain_id, start_seq=first, end_seq=end_seq, batch_size=batch_size)) as events:
        for event in events:
            if not verifier.feed(canonical_fields(event), event.hash):
                break
    if end_seq is None or end_seq >= head_seq:
        verifier.check_head(head_seq, head_hash)
    elif verifier.broken is None and (verifier.last_seq or first - 1) < end_seq:
        last = verifier.last_seq or first - 1
        verifier.mark_broken(last + 1, "missing", f"seq {_span(last + 1, end_seq)} is missing (deleted)", None)
    result = verifier.result()
    return Verification(chain=chain_id, count=result.count, first_seq=result.first_seq, last_seq=result.last_seq,
                        head_hash=result.head_hash, broken=result.broken, notes=result.notes)


def verify_export(lines: Iterable[bytes | str]) -> Verification:
    """Verify an NDJSON export offline: every line is an event's canonical object plus its `hash`."""
    verifier = ChainVerifier()
    for number, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            verifier.mark_broken(None, "malformed", f"line {number} is not JSON ({exc.msg})", number)
            break
        if not isinstance(fields, dict) or "hash" not in fields:
            verifier.mark_broken(None, "malformed", f"line {number} is not an audit event with a hash", number)
            break
        stored = fields.pop("hash")
        if not verifier.feed(fields, stored, line=number):
            break
    return verifier.result()
