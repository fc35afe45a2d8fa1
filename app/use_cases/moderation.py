"""Moderating queued submissions in batches (the command a worker runs for one message) and the sweep that sends
again what the queue lost. See docs/moderation.md and docs/architecture.md."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import structlog
from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.orm import Session, lazyload

from app import metrics
from app.config import Settings
from app.db import Database
from app.models import Decision, Submission, SubmissionStatus, Tenant, Verdict, utcnow
from app.moderation.backoff import retry_delay
from app.moderation.cache import CacheScope, VerdictCache
from app.moderation.circuit import degrade, fallback_of
from app.moderation.policy import Policy
from app.moderation.providers import (
    ModerationProvider,
    ProviderError,
    ProviderResult,
    TextScores,
    TransientProviderError,
)
from app.outbox import MODERATE_SUBMISSION, Message, send_after_commit
from app.use_cases.policies import load_policy
from app.use_cases.verdicts import Claim, claim_submission, fail_submission, record_verdict, release_for_retry

log = structlog.get_logger(__name__)

FAILSAFE_PROVIDER = "failsafe"
# Verdicts per transaction when a batch is recorded: a provider call's worth (the audit events of a transaction are
# appended at its commit, each chain's head locked once, so a larger chunk no longer holds the lock longer per verdict).
RECORD_CHUNK = 50


@dataclass(frozen=True)
class Work:
    """One claimed submission of a batch, with what moderating it needs."""

    claim: Claim
    submission: Submission
    tenant_id: str
    texts: list[str]
    model: str | None
    policy: Policy

    @property
    def submission_id(self) -> str:
        return self.claim.submission_id

    def cache_scope(self, provider: ModerationProvider) -> CacheScope:
        return CacheScope(tenant_id=self.tenant_id, provider=provider.name, model=self.model,
                          policy_name=self.policy.name, policy_version=self.policy.version,
                          lists_version=self.policy.lists_version)


def moderate_submission(
    database: Database, provider: ModerationProvider, submission_id: str, settings: Settings,
    cache: VerdictCache | None = None,
) -> str:
    """Moderate `submission_id`, and with it as many other queued submissions as fill one provider call. Returns
    what became of it: `completed`, `failed`, `retry` (back in the queue, its message sent) or `skipped`.

    A command in steps, each its own transaction: claim the batch; with no transaction open, ask the cache and the
    provider; then settle every submission (a few verdicts per transaction, each fenced by its own claim).
    """
    statuses: dict[str, str] = {}
    with database.session() as session:
        with session.begin():
            claim = claim_submission(session, submission_id, lease_seconds=settings.processing_lease_seconds)
            if claim is None:
                # Already done, or held by a live claim: a redelivered or duplicate message. Nothing to do.
                return "skipped"
            first = _load_work(session, claim)
            if first is None:
                return "failed"
            capacity = provider.max_batch
            more, others_queued = _claim_more(session, first, room=capacity - len(first.texts), settings=settings)
            batch = [first, *more]
        # Under load (something else was queued) wait once, briefly, for more to arrive; an idle worker never waits.
        if others_queued and _room(batch, capacity) > 0 and settings.batch_max_wait_ms:
            time.sleep(settings.batch_max_wait_ms / 1000)
            with session.begin():
                batch += _claim_more(session, first, room=_room(batch, capacity), settings=settings)[0]

        if cache is not None:
            hits, batch = _cached_answers(provider, cache, batch)
            for work, outcome in hits:
                with session.begin():
                    verdict = record_verdict(session, work.claim, outcome, work.policy, cached=True,
                                             submission=work.submission)
                statuses[work.submission_id] = _recorded(work, verdict, cached=True)
        if not batch:
            return statuses[submission_id]

        answered, failures = _ask_provider(provider, batch, cache)
        for work, error in failures:
            fallback_answer = _fallback_answer(provider, work, error, settings)
            with session.begin():
                statuses[work.submission_id] = _settle_failure(session, work, error, settings, fallback_answer)

        # Up to RECORD_CHUNK verdicts per transaction: one commit and one chain-head lock per tenant for the lot
        # (the audit events are appended at commit, app/use_cases/audit.py); each is fenced by its own claim.
        for start in range(0, len(answered), RECORD_CHUNK):
            chunk = answered[start:start + RECORD_CHUNK]
            with session.begin():
                verdicts = [record_verdict(session, work.claim, outcome, work.policy, submission=work.submission)
                            for work, outcome in chunk]
            for (work, _), verdict in zip(chunk, verdicts, strict=True):
                statuses[work.submission_id] = _recorded(work, verdict, batch_texts=sum(len(w.texts) for w in batch))
    return statuses[submission_id]


def _room(batch: Sequence[Work], capacity: int) -> int:
    return capacity - sum(len(work.texts) for work in batch)


def _load_work(session: Session, claim: Claim, submission: Submission | None = None) -> Work | None:
    if submission is None:
        submission = session.get(Submission, claim.submission_id, options=[lazyload(Submission.verdict)])
    if submission is None or submission.content is None:
        fail_submission(session, claim, code="content_unavailable", message="the content was erased")
        return None
    return Work(claim=claim, submission=submission, tenant_id=submission.tenant_id, texts=list(submission.content),
                model=submission.model, policy=load_policy(session, submission.tenant_id, submission.policy_name))


def _claim_more(session: Session, first: Work, *, room: int, settings: Settings) -> tuple[list[Work], bool]:
    """Claim queued submissions for the same model, up to `room` texts, in the caller's transaction; and whether
    any were queued. Rows are locked with SKIP LOCKED, so workers gathering at the same moment take different rows
    instead of queueing behind each other; the conditional UPDATE of each claim still decides."""
    if room <= 0:
        return [], False
    now = utcnow()
    same_model = Submission.model.is_(None) if first.model is None else Submission.model == first.model
    # issue 11 item 2: rows whose claim expired (their worker died) are taken ahead of the queued backlog, so they
    # are worked again about a lease after the death, however long the queue.
    expired_claim = and_(Submission.status == SubmissionStatus.PROCESSING.value,
                         Submission.claimed_at < now - timedelta(seconds=settings.processing_lease_seconds))
    due = and_(Submission.status == SubmissionStatus.QUEUED.value, Submission.enqueued_at <= now)
    candidates = session.execute(
        select(Submission.id, Submission.text_count)
        .where(or_(expired_claim, due), same_model, Submission.text_count <= room)
        .order_by(case((expired_claim, 0), else_=1), Submission.enqueued_at).limit(room)
        .with_for_update(skip_locked=True)
    ).tuples().all()
    claimed: list[Claim] = []
    for candidate_id, text_count in candidates:
        if text_count > room:
            continue
        claim = claim_submission(session, candidate_id, lease_seconds=settings.processing_lease_seconds)
        if claim is not None:
            claimed.append(claim)
            room -= text_count
    loaded = {row.id: row for row in session.scalars(
        select(Submission).where(Submission.id.in_([c.submission_id for c in claimed]))
        .options(lazyload(Submission.verdict)))} if claimed else {}
    works = [_load_work(session, claim, loaded.get(claim.submission_id)) for claim in claimed]
    return [w for w in works if w is not None], bool(candidates)


def _cached_answers(provider: ModerationProvider, cache: VerdictCache,
                    batch: Sequence[Work]) -> tuple[list[tuple[Work, ProviderResult]], list[Work]]:
    """The submissions whose texts are all cached, each with its cached answer; and the rest, which still need the
    provider."""
    hits: list[tuple[Work, ProviderResult]] = []
    rest: list[Work] = []
    for work in batch:
        answer = cache.answer(work.cache_scope(provider), work.texts)
        if answer is None:
            rest.append(work)
        else:
            hits.append((work, answer))
    return hits, rest


def _ask_provider(
    provider: ModerationProvider, batch: Sequence[Work], cache: VerdictCache | None,
) -> tuple[list[tuple[Work, ProviderResult]], list[tuple[Work, ProviderError]]]:
    """One provider call for the whole batch (no transaction is open): each submission's own answer, or the error
    that stands in for it (the call's, or an unusable answer for its texts alone). Good answers are cached."""
    texts = [text for work in batch for text in work.texts]
    try:
        result = provider.moderate(texts, batch[0].model)
    except ProviderError as exc:
        log.warning("moderation_batch_failed", submission_ids=[w.submission_id for w in batch], texts=len(texts),
                    code=exc.code, transient=exc.transient)
        return [], [(work, exc) for work in batch]
    answered: list[tuple[Work, ProviderResult]] = []
    failures: list[tuple[Work, ProviderError]] = []
    offset = 0
    for work in batch:
        positions = range(offset, offset + len(work.texts))
        offset += len(work.texts)
        if result.defective.intersection(positions):
            # Only this submission's own answer was unusable: it alone asks again.
            failures.append((work, TransientProviderError("upstream_malformed",
                                                          "the provider's answer for this text was unusable")))
            continue
        own = result.results[positions.start:positions.stop]
        if cache is not None and not result.degraded:
            cache.put(work.cache_scope(provider), result.provider, result.model,
                      list(zip(work.texts, own, strict=True)))
        answered.append((work, ProviderResult(
            provider=result.provider, model=result.model, results=own, latency_ms=result.latency_ms,
            judged=frozenset().union(*(r.scores for r in own)), degraded=result.degraded)))
    return answered, failures


def _retries_left(claim: Claim, exc: ProviderError, settings: Settings) -> bool:
    # Waiting for rate-limit capacity is not a failed try: it gives the attempt back (see release_for_retry).
    waited = exc.code == "upstream_capacity_wait"
    return exc.transient and (waited or claim.attempt <= settings.moderation_max_retries)


def _fallback_answer(provider: ModerationProvider, work: Work, exc: ProviderError,
                     settings: Settings) -> ProviderResult | None:
    """The fallback provider's answer, when the provider stayed unavailable through every retry and a fallback is
    configured (asked with no transaction open); None otherwise, or if the fallback failed too."""
    fallback = fallback_of(provider)
    if fallback is None or not exc.transient or _retries_left(work.claim, exc, settings):
        return None
    try:
        return degrade(fallback.moderate(work.texts, None))
    except ProviderError as fallback_error:
        log.warning("fallback_failed", submission_id=work.submission_id, request_id=work.submission.request_id,
                    code=fallback_error.code)
        return None


def _settle_failure(session: Session, work: Work, exc: ProviderError, settings: Settings,
                    fallback_answer: ProviderResult | None) -> str:
    """A submission the provider did not answer, in the caller's transaction: back to the queue while it has
    retries left; then the fallback's answer, if there is one, else the tenant's failure mode decides: fail it, or
    record a degraded verdict (never a silent pass). A refusal (not transient) fails it at once."""
    claim = work.claim
    log_ = log.bind(submission_id=claim.submission_id, request_id=work.submission.request_id)
    if _retries_left(claim, exc, settings):
        delay = retry_delay(claim.attempt, exc, float(settings.moderation_retry_backoff_max))
        if not release_for_retry(session, claim, delay_seconds=delay,
                                 refund_attempt=exc.code == "upstream_capacity_wait"):
            return "skipped"
        log_.warning("moderation_retry", attempt=claim.attempt, code=exc.code, retry_in=round(delay, 2))
        code = exc.code
        metrics.after_commit(session, lambda: metrics.MODERATION_RETRIES.labels(code, "async").inc())
        return "retry"
    if exc.transient and fallback_answer is not None:
        verdict = record_verdict(session, claim, fallback_answer, work.policy, degraded_reason=exc.code,
                                 submission=work.submission)
        log_.warning("verdict_degraded", provider=fallback_answer.provider, reason=exc.code)
        return "completed" if verdict is not None else "skipped"
    mode = (session.scalar(select(Tenant.failure_mode).where(Tenant.id == work.tenant_id))
            or settings.moderation_failure_mode) if exc.transient else "fail"
    if mode == "fail":
        fail_submission(session, claim, code=exc.code, message=exc.message)
        log_.warning("moderation_failed", attempt=claim.attempt, code=exc.code)
        return "failed"
    decision = Decision(mode)
    failsafe = ProviderResult(provider=FAILSAFE_PROVIDER,
                              model="fail-open" if decision is Decision.ALLOW else "fail-closed",
                              results=[TextScores(scores={}) for _ in work.texts], judged=frozenset(), latency_ms=0,
                              degraded=True)
    verdict = record_verdict(session, claim, failsafe, work.policy, decision=decision, degraded_reason=exc.code,
                             submission=work.submission)
    log_.warning("verdict_degraded", provider=FAILSAFE_PROVIDER, decision=decision.value, reason=exc.code)
    return "completed" if verdict is not None else "skipped"


def _recorded(work: Work, verdict: Verdict | None, *, cached: bool = False, batch_texts: int | None = None) -> str:
    if verdict is None:
        return "skipped"
    log.info("verdict_recorded", submission_id=work.submission_id, request_id=work.submission.request_id,
             attempt=work.claim.attempt, decision=verdict.decision, provider=verdict.provider,
             **({"cached": True} if cached else {"latency_ms": verdict.latency_ms, "batch_texts": batch_texts}))
    return "completed"


def requeue_stalled(session: Session, settings: Settings, *, batch_size: int = 500) -> int:
    """Send again what the queue lost, in the caller's transaction: queued rows whose message never reached the
    broker (it refused the publish) and nobody picked up within REQUEUE_AFTER_SECONDS, queued rows whose message the
    broker took but which still wait after REDISPATCH_AFTER_SECONDS (a broker that lost its messages), and claims
    whose lease ran out. A row merely waiting its turn in a healthy queue is left alone: re-sending a backlog only
    doubles it. The row, not the message, is the source of truth."""
    now = utcnow()
    stale_queued = and_(
        Submission.status == SubmissionStatus.QUEUED.value,
        Submission.enqueued_at < now - timedelta(seconds=settings.requeue_after_seconds),
        or_(Submission.dispatched_at.is_(None),
            Submission.dispatched_at < now - timedelta(seconds=settings.redispatch_after_seconds)),
    )
    expired_claims = and_(Submission.status == SubmissionStatus.PROCESSING.value,
                          Submission.claimed_at < now - timedelta(seconds=settings.processing_lease_seconds))
    ids = list(session.scalars(
        select(Submission.id).where(or_(stale_queued, expired_claims))
        .order_by(Submission.created_at).limit(batch_size)
    ))
    if not ids:
        return 0
    session.execute(
        update(Submission).where(Submission.id.in_(ids), stale_queued).values(enqueued_at=now, dispatched_at=now)
        .execution_options(synchronize_session=False)
    )
    send_after_commit(session, *(Message(MODERATE_SUBMISSION, (submission_id,)) for submission_id in ids))
    log.info("requeued_stalled", count=len(ids))
    return len(ids)


def mark_undispatched(database: Database, messages: Sequence[Message]) -> int:
    """The broker refused these messages after their transaction committed (app/outbox.py): their queued
    submissions were never dispatched, so the sweep sends them again after REQUEUE_AFTER_SECONDS instead of waiting
    REDISPATCH_AFTER_SECONDS. Returns the rows marked."""
    ids = [m.args[0] for m in messages if m.task == MODERATE_SUBMISSION and m.args]
    if not ids:
        return 0
    with database.transaction() as session:
        marked = session.execute(
            update(Submission).where(Submission.id.in_(ids), Submission.status == SubmissionStatus.QUEUED.value)
            .values(dispatched_at=None).execution_options(synchronize_session=False)
        )
    return int(getattr(marked, "rowcount", 0) or 0)
