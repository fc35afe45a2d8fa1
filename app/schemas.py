"""Request and response schemas of the HTTP API (pydantic v2). They validate what comes in and shape what goes out.

Limits that operators configure (text length, texts per submission, metadata size) come in through the validation
context as `Limits`, so one schema serves every deployment.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from app.moderation.taxonomy import CATEGORIES

if TYPE_CHECKING:
    from app.models import Submission, Verdict


@dataclass(frozen=True)
class Limits:
    max_text_chars: int
    max_texts_per_submission: int
    max_items_per_request: int
    max_metadata_bytes: int
    max_metadata_depth: int = 5


def _limits(info: ValidationInfo) -> Limits:
    limits = (info.context or {}).get("limits")
    if not isinstance(limits, Limits):
        raise RuntimeError("schemas need Limits in the validation context")
    return limits


def _text_or_texts(value: Any) -> Any:
    # `input` may be one text or a list of texts; inside Verdict it is always a list.
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a string or a list of strings")
    return value


Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SubmissionIn(_Strict):
    input: Annotated[
        list[str], BeforeValidator(_text_or_texts, json_schema_input_type=str | list[str])
    ] = Field(description="The text to moderate, or a list of texts.")
    role: Literal["input", "output"] = Field(
        default="input", description="`input`: what a user typed; `output`: what a model answered."
    )
    conversation_id: Identifier | None = None
    turn_id: Identifier | None = None
    metadata: dict[str, Any] | None = Field(default=None, description="Small JSON object returned as given.")
    policy: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "default"
    model: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    mask: bool | None = Field(
        default=None, description="Replace personal data (e-mail, phone, card, IP, IBAN…) with placeholders before "
        "the text is stored or sent to a provider. Unset: the tenant's default.",
    )
    callback_url: Annotated[str, StringConstraints(max_length=2048)] | None = None

    @field_validator("input")
    @classmethod
    def _check_texts(cls, texts: list[str], info: ValidationInfo) -> list[str]:
        limits = _limits(info)
        if not texts:
            raise ValueError("must contain at least one text")
        if len(texts) > limits.max_texts_per_submission:
            raise ValueError(f"at most {limits.max_texts_per_submission} texts per submission")
        for text in texts:
            if not text.strip():
                raise ValueError("texts must not be empty")
            if len(text) > limits.max_text_chars:
                raise ValueError(f"each text may be at most {limits.max_text_chars} characters")
        return texts

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, metadata: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if metadata is None:
            return None
        limits = _limits(info)
        if _depth(metadata) > limits.max_metadata_depth:
            raise ValueError(f"may be nested at most {limits.max_metadata_depth} levels deep")
        if len(json.dumps(metadata, separators=(",", ":")).encode()) > limits.max_metadata_bytes:
            raise ValueError(f"may be at most {limits.max_metadata_bytes} bytes as JSON")
        return metadata

    @field_validator("callback_url")
    @classmethod
    def _check_callback_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        return url


class SubmissionBatchIn(_Strict):
    items: list[SubmissionIn]

    @field_validator("items")
    @classmethod
    def _check_items(cls, items: list[SubmissionIn], info: ValidationInfo) -> list[SubmissionIn]:
        limits = _limits(info)
        if not items:
            raise ValueError("must contain at least one submission")
        if len(items) > limits.max_items_per_request:
            raise ValueError(f"at most {limits.max_items_per_request} submissions per request")
        return items


def _depth(value: Any) -> int:
    # Iterative, so a hostile body nested hundreds of levels deep is refused, not a RecursionError (500).
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
        deepest = max(deepest, depth)
    return deepest


class SubmissionListQuery(_Strict):
    model_config = ConfigDict(extra="forbid", strict=False)

    status: Literal["queued", "processing", "completed", "failed"] | None = None
    decision: Literal["allow", "review", "block"] | None = None
    role: Literal["input", "output"] | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: Annotated[str, StringConstraints(max_length=200)] | None = None


class SubmissionGetQuery(_Strict):
    model_config = ConfigDict(extra="forbid", strict=False)

    wait: float = Field(default=0, ge=0, le=30, description="Long-poll: wait up to this many seconds for a verdict.")


# ---- audit trail -----------------------------------------------------------------------------------------------

AuditTerm = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]


def _iso_8601_only(value: Any) -> Any:
    # pydantic would also read a number (or a numeric string) as Unix seconds; the API, and its OpenAPI document,
    # say ISO 8601 (found by the fuzzer's negative-data check: `?start=0.5` was accepted).
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        raise ValueError("must be an ISO 8601 time with a zone, such as 2026-01-31T00:00:00Z")
    return value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
IsoDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_8601_only)]


class AuditRangeQuery(_Strict):
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


class AuditVerifyQuery(_Strict):
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


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: Any = None


class ModerationRequest(BaseModel):
    """OpenAI's moderation request. Unknown fields are ignored, as OpenAI's own API does."""

    model_config = ConfigDict(extra="ignore", strict=True)

    input: str | list[str] | list[TextPart | ImagePart]
    model: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None


# ---- responses -------------------------------------------------------------------------------------------------

Scores = dict[str, float | None]
Flags = dict[str, bool | None]


class VerdictOut(BaseModel):
    decision: Literal["allow", "review", "block"]
    flagged: bool
    categories: Flags
    category_scores: Scores
    not_judged: list[str] = Field(description="Categories the provider did not judge (never reported as zero).")
    results: list[dict[str, Any]] = Field(description="Per text, in the order submitted.")
    provider: str
    model: str
    policy: str
    policy_version: int
    thresholds: dict[str, Any]
    cached: bool
    degraded: bool
    latency_ms: int | None
    decided_at: datetime


class SubmissionError(BaseModel):
    code: str
    message: str


class SubmissionOut(BaseModel):
    id: str
    object: Literal["submission"] = "submission"
    status: Literal["queued", "processing", "completed", "failed"]
    role: Literal["input", "output"]
    text_count: int
    conversation_id: str | None
    turn_id: str | None
    metadata: dict[str, Any] | None
    policy: str
    model: str | None
    created_at: datetime
    completed_at: datetime | None
    erased_at: datetime | None = Field(
        default=None, description="When the content, metadata and per-text results were erased (a tombstone).")
    verdict: VerdictOut | None
    error: SubmissionError | None
    links: dict[str, str]


def submission_out(submission: Submission, verdict: Verdict | None) -> SubmissionOut:
    """A stored submission as the API shows it and webhook payloads carry it: one function for both, so a receiver
    gets exactly what `GET /v1/submissions/{id}` returns. Never the text."""
    return SubmissionOut(
        id=submission.id,
        status=submission.status,
        role=submission.role,
        text_count=submission.text_count,
        conversation_id=submission.conversation_id,
        turn_id=submission.turn_id,
        metadata=submission.client_metadata,
        policy=submission.policy_name,
        model=submission.model,
        created_at=submission.created_at,
        completed_at=submission.completed_at,
        erased_at=submission.erased_at,
        verdict=None if verdict is None else VerdictOut(
            decision=verdict.decision,
            flagged=verdict.flagged,
            categories=verdict.categories,
            category_scores=verdict.category_scores,
            not_judged=verdict.not_judged,
            results=verdict.results,
            provider=verdict.provider,
            model=verdict.model,
            policy=verdict.policy_name,
            policy_version=verdict.policy_version,
            thresholds=verdict.thresholds,
            cached=verdict.cached,
            degraded=verdict.degraded,
            latency_ms=verdict.latency_ms,
            decided_at=verdict.created_at,
        ),
        error=None if submission.error_code is None else SubmissionError(
            code=submission.error_code, message=submission.error_message or ""),
        links={"self": f"/v1/submissions/{submission.id}"},
    )


class SubmissionAccepted(BaseModel):
    id: str
    object: Literal["submission"] = "submission"
    status: Literal["queued"] = "queued"
    links: dict[str, str]


class SubmissionBatchAccepted(BaseModel):
    object: Literal["list"] = "list"
    data: list[SubmissionAccepted]


class SubmissionPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[SubmissionOut]
    has_more: bool
    next_cursor: str | None


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


class ModerationResultOut(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]
    # Verdict's additions; OpenAI clients ignore unknown fields.
    decision: Literal["allow", "review", "block"]
    not_judged: list[str]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResultOut]


def openai_result(
    flagged: bool, decision: Literal["allow", "review", "block"], categories: Flags, scores: Scores,
    not_judged: list[str],
) -> ModerationResultOut:
    # OpenAI's shape has no "not judged": such categories read false / 0.0 there, and `not_judged` says which.
    return ModerationResultOut(
        flagged=flagged,
        categories={c: bool(categories.get(c)) for c in CATEGORIES},
        category_scores={c: float(scores.get(c) or 0.0) for c in CATEGORIES},
        category_applied_input_types={c: ([] if c in not_judged else ["text"]) for c in CATEGORIES},
        decision=decision,
        not_judged=not_judged,
    )


# ---- errors, health, models ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str = Field(description="The kind of error: `invalid_request_error`, `authentication_error`, "
                      "`permission_error`, `not_found_error`, `conflict_error`, `request_too_large`, "
                      "`rate_limit_error`, `api_error`, `service_unavailable`.")
    message: str = Field(description="For people: what went wrong, naming the field where there is one.")
    param: str | None = Field(description="The offending field, query parameter or header (`items[3].input`).")
    code: str = Field(description="For programs: a stable code (`missing_scope`, `text_too_long`, …).")


class ErrorResponse(BaseModel):
    """Every error of the API has this one shape."""

    error: ErrorDetail


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessOut(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, Literal["ok"]]


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str
    provider: str
    judged_categories: list[str]
    not_judged_categories: list[str]
    max_batch: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
