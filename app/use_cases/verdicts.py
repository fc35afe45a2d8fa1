"""Claiming a submission and settling it exactly once (verdict, failure, or back to the queue), each fenced by the
claim's token, in the caller's transaction. See docs/architecture.md ("Claims and fencing tokens")."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import ColumnElement, Table, and_, bindparam, or_, tuple_, update
from sqlalchemy.orm import Session, lazyload
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from app import metrics
from app.db import insert_as_loaded
from app.models import Decision, ReviewItem, Submission, SubmissionStatus, Verdict, new_id, utcnow
from app.moderation.policy import Assessment, Policy, assess
from app.moderation.providers import ProviderResult
from app.outbox import MODERATE_SUBMISSION, Message, send_after_commit
from app.use_cases import reviews, webhook_deliveries
from app.use_cases.audit import record_event
from app.use_cases.policies import shadow_summary

log = structlog.get_logger(__name__)

WORKER_ACTOR = "worker"
# A retry's message may come a little before its row's due time when the hosts' clocks differ.
CLOCK_TOLERANCE_SECONDS = 1.0


@dataclass(frozen=True)
class Claim:
    submission_id: str
    token: str
    attempt: int


def claim_submission(session: Session, submission_id: str, *, lease_seconds: int) -> Claim | None:
    """Claim the submission for one attempt, in the caller's transaction: a conditional UPDATE that sets a fresh
    fencing token. None if it is not due, already done, or held by a live claim."""
    claims = claim_submissions(session, [submission_id], lease_seconds=lease_seconds)
    return claims[0] if claims else None


_SUBMISSIONS: Table = Submission.__table__  # type: ignore[assignment]
_ROW = _SUBMISSIONS.c
_QUEUED, _PROCESSING = SubmissionStatus.QUEUED.value, SubmissionStatus.PROCESSING.value
# The claim and the settle of every batch, built once with bound parameters (their cache keys with them) and run
# as plain statements on the transaction's connection: their rows' objects are kept in step by hand (_set_written),
# so none of the ORM's per-statement work is needed (issue 15: at a light load, where a batch is a text or two, the
# statements' construction and cache keys were a good part of a verdict's CPU).
# `claimable` with bound parameters (`claimable_parameters` gives them), for statements built once.
CLAIMABLE: ColumnElement[bool] = or_(
    and_(_ROW.status == _QUEUED, or_(_ROW.enqueued_at.is_(None), _ROW.enqueued_at <= bindparam("due_by"))),
    and_(_ROW.status == _PROCESSING, _ROW.claimed_at < bindparam("lease_cutoff")),
)
_CLAIM = (
    update(_SUBMISSIONS)
    .where(_ROW.id.in_(bindparam("ids", expanding=True)), CLAIMABLE)
    .values(status=_PROCESSING, claim_token=bindparam("token"), claimed_at=bindparam("claimed"),
            attempts=_ROW.attempts + 1, updated_at=bindparam("updated"))
    .returning(_ROW.id, _ROW.attempts)
)
# Each row fenced by its own claim (its id with its claim's token); `id IN` as well, for the primary key's index.
_SETTLE = (
    update(_SUBMISSIONS)
    .where(_ROW.id.in_(bindparam("ids", expanding=True)),
           tuple_(_ROW.id, _ROW.claim_token).in_(bindparam("claims", expanding=True)),
           _ROW.status == _PROCESSING)
    .values(status=SubmissionStatus.COMPLETED.value, completed_at=bindparam("completed"), claim_token=None,
            updated_at=bindparam("updated"), error_code=None, error_message=None)
    .returning(_ROW.id, _ROW.erased_at)
)


def claimable_parameters(now: datetime, lease_seconds: int) -> dict[str, datetime]:
    """The values of CLAIMABLE's parameters at `now`: what `claimable(now, lease_seconds)` says."""
    return {"due_by": now + timedelta(seconds=CLOCK_TOLERANCE_SECONDS),
            "lease_cutoff": now - timedelta(seconds=lease_seconds)}


def claimable(now: datetime, lease_seconds: int) -> ColumnElement[bool]:
    """What a claim may take: queued and due (a submission given back for a retry waits for its due time, even when a
    message, its own earlier one still queued after a batch took it along, comes sooner), or processing under a
    claim whose lease ran out (its worker died)."""
    return or_(
        and_(Submission.status == SubmissionStatus.QUEUED.value,
             or_(Submission.enqueued_at.is_(None),
                 Submission.enqueued_at <= now + timedelta(seconds=CLOCK_TOLERANCE_SECONDS))),
        and_(Submission.status == SubmissionStatus.PROCESSING.value,
             Submission.claimed_at < now - timedelta(seconds=lease_seconds)),
    )


def claim_submissions(session: Session, submission_ids: Sequence[str], *, lease_seconds: int) -> list[Claim]:
    """Claim those of the submissions that may be claimed, each for one attempt, in the caller's transaction: one
    conditional UPDATE (whichever worker's UPDATE reaches a row first takes it; the other's matches nothing there),
    which sets a fresh fencing token shared by the claims it makes. Returns the claims made, in no set order.

    What the UPDATE wrote is set on the rows this session holds (the caller read and locked them), so the claimed
    rows need no reload."""
    if not submission_ids:
        return []
    now = utcnow()
    token = secrets.token_hex(16)
    session.flush()  # what an ORM statement's autoflush did: a row added in this transaction is claimable too
    rows = session.connection().execute(_CLAIM, {
        "ids": list(submission_ids), **claimable_parameters(now, lease_seconds), "token": token, "claimed": now,
        "updated": now,
    }).tuples().all()
    for submission_id, attempt in rows:
        row = session.identity_map.get(identity_key(Submission, submission_id))
        if isinstance(row, Submission):
            _set_written(row, status=SubmissionStatus.PROCESSING.value, claim_token=token, claimed_at=now,
                         attempts=attempt, updated_at=now)
    return [Claim(submission_id=submission_id, token=token, attempt=attempt) for submission_id, attempt in rows]


def _set_written(row: Submission, **values: object) -> None:
    """What an UPDATE (synchronize_session=False) wrote to `row`, set on the loaded object as already stored: it
    then shows the row as it is without a reload, and no flush writes it again."""
    for key, value in values.items():
        set_committed_value(row, key, value)


def _held_by(claim: Claim) -> ColumnElement[bool]:
    """The fence of every UPDATE that settles a submission: it is still processing under this claim's token."""
    return and_(Submission.id == claim.submission_id, Submission.claim_token == claim.token,
                Submission.status == SubmissionStatus.PROCESSING.value)


@dataclass(frozen=True)
class Outcome:
    """One submission's answer, to be recorded under its claim (see record_verdicts)."""

    claim: Claim
    submission: Submission
    result: ProviderResult
    policy: Policy
    degraded: bool = False
    cached: bool = False
    # Overrides the policy's (a fail-open or fail-closed verdict, which has no scores to assess).
    decision: Decision | None = None
    degraded_reason: str | None = None
    # The caller wrote the submission already settled (completed, no claim token) in this same transaction: the
    # synchronous path's own row, which no one else can see, let alone claim. No fenced UPDATE is needed to settle it.
    settled: bool = False


def record_verdict(
    session: Session, claim: Claim, outcome: ProviderResult, policy: Policy, *, degraded: bool = False,
    cached: bool = False, decision: Decision | None = None, degraded_reason: str | None = None,
    submission: Submission | None = None, settled: bool = False,
) -> Verdict | None:
    """Store the verdict, its webhook deliveries and audit events in the caller's transaction, if `claim` still
    holds the submission; None (and nothing written: the fenced UPDATE matched no row) if another worker took it.

    `decision` overrides the policy's (a fail-open or fail-closed verdict, which has no scores to assess)."""
    # The verdict relationship is not loaded: this is the verdict being made.
    if submission is None:
        submission = session.get(Submission, claim.submission_id, options=[lazyload(Submission.verdict)])
    if submission is None:
        return None
    return record_verdicts(session, [Outcome(claim=claim, submission=submission, result=outcome, policy=policy,
                                             degraded=degraded, cached=cached, decision=decision,
                                             degraded_reason=degraded_reason, settled=settled)])[0]


def record_verdicts(session: Session, outcomes: Sequence[Outcome], *,
                    inline: webhook_deliveries.InlineDeliveries | None = None) -> list[Verdict | None]:
    """Store each outcome's verdict, webhook deliveries and audit events in the caller's transaction, if its claim
    still holds the submission (None in its place, and nothing written for it, if another worker took it).

    `inline`: the caller sends the deliveries itself once the transaction commits, those `inline` takes (all but the
    ones to a receiver it found slow lately; they are then written claimed for it); the others' messages are sent.

    A chunk costs a handful of statements, not a handful per verdict: one fenced UPDATE settles every submission
    (each matched by its own id and claim token), the verdicts and deliveries are inserted together, the tenant's
    webhook endpoints are read once, and the audit events are appended at commit (app/use_cases/audit.py)."""
    if not outcomes:
        return []
    now = utcnow()
    session.flush()  # as an ORM statement's autoflush would: a row added in this transaction is settled too
    won: dict[str, datetime | None] = dict.fromkeys([item.claim.submission_id for item in outcomes if item.settled])
    claimed = [item for item in outcomes if not item.settled]
    if claimed:
        won.update(session.connection().execute(_SETTLE, {
            "ids": [item.claim.submission_id for item in claimed],
            "claims": [(item.claim.submission_id, item.claim.token) for item in claimed],
            "completed": now, "updated": now,
        }).tuples().all())
    recorded: list[tuple[Outcome, Assessment, dict[str, Any] | None, Verdict, ReviewItem | None]] = []
    verdicts: list[Verdict | None] = []
    endpoints = webhook_deliveries.EndpointsOfTenants(session, inline)
    for item in outcomes:
        submission = item.submission
        if submission.id not in won:
            log.warning("verdict_discarded_claim_lost", submission_id=item.claim.submission_id)
            verdicts.append(None)
            continue
        erased_at = won[submission.id]
        if erased_at is not None and submission.erased_at is None:
            # Erased while the provider worked: show the row as it now is (no text, no metadata).
            session.refresh(submission)
        elif not item.settled:
            _set_written(submission, status=SubmissionStatus.COMPLETED.value, completed_at=now, claim_token=None,
                         updated_at=now, error_code=None, error_message=None)
        assessment, shadow = _assessment(item)
        degraded = item.degraded or item.result.degraded
        verdict = _verdict_row(submission, item.result, item.policy, assessment, degraded=degraded,
                               cached=item.cached, now=now, shadow=shadow)
        if erased_at is not None:
            verdict.results = []  # erased while the provider worked: keep no per-text trace of the erased texts
        review = reviews.open_review(session, submission, verdict)  # a `review` decision queues it for a person
        metrics.verdict_recorded(session, decision=verdict.decision, provider=verdict.provider, cached=item.cached,
                                 degraded=degraded, tenant_id=submission.tenant_id, source=submission.source,
                                 seconds=(now - submission.created_at).total_seconds())
        webhook_deliveries.raise_submission_events(session, submission.id, verdict, review, submission=submission,
                                                   endpoints=endpoints)
        recorded.append((item, assessment, shadow, verdict, review))
        verdicts.append(verdict)
    # The verdicts go out as rows in one INSERT, not through the unit of work (their flush was most of a sync call's
    # recording CPU); the review items and deliveries raised above have no reference to them.
    insert_as_loaded(session, [verdict for _item, _assessment, _shadow, verdict, _review in recorded])
    endpoints.send()
    for item, assessment, shadow, _verdict, review in recorded:
        _record_verdict_events(session, item, assessment, shadow, review)
    return verdicts


def _assessment(item: Outcome) -> tuple[Assessment, dict[str, Any] | None]:
    submission, outcome, policy, decision = item.submission, item.result, item.policy, item.decision
    texts = submission.content
    assessment = assess(policy, outcome, role=submission.role, texts=texts)
    # The shadow decides from the same scores (no provider call); a fail-open or fail-closed verdict has none.
    shadow = None if policy.shadow is None or decision is not None else shadow_summary(
        policy.shadow, outcome, role=submission.role, texts=texts)
    if decision is not None:
        flagged = decision is not Decision.ALLOW
        assessment = dataclasses.replace(assessment, decision=decision, flagged=flagged, results=[
            {**r, "decision": decision.value, "flagged": flagged} for r in assessment.results])
    return assessment, shadow


def _record_verdict_events(session: Session, item: Outcome, assessment: Assessment, shadow: dict[str, Any] | None,
                           review: ReviewItem | None) -> None:
    submission, outcome, policy, claim = item.submission, item.result, item.policy, item.claim
    degraded = item.degraded or outcome.degraded
    links = {"conversation_id": submission.conversation_id, "turn_id": submission.turn_id}
    record_event(
        session, tenant_id=submission.tenant_id, action="moderation.completed", actor=WORKER_ACTOR,
        subject_type="submission", subject_id=submission.id, request_id=submission.request_id,
        content_digest=submission.content_digest, **links,
        details={"provider": outcome.provider, "model": outcome.model, "latency_ms": outcome.latency_ms,
                 "attempt": claim.attempt, "cached": item.cached, "degraded": degraded,
                 **({"degraded_reason": item.degraded_reason} if item.degraded_reason else {})},
    )
    # The decision with what it takes to re-derive it: the scores and the thresholds they were held against (for
    # the judged categories; the others had no score to hold against a threshold).
    scores = {c: score for c, score in assessment.category_scores.items() if score is not None}
    thresholds = assessment.thresholds
    record_event(
        session, tenant_id=submission.tenant_id, action="verdict.decided", actor=WORKER_ACTOR,
        subject_type="submission", subject_id=submission.id, request_id=submission.request_id,
        content_digest=submission.content_digest, **links, decision=assessment.decision.value,
        categories=[c for c, hit in assessment.categories.items() if hit],
        details={"flagged": assessment.flagged, "policy": policy.name, "policy_version": policy.version,
                 "role": submission.role, "scores": scores, "thresholds": {c: thresholds[c] for c in scores},
                 "not_judged": assessment.not_judged, "degraded": degraded,
                 **({"matches": assessment.matches} if assessment.matches else {}),
                 **({"shadow": {k: shadow[k] for k in ("policy", "policy_version", "decision")}} if shadow else {})},
    )
    if review is not None:
        reviews.record_review_opened(session, review, submission, actor=WORKER_ACTOR)


def _verdict_row(
    submission: Submission, outcome: ProviderResult, policy: Policy, assessment: Assessment, *,
    degraded: bool, cached: bool, now: datetime, shadow: dict[str, Any] | None = None,
) -> Verdict:
    return Verdict(
        id=new_id("vrd"),
        submission_id=submission.id,
        tenant_id=submission.tenant_id,
        decision=assessment.decision.value,
        flagged=assessment.flagged,
        categories=assessment.categories,
        category_scores=assessment.category_scores,
        results=assessment.results,
        not_judged=assessment.not_judged,
        provider=outcome.provider,
        model=outcome.model,
        policy_name=policy.name,
        policy_version=policy.version,
        thresholds=assessment.thresholds,
        category_decisions=assessment.category_decisions,
        matches=assessment.matches,
        shadow=shadow,
        shadow_decision=None if shadow is None else shadow["decision"],
        cached=cached,
        degraded=degraded,
        latency_ms=outcome.latency_ms,
        created_at=now,
    )


def fail_submission(session: Session, claim: Claim, *, code: str, message: str) -> bool:
    """Mark the submission failed (with its deliveries and audit event) if `claim` still holds it."""
    now = utcnow()
    won = session.execute(
        update(Submission)
        .where(_held_by(claim))
        .values(status=SubmissionStatus.FAILED.value, completed_at=now, claim_token=None, updated_at=now,
                error_code=code, error_message=message[:500])
        .returning(Submission.tenant_id, Submission.request_id, Submission.content_digest, Submission.conversation_id,
                   Submission.turn_id)
    ).one_or_none()
    if won is None:
        return False
    tenant_id, request_id, digest, conversation_id, turn_id = won
    metrics.after_commit(session, lambda: metrics.MODERATION_FAILURES.labels(code).inc())
    webhook_deliveries.raise_submission_events(session, claim.submission_id)
    record_event(session, tenant_id=tenant_id, action="moderation.failed", actor=WORKER_ACTOR,
                 subject_type="submission", subject_id=claim.submission_id, request_id=request_id,
                 content_digest=digest, conversation_id=conversation_id, turn_id=turn_id,
                 details={"code": code, "attempt": claim.attempt})
    return True


def release_for_retry(session: Session, claim: Claim, *, delay_seconds: float, refund_attempt: bool = False) -> bool:
    """Give the submission back to the queue, due in `delay_seconds` (which the caller keeps below the broker's
    visibility timeout), with its message sent once the transaction commits; the requeue sweep leaves the row alone
    until the retry is due. False if `claim` no longer holds the submission.

    `refund_attempt`: the try never reached the provider (it waited for rate-limit capacity), so it does not count
    against the submission's retries."""
    now = utcnow()
    won = session.execute(
        update(Submission)
        .where(Submission.id == claim.submission_id, Submission.claim_token == claim.token)
        .values(status=SubmissionStatus.QUEUED.value, claim_token=None, updated_at=now,
                enqueued_at=now + timedelta(seconds=delay_seconds), dispatched_at=now,
                attempts=Submission.attempts - (1 if refund_attempt else 0))
        .returning(Submission.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if won is None:
        return False
    # The submission's earlier messages, still queued, meet a row that is not due yet and are skipped.
    send_after_commit(session, Message(MODERATE_SUBMISSION, (claim.submission_id,), countdown=delay_seconds))
    return True
