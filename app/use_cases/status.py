"""The deployment at a glance: queue depth and the oldest queued age, webhook backlog and dead deliveries, the
upstream's circuit and budget, the review queue, the last audit sequence of each chain. Read by `verdict status`
and by every scrape of `/metrics` (app/metrics.py), so each query is one index range (docs/operations.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import AuditChainHead, DeliveryStatus, Submission, SubmissionStatus, Tenant, WebhookDelivery, utcnow
from app.moderation.circuit import guarded_upstream
from app.moderation.openai_compat import OpenAICompatibleProvider
from app.moderation.providers import ModerationProvider
from app.moderation.upstream_budget import BudgetState, RateLimitUnavailable
from app.use_cases.reviews import ReviewQueueDepth, queue_depth

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class QueueStatus:
    queued: int
    processing: int
    # Seconds since the oldest queued submission became due; None when nothing is queued and due.
    oldest_queued_age_seconds: float | None


@dataclass(frozen=True)
class WebhookStatus:
    pending: int
    delivering: int
    dead: int


@dataclass(frozen=True)
class UpstreamStatus:
    provider: str
    # `closed`, `half-open` or `open`; None when there is no upstream, or its state is not shared (no Redis).
    circuit: str | None = None
    budget: BudgetState | None = None
    # Why circuit or budget is missing, when an upstream is configured.
    note: str | None = None


@dataclass(frozen=True)
class ChainHead:
    chain_id: str
    tenant_name: str | None  # None: the system chain
    seq: int


@dataclass(frozen=True)
class DeploymentStatus:
    queue: QueueStatus
    webhooks: WebhookStatus
    upstream: UpstreamStatus
    audit_heads: list[ChainHead] = field(default_factory=list)
    reviews: ReviewQueueDepth | None = None


def queue_status(session: Session, now: datetime | None = None) -> QueueStatus:
    """Counts of queued and processing submissions and the oldest due one, in the caller's transaction (each on
    the (status, enqueued_at) index)."""
    now = now or utcnow()
    counts = dict(session.execute(
        select(Submission.status, func.count())
        .where(Submission.status.in_([SubmissionStatus.QUEUED.value, SubmissionStatus.PROCESSING.value]))
        .group_by(Submission.status)
    ).tuples().all())
    oldest = session.scalar(select(func.min(Submission.enqueued_at)).where(
        Submission.status == SubmissionStatus.QUEUED.value, Submission.enqueued_at <= now))
    if isinstance(oldest, str):  # SQLite returns an aggregate of a timestamp column as text
        oldest = datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=now.tzinfo)
    return QueueStatus(
        queued=counts.get(SubmissionStatus.QUEUED.value, 0),
        processing=counts.get(SubmissionStatus.PROCESSING.value, 0),
        oldest_queued_age_seconds=None if oldest is None else max(0.0, (now - oldest).total_seconds()),
    )


def webhook_status(session: Session) -> WebhookStatus:
    """Deliveries pending, delivering and dead, in the caller's transaction (on the (status, next_attempt_at)
    index)."""
    counts = dict(session.execute(
        select(WebhookDelivery.status, func.count())
        .where(WebhookDelivery.status.in_([DeliveryStatus.PENDING.value, DeliveryStatus.DELIVERING.value,
                                           DeliveryStatus.DEAD.value]))
        .group_by(WebhookDelivery.status)
    ).tuples().all())
    return WebhookStatus(pending=counts.get(DeliveryStatus.PENDING.value, 0),
                         delivering=counts.get(DeliveryStatus.DELIVERING.value, 0),
                         dead=counts.get(DeliveryStatus.DEAD.value, 0))


def audit_heads(session: Session) -> list[ChainHead]:
    """The last sequence number of every audit chain, with its tenant's name, in the caller's transaction."""
    rows = session.execute(
        select(AuditChainHead.chain_id, Tenant.name, AuditChainHead.seq)
        .outerjoin(Tenant, Tenant.id == AuditChainHead.chain_id)
        .order_by(Tenant.name.is_(None), Tenant.name)
    ).tuples().all()
    return [ChainHead(chain_id=chain_id, tenant_name=name, seq=seq) for chain_id, name, seq in rows]


def upstream_status(provider: ModerationProvider, *, shared: bool) -> UpstreamStatus:
    """The upstream's circuit and budget as every worker sees them (in Redis). `shared`: the deployment has a
    Redis; without one each process has its own breaker, and this process's says nothing about the workers'."""
    upstream = guarded_upstream(provider)
    if upstream is None:
        return UpstreamStatus(provider=provider.name)
    if not shared:
        return UpstreamStatus(provider=provider.name, note="no Redis: circuit and budget are per process")
    circuit = upstream.circuit_state()
    budget = None
    note = None
    primary = upstream.primary
    if isinstance(primary, OpenAICompatibleProvider):
        try:
            budget = primary.budget_state()
        except RateLimitUnavailable:
            log.warning("upstream_budget_unreadable")
            note = "the shared budget could not be read (Redis)"
    return UpstreamStatus(provider=provider.name, circuit=circuit, budget=budget, note=note)


def deployment_status(session: Session, provider: ModerationProvider, *, shared: bool,
                      with_audit_heads: bool = True) -> DeploymentStatus:
    """Everything above, in the caller's transaction."""
    return DeploymentStatus(queue=queue_status(session), webhooks=webhook_status(session),
                            upstream=upstream_status(provider, shared=shared),
                            audit_heads=audit_heads(session) if with_audit_heads else [],
                            reviews=queue_depth(session))
