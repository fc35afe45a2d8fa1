"""Human review: the queue a `review` verdict opens, claims that expire, the reviewer's decision (once, by the
claimant), an admin's override, the reads (each read of a text audited) and the queue's counts. In the caller's
transaction throughout; see docs/review.md."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from app import metrics
from app.audit_chain import chain_of
from app.models import (
    AuditEvent,
    ReviewItem,
    ReviewItemCategory,
    ReviewStatus,
    Submission,
    Verdict,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    new_id,
    utcnow,
)
from app.use_cases import webhook_deliveries
from app.use_cases.audit import SYSTEM_ACTOR, record_event
from app.use_cases.authentication import Principal
from app.use_cases.errors import Conflict, NotFound
from app.use_cases.pagination import decode_cursor, decode_ranked_cursor, encode_cursor, encode_ranked_cursor
from app.webhooks import events

# How many other submissions of the conversation an item shows: before it (the closest), and after it.
CONTEXT_LIMIT = 20
CONTEXT_AFTER = 5
# The decided items the time-to-decision figures are computed over, at most (the newest).
STATS_SAMPLE = 10_000


# ---- opening an item (the worker, in the verdict's transaction) ------------------------------------------------


def open_review(session: Session, submission: Submission, verdict: Verdict) -> ReviewItem | None:
    """The review item of a verdict that decided `review`, added in the verdict's own transaction (None for any
    other decision). Its `review.created` event is `record_review_opened`, called after the verdict's events."""
    if verdict.decision != "review":
        return None
    scores = [score for score in verdict.category_scores.values() if score is not None]
    categories = sorted(c for c, hit in verdict.categories.items() if hit)
    item = ReviewItem(id=new_id("rev"), tenant_id=submission.tenant_id, submission_id=submission.id,
                      status=ReviewStatus.PENDING.value, priority=max(scores, default=0.0), role=submission.role,
                      conversation_id=submission.conversation_id, categories=categories,
                      created_at=verdict.created_at)
    session.add(item)
    session.add_all(ReviewItemCategory(review_id=item.id, category=c, tenant_id=item.tenant_id) for c in categories)
    return item


def record_review_opened(session: Session, item: ReviewItem, submission: Submission, *, actor: str) -> None:
    _audit(session, item, submission, "review.created", actor=actor, request_id=submission.request_id,
           details={"priority": item.priority, "categories": item.categories})


# ---- reading ---------------------------------------------------------------------------------------------------


def _live_claim(now: datetime) -> ColumnElement[bool]:
    return and_(ReviewItem.status == ReviewStatus.CLAIMED.value, ReviewItem.claim_expires_at > now)


def _effectively_pending(now: datetime) -> ColumnElement[bool]:
    # A claim whose time ran out is pending again at once: no sweep has to run for the item to be taken.
    return or_(ReviewItem.status == ReviewStatus.PENDING.value,
               and_(ReviewItem.status == ReviewStatus.CLAIMED.value, ReviewItem.claim_expires_at <= now))


def _status_condition(status: str, now: datetime) -> ColumnElement[bool]:
    if status == ReviewStatus.PENDING.value:
        return _effectively_pending(now)
    if status == ReviewStatus.CLAIMED.value:
        return _live_claim(now)
    return ReviewItem.status == ReviewStatus.DECIDED.value


@dataclass(frozen=True)
class ReviewFilter:
    status: str | None = None
    category: str | None = None
    role: str | None = None
    conversation_id: str | None = None
    created_before: datetime | None = None
    created_after: datetime | None = None


@dataclass(frozen=True)
class ReviewPage:
    items: list[ReviewItem]
    next_cursor: str | None
    counts: dict[str, int]


def _conditions(tenant_id: str, filters: ReviewFilter) -> list[ColumnElement[bool]]:
    """Every filter but the status (the counts are per status under the others)."""
    conditions: list[ColumnElement[bool]] = [ReviewItem.tenant_id == tenant_id]
    if filters.role:
        conditions.append(ReviewItem.role == filters.role)
    if filters.conversation_id:
        conditions.append(ReviewItem.conversation_id == filters.conversation_id)
    if filters.created_before:
        conditions.append(ReviewItem.created_at < filters.created_before)
    if filters.created_after:
        conditions.append(ReviewItem.created_at > filters.created_after)
    if filters.category:
        conditions.append(ReviewItem.id.in_(
            select(ReviewItemCategory.review_id).where(ReviewItemCategory.tenant_id == tenant_id,
                                                       ReviewItemCategory.category == filters.category)))
    return conditions


def _order(order: str) -> list[Any]:
    if order == "priority":
        return [ReviewItem.priority.desc(), ReviewItem.created_at, ReviewItem.id]
    return [ReviewItem.created_at, ReviewItem.id]


def list_reviews(
    session: Session, tenant_id: str, filters: ReviewFilter, *, order: str, limit: int, cursor: str | None,
) -> ReviewPage:
    """One page of the tenant's queue: by priority (highest score first, then oldest) or by age (oldest first),
    keyset-paginated so a page stays stable while items arrive; with the counts per status under the filters."""
    now = utcnow()
    conditions = _conditions(tenant_id, filters)
    query = select(ReviewItem).where(*conditions)
    if filters.status:
        query = query.where(_status_condition(filters.status, now))
    if cursor and order == "priority":
        priority, created_at, last_id = decode_ranked_cursor(cursor)
        query = query.where(or_(
            ReviewItem.priority < priority,
            and_(ReviewItem.priority == priority,
                 or_(ReviewItem.created_at > created_at,
                     and_(ReviewItem.created_at == created_at, ReviewItem.id > last_id)))))
    elif cursor:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(or_(ReviewItem.created_at > created_at,
                                and_(ReviewItem.created_at == created_at, ReviewItem.id > last_id)))
    rows = list(session.scalars(query.order_by(*_order(order)).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if has_more and rows:
        last = rows[-1]
        next_cursor = (encode_ranked_cursor(last.priority, last.created_at, last.id) if order == "priority"
                       else encode_cursor(last.created_at, last.id))
    return ReviewPage(items=rows, next_cursor=next_cursor, counts=_counts(session, conditions, now))


def _counts(session: Session, conditions: list[ColumnElement[bool]], now: datetime) -> dict[str, int]:
    status = case((_live_claim(now), ReviewStatus.CLAIMED.value),
                  (ReviewItem.status == ReviewStatus.DECIDED.value, ReviewStatus.DECIDED.value),
                  else_=ReviewStatus.PENDING.value)
    counts = {s.value: 0 for s in ReviewStatus}
    for name, count in session.execute(select(status, func.count()).where(*conditions).group_by(status)):
        counts[name] = count
    return counts


def get_review(session: Session, tenant_id: str, review_id: str, *, for_update: bool = False) -> ReviewItem:
    """The tenant's item, its submission and verdict loaded; another tenant's answers exactly as a missing one."""
    if "\x00" in review_id or len(review_id) > 64:
        raise NotFound("No such review item.", param="id")
    query = (select(ReviewItem).where(ReviewItem.id == review_id, ReviewItem.tenant_id == tenant_id)
             .options(selectinload(ReviewItem.submission).selectinload(Submission.verdict))
             .execution_options(populate_existing=True))
    if for_update:
        query = query.with_for_update(of=ReviewItem)
    item = session.scalars(query).one_or_none()
    if item is None:
        raise NotFound("No such review item.", param="id")
    return item


@dataclass(frozen=True)
class ContextTurn:
    """Another submission of the item's conversation: what led to it, or followed."""

    submission: Submission
    # The input this item's output answers (same conversation and turn).
    led_to_this: bool


@dataclass(frozen=True)
class ReviewDetail:
    item: ReviewItem
    context: list[ContextTurn]


def read_review(session: Session, principal: Principal, review_id: str, *, request_id: str | None) -> ReviewDetail:
    """The item with its text and its conversation's other turns, for a reviewer: each read is audited
    (`review.viewed`, naming the submissions whose text was shown, never the text)."""
    item = get_review(session, principal.tenant_id, review_id)
    submission = item.submission
    context: list[ContextTurn] = []
    if submission.conversation_id is not None:
        same = (Submission.tenant_id == principal.tenant_id,
                Submission.conversation_id == submission.conversation_id, Submission.id != submission.id)
        # What came before (the lead-up, the closest first, shown oldest first) and a few turns after.
        before = list(session.scalars(
            select(Submission).where(*same, Submission.created_at <= submission.created_at)
            .order_by(Submission.created_at.desc(), Submission.id.desc()).limit(CONTEXT_LIMIT)))
        after = list(session.scalars(
            select(Submission).where(*same, Submission.created_at > submission.created_at)
            .order_by(Submission.created_at, Submission.id).limit(CONTEXT_AFTER)))
        others = [*reversed(before), *after]
        context = [ContextTurn(submission=other, led_to_this=(
            submission.role == "output" and other.role == "input" and submission.turn_id is not None
            and other.turn_id == submission.turn_id)) for other in others]
    shown = [submission.id, *(turn.submission.id for turn in context if turn.submission.content is not None)]
    _audit(session, item, submission, "review.viewed", actor=principal.key_id, request_id=request_id,
           details={"shown": shown if submission.content is not None else shown[1:],
                    "erased": submission.content is None})
    return ReviewDetail(item=item, context=context)


# ---- claims ----------------------------------------------------------------------------------------------------


def _refusal(item: ReviewItem, principal: Principal, now: datetime) -> Conflict:
    """Why `principal` cannot act on the item now, as the 409 it gets."""
    if item.status == ReviewStatus.DECIDED.value:
        return Conflict("This item has already been decided; an override is an admin's action.",
                        code="already_decided")
    if item.status_at(now) == ReviewStatus.CLAIMED.value and item.claimed_by != principal.key_id:
        until = item.claim_expires_at.isoformat() if item.claim_expires_at else "?"
        return Conflict(f"Another reviewer holds this item until {until}.", code="claimed_by_another")
    if item.claimed_by == principal.key_id and item.status == ReviewStatus.CLAIMED.value:
        return Conflict("Your claim on this item expired; claim it again to decide it.", code="claim_expired")
    return Conflict("Claim this item first.", code="not_claimed")


def claim_review(
    session: Session, principal: Principal, review_id: str, *, claim_seconds: int, request_id: str | None,
) -> ReviewItem:
    """Claim the item for `claim_seconds` (a claim of one's own is extended); 409 if another reviewer holds it or
    it is decided. An expired claim of someone else's is taken over, its release audited."""
    item = get_review(session, principal.tenant_id, review_id, for_update=True)
    now = utcnow()
    if item.status == ReviewStatus.DECIDED.value or (
            item.status_at(now) == ReviewStatus.CLAIMED.value and item.claimed_by != principal.key_id):
        raise _refusal(item, principal, now)
    if item.status_at(now) == ReviewStatus.CLAIMED.value:
        return _extend(session, item, principal, claim_seconds=claim_seconds, now=now, request_id=request_id)
    return _take(session, item, principal, claim_seconds=claim_seconds, now=now, request_id=request_id)


def _take(session: Session, item: ReviewItem, principal: Principal, *, claim_seconds: int, now: datetime,
          request_id: str | None) -> ReviewItem:
    expired_holder = item.claimed_by if item.status == ReviewStatus.CLAIMED.value else None
    expired_at = item.claim_expires_at
    item.status = ReviewStatus.CLAIMED.value
    item.claimed_by = principal.key_id
    item.claimed_at = now
    item.claim_expires_at = now + timedelta(seconds=claim_seconds)
    session.flush()
    if expired_holder is not None:
        _audit(session, item, item.submission, "review.released", actor=SYSTEM_ACTOR, request_id=request_id,
               details={"reason": "expired", "claimed_by": expired_holder,
                        "expired_at": expired_at.isoformat() if expired_at else None})
    _audit(session, item, item.submission, "review.claimed", actor=principal.key_id, request_id=request_id,
           details={"expires_at": item.claim_expires_at.isoformat()})
    return item


def _extend(session: Session, item: ReviewItem, principal: Principal, *, claim_seconds: int, now: datetime,
            request_id: str | None) -> ReviewItem:
    item.claim_expires_at = now + timedelta(seconds=claim_seconds)
    session.flush()
    _audit(session, item, item.submission, "review.claim_extended", actor=principal.key_id, request_id=request_id,
           details={"expires_at": item.claim_expires_at.isoformat()})
    return item


def extend_claim(
    session: Session, principal: Principal, review_id: str, *, claim_seconds: int, request_id: str | None,
) -> ReviewItem:
    """Another `claim_seconds` from now on the caller's own live claim; 409 otherwise (an expired claim is
    claimed again, which may find someone else got there first)."""
    item = get_review(session, principal.tenant_id, review_id, for_update=True)
    now = utcnow()
    if item.status_at(now) != ReviewStatus.CLAIMED.value or item.claimed_by != principal.key_id:
        raise _refusal(item, principal, now)
    return _extend(session, item, principal, claim_seconds=claim_seconds, now=now, request_id=request_id)


def release_claim(session: Session, principal: Principal, review_id: str, *, request_id: str | None) -> ReviewItem:
    """Give the caller's live claim back to the queue; 409 if the caller holds none on it."""
    item = get_review(session, principal.tenant_id, review_id, for_update=True)
    now = utcnow()
    if item.status_at(now) != ReviewStatus.CLAIMED.value or item.claimed_by != principal.key_id:
        raise _refusal(item, principal, now)
    item.status = ReviewStatus.PENDING.value
    item.claimed_by = None
    item.claimed_at = None
    item.claim_expires_at = None
    session.flush()
    _audit(session, item, item.submission, "review.released", actor=principal.key_id, request_id=request_id,
           details={"reason": "released"})
    return item


def release_expired_claims(session: Session, *, batch_size: int = 200) -> int:
    """The beat sweep: put claims whose time ran out back to `pending` and audit each release (`review.released`,
    reason `expired`, actor `system`), in the caller's transaction. The queue already treats such an item as
    pending; this makes the trail say when the claim lapsed, not only when someone took the item over."""
    now = utcnow()
    expired = list(session.scalars(
        select(ReviewItem).where(ReviewItem.status == ReviewStatus.CLAIMED.value,
                                 ReviewItem.claim_expires_at <= now)
        .order_by(ReviewItem.tenant_id, ReviewItem.id).limit(batch_size)
        .with_for_update(skip_locked=True).options(selectinload(ReviewItem.submission))
    ))
    for item in expired:
        holder, expired_at = item.claimed_by, item.claim_expires_at
        item.status = ReviewStatus.PENDING.value
        item.claimed_by = None
        item.claimed_at = None
        item.claim_expires_at = None
        session.flush()
        _audit(session, item, item.submission, "review.released", actor=SYSTEM_ACTOR, request_id=None,
               details={"reason": "expired", "claimed_by": holder,
                        "expired_at": expired_at.isoformat() if expired_at else None})
    return len(expired)


def claim_next(
    session: Session, principal: Principal, filters: ReviewFilter, *, order: str, claim_seconds: int,
    request_id: str | None,
) -> ReviewItem:
    """Claim the queue's first pending item (in `order`, under the filters); NotFound when none is left. Rows are
    locked with SKIP LOCKED, so reviewers asking at the same moment get different items."""
    now = utcnow()
    candidate = session.scalars(
        select(ReviewItem.id).where(*_conditions(principal.tenant_id, filters), _effectively_pending(now))
        .order_by(*_order(order)).limit(1).with_for_update(skip_locked=True)
    ).first()
    if candidate is None:
        raise NotFound("No item is waiting for review.", code="queue_empty")
    item = get_review(session, principal.tenant_id, candidate)
    return _take(session, item, principal, claim_seconds=claim_seconds, now=now, request_id=request_id)


# ---- deciding --------------------------------------------------------------------------------------------------


def decide_review(
    session: Session, principal: Principal, review_id: str, *, decision: str, reason: str,
    categories: Sequence[str] | None, request_id: str | None,
) -> ReviewItem:
    """The claimant's decision, once: `allow` or `block` with a reason (and the categories that apply, if the
    machine's were wrong). 409 for anyone else, for a claim that expired, and for a second decision. Audited
    (`review.decided`), and sent as the `review.decided` webhook with the submission as GET shows it."""
    now = utcnow()
    won = session.execute(
        update(ReviewItem)
        .where(ReviewItem.id == review_id, ReviewItem.tenant_id == principal.tenant_id,
               ReviewItem.claimed_by == principal.key_id, _live_claim(now))
        .values(status=ReviewStatus.DECIDED.value, decision=decision, reason=reason,
                corrected_categories=None if categories is None else sorted(set(categories)),
                decided_by=principal.key_id, decided_at=now, claim_expires_at=None)
        .returning(ReviewItem.id).execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    item = get_review(session, principal.tenant_id, review_id)
    if won is None:
        raise _refusal(item, principal, now)
    metrics.review_decided(session, decision=decision, seconds=(now - item.created_at).total_seconds())
    _announce(session, item, "review.decided", actor=principal.key_id, request_id=request_id,
              decision=decision, reason=reason, categories=categories, extra={
                  "waited_seconds": round((now - item.created_at).total_seconds(), 3)})
    return item


def override_review(
    session: Session, principal: Principal, review_id: str, *, decision: str, reason: str,
    categories: Sequence[str] | None, request_id: str | None,
) -> ReviewItem:
    """An admin's override of a decided item (an appeal upheld, a mistake corrected): a new, audited action
    (`review.overridden`) that changes the final decision and sends `review.decided` again. The reviewer's own
    decision stays on record."""
    item = get_review(session, principal.tenant_id, review_id, for_update=True)
    if item.status != ReviewStatus.DECIDED.value:
        raise Conflict("Only a decided item can be overridden; this one is still waiting for a reviewer.",
                       code="not_decided")
    previous = item.final_decision
    item.override_decision = decision
    item.override_reason = reason
    item.overridden_by = principal.key_id
    item.overridden_at = utcnow()
    if categories is not None:
        item.corrected_categories = sorted(set(categories))
    session.flush()
    _announce(session, item, "review.overridden", actor=principal.key_id, request_id=request_id,
              decision=decision, reason=reason, categories=categories, extra={"previous_decision": previous})
    return item


def _announce(
    session: Session, item: ReviewItem, action: str, *, actor: str, request_id: str | None, decision: str,
    reason: str, categories: Sequence[str] | None, extra: dict[str, Any],
) -> None:
    submission = item.submission
    webhook_deliveries.raise_submission_events(session, submission.id, submission.verdict, item,
                                               event_types=[events.REVIEW_DECIDED])
    # The reason is the reviewer's own words, but it may quote the text: the trail keeps its digest, the item (which
    # erasure clears) the words.
    _audit(session, item, submission, action, actor=actor, request_id=request_id, decision=decision,
           categories=list(categories) if categories is not None else item.categories,
           details={"reason_sha256": hashlib.sha256(reason.encode()).hexdigest(),
                    "corrected_categories": None if categories is None else sorted(set(categories)),
                    "machine_decision": "review", **extra})


def _audit(session: Session, item: ReviewItem, submission: Submission, action: str, *, actor: str,
           request_id: str | None, details: dict[str, Any], decision: str | None = None,
           categories: list[str] | None = None) -> None:
    record_event(session, tenant_id=item.tenant_id, action=action, actor=actor, subject_type="review",
                 subject_id=item.id, request_id=request_id, content_digest=submission.content_digest,
                 conversation_id=submission.conversation_id, turn_id=submission.turn_id, decision=decision,
                 categories=categories, details={"submission_id": submission.id, **details})


# ---- what the submission page shows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryLog:
    delivery: WebhookDelivery
    attempts: list[WebhookDeliveryAttempt]


def submission_deliveries(session: Session, tenant_id: str, submission_id: str) -> list[DeliveryLog]:
    """The webhook deliveries a submission raised, oldest first, each with its attempts."""
    found = list(session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant_id,
                                      WebhookDelivery.submission_id == submission_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id).limit(100)
    ))
    attempts: dict[str, list[WebhookDeliveryAttempt]] = {d.id: [] for d in found}
    if found:
        for attempt in session.scalars(
                select(WebhookDeliveryAttempt).where(WebhookDeliveryAttempt.delivery_id.in_(list(attempts)))
                .order_by(WebhookDeliveryAttempt.delivery_id, WebhookDeliveryAttempt.number)):
            attempts[attempt.delivery_id].append(attempt)
    return [DeliveryLog(delivery=d, attempts=attempts[d.id]) for d in found]


def submission_events(session: Session, tenant_id: str, submission_id: str,
                      review: ReviewItem | None) -> list[AuditEvent]:
    """The audit events of a submission and of its review item, in chain order (the first 500)."""
    subjects = [submission_id, *([review.id] if review is not None else [])]
    return list(session.scalars(
        select(AuditEvent).where(AuditEvent.chain_id == chain_of(tenant_id), AuditEvent.subject_id.in_(subjects))
        .order_by(AuditEvent.seq).limit(500)))


# ---- the queue's figures ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewStats:
    counts: dict[str, int]
    oldest_pending_at: datetime | None
    window_seconds: int
    decided_in_window: int
    # Seconds from the item's creation (the `review` verdict) to the human decision, over the window's decisions.
    time_to_decision: dict[str, float | None]


@dataclass(frozen=True)
class ReviewQueueDepth:
    """Every tenant's review queue together, for `verdict status` and /metrics (app/use_cases/status.py)."""

    counts: dict[str, int]  # pending (expired claims included), claimed, decided
    oldest_pending_age_seconds: float | None


def queue_depth(session: Session, now: datetime | None = None) -> ReviewQueueDepth:
    """The review queue across tenants, in the caller's transaction (each a range of the status indexes)."""
    now = now or utcnow()
    oldest = session.scalar(select(func.min(ReviewItem.created_at)).where(_effectively_pending(now)))
    if isinstance(oldest, str):  # SQLite returns an aggregate of a timestamp column as text
        oldest = datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=now.tzinfo)
    return ReviewQueueDepth(counts=_counts(session, [], now),
                            oldest_pending_age_seconds=None if oldest is None else
                            max(0.0, (now - oldest).total_seconds()))


def review_stats(session: Session, tenant_id: str, *, window_seconds: int) -> ReviewStats:
    """Queue depth (per status, and the oldest pending item) and time to decision over the last `window_seconds`."""
    now = utcnow()
    conditions = [ReviewItem.tenant_id == tenant_id]
    oldest = session.scalar(select(func.min(ReviewItem.created_at)).where(*conditions, _effectively_pending(now)))
    decided = session.execute(
        select(ReviewItem.created_at, ReviewItem.decided_at)
        .where(*conditions, ReviewItem.status == ReviewStatus.DECIDED.value,
               ReviewItem.decided_at >= now - timedelta(seconds=window_seconds))
        .order_by(ReviewItem.decided_at.desc()).limit(STATS_SAMPLE)
    ).all()
    waits = sorted((row.decided_at - row.created_at).total_seconds() for row in decided if row.decided_at)
    return ReviewStats(counts=_counts(session, conditions, now), oldest_pending_at=oldest,
                       window_seconds=window_seconds, decided_in_window=len(waits),
                       time_to_decision=_summary(waits))


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "max": None}

    def rank(q: float) -> float:  # the nearest-rank percentile: the smallest value with q of them at or below it
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    return {"mean": round(sum(values) / len(values), 3), "p50": round(rank(0.5), 3), "p90": round(rank(0.9), 3),
            "max": round(values[-1], 3)}
