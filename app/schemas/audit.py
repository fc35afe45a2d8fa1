"""Schemas of `/v1/audit`: the query, export and verification parameters, and the events as the chain hashes them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from app.moderation.taxonomy import CATEGORIES
from app.schemas.common import IsoDatetime, Strict

AuditTerm = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]


class AuditRangeQuery(Strict):
    model_config = ConfigDict(extra="forbid", strict=False)

    start: IsoDatetime | None = Field(default=None, description="ISO 8601 with a zone (`…Z`); inclusive.")
    end: IsoDatetime | None = Field(default=None, description="ISO 8601 with a zone; exclusive.")

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("start")
        if end is not None and start is not None and end <= start:
            raise ValueError("must be after start")
        return end


class AuditQuery(AuditRangeQuery):
    action: AuditTerm | None = None
    actor: AuditTerm | None = Field(default=None, description="A key id, `worker`, `system` or `anonymous`.")
    subject: AuditTerm | None = Field(default=None, description="The subject's id (`sub_…`, `key_…`, `ten_…`).")
    decision: Literal["allow", "review", "block"] | None = None
    category: AuditTerm | None = None
    conversation_id: AuditTerm | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: Annotated[str, StringConstraints(max_length=200)] | None = None

    @field_validator("category")
    @classmethod
    def _known_category(cls, category: str | None) -> str | None:
        if category is not None and category not in CATEGORIES:
            raise ValueError(f"must be one of {', '.join(CATEGORIES)}")
        return category


class AuditExportQuery(AuditRangeQuery):
    format: Literal["ndjson", "csv"] = "ndjson"


class AuditVerifyQuery(Strict):
    model_config = ConfigDict(extra="forbid", strict=False)

    # At most PostgreSQL's bigint: a larger number could only fail in the database (found by the API fuzzer).
    start_seq: int | None = Field(default=None, ge=1, le=2**63 - 1)
    end_seq: int | None = Field(default=None, ge=1, le=2**63 - 1)

    @field_validator("end_seq")
    @classmethod
    def _not_before_start(cls, end_seq: int | None, info: ValidationInfo) -> int | None:
        start_seq = info.data.get("start_seq")
        if end_seq is not None and start_seq is not None and end_seq < start_seq:
            raise ValueError("must not be below start_seq")
        return end_seq


# ---- responses -------------------------------------------------------------------------------------------------


class AuditEventOut(BaseModel):
    """An audit event as the chain hashes it (see app/use_cases/audit.py), plus its hash."""

    object: Literal["audit_event"] = "audit_event"
    v: int
    chain: str
    tenant_id: str | None
    seq: int
    prev_hash: str
    hash: str
    occurred_at: str
    action: str
    actor: str
    subject_type: str | None
    subject_id: str | None
    request_id: str | None
    content_digest: str | None
    conversation_id: str | None
    turn_id: str | None
    decision: str | None
    categories: list[str] | None
    details: dict[str, Any]


class AuditPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEventOut]
    has_more: bool
    next_cursor: str | None


class ChainBreakOut(BaseModel):
    seq: int | None
    code: str
    reason: str


class AuditVerificationOut(BaseModel):
    object: Literal["audit_verification"] = "audit_verification"
    ok: bool
    chain: str
    count: int = Field(description="Events checked (up to the first broken one).")
    first_seq: int | None
    last_seq: int | None
    head_hash: str | None = Field(description="The hash of the last event checked; anchor it somewhere else.")
    broken: ChainBreakOut | None
    notes: list[str]


