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

    tenant: Mapped[Tenant] = relationship(lazy="joined")


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
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=lambda: new_id("sub"))
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    api_key_id: Mapped[str | None] = mapped_column(sa.String(40))
    source: Mapped[str] = mapped_column(sa.String(16), default="async")
    role: Mapped[str] = mapped_column(sa.String(16), default=Role.INPUT.value)
    status: Mapped[str] = mapped_column(sa.String(16), default=SubmissionStatus.QUEUED.value)
    # The texts to moderate; None once erased.
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
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Fencing token: only the holder of the current claim may record the verdict.
    claim_token: Mapped[str | None] = mapped_column(sa.String(32))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error_message: Mapped[str | None] = mapped_column(sa.String(500))

    verdict: Mapped[Verdict | None] = relationship(back_populates="submission", lazy="selectin")


class Verdict(Base):
    """The decision on one submission, with its provenance. At most one per submission."""

    __tablename__ = "verdicts"
    __table_args__ = (sa.CheckConstraint("decision IN ('allow', 'review', 'block')", name="decision_known"),)

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

    submission: Mapped[Submission] = relationship(back_populates="verdict")


class AuditEvent(Base):
    """One append-only record of a state change. Holds digests of content, never content."""

    __tablename__ = "audit_events"
    __table_args__ = (sa.Index("ix_audit_events_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.ForeignKey("tenants.id", ondelete="RESTRICT"))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    action: Mapped[str] = mapped_column(sa.String(64))
    actor: Mapped[str] = mapped_column(sa.String(64))
    subject_type: Mapped[str | None] = mapped_column(sa.String(32))
    subject_id: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    request_id: Mapped[str | None] = mapped_column(sa.String(128))
    content_digest: Mapped[str | None] = mapped_column(sa.String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
