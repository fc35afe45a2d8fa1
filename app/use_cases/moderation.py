"""Moderating submissions: claim them, ask the provider, apply the policy, record each verdict exactly once.

A worker moderates in batches: the submission its message names, plus whatever else is queued for the same model,
up to the provider's batch size, in one upstream call. Each submission of a batch is claimed on its own and its
verdict recorded under its own fencing token, so batching changes how many calls are made, never who records what.
The messages of the submissions a batch took along are consumed later and skipped, like any duplicate.

Exactly once rests on two guards. A claim is a conditional UPDATE (`status = 'queued'`, or a `processing` claim whose
lease has run out) that sets a fresh fencing token; the verdict is recorded only by an UPDATE that still matches that
token. So a redelivered message, a second worker or a worker that outlived its lease does no harm: at most one
holder commits, and the `verdicts.submission_id` unique constraint backs it up.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, lazyload

from app.auth import Principal
from app.config import Settings
from app.db import Database
from app.masking import Masker
from app.models import Decision, Submission, SubmissionStatus, Tenant, Verdict, utcnow
from app.moderation.backoff import retry_delay, sync_retrying
from app.moderation.cache import CacheScope, VerdictCache
from app.moderation.circuit import GuardedProvider, degrade
from app.moderation.policy import DEFAULT_POLICY, Assessment, Policy, assess, get_policy
from app.moderation.providers import (
    ModerationProvider,
    ProviderError,
    ProviderResult,
    TextScores,
    TransientProviderError,
)
from app.use_cases import webhooks
from app.use_cases.audit import content_digest, record_event

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
    claim = _claim(session, submission_id, lease_seconds=lease_seconds)
    session.commit()
    return claim


def _claim(session: Session, submission_id: str, *, lease_seconds: int) -> Claim | None:
    """The conditional UPDATE that claims a submission, in the caller's transaction."""
    now = utcnow()
    token = secrets.token_hex(16)
    result = session.execute(
        update(Submission)
        .where(
            Submission.id == submission_id,
            or_(
                # Queued and due: a submission given back for a retry waits for its due time, even when a message
                # (its own earlier one, still queued after a batch took it along) comes sooner.
                and_(Submission.status == SubmissionStatus.QUEUED.value,
                     or_(Submission.enqueued_at.is_(None),
                         Submission.enqueued_at <= now + timedelta(seconds=CLOCK_TOLERANCE_SECONDS))),
                and_(Submission.status == SubmissionStatus.PROCESSING.value,
                     Submission.claimed_at < now - timedelta(seconds=lease_seconds)),
            ),
        )
        .values(status=SubmissionStatus.PROCESSING.value, claim_token=token, claimed_at=now,
                attempts=Submission.attempts + 1, updated_at=now)
        .returning(Submission.attempts)
    )
    attempt = result.scalar_one_or_none()
    if attempt is None:
        return None
    return Claim(submission_id=submission_id, token=token, attempt=attempt)


def record_verdict(
    session: Session, claim: Claim, outcome: ProviderResult, policy: Policy, *, degraded: bool = False,
    cached: bool = False, decision: Decision | None = None, degraded_reason: str | None = None,
) -> Verdict | None:
    """Store the verdict if `claim` still holds the submission; None if another worker took it over.

    `decision` overrides the policy's (a fail-open or fail-closed verdict, which has no scores to assess)."""
    verdict = _record(session, claim, outcome, policy, degraded=degraded, cached=cached, decision=decision,
                      degraded_reason=degraded_reason)
    if verdict is None:
        session.rollback()
        return None
    session.commit()
    return verdict


def _record(
    session: Session, claim: Claim, outcome: ProviderResult, policy: Policy, *, degraded: bool = False,
    cached: bool = False, decision: Decision | None = None, degraded_reason: str | None = None,
    submission: Submission | None = None,
) -> Verdict | None:
    """`record_verdict` in the caller's transaction, so a batch commits its verdicts (and takes the tenant's audit
    chain lock) once. A lost claim changes nothing: its fenced UPDATE matched no row."""
    # The verdict relationship is not loaded: this is the verdict being made.
    if submission is None:
        submission = session.get(Submission, claim.submission_id, options=[lazyload(Submission.verdict)])
    if submission is None:
        return None
    assessment = assess(policy, outcome)
    if decision is not None:
        flagged = decision is not Decision.ALLOW
        assessment = dataclasses.replace(assessment, decision=decision, flagged=flagged, results=[
            {**r, "decision": decision.value, "flagged": flagged} for r in assessment.results])
    degraded = degraded or outcome.degraded
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
        log.warning("verdict_discarded_claim_lost", submission_id=claim.submission_id)
        return None
    verdict = _verdict_row(submission, outcome, policy, assessment, degraded=degraded, cached=cached, now=now)
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
                 "attempt": claim.attempt, "cached": cached, "degraded": degraded,
                 **({"degraded_reason": degraded_reason} if degraded_reason else {})},
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
    return verdict


def _verdict_row(
    submission: Submission, outcome: ProviderResult, policy: Policy, assessment: Assessment, *,
    degraded: bool, cached: bool, now: datetime,
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
        cached=cached,
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


def release_for_retry(session: Session, claim: Claim, *, delay_seconds: float, refund_attempt: bool = False) -> bool:
    """Give the submission back to the queue; the sweep leaves it alone until the retry is due.

    `refund_attempt`: the try never reached the provider (it waited for rate-limit capacity), so it does not count
    against the submission's retries."""
    now = utcnow()
    won = session.execute(
        update(Submission)
        .where(Submission.id == claim.submission_id, Submission.claim_token == claim.token)
        .values(status=SubmissionStatus.QUEUED.value, claim_token=None, updated_at=now,
                enqueued_at=now + timedelta(seconds=delay_seconds),
                attempts=Submission.attempts - (1 if refund_attempt else 0))
        .returning(Submission.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    session.commit()
    return won is not None


@dataclass(frozen=True)
class Outcome:
    """What the task should do next: nothing (`done`), or run again in `retry_in` seconds; and the other
    submissions of its batch that go back to the queue, each with its countdown (`retries`)."""

    status: str
    retry_in: float | None = None
    retries: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Work:
    """One claimed submission of a batch, with what moderating it needs."""

    claim: Claim
    submission: Submission
    tenant_id: str
    texts: list[str]
    model: str | None
    policy: Policy

    def cache_scope(self, provider: ModerationProvider) -> CacheScope:
        return CacheScope(tenant_id=self.tenant_id, provider=provider.name, model=self.model,
                          policy_name=self.policy.name, policy_version=self.policy.version)


def moderate_submission(
    database: Database, provider: ModerationProvider, submission_id: str, settings: Settings,
    cache: VerdictCache | None = None,
) -> Outcome:
    """Moderate `submission_id`, and with it as many other queued submissions as fill one provider call."""
    with database.session_scope() as session:
        claim = claim_submission(session, submission_id, lease_seconds=settings.processing_lease_seconds)
        if claim is None:
            # Already done, or held by a live claim: a redelivered or duplicate message. Nothing to do.
            return Outcome("skipped")
        first = _load_work(session, claim)
        if first is None:
            return Outcome("failed")
        started = time.monotonic()
        capacity = min(provider.max_batch, BATCH_SIZER.most_submissions(settings))
        batch = [first, *_claim_more(session, first, capacity=capacity, settings=settings)]
        # Hold no transaction open while the provider works. Commit, not rollback: the loaded rows stay usable
        # (expire_on_commit is off), so recording does not read them again.
        session.commit()
        statuses: dict[str, tuple[str, float | None]] = {}
        if cache is not None:
            batch = _record_cached(session, provider, cache, batch, statuses)
        if batch:
            statuses.update(_moderate_batch(session, provider, batch, settings, started=started, cache=cache))

    status, delay = statuses[submission_id]
    others = [(other_id, other_delay) for other_id, (_, other_delay) in statuses.items() if other_id != submission_id]
    return Outcome(status, retry_in=delay,
                   retries=[(other_id, other_delay) for other_id, other_delay in others if other_delay is not None])


def _load_work(session: Session, claim: Claim, submission: Submission | None = None) -> Work | None:
    if submission is None:
        submission = session.get(Submission, claim.submission_id, options=[lazyload(Submission.verdict)])
    if submission is None or submission.content is None:
        fail_submission(session, claim, code="content_unavailable", message="the content was erased")
        return None
    return Work(claim=claim, submission=submission, tenant_id=submission.tenant_id, texts=list(submission.content),
                model=submission.model, policy=get_policy(submission.policy_name) or DEFAULT_POLICY)


def _claim_more(session: Session, first: Work, *, capacity: int, settings: Settings) -> list[Work]:
    """Claim queued submissions for the same model until the batch holds `capacity` texts.

    Under load (something else was queued) the worker waits up to BATCH_MAX_WAIT_MS once for more to arrive; when
    nothing else is queued it does not wait at all. Rows are locked with SKIP LOCKED, so workers gathering at the
    same moment take different rows instead of queueing behind each other; the conditional UPDATE still decides.
    """
    room = capacity - len(first.texts)
    claimed: list[Claim] = []
    for round_ in range(2):
        if room <= 0:
            break
        now = utcnow()
        same_model = Submission.model.is_(None) if first.model is None else Submission.model == first.model
        candidates = session.execute(
            select(Submission.id, Submission.text_count)
            .where(Submission.status == SubmissionStatus.QUEUED.value, Submission.enqueued_at <= now, same_model,
                   Submission.text_count <= room)
            .order_by(Submission.enqueued_at).limit(room)
            .with_for_update(skip_locked=True)
        ).tuples().all()
        for candidate_id, text_count in candidates:
            if text_count > room:
                continue
            claim = _claim(session, candidate_id, lease_seconds=settings.processing_lease_seconds)
            if claim is not None:
                claimed.append(claim)
                room -= text_count
        session.commit()
        if round_ == 0 and candidates and room > 0 and settings.batch_max_wait_ms:
            time.sleep(settings.batch_max_wait_ms / 1000)
            continue
        break
    loaded = {row.id: row for row in session.scalars(
        select(Submission).where(Submission.id.in_([c.submission_id for c in claimed]))
        .options(lazyload(Submission.verdict)))} if claimed else {}
    works = [_load_work(session, claim, loaded.get(claim.submission_id)) for claim in claimed]
    return [w for w in works if w is not None]


class BatchSizer:
    """How many submissions one batch may hold so that its database work (claiming, recording verdicts and audit
    events) fits the task's time limit, learned from the batches this process already did.

    The provider's batch size bounds the texts; this bounds the rows. With a production lease it rarely binds; with
    a short lease, a slow database or many workers queueing on one tenant's audit chain, it keeps a batch from being
    cut off by the soft time limit (which would leave its claims to expire and be redone)."""

    def __init__(self, initial_seconds_per_submission: float = 0.05) -> None:
        self.seconds_per_submission = initial_seconds_per_submission

    def most_submissions(self, settings: Settings) -> int:
        # What the soft limit leaves after waiting for capacity and the call's own timeout; half of it, for safety,
        # shared by as many batches as this worker runs at once (they may queue on the same tenant's audit chain).
        spare = settings.task_soft_time_limit - settings.upstream_capacity_wait - settings.upstream_timeout_seconds
        budget = max(1.0, spare) / 2 / settings.worker_concurrency
        return max(1, int(budget / self.seconds_per_submission))

    def observe(self, submissions: int, seconds: float) -> None:
        if submissions > 0:
            self.seconds_per_submission = 0.7 * self.seconds_per_submission + 0.3 * (seconds / submissions)


BATCH_SIZER = BatchSizer()
# Verdicts per transaction when a batch is recorded.
RECORD_CHUNK = 8


def _record_cached(session: Session, provider: ModerationProvider, cache: VerdictCache, batch: Sequence[Work],
                   statuses: dict[str, tuple[str, float | None]]) -> list[Work]:
    """Record a cached verdict for every submission whose texts are all cached; the rest still need the provider."""
    rest: list[Work] = []
    for work in batch:
        hits = cache.get_all(work.cache_scope(provider), work.texts)
        if hits is None:
            rest.append(work)
            continue
        results = [hit.scores for hit in hits]
        outcome = ProviderResult(provider=hits[0].provider, model=hits[0].model, results=results,
                                 judged=frozenset().union(*(r.scores for r in results)), latency_ms=0)
        verdict = record_verdict(session, work.claim, outcome, work.policy, cached=True)
        statuses[work.claim.submission_id] = ("completed", None) if verdict is not None else ("skipped", None)
        if verdict is not None:
            log.info("verdict_recorded", submission_id=work.claim.submission_id, request_id=work.submission.request_id,
                     attempt=work.claim.attempt,
                     decision=verdict.decision, provider=verdict.provider, cached=True)
    return rest


def _moderate_batch(
    session: Session, provider: ModerationProvider, batch: Sequence[Work], settings: Settings, *, started: float,
    cache: VerdictCache | None,
) -> dict[str, tuple[str, float | None]]:
    """Ask the provider once for the whole batch and settle every submission in it: each one's status, and the
    countdown of those that go back to the queue."""
    texts = [text for work in batch for text in work.texts]
    ids = [w.claim.submission_id for w in batch]
    log_ = log.bind(submission_ids=ids, texts=len(texts))
    call_started = time.monotonic()
    try:
        result = provider.moderate(texts, batch[0].model)
    except ProviderError as exc:
        log_.warning("moderation_batch_failed", code=exc.code, transient=exc.transient)
        return {w.claim.submission_id: _retry_or_fail(session, w, exc, settings, provider) for w in batch}
    call_seconds = time.monotonic() - call_started

    statuses: dict[str, tuple[str, float | None]] = {}
    recorded: list[tuple[Work, Verdict]] = []
    # Past this point the task is close to its soft time limit: what is not recorded yet goes back to the queue at
    # once (not counted as a try) instead of being cut off mid-transaction and left to its lease. The first chunk is
    # always recorded, so every batch makes progress.
    deadline = started + settings.task_soft_time_limit * 0.75
    answered: list[tuple[Work, ProviderResult]] = []
    offset = 0
    for work in batch:
        positions = range(offset, offset + len(work.texts))
        offset += len(work.texts)
        if result.defective.intersection(positions):
            # Only this submission's own answer was unusable: it alone asks again.
            error = TransientProviderError("upstream_malformed", "the provider's answer for this text was unusable")
            statuses[work.claim.submission_id] = _retry_or_fail(session, work, error, settings, provider)
            continue
        own = result.results[positions.start:positions.stop]
        if cache is not None and not result.degraded:
            answers = list(zip(work.texts, own, strict=True))
            cache.put(work.cache_scope(provider), result.provider, result.model, answers)
        answered.append((work, ProviderResult(
            provider=result.provider, model=result.model, results=own, latency_ms=result.latency_ms,
            judged=frozenset().union(*(r.scores for r in own)), degraded=result.degraded)))

    # Verdicts are committed a few at a time: fewer commits than one each, while the tenant's audit chain stays
    # locked only briefly (batches of one tenant in several workers interleave) and a batch cut off half-way keeps
    # what it committed. Each verdict is still fenced by its own claim's token.
    for start in range(0, len(answered), RECORD_CHUNK):
        chunk = answered[start:start + RECORD_CHUNK]
        if start and time.monotonic() > deadline:
            for work, _ in chunk:
                if release_for_retry(session, work.claim, delay_seconds=0, refund_attempt=True):
                    statuses[work.claim.submission_id] = ("retry", 0.0)
                    log.warning("moderation_deferred", submission_id=work.claim.submission_id,
                                request_id=work.submission.request_id, reason="time_limit")
                else:
                    statuses[work.claim.submission_id] = ("skipped", None)
            continue
        kept: list[tuple[Work, Verdict]] = []
        for work, part in chunk:
            verdict = _record(session, work.claim, part, work.policy, submission=work.submission)
            if verdict is None:
                statuses[work.claim.submission_id] = ("skipped", None)
            else:
                kept.append((work, verdict))
        session.commit()
        recorded.extend(kept)
    BATCH_SIZER.observe(len(batch), time.monotonic() - started - call_seconds)
    for work, verdict in recorded:
        log.info("verdict_recorded", submission_id=work.claim.submission_id, request_id=work.submission.request_id,
                 attempt=work.claim.attempt,
                 decision=verdict.decision, provider=verdict.provider, latency_ms=verdict.latency_ms,
                 batch_texts=len(texts))
        statuses[work.claim.submission_id] = ("completed", None)
    return statuses


def _retry_or_fail(session: Session, work: Work, exc: ProviderError, settings: Settings,
                   provider: ModerationProvider) -> tuple[str, float | None]:
    claim = work.claim
    # Waiting for rate-limit capacity is not a failed try: it gives the attempt back (see release_for_retry).
    waited = exc.code == "upstream_capacity_wait"
    if exc.transient and (waited or claim.attempt <= settings.moderation_max_retries):
        delay = retry_delay(claim.attempt, exc, float(settings.moderation_retry_backoff_max))
        if not release_for_retry(session, claim, delay_seconds=delay, refund_attempt=waited):
            return ("skipped", None)
        log.warning("moderation_retry", submission_id=claim.submission_id, request_id=work.submission.request_id,
                    attempt=claim.attempt, code=exc.code,
                    retry_in=round(delay, 2))
        return ("retry", delay)
    if exc.transient:
        return _decide_without_provider(session, work, exc, settings, provider)
    fail_submission(session, claim, code=exc.code, message=exc.message)
    log.warning("moderation_failed", submission_id=claim.submission_id, request_id=work.submission.request_id,
                attempt=claim.attempt, code=exc.code)
    return ("failed", None)


FAILSAFE_PROVIDER = "failsafe"


def _decide_without_provider(session: Session, work: Work, exc: ProviderError, settings: Settings,
                             provider: ModerationProvider) -> tuple[str, float | None]:
    """The provider stayed unavailable through every retry: the fallback provider answers, if there is one; else the
    tenant's failure mode decides: fail the submission, or record a degraded verdict (never a silent pass)."""
    claim = work.claim
    fallback = provider.fallback if isinstance(provider, GuardedProvider) else None
    if fallback is not None:
        try:
            outcome = degrade(fallback.moderate(work.texts, None))
        except ProviderError as fallback_error:
            log.warning("fallback_failed", submission_id=claim.submission_id, request_id=work.submission.request_id,
                        code=fallback_error.code)
        else:
            verdict = record_verdict(session, claim, outcome, work.policy, degraded_reason=exc.code)
            log.warning("verdict_degraded", submission_id=claim.submission_id, request_id=work.submission.request_id,
                        provider=outcome.provider,
                        reason=exc.code)
            return ("completed", None) if verdict is not None else ("skipped", None)
    mode = session.scalar(select(Tenant.failure_mode).where(Tenant.id == work.tenant_id)) \
        or settings.moderation_failure_mode
    if mode == "fail":
        fail_submission(session, claim, code=exc.code, message=exc.message)
        log.warning("moderation_failed", submission_id=claim.submission_id, request_id=work.submission.request_id,
                    attempt=claim.attempt, code=exc.code)
        return ("failed", None)
    decision = Decision(mode)
    failsafe = ProviderResult(provider=FAILSAFE_PROVIDER,
                              model="fail-open" if decision is Decision.ALLOW else "fail-closed",
                              results=[TextScores(scores={}) for _ in work.texts], judged=frozenset(), latency_ms=0,
                              degraded=True)
    verdict = record_verdict(session, claim, failsafe, work.policy, decision=decision, degraded_reason=exc.code)
    log.warning("verdict_degraded", submission_id=claim.submission_id, request_id=work.submission.request_id,
                provider=FAILSAFE_PROVIDER,
                decision=decision.value, reason=exc.code)
    return ("completed", None) if verdict is not None else ("skipped", None)


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


# The synchronous endpoint's own retries: a few, within a few seconds, because a client holds the connection open.
SYNC_ATTEMPTS = 3
SYNC_RETRY_BUDGET_SECONDS = 5.0


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
        # The caller waits for this answer, so transient failures are retried here, briefly, not through the queue.
        retrying = sync_retrying(attempts=SYNC_ATTEMPTS, budget_seconds=SYNC_RETRY_BUDGET_SECONDS,
                                 cap=SYNC_RETRY_BUDGET_SECONDS)
        outcome = retrying(provider.moderate, texts, model)
    except ProviderError as exc:
        fail_submission(session, claim, code=exc.code, message=exc.message)
        raise ModerationUnavailable(exc.code, exc.message, exc.retry_after) from exc
    verdict = record_verdict(session, claim, outcome, DEFAULT_POLICY)
    if verdict is None:  # pragma: no cover - only if the lease ran out mid-request
        raise ModerationUnavailable("claim_lost", "the request took longer than the processing lease", None)
    session.refresh(submission)
    return submission, verdict

