"""Synchronous moderation (the OpenAI-compatible `/v1/moderations`): the caller waits for the answer, which is
stored, claimed and audited like an async submission's. See docs/api.md."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import structlog
from sqlalchemy.orm import Session
from tenacity import RetryCallState

from app import metrics
from app.audit_chain import content_digest
from app.config import Settings
from app.db import Database, insert_as_loaded
from app.masking import Masker
from app.models import Submission, SubmissionStatus, Verdict, new_id, utcnow
from app.moderation.backoff import sync_retrying
from app.moderation.cache import CacheScope, VerdictCache
from app.moderation.circuit import degrade, fallback_of
from app.moderation.policy import DEFAULT_POLICY, Policy
from app.moderation.providers import ModerationProvider, ProviderError, ProviderResult, TransientProviderError
from app.use_cases.audit import record_event
from app.use_cases.authentication import Principal
from app.use_cases.errors import Unavailable
from app.use_cases.policies import BUILTIN, default_policy_name, load_policy
from app.use_cases.submissions import tenant_mask_default
from app.use_cases.verdicts import Claim, fail_submission, record_verdict

log = structlog.get_logger(__name__)

# The synchronous endpoint's own retries: a few, within a few seconds, because a client holds the connection open.
SYNC_ATTEMPTS = 3
SYNC_RETRY_BUDGET_SECONDS = 5.0
UNAVAILABLE_MESSAGE = "The moderation provider is unavailable; try again later."


def moderate_now(
    database: Database, provider: ModerationProvider, principal: Principal, texts: Sequence[str],
    *, model: str | None, request_id: str | None, settings: Settings, cache: VerdictCache | None = None,
) -> tuple[Submission, Verdict]:
    """Moderate `texts` while the caller waits; Unavailable if the provider cannot answer (the submission is then
    stored as failed). OpenAI's request has no `mask`; a tenant (or deployment) that masks by default is masked here.

    Nothing is written before the answer: the tenant's defaults come with its key (`Principal.tenant_defaults`), and
    a tenant policy is read in a read-only transaction. With no transaction open, ask the cache, then the provider
    (under the shared upstream budget and circuit breaker, retrying briefly), then the fallback if the provider
    stayed unavailable. Then one transaction stores it all: the submission (created completed with its verdict, or
    claimed and failed: either way no worker's batch can take it along), its verdict or its failure, and their audit
    events. A process that dies while the provider works
    leaves nothing behind (its caller got no answer either); a database that fails at the end leaves nothing half
    written.
    """
    now = utcnow()
    with database.session() as session:
        masker = Masker.from_settings(settings)
        known = principal.tenant_defaults
        if known is not None and (known.policy or BUILTIN) == BUILTIN:
            policy, tenant_mask = DEFAULT_POLICY, known.mask  # what the key's lookup read: nothing to ask
        else:
            with session.begin():  # read only
                policy, tenant_mask = _policy_and_mask(session, principal)
        mask = masker.applies(None, tenant_mask)
        details: dict[str, object] = {"role": "input", "text_count": len(texts), "source": "sync", "mask": mask}
        if mask:
            texts, details["masked"] = masker.mask_all(texts)
        digest = content_digest(texts)

        scope = CacheScope(tenant_id=principal.tenant_id, provider=provider.name, model=model,
                           policy_name=policy.name, policy_version=policy.version,
                           lists_version=policy.lists_version)
        answer: ProviderResult | ProviderError | None = cache.answer(scope, texts) if cache is not None else None
        cached, degraded_reason = answer is not None, None
        if answer is None:
            try:
                answer = _ask(provider, texts, model)
            except ProviderError as exc:
                # Like a queued submission whose retries ran out: the fallback answers, degraded, if there is one;
                # else the failure is what is stored.
                answer = _fallback_answer(provider, texts, exc, request_id) or exc
                degraded_reason = None if answer is exc else exc.code
            else:
                if cache is not None and not answer.degraded:
                    cache.put(scope, answer.provider, answer.model, list(zip(texts, answer.results, strict=True)))

        with session.begin():
            # A verdict's submission is created settled (completed, its first attempt, no claim left): it is this
            # transaction's own row, which no worker can see, let alone claim, so no fenced UPDATE settles it. A
            # failure's is created as a claim (what claim_submission's UPDATE makes of a fresh row: processing, under
            # a fresh token) and failed under that claim here.
            claim = Claim(submission_id=new_id("sub"), token=secrets.token_hex(16), attempt=1)
            settled, done = not isinstance(answer, ProviderError), utcnow()
            submission = Submission(
                id=claim.submission_id, tenant_id=principal.tenant_id, api_key_id=principal.key_id, source="sync",
                role="input", content=list(texts), content_digest=digest, text_count=len(texts),
                policy_name=policy.name, model=model, mask=mask, request_id=request_id, created_at=now,
                enqueued_at=now, claimed_at=now, attempts=claim.attempt,
                **({"status": SubmissionStatus.COMPLETED.value, "claim_token": None, "completed_at": done,
                    "updated_at": done} if settled else
                   {"status": SubmissionStatus.PROCESSING.value, "claim_token": claim.token, "updated_at": now}),
            )
            # Written as a row, not flushed through the unit of work (as submit_content writes its rows).
            insert_as_loaded(session, [submission])
            metrics.submissions_received(session, principal.tenant_id, [submission.role], source="sync")
            record_event(session, tenant_id=principal.tenant_id, action="submission.received",
                         actor=principal.key_id, subject_type="submission", subject_id=submission.id,
                         request_id=request_id, content_digest=digest, details=details)
            if isinstance(answer, ProviderError):
                fail_submission(session, claim, code=answer.code, message=answer.message)
                verdict = None
            else:
                verdict = record_verdict(session, claim, answer, policy, submission=submission, cached=cached,
                                         degraded_reason=degraded_reason, settled=True)
                if verdict is None:  # pragma: no cover - the row is this transaction's own
                    raise RuntimeError("could not settle a fresh submission")
    if isinstance(answer, ProviderError):
        raise Unavailable(UNAVAILABLE_MESSAGE, code=answer.code, retry_after=answer.retry_after) from answer
    if verdict is None:  # pragma: no cover - see above
        raise RuntimeError("no verdict")
    return submission, verdict


def _policy_and_mask(session: Session, principal: Principal) -> tuple[Policy, bool | None]:
    """The tenant's default policy (OpenAI's request names none) and its mask default, in the caller's transaction."""
    policy = load_policy(session, principal.tenant_id,
                         default_policy_name(session, principal.tenant_id, principal.tenant_defaults))
    return policy, tenant_mask_default(session, principal)


def _ask(provider: ModerationProvider, texts: Sequence[str], model: str | None) -> ProviderResult:
    """The provider's answer for every text. The caller waits for it, so transient failures (an answer with an
    unusable result among them) are retried here, briefly, not through the queue."""

    def ask_once() -> ProviderResult:
        result = provider.moderate(texts, model)
        if result.defective:
            raise TransientProviderError("upstream_malformed", "the provider's answer for a text was unusable")
        return result

    def count_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        metrics.MODERATION_RETRIES.labels(getattr(error, "code", "unknown"), "sync").inc()

    retrying = sync_retrying(attempts=SYNC_ATTEMPTS, budget_seconds=SYNC_RETRY_BUDGET_SECONDS,
                             cap=SYNC_RETRY_BUDGET_SECONDS, before_sleep=count_retry)
    answer: ProviderResult = retrying(ask_once)
    return answer


def _fallback_answer(provider: ModerationProvider, texts: Sequence[str], exc: ProviderError,
                     request_id: str | None) -> ProviderResult | None:
    """The fallback's answer when the provider stayed unavailable (a transient error through every try) and one is
    configured; None otherwise, or if the fallback failed too."""
    fallback = fallback_of(provider)
    if fallback is None or not exc.transient:
        return None
    try:
        answer = degrade(fallback.moderate(texts, None))
    except ProviderError as fallback_error:
        log.warning("fallback_failed", request_id=request_id, code=fallback_error.code)
        return None
    log.warning("verdict_degraded", provider=answer.provider, reason=exc.code, request_id=request_id)
    return answer
