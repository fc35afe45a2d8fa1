"""Moderating a submission: claim it, ask the provider, apply the policy, record the verdict exactly once.

Exactly once rests on two guards. A claim is a conditional UPDATE (`status = 'queued'`, or a `processing` claim whose
lease has run out) that sets a fresh fencing token; the verdict is recorded only by an UPDATE that still matches that
token. So a redelivered message, a second worker or a worker that outlived its lease does no harm: at most one
holder commits, and the `verdicts.submission_id` unique constraint backs it up.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.auth import Principal
from app.config import Settings
from app.db import Database
from app.masking import Masker
from app.models import Submission, SubmissionStatus, Tenant, Verdict, utcnow
from app.moderation.policy import DEFAULT_POLICY, Assessment, Policy, assess, get_policy
from app.moderation.providers import ModerationProvider, ProviderError, ProviderResult
from app.use_cases import webhooks
from app.use_cases.audit import content_digest, record_event

log = structlog.get_logger(__name__)

WORKER_ACTOR = "worker"


@dataclass(frozen=True)
class Claim:
    submission_id: str
    token: str
    attempt: int


def claim_submission(session: Session, submission_id: str, *, lease_seconds: int) -> Claim | None:
    now = utcnow()
    token = secrets.token_hex(16)
    result = session.execute(
        update(Submission)
        .where(
            Submission.id == submission_id,
            or_(
                Submission.status == SubmissionStatus.QUEUED.value,
                and_(Submission.status == SubmissionStatus.PROCESSING.value,
                     Submission.claimed_at < now - timedelta(seconds=lease_seconds)),
            ),
        )
        .values(status=SubmissionStatus.PROCESSING.value, claim_token=token, claimed_at=now,
                attempts=Submission.attempts + 1, updated_at=now)
        .returning(Submission.attempts)
    )
    attempt = result.scalar_one_or_none()
    session.commit()
    if attempt is None:
        return None
    return Claim(submission_id=submission_id, token=token, attempt=attempt)


def record_verdict(
    session: Session, claim: Claim, outcome: ProviderResult, policy: Policy, *, degraded: bool = False
) -> Verdict | None:
    """Store the verdict if `claim` still holds the submission; None if another worker took it over."""
    submission = session.get(Submission, claim.submission_id)
    if submission is None:
        return None
    assessment = assess(policy, outcome)
    now = utcnow()
    won = session.execute(
        update(Submission)
        .where(Submission.id == claim.submission_id, Submission.claim_token == claim.token,
               Submission.status == SubmissionStatus.PROCESSING.value)
        .values(status=SubmissionStatus.COMPLETED.value, completed_at=now, claim_token=None, updated_at=now,
                error_code=None, error_message=None)
        .returning(Submission.erased_at)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if won is None:
        session.rollback()
        log.warning("verdict_discarded_claim_lost", submission_id=claim.submission_id)
        return None
    verdict = _verdict_row(submission, outcome, policy, assessment, degraded=degraded, now=now)
    if won.erased_at is not None:
        verdict.results = []  # erased while the provider worked: keep no per-text trace of the erased texts
    session.add(verdict)
    webhooks.enqueue_submission_events(session, submission.id, verdict)
    links = {"conversation_id": submission.conversation_id, "turn_id": submission.turn_id}
    record_event(
        session, tenant_id=submission.tenant_id, action="moderation.completed", actor=WORKER_ACTOR,
        subject_type="submission", subject_id=submission.id, request_id=submission.request_id,
        content_digest=submission.content_digest, **links,
        details={"provider": outcome.provider, "model": outcome.model, "latency_ms": outcome.latency_ms,
                 "attempt": claim.attempt, "cached": False},
    )
    # The decision with what it takes to re-derive it: the scores and the thresholds they were held against (for
    # the judged categories; the others had no score to hold against a threshold).
    scores = {c: score for c, score in assessment.category_scores.items() if score is not None}
    thresholds = policy.thresholds_json()
    record_event(
        session, tenant_id=submission.tenant_id, action="verdict.decided", actor=WORKER_ACTOR,
        subject_type="submission", subject_id=submission.id, request_id=submission.request_id,
        content_digest=submission.content_digest, **links, decision=assessment.decision.value,
        categories=[c for c, hit in assessment.categories.items() if hit],
        details={"flagged": assessment.flagged, "policy": policy.name, "policy_version": policy.version,
                 "scores": scores, "thresholds": {c: thresholds[c] for c in scores},
                 "not_judged": assessment.not_judged, "degraded": degraded},
    )
    session.commit()
    return verdict


def _verdict_row(
    submission: Submission, outcome: ProviderResult, policy: Policy, assessment: Assessment, *,
    degraded: bool, now: datetime,
) -> Verdict:
    return Verdict(
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
        thresholds=policy.thresholds_json(),
        cached=False,
        degraded=degraded,
        latency_ms=outcome.latency_ms,
        created_at=now,
    )


def fail_submission(session: Session, claim: Claim, *, code: str, message: str) -> bool:
    now = utcnow()
    won = session.execute(
        update(Submission)
        .where(Submission.id == claim.submission_id, Submission.claim_token == claim.token,
               Submission.status == SubmissionStatus.PROCESSING.value)
        .values(status=SubmissionStatus.FAILED.value, completed_at=now, claim_token=None, updated_at=now,
                error_code=code, error_message=message[:500])
        .returning(Submission.tenant_id, Submission.request_id, Submission.content_digest, Submission.conversation_id,
                   Submission.turn_id)
    ).one_or_none()
    if won is None:
        session.rollback()
        return False
    tenant_id, request_id, digest, conversation_id, turn_id = won
    webhooks.enqueue_submission_events(session, claim.submission_id)
    record_event(session, tenant_id=tenant_id, action="moderation.failed", actor=WORKER_ACTOR,
                 subject_type="submission", subject_id=claim.submission_id, request_id=request_id,
                 content_digest=digest, conversation_id=conversation_id, turn_id=turn_id,
                 details={"code": code, "attempt": claim.attempt})
    session.commit()
    return True


def release_for_retry(session: Session, claim: Claim, *, delay_seconds: float) -> bool:
    """Give the submission back to the queue; the sweep leaves it alone until the retry is due."""
    now = utcnow()
    won = session.execute(
        update(Submission)
        .where(Submission.id == claim.submission_id, Submission.claim_token == claim.token)
        .values(status=SubmissionStatus.QUEUED.value, claim_token=None, updated_at=now,
                enqueued_at=now + timedelta(seconds=delay_seconds))
        .returning(Submission.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    session.commit()
    return won is not None


@dataclass(frozen=True)
class Outcome:
    """What the task should do next: nothing (`done`), or run again in `retry_in` seconds."""

    status: str
    retry_in: float | None = None


def moderate_submission(
    database: Database, provider: ModerationProvider, submission_id: str, settings: Settings
) -> Outcome:
    with database.session_scope() as session:
        claim = claim_submission(session, submission_id, lease_seconds=settings.processing_lease_seconds)
        if claim is None:
            # Already done, or held by a live claim: a redelivered or duplicate message. Nothing to do.
            return Outcome("skipped")
        submission = session.get(Submission, submission_id)
        # The request id of the submitting request, carried through its row into every log line of the task.
        log_ = log.bind(submission_id=submission_id, attempt=claim.attempt,
                        request_id=submission.request_id if submission is not None else None)
        if submission is None or submission.content is None:
            fail_submission(session, claim, code="content_unavailable", message="the content was erased")
            return Outcome("failed")
        policy = get_policy(submission.policy_name) or DEFAULT_POLICY
        texts = list(submission.content)
        model = submission.model
        session.rollback()  # hold no transaction open while the provider works

        try:
            outcome = provider.moderate(texts, model)
        except ProviderError as exc:
            retries_left = claim.attempt <= settings.moderation_max_retries
            if exc.transient and retries_left:
                delay = _retry_delay(claim.attempt, exc.retry_after, settings)
                release_for_retry(session, claim, delay_seconds=delay)
                log_.warning("moderation_retry", code=exc.code, retry_in=round(delay, 2))
                return Outcome("retry", retry_in=delay)
            fail_submission(session, claim, code=exc.code, message=exc.message)
            log_.warning("moderation_failed", code=exc.code)
            return Outcome("failed")

        verdict = record_verdict(session, claim, outcome, policy)
        if verdict is None:
            return Outcome("skipped")
        log_.info("verdict_recorded", decision=verdict.decision, provider=verdict.provider,
                  latency_ms=verdict.latency_ms)
        return Outcome("completed")


def _retry_delay(attempt: int, retry_after: float | None, settings: Settings) -> float:
    if retry_after is not None:
        return min(float(settings.moderation_retry_backoff_max), retry_after)
    return float(get_exponential_backoff_interval(
        factor=1, retries=attempt, maximum=settings.moderation_retry_backoff_max, full_jitter=True
    ))


def requeue_stalled(session: Session, settings: Settings, dispatch: Callable[[Sequence[str]], None],
                    *, batch_size: int = 500) -> int:
    """Send again what the queue lost: queued rows nobody picked up, and claims whose lease ran out.

    A lost message (a restarted Redis, an enqueue that failed after commit, a killed worker) leaves its row behind,
    so the row, not the message, is the source of truth.
    """
    now = utcnow()
    stale_queued = and_(Submission.status == SubmissionStatus.QUEUED.value,
                        Submission.enqueued_at < now - timedelta(seconds=settings.requeue_after_seconds))
    expired_claims = and_(Submission.status == SubmissionStatus.PROCESSING.value,
                          Submission.claimed_at < now - timedelta(seconds=settings.processing_lease_seconds))
    ids = list(session.scalars(
        select(Submission.id).where(or_(stale_queued, expired_claims))
        .order_by(Submission.created_at).limit(batch_size)
    ))
    if not ids:
        session.rollback()
        return 0
    session.execute(
        update(Submission).where(Submission.id.in_(ids), stale_queued).values(enqueued_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    dispatch(ids)
    log.info("requeued_stalled", count=len(ids))
    return len(ids)


class ModerationUnavailable(Exception):
    def __init__(self, code: str, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


def moderate_now(
    session: Session, provider: ModerationProvider, principal: Principal, texts: Sequence[str],
    *, model: str | None, request_id: str | None, settings: Settings,
) -> tuple[Submission, Verdict]:
    """Synchronous moderation (the OpenAI-compatible endpoint), stored and audited like an async submission.

    OpenAI's request has no `mask`; a tenant (or deployment) that masks by default is masked here too.
    """
    now = utcnow()
    masker = Masker.from_settings(settings)
    mask = masker.applies(None, session.scalar(select(Tenant.mask_by_default).where(Tenant.id == principal.tenant_id)))
    details: dict[str, object] = {"role": "input", "text_count": len(texts), "source": "sync", "mask": mask}
    if mask:
        texts, details["masked"] = masker.mask_all(texts)
    digest = content_digest(texts)
    submission = Submission(
        tenant_id=principal.tenant_id, api_key_id=principal.key_id, source="sync", role="input",
        content=list(texts), content_digest=digest, text_count=len(texts), policy_name=DEFAULT_POLICY.name,
        model=model, mask=mask, request_id=request_id, created_at=now, enqueued_at=now,
    )
    session.add(submission)
    session.flush()
    record_event(session, tenant_id=principal.tenant_id, action="submission.received", actor=principal.key_id,
                 subject_type="submission", subject_id=submission.id, request_id=request_id,
                 content_digest=digest, details=details)
    session.commit()
    claim = claim_submission(session, submission.id, lease_seconds=settings.processing_lease_seconds)
    if claim is None:  # pragma: no cover - the row was created a moment ago by this request
        raise RuntimeError("could not claim a fresh submission")
    try:
        outcome = provider.moderate(texts, model)
    except ProviderError as exc:
        fail_submission(session, claim, code=exc.code, message=exc.message)
        raise ModerationUnavailable(exc.code, exc.message, exc.retry_after) from exc
    verdict = record_verdict(session, claim, outcome, DEFAULT_POLICY)
    if verdict is None:  # pragma: no cover - only if the lease ran out mid-request
        raise ModerationUnavailable("claim_lost", "the request took longer than the processing lease", None)
    session.refresh(submission)
    return submission, verdict

