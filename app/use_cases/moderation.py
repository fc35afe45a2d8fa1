"""Moderating queued submissions in batches (the command a worker runs for one message) and the sweep that sends
again what the queue lost. See docs/moderation.md and docs/architecture.md."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import Select, and_, bindparam, case, exists, or_, select, update
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
from app.outbox import MODERATE_QUEUED, MODERATE_SUBMISSION, Message, send_after_commit
from app.use_cases import webhook_deliveries
from app.use_cases.policies import load_policy
from app.use_cases.verdicts import (
    CLAIMABLE,
    Claim,
    Outcome,
    claim_submissions,
    claimable_parameters,
    fail_submission,
    record_verdict,
    record_verdicts,
    release_for_retry,
)

log = structlog.get_logger(__name__)

FAILSAFE_PROVIDER = "failsafe"
# Verdicts per transaction when a batch is recorded: a provider call's worth (the audit events of a transaction are
# appended at its commit, each chain's head locked once, so a larger chunk no longer holds the lock longer per verdict).
RECORD_CHUNK = 50
# Texts per moderation message when the sender does not know the workers' provider (the API): the local engine's
# and `/moderate`'s batch. A worker whose provider takes fewer claims what one call holds and sends the rest on.
MESSAGE_TEXTS = 100


def moderation_messages(submissions: Sequence[tuple[str, int]], *, max_texts: int = MESSAGE_TEXTS,
                        ring: bool = False) -> list[Message]:
    """The messages that send `submissions` (ids with their text counts) to the queue: one per provider call's
    worth, in order, so a worker claims a message's submissions together and no message is left to be skipped.
    `ring`: the doorbell may stand for them (new submissions; app/doorbell.py)."""
    messages: list[Message] = []
    ids: list[str] = []
    texts = 0
    for submission_id, text_count in submissions:
        if ids and texts + text_count > max_texts:
            messages.append(Message(MODERATE_SUBMISSION, tuple(ids), ring=ring))
            ids, texts = [], 0
        ids.append(submission_id)
        texts += text_count
    if ids:
        messages.append(Message(MODERATE_SUBMISSION, tuple(ids), ring=ring))
    return messages


# The doorbell rung again by a worker that answered one and left rows queued (see moderate_queued).
RING_AGAIN = Message(MODERATE_QUEUED, (), ring=True)


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


def moderate_submissions(
    database: Database, provider: ModerationProvider, submission_ids: Sequence[str], settings: Settings,
    cache: VerdictCache | None = None, *, answer_doorbell: Callable[[], object] | None = None,
) -> dict[str, str]:
    """Moderate the submissions one message names (a provider call's worth, as the sender chunked them), and with
    them as many other queued submissions as fill the call. Returns what became of each of `submission_ids`:
    `completed`, `failed`, `retry` (back in the queue, its message sent), `requeued` (more than one provider call
    could take: sent again in a message of its own) or `skipped` (nothing to do: done, or another worker holds it).

    A message that names no ids is the doorbell (app/doorbell.py): `answer_doorbell` (its key's DEL) is called first,
    before the queue is read, then a provider call's worth of the oldest queued submissions is claimed (expired
    claims first), and if any are left the doorbell is rung again once that claim commits, before the provider is
    asked, so another worker process claims the next batch meanwhile. One that finds nothing rings nothing.

    A command in steps, each its own transaction: claim the batch; with no transaction open, ask the cache and the
    provider; then settle every submission (up to RECORD_CHUNK verdicts per transaction, each fenced by its own
    claim).
    """
    ids = list(dict.fromkeys(submission_ids))
    statuses = dict.fromkeys(ids, "skipped")
    capacity = provider.max_batch
    if not ids and answer_doorbell is not None:
        # No wakeup is lost: whoever found the doorbell pending committed its rows before, and the SELECT that
        # follows this DEL sees them (app/doorbell.py).
        answer_doorbell()
    with database.session() as session:
        with session.begin():
            works, others_queued = (_claim_named(session, ids, statuses, capacity=capacity, settings=settings) if ids
                                    else _claim_queued(session, capacity=capacity, settings=settings))
            if not works:
                return statuses
            if not ids:  # a doorbell reports what became of the submissions it claimed
                statuses.update(dict.fromkeys((work.submission_id for work in works), "skipped"))
            model = works[0].model
        # Under load (something else was queued) wait once, briefly, for more to arrive; an idle worker never waits.
        if others_queued and _room(works, capacity) > 0 and settings.batch_max_wait_ms:
            time.sleep(settings.batch_max_wait_ms / 1000)
            with session.begin():
                more = _claim_more(session, model, room=_room(works, capacity), settings=settings)[0]
            works += more
            if not ids:
                statuses.update(dict.fromkeys((work.submission_id for work in more), "skipped"))

        batch_texts = sum(len(w.texts) for w in works)
        if cache is not None:
            hits, works = _cached_answers(provider, cache, works)
            for chunk in _chunks(hits):
                inline = webhook_deliveries.inline_deliveries(settings)
                with session.begin():
                    _record(session, chunk, statuses, cached=True, inline=inline)
                if inline:  # the chunk's webhooks, sent now that its verdicts are committed (see below)
                    results = webhook_deliveries.send_inline(inline, settings)
                    with session.begin():
                        webhook_deliveries.conclude_inline(session, inline, results, settings)
        if not works:
            return statuses

        answered, failures = _ask_provider(provider, works, cache)
        for work, error in failures:
            fallback_answer = _fallback_answer(provider, work, error, settings)
            with session.begin():
                status = _settle_failure(session, work, error, settings, fallback_answer)
            if work.submission_id in statuses:
                statuses[work.submission_id] = status
        # Up to RECORD_CHUNK verdicts per transaction: one commit and one chain-head lock per tenant for the lot (the
        # audit events are appended at commit, app/use_cases/audit.py); each is fenced by its own claim.
        # The chunk's webhooks (however many: 8 at a time) are then sent from here, with no transaction open, each
        # step of an attempt waiting at most WEBHOOK_INLINE_SECONDS, and concluded in one more transaction; what got
        # no answer in time, or was not sent because its receiver did not answer, goes through the `webhooks` queue
        # (app/use_cases/webhook_deliveries.py, InlineDeliveries and send_inline).
        for chunk in _chunks(answered):
            inline = webhook_deliveries.inline_deliveries(settings)
            with session.begin():
                _record(session, chunk, statuses, batch_texts=batch_texts, inline=inline)
            if inline:
                results = webhook_deliveries.send_inline(inline, settings)
                with session.begin():
                    webhook_deliveries.conclude_inline(session, inline, results, settings)
    return statuses


def _chunks(answers: Sequence[tuple[Work, ProviderResult]]) -> list[Sequence[tuple[Work, ProviderResult]]]:
    return [answers[start:start + RECORD_CHUNK] for start in range(0, len(answers), RECORD_CHUNK)]


def _record(session: Session, chunk: Sequence[tuple[Work, ProviderResult]], statuses: dict[str, str], *,
            cached: bool = False, batch_texts: int | None = None,
            inline: webhook_deliveries.InlineDeliveries | None = None) -> None:
    """The chunk's verdicts, in the caller's transaction (see record_verdicts); what became of each goes into
    `statuses` (for the message's own submissions)."""
    verdicts = record_verdicts(session, [
        Outcome(claim=work.claim, submission=work.submission, result=outcome, policy=work.policy, cached=cached)
        for work, outcome in chunk], inline=inline)
    for (work, _), verdict in zip(chunk, verdicts, strict=True):
        status = _recorded(work, verdict, cached=cached, batch_texts=batch_texts)
        if work.submission_id in statuses:
            statuses[work.submission_id] = status


def _room(batch: Sequence[Work], capacity: int) -> int:
    return capacity - sum(len(work.texts) for work in batch)


def _claim_named(session: Session, ids: Sequence[str], statuses: dict[str, str], *, capacity: int,
                 settings: Settings) -> tuple[list[Work], bool]:
    """Claim a message's own submissions and the other queued ones that fill the call, in the caller's transaction
    (those it names that do not fit are sent again at once); the work, and whether others were queued."""
    own, left = _own_rows(session, ids, capacity=capacity, settings=settings)
    if not own and not left:
        # All done, or held by live claims: a redelivered or duplicate message. Nothing to do.
        return [], False
    if left:
        _send_again(session, left, capacity=capacity)
        statuses.update(dict.fromkeys((row.id for row in left), "requeued"))
    more, others_queued = _more_rows(
        session, own[0].model, room=capacity - sum(row.text_count for row in own), settings=settings,
        besides={row.id for row in own},
    ) if own else ([], False)
    # The message's own rows and the others that fill the call, claimed by one UPDATE.
    batch = _claim(session, own + more, settings)
    for submission_id in ids:
        if submission_id in batch.failed:
            statuses[submission_id] = "failed"
    return batch.works, others_queued


def _claim_queued(session: Session, *, capacity: int, settings: Settings) -> tuple[list[Work], bool]:
    """A doorbell's batch, in the caller's transaction: the oldest claimable submission (an expired claim first) and
    the queued ones of its model that fill the call, claimed by one UPDATE; the doorbell rung again once this
    commits if any others are left (of any model: a doorbell that did not take them must leave one pending). The
    work, and whether others were left."""
    now = utcnow()
    parameters: dict[str, Any] = {"now": now,
                                  "lease_cutoff": now - timedelta(seconds=settings.processing_lease_seconds)}
    first = session.scalars(_NEXT, parameters).first()
    if first is None:
        return [], False  # nothing queued (or all of it held by other workers): nothing rings
    more, _ = _more_rows(session, first.model, room=capacity - first.text_count, settings=settings,
                         besides={first.id})
    batch = _claim(session, [first, *more], settings)
    # Not SKIP LOCKED: a row another transaction merely locked (read, but not taken) must not be missed.
    left = bool(session.scalar(_ANY_CLAIMABLE, parameters))
    if left:
        send_after_commit(session, RING_AGAIN)
    return batch.works, left


@dataclass
class _Claimed:
    works: list[Work]
    failed: set[str]  # claimed, but their content was erased: failed at once

    def __bool__(self) -> bool:
        return bool(self.works or self.failed)


def _own_rows(session: Session, ids: Sequence[str], *, capacity: int,
              settings: Settings) -> tuple[list[Submission], list[Submission]]:
    """The message's own submissions that may be claimed, read and locked in the caller's transaction: as many of
    the first one's model as fill the call (the first always: a submission larger than a call is the provider's to
    refuse); and those left over (another model, or no room), which are queued and are not to be claimed."""
    rows = list(session.scalars(_OWN, {"ids": list(ids),
                                       **claimable_parameters(utcnow(), settings.processing_lease_seconds)}))
    position = {submission_id: index for index, submission_id in enumerate(ids)}
    rows.sort(key=lambda row: position[row.id])  # in the message's order: the order they were submitted in
    if not rows:
        return [], []
    model = rows[0].model
    taken: list[Submission] = []
    left: list[Submission] = []
    room = capacity
    for row in rows:
        if row.model == model and (not taken or row.text_count <= room):
            taken.append(row)
            room -= row.text_count
        else:
            left.append(row)
    return taken, left


def _locking(statement: Select[tuple[Submission]]) -> Select[tuple[Submission]]:
    """`statement`'s rows, locked for this transaction; rows another transaction holds are skipped (SKIP LOCKED), so
    workers gathering at the same moment take different rows instead of queueing behind each other. The claim's
    conditional UPDATE still decides (SQLite locks no rows). A row read earlier in this session (one that did not
    fit a batch) is read afresh: it may have been erased meanwhile."""
    return statement.options(lazyload(Submission.verdict)).with_for_update(skip_locked=True) \
        .execution_options(populate_existing=True)


# The reads of every batch, built once with bound parameters (their cache keys with them): at a light load a batch
# is a text or two, and building them again for each was a good part of its CPU (issue 15).
# A message's own submissions that may be claimed (CLAIMABLE's parameters).
_OWN = _locking(select(Submission).where(Submission.id.in_(bindparam("ids", expanding=True)), CLAIMABLE)
                .order_by(Submission.id))
# issue 11 item 2: rows whose claim expired (their worker died) are taken ahead of the queued backlog, so they are
# worked again about a lease after the death, however long the queue.
_EXPIRED_CLAIM = and_(Submission.status == SubmissionStatus.PROCESSING.value,
                      Submission.claimed_at < bindparam("lease_cutoff"))
_DUE = and_(Submission.status == SubmissionStatus.QUEUED.value, Submission.enqueued_at <= bindparam("now"))


# A doorbell's first row: the oldest claimable (an expired claim ahead of the queue), whatever its model.
_NEXT = _locking(select(Submission).where(or_(_EXPIRED_CLAIM, _DUE))
                 .order_by(case((_EXPIRED_CLAIM, 0), else_=1), Submission.enqueued_at).limit(1))
# Whether anything claimable is left once a doorbell's batch is claimed (its own rows are then `processing`).
_ANY_CLAIMABLE = select(exists().where(or_(_EXPIRED_CLAIM, _DUE)))


def _more(*criteria: Any) -> Select[tuple[Submission]]:
    return _locking(select(Submission).where(or_(_EXPIRED_CLAIM, _DUE), *criteria,
                                             Submission.text_count <= bindparam("room"))
                    .order_by(case((_EXPIRED_CLAIM, 0), else_=1), Submission.enqueued_at)
                    .limit(bindparam("limit")))


_MORE_OF_MODEL = _more(Submission.model == bindparam("model"))
_MORE_WITHOUT_MODEL = _more(Submission.model.is_(None))


def _claim(session: Session, rows: Sequence[Submission], settings: Settings) -> _Claimed:
    """Claim `rows` (read and locked in this transaction) with one conditional UPDATE; those it took, as work (or
    failed at once if their content was erased)."""
    by_id = {row.id: row for row in rows}
    claims = {claim.submission_id: claim for claim in claim_submissions(
        session, list(by_id), lease_seconds=settings.processing_lease_seconds)}
    works: list[Work] = []
    failed: set[str] = set()
    for row in rows:  # in the order read
        claim = claims.get(row.id)
        if claim is None:
            continue
        work = _load_work(session, claim, row)
        if work is None:
            failed.add(row.id)
        else:
            works.append(work)
    return _Claimed(works, failed)


def _send_again(session: Session, rows: Sequence[Submission], *, capacity: int) -> None:
    """Queued submissions a message named but its batch could not take: sent again, a provider call's worth per
    message, once the caller's transaction commits (marked dispatched now: the sweep counts from these messages)."""
    session.execute(
        update(Submission).where(Submission.id.in_([row.id for row in rows]),
                                 Submission.status == SubmissionStatus.QUEUED.value)
        .values(dispatched_at=utcnow()).execution_options(synchronize_session=False)
    )
    send_after_commit(session, *moderation_messages([(row.id, row.text_count) for row in rows], max_texts=capacity))


def _load_work(session: Session, claim: Claim, submission: Submission | None = None) -> Work | None:
    if submission is None:
        submission = session.get(Submission, claim.submission_id, options=[lazyload(Submission.verdict)])
    if submission is None or submission.content is None:
        fail_submission(session, claim, code="content_unavailable", message="the content was erased")
        return None
    return Work(claim=claim, submission=submission, tenant_id=submission.tenant_id, texts=list(submission.content),
                model=submission.model, policy=load_policy(session, submission.tenant_id, submission.policy_name))


def _claim_more(session: Session, model: str | None, *, room: int, settings: Settings) -> tuple[list[Work], bool]:
    """Claim queued submissions for the same model, up to `room` texts, in the caller's transaction; and whether
    any were queued (see _more_rows)."""
    rows, queued = _more_rows(session, model, room=room, settings=settings)
    return _claim(session, rows, settings).works, queued


def _more_rows(session: Session, model: str | None, *, room: int, settings: Settings,
               besides: set[str] | frozenset[str] = frozenset()) -> tuple[list[Submission], bool]:
    """Queued submissions for the same model, up to `room` texts, read and locked in the caller's transaction, to be
    claimed (with `besides`, rows read to be claimed with them, not yet claimed); and whether any were queued. Rows
    are locked with SKIP LOCKED, so workers gathering at the same moment take different rows instead of queueing
    behind each other (this transaction's own locks do not hide `besides`); the claim's UPDATE still decides."""
    if room <= 0:
        return [], False
    now = utcnow()
    parameters: dict[str, Any] = {"now": now, "room": room, "limit": room + len(besides),
                                  "lease_cutoff": now - timedelta(seconds=settings.processing_lease_seconds)}
    if model is not None:
        parameters["model"] = model
    candidates = [row for row in session.scalars(_MORE_WITHOUT_MODEL if model is None else _MORE_OF_MODEL, parameters)
                  if row.id not in besides]
    taken: list[Submission] = []
    for row in candidates:
        if row.text_count <= room:
            taken.append(row)
            room -= row.text_count
    return taken, bool(candidates)


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
    rows = session.execute(
        select(Submission.id, Submission.text_count).where(or_(stale_queued, expired_claims))
        .order_by(Submission.created_at).limit(batch_size)
    ).tuples().all()
    if not rows:
        return 0
    ids = [submission_id for submission_id, _ in rows]
    session.execute(
        update(Submission).where(Submission.id.in_(ids), stale_queued).values(enqueued_at=now, dispatched_at=now)
        .execution_options(synchronize_session=False)
    )
    send_after_commit(session, *moderation_messages(rows))
    log.info("requeued_stalled", count=len(ids))
    return len(ids)


def mark_undispatched(database: Database, messages: Sequence[Message]) -> int:
    """The broker refused these messages after their transaction committed (app/outbox.py): their queued
    submissions were never dispatched, so the sweep sends them again after REQUEUE_AFTER_SECONDS instead of waiting
    REDISPATCH_AFTER_SECONDS. Every submission a message names: one message stands for a provider call's worth.
    Returns the rows marked."""
    ids = [submission_id for m in messages if m.task == MODERATE_SUBMISSION for submission_id in m.args]
    if not ids:
        return 0
    with database.transaction() as session:
        marked = session.execute(
            update(Submission).where(Submission.id.in_(ids), Submission.status == SubmissionStatus.QUEUED.value)
            .values(dispatched_at=None).execution_options(synchronize_session=False)
        )
    return int(getattr(marked, "rowcount", 0) or 0)
