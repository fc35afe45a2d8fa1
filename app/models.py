"""The stored moderation domain: tenants and their keys, submissions, verdicts, and the audit trail."""

from __future__ import annotations

import enum
import secrets
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base
from app.secrets_at_rest import EncryptedSecret

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every database (SQLite forgets the zone on the way back)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class SubmissionStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class Role(enum.StrEnum):
    INPUT = "input"
    OUTPUT = "output"


class Decision(enum.StrEnum):
    ALLOW = "allow"
    REVIEW = "review"
    BLOCK = "block"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(sa.String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Days to keep submitted content before the retention job erases it: None follows CONTENT_RETENTION_DAYS,
    # 0 keeps it forever.
    retention_days: Mapped[int | None] = mapped_column(sa.Integer)
    # Mask personal data in submissions that do not say `mask` themselves: None follows MASK_BY_DEFAULT.
    mask_by_default: Mapped[bool | None] = mapped_column(sa.Boolean)
    # Requests and tokens per minute for each of the tenant's keys: None follows RATE_LIMIT_RPM / RATE_LIMIT_TPM.
    rate_limit_rpm: Mapped[int | None] = mapped_column(sa.Integer)
    rate_limit_tpm: Mapped[int | None] = mapped_column(sa.Integer)
    # When no provider can answer: fail, or a degraded review/block/allow verdict. None follows
    # MODERATION_FAILURE_MODE.
    failure_mode: Mapped[str | None] = mapped_column(sa.String(16))
    # The policy of submissions that name none: None is the built-in `default`.
    default_policy: Mapped[str | None] = mapped_column(sa.String(64))

    __table_args__ = (
        sa.CheckConstraint("failure_mode IS NULL OR failure_mode IN ('fail', 'review', 'block', 'allow')",
                           name="failure_mode_known"),
    )


class ApiKey(Base):
    """A bearer key. Only a SHA-256 digest of the secret is stored; the key id is public and names the actor."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(sa.String(100))
    secret_hash: Mapped[str] = mapped_column(sa.String(64))
    scopes: Mapped[list[str]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # This key's own requests and tokens per minute: None follows its tenant's (app/api/rate_limits.py).
    rate_limit_rpm: Mapped[int | None] = mapped_column(sa.Integer)
    rate_limit_tpm: Mapped[int | None] = mapped_column(sa.Integer)

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class IdempotencyRecord(Base):
    """The first response to a POST sent with an `Idempotency-Key`, replayed to retries of the same request.

    The row is inserted before the request runs (`status_code` None: in progress), so of two identical requests
    racing only one inserts it and runs; the other is told the first is still in progress. `fingerprint` is a
    digest of method, path and body: the same key with another request is refused.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (sa.Index("ix_idempotency_keys_expires_at", "expires_at"),)

    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(sa.String(64))
    api_key_id: Mapped[str | None] = mapped_column(sa.String(40))
    status_code: Mapped[int | None] = mapped_column(sa.Integer)
    response_body: Mapped[str | None] = mapped_column(sa.Text)
    response_headers: Mapped[dict[str, str] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Submission(Base):
    """Content sent for moderation. The row is also the outbox: `queued` rows are (re)enqueued until claimed."""

    __tablename__ = "submissions"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN ('queued', 'processing', 'completed', 'failed')", name="status_known"
        ),
        sa.CheckConstraint("role IN ('input', 'output')", name="role_known"),
        sa.Index("ix_submissions_tenant_created", "tenant_id", "created_at", "id"),
        sa.Index("ix_submissions_status_enqueued", "status", "enqueued_at"),
        # The retention job's scan: only content not yet erased, so tombstones never slow it down.
        sa.Index("ix_submissions_tenant_unerased", "tenant_id", "created_at",
                 postgresql_where=sa.text("erased_at IS NULL"), sqlite_where=sa.text("erased_at IS NULL")),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=lambda: new_id("sub"))
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    api_key_id: Mapped[str | None] = mapped_column(sa.String(40))
    source: Mapped[str] = mapped_column(sa.String(16), default="async")
    role: Mapped[str] = mapped_column(sa.String(16), default=Role.INPUT.value)
    status: Mapped[str] = mapped_column(sa.String(16), default=SubmissionStatus.QUEUED.value)
    # The texts to moderate (masked, if `mask`); None once erased.
    content: Mapped[list[str] | None] = mapped_column(JSONType)
    content_digest: Mapped[str] = mapped_column(sa.String(64))
    text_count: Mapped[int] = mapped_column(sa.Integer)
    conversation_id: Mapped[str | None] = mapped_column(sa.String(128), index=True)
    turn_id: Mapped[str | None] = mapped_column(sa.String(128))
    client_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    policy_name: Mapped[str] = mapped_column(sa.String(64), default="default")
    model: Mapped[str | None] = mapped_column(sa.String(128))
    mask: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    callback_url: Mapped[str | None] = mapped_column(sa.String(2048))
    request_id: Mapped[str | None] = mapped_column(sa.String(128))

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When its message was last handed to the broker (None: never, or the broker refused it): the sweep re-sends a
    # queued row that merely waits in a healthy queue only after REDISPATCH_AFTER_SECONDS.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Fencing token: only the holder of the current claim may record the verdict.
    claim_token: Mapped[str | None] = mapped_column(sa.String(32))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error_message: Mapped[str | None] = mapped_column(sa.String(500))
    # Set when the content, metadata and per-text results were erased; the row stays as a tombstone.
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    verdict: Mapped[Verdict | None] = relationship(back_populates="submission", lazy="selectin")
    # Loaded where it is shown (app/use_cases/submissions.py), not on every load: the worker's path never needs it.
    review: Mapped[ReviewItem | None] = relationship(back_populates="submission", lazy="raise_on_sql")


class Verdict(Base):
    """The decision on one submission, with its provenance. At most one per submission."""

    __tablename__ = "verdicts"
    __table_args__ = (
        sa.CheckConstraint("decision IN ('allow', 'review', 'block')", name="decision_known"),
        # Shadow reports and backtests read one tenant's verdicts of one policy (or all) over a time range.
        sa.Index("ix_verdicts_tenant_policy_created", "tenant_id", "policy_name", "created_at"),
        sa.Index("ix_verdicts_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=lambda: new_id("vrd"))
    submission_id: Mapped[str] = mapped_column(
        sa.ForeignKey("submissions.id", ondelete="CASCADE"), unique=True
    )
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    decision: Mapped[str] = mapped_column(sa.String(16))
    flagged: Mapped[bool] = mapped_column(sa.Boolean)
    # category -> bool, or None where the provider did not judge it.
    categories: Mapped[dict[str, bool | None]] = mapped_column(JSONType)
    # category -> highest score over the submission's texts, or None where not judged.
    category_scores: Mapped[dict[str, float | None]] = mapped_column(JSONType)
    # one entry per text: {"flagged", "categories", "category_scores"}
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    not_judged: Mapped[list[str]] = mapped_column(JSONType)
    provider: Mapped[str] = mapped_column(sa.String(64))
    model: Mapped[str] = mapped_column(sa.String(128))
    policy_name: Mapped[str] = mapped_column(sa.String(64))
    policy_version: Mapped[int] = mapped_column(sa.Integer)
    thresholds: Mapped[dict[str, Any]] = mapped_column(JSONType)
    cached: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    degraded: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    latency_ms: Mapped[int | None] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Each category's own decision under the policy (None before policies were versioned: re-derived from scores).
    category_decisions: Mapped[dict[str, str | None] | None] = mapped_column(JSONType)
    # The term lists that matched: [{"list", "list_version", "category", "decision", "text", "count"}], no words.
    matches: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    # The shadow policy's decision from the same scores, never acted on: {"policy", "policy_version", "decision",
    # "flagged", "category_decisions", "matches"}; `shadow_decision` repeats the decision for the shadow report.
    shadow: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    shadow_decision: Mapped[str | None] = mapped_column(sa.String(16))

    submission: Mapped[Submission] = relationship(back_populates="verdict")


_NOT_NULL_DECISION = sa.text("decision IS NOT NULL")
_NOT_NULL_CONVERSATION = sa.text("conversation_id IS NOT NULL")


class AuditEvent(Base):
    """One append-only record of a state change. Holds digests of content, never content.

    Events form one hash chain per tenant (`chain_id` is the tenant id, or `system` for events of no tenant): `seq`
    counts 1, 2, 3… with no gap, and `hash` covers `prev_hash` and the event's canonical form
    (app/use_cases/audit.py). What the audit API filters on is a real column, indexed together with `seq`, so a
    filtered page is one ordered index range at any table size.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        sa.UniqueConstraint("chain_id", "seq", name="uq_audit_events_chain_seq"),
        sa.Index("ix_audit_events_chain_occurred", "chain_id", "occurred_at"),
        sa.Index("ix_audit_events_chain_action", "chain_id", "action", "seq"),
        sa.Index("ix_audit_events_chain_actor", "chain_id", "actor", "seq"),
        sa.Index("ix_audit_events_chain_subject", "chain_id", "subject_id", "seq"),
        sa.Index("ix_audit_events_chain_decision", "chain_id", "decision", "seq",
                 postgresql_where=_NOT_NULL_DECISION, sqlite_where=_NOT_NULL_DECISION),
        sa.Index("ix_audit_events_chain_conversation", "chain_id", "conversation_id", "seq",
                 postgresql_where=_NOT_NULL_CONVERSATION, sqlite_where=_NOT_NULL_CONVERSATION),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.ForeignKey("tenants.id", ondelete="RESTRICT"))
    chain_id: Mapped[str] = mapped_column(sa.String(40))
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    prev_hash: Mapped[str] = mapped_column(sa.String(64))
    hash: Mapped[str] = mapped_column(sa.String(64))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    action: Mapped[str] = mapped_column(sa.String(64))
    actor: Mapped[str] = mapped_column(sa.String(64))
    subject_type: Mapped[str | None] = mapped_column(sa.String(32))
    subject_id: Mapped[str | None] = mapped_column(sa.String(64))
    request_id: Mapped[str | None] = mapped_column(sa.String(128))
    content_digest: Mapped[str | None] = mapped_column(sa.String(64))
    # Links a model output to the input that produced it (the submission's own ids).
    conversation_id: Mapped[str | None] = mapped_column(sa.String(128))
    turn_id: Mapped[str | None] = mapped_column(sa.String(128))
    decision: Mapped[str | None] = mapped_column(sa.String(16))
    # The flagged categories a decision names; searchable through AuditEventCategory.
    categories: Mapped[list[str] | None] = mapped_column(JSONType)
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class AuditEventCategory(Base):
    """An index of the categories each event names, for the audit API's `category` filter. The event row, which the
    hash chain covers, is the record; this table only finds it."""

    __tablename__ = "audit_event_categories"
    __table_args__ = (
        sa.ForeignKeyConstraint(["chain_id", "seq"], ["audit_events.chain_id", "audit_events.seq"],
                                ondelete="CASCADE"),
    )

    chain_id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    category: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)


class AuditChainHead(Base):
    """The last event of one audit chain. A writer locks this row to append, so concurrent writers of a chain queue
    up instead of forking it, and verification can tell a chain whose newest events were deleted."""

    __tablename__ = "audit_chain_heads"

    chain_id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    hash: Mapped[str] = mapped_column(sa.String(64))
    occurred_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuthFailureWindow(Base):
    """Failed authentications of one window for one subject (a key id, or a client address when the presented id
    names no key), counted here instead of one audit event each; app/use_cases/audit.py turns a closed window into
    one summary event and deletes the row."""

    __tablename__ = "auth_failure_windows"
    __table_args__ = (sa.Index("ix_auth_failure_windows_window_start", "window_start"),)

    chain_id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    subject_type: Mapped[str] = mapped_column(sa.String(16), primary_key=True)  # "api_key" or "client_address"
    subject_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.String(40))
    count: Mapped[int] = mapped_column(sa.Integer)
    first_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_at: Mapped[datetime] = mapped_column(UTCDateTime)


# ---- webhooks ----


class WebhookEndpointStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class WebhookEndpointKind(enum.StrEnum):
    ENDPOINT = "endpoint"
    # The tenant's one signer for per-submission `callback_url`s: no URL of its own, each delivery carries one.
    CALLBACK = "callback"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for its next attempt, due at `next_attempt_at`
    DELIVERING = "delivering"  # claimed by a worker until the claim's lease runs out
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # retries exhausted, or the receiver answered 410; can be redelivered by hand


class WebhookEndpoint(Base):
    """Where a tenant's events go, which ones, and the secret that signs them.

    The secret cannot be hashed (signing with HMAC needs it as issued, `whsec_<base64>`), so it is stored encrypted
    with the server's key (app/secrets_at_rest.py).
    During a rotation the previous secret signs too, until `previous_secret_expires_at`.
    """

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        sa.CheckConstraint("kind IN ('endpoint', 'callback')", name="kind_known"),
        sa.CheckConstraint("status IN ('enabled', 'disabled')", name="status_known"),
        sa.Index("ix_webhook_endpoints_tenant_kind", "tenant_id", "kind"),
        sa.Index("uq_webhook_endpoints_callback_signer", "tenant_id", unique=True,
                 postgresql_where=sa.text("kind = 'callback'"), sqlite_where=sa.text("kind = 'callback'")),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=lambda: new_id("wh"))
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(sa.String(16), default=WebhookEndpointKind.ENDPOINT.value)
    url: Mapped[str | None] = mapped_column(sa.String(2048))
    description: Mapped[str | None] = mapped_column(sa.String(500))
    events: Mapped[list[str]] = mapped_column(JSONType, default=list)
    status: Mapped[str] = mapped_column(sa.String(16), default=WebhookEndpointStatus.ENABLED.value)
    disabled_reason: Mapped[str | None] = mapped_column(sa.String(200))
    # Encrypted at rest (a Fernet token in the column): plaintext only in this process's memory.
    secret: Mapped[str] = mapped_column(EncryptedSecret)
    previous_secret: Mapped[str | None] = mapped_column(EncryptedSecret)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    secret_rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class WebhookDelivery(Base):
    """One event for one endpoint (or one callback URL): the outbox row, written in the transaction that caused it.

    Its id is the `webhook-id` header, the same on every attempt and redelivery, so receivers can deduplicate.
    `payload` is the exact body, serialized once, so every attempt sends the same bytes.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.CheckConstraint("status IN ('pending', 'delivering', 'succeeded', 'dead')", name="status_known"),
        sa.Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at", "id"),
        sa.Index("ix_webhook_deliveries_status_due", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=lambda: new_id("msg"))
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(sa.String(64))
    submission_id: Mapped[str | None] = mapped_column(sa.String(40))
    url: Mapped[str] = mapped_column(sa.String(2048))
    payload: Mapped[str] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(16), default=DeliveryStatus.PENDING.value)
    # Every attempt ever made (numbers the attempt log); `retries` counts automatic retries since the delivery
    # was created or last redelivered by hand, and picks the next delay from the retry schedule.
    attempt_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    retries: Mapped[int] = mapped_column(sa.Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When a task was last sent for it: the sweep sends again only if that task seems lost.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Fencing token: only the holder of the current claim may record the attempt's outcome.
    claim_token: Mapped[str | None] = mapped_column(sa.String(32))
    last_status_code: Mapped[int | None] = mapped_column(sa.Integer)
    last_error: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookDeliveryAttempt(Base):
    """One HTTP attempt of a delivery: status code, latency, error, and a short excerpt of the answer, no more."""

    __tablename__ = "webhook_delivery_attempts"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(sa.Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status_code: Mapped[int | None] = mapped_column(sa.Integer)
    latency_ms: Mapped[int | None] = mapped_column(sa.Integer)
    error: Mapped[str | None] = mapped_column(sa.String(200))
    response_excerpt: Mapped[str | None] = mapped_column(sa.String(256))


# ---- policies ----


class TenantPolicy(Base):
    """A tenant's named policy. Its versions are immutable rows of PolicyVersion; `current_version` is the one new
    verdicts are decided under. Retired, never erased: old verdicts still name it."""

    __tablename__ = "policies"
    __table_args__ = (sa.UniqueConstraint("tenant_id", "name", name="uq_policies_tenant_name"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=lambda: new_id("pol"))
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(64))
    current_version: Mapped[int] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PolicyVersion(Base):
    """One version of a policy, never changed once written: the document as validated, and its digest (applying
    the same document again writes no new version)."""

    __tablename__ = "policy_versions"
    __table_args__ = (sa.UniqueConstraint("policy_id", "version", name="uq_policy_versions_policy_version"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    policy_id: Mapped[str] = mapped_column(sa.ForeignKey("policies.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(sa.Integer)
    document: Mapped[dict[str, Any]] = mapped_column(JSONType)
    digest: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(sa.String(64))


class TermList(Base):
    """A tenant's named blocklist or allowlist: terms and RE2 patterns. `version` counts its changes; a verdict's
    list match names it, and the verdict cache's key carries it."""

    __tablename__ = "term_lists"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "kind", "name", name="uq_term_lists_tenant_kind_name"),
        sa.CheckConstraint("kind IN ('blocklist', 'allowlist')", name="kind_known"),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=lambda: new_id("tl"))
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(sa.String(16))
    name: Mapped[str] = mapped_column(sa.String(64))
    version: Mapped[int] = mapped_column(sa.Integer, default=1)
    description: Mapped[str | None] = mapped_column(sa.String(500))
    terms: Mapped[list[str]] = mapped_column(JSONType, default=list)
    patterns: Mapped[list[str]] = mapped_column(JSONType, default=list)
    digest: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Backtest(Base):
    """A backtest of a candidate policy over a range of stored verdicts, run by a worker when the range is large
    (the small ones are answered at once and not stored)."""

    __tablename__ = "backtests"
    __table_args__ = (
        sa.CheckConstraint("status IN ('queued', 'running', 'completed', 'failed')", name="status_known"),
        sa.Index("ix_backtests_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=lambda: new_id("bt"))
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    policy_name: Mapped[str] = mapped_column(sa.String(64))
    # {"version": n} or {"document": {...}}, the range and which verdicts: what the request asked.
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(sa.String(16), default="queued")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(sa.String(500))
    created_by: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# ---- human review ----


class ReviewStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for a reviewer (also a claim whose time ran out: see app/use_cases/reviews.py)
    CLAIMED = "claimed"  # held by one reviewer until `claim_expires_at`
    DECIDED = "decided"


class ReviewItem(Base):
    """A submission whose verdict said `review`, waiting for (or decided by) a person. Written in the verdict's
    transaction; the machine verdict stays as it was, the human decision sits here (docs/review.md)."""

    __tablename__ = "review_items"
    __table_args__ = (
        sa.CheckConstraint("status IN ('pending', 'claimed', 'decided')", name="status_known"),
        sa.CheckConstraint("decision IS NULL OR decision IN ('allow', 'block')", name="decision_known"),
        sa.CheckConstraint("override_decision IS NULL OR override_decision IN ('allow', 'block')",
                           name="override_decision_known"),
        # The queue's two orders, each one index range per tenant and status.
        sa.Index("ix_review_items_tenant_status_priority", "tenant_id", "status", "priority", "created_at", "id"),
        sa.Index("ix_review_items_tenant_status_created", "tenant_id", "status", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=lambda: new_id("rev"))
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    submission_id: Mapped[str] = mapped_column(sa.ForeignKey("submissions.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(sa.String(16), default=ReviewStatus.PENDING.value)
    # The highest category score of the verdict: the queue's default order, highest first.
    priority: Mapped[float] = mapped_column(sa.Float, default=0.0)
    # Copied from the submission and its verdict, for the queue's filters.
    role: Mapped[str] = mapped_column(sa.String(16))
    conversation_id: Mapped[str | None] = mapped_column(sa.String(128))
    categories: Mapped[list[str]] = mapped_column(JSONType, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(sa.String(40))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decision: Mapped[str | None] = mapped_column(sa.String(16))
    reason: Mapped[str | None] = mapped_column(sa.String(1000))
    # The categories the reviewer says apply, when they differ from the machine's.
    corrected_categories: Mapped[list[str] | None] = mapped_column(JSONType)
    decided_by: Mapped[str | None] = mapped_column(sa.String(40))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # An admin's later override (an appeal): the decision in force from then on.
    override_decision: Mapped[str | None] = mapped_column(sa.String(16))
    override_reason: Mapped[str | None] = mapped_column(sa.String(1000))
    overridden_by: Mapped[str | None] = mapped_column(sa.String(40))
    overridden_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    submission: Mapped[Submission] = relationship(back_populates="review", lazy="raise_on_sql")

    @property
    def final_decision(self) -> str | None:
        return self.override_decision or self.decision

    def status_at(self, now: datetime | None = None) -> str:
        """The status as the queue sees it: a claim whose time ran out is pending again, with no sweep needed."""
        if self.status == ReviewStatus.CLAIMED.value and (
                self.claim_expires_at is None or self.claim_expires_at <= (now or utcnow())):
            return ReviewStatus.PENDING.value
        return self.status


class ReviewItemCategory(Base):
    """An index of the categories each review item was flagged for, for the queue's `category` filter."""

    __tablename__ = "review_item_categories"
    __table_args__ = (sa.Index("ix_review_item_categories_tenant_category", "tenant_id", "category"),)

    review_id: Mapped[str] = mapped_column(sa.ForeignKey("review_items.id", ondelete="CASCADE"), primary_key=True)
    category: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))


class ConsoleSession(Base):
    """A reviewer signed in to the console. The browser holds only a random token; the row keeps its SHA-256
    digest, the key it stands for (checked again on every request) and the CSRF token of the session's forms."""

    __tablename__ = "console_sessions"
    __table_args__ = (sa.Index("ix_console_sessions_expires_at", "expires_at"),)

    token_hash: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    api_key_id: Mapped[str] = mapped_column(sa.ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
