"""Schemas of `/v1/submissions`, and `submission_out`: a stored submission as the API shows it and webhook payloads
carry it."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from app.schemas.common import Flags, Identifier, Scores, Strict, limits_of

if TYPE_CHECKING:
    from app.models import ReviewItem, Submission, Verdict


def _text_or_texts(value: Any) -> Any:
    # `input` may be one text or a list of texts; inside Verdict it is always a list.
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a string or a list of strings")
    return value


class SubmissionIn(Strict):
    input: Annotated[
        list[str], BeforeValidator(_text_or_texts, json_schema_input_type=str | list[str])
    ] = Field(description="The text to moderate, or a list of texts.")
    role: Literal["input", "output"] = Field(
        default="input", description="`input`: what a user typed; `output`: what a model answered."
    )
    conversation_id: Identifier | None = None
    turn_id: Identifier | None = None
    metadata: dict[str, Any] | None = Field(default=None, description="Small JSON object returned as given.")
    policy: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None, description="The policy to decide under (`default`, or one of the tenant's). Unset: the "
        "tenant's default policy.")
    model: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    mask: bool | None = Field(
        default=None, description="Replace personal data (e-mail, phone, card, IP, IBAN…) with placeholders before "
        "the text is stored or sent to a provider. Unset: the tenant's default.",
    )
    callback_url: Annotated[str, StringConstraints(max_length=2048)] | None = None

    @field_validator("input")
    @classmethod
    def _check_texts(cls, texts: list[str], info: ValidationInfo) -> list[str]:
        limits = limits_of(info)
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
        limits = limits_of(info)
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


class SubmissionBatchIn(Strict):
    items: list[SubmissionIn]

    @field_validator("items")
    @classmethod
    def _check_items(cls, items: list[SubmissionIn], info: ValidationInfo) -> list[SubmissionIn]:
        limits = limits_of(info)
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


class SubmissionListQuery(Strict):
    model_config = ConfigDict(extra="forbid", strict=False)

    status: Literal["queued", "processing", "completed", "failed"] | None = None
    decision: Literal["allow", "review", "block"] | None = None
    role: Literal["input", "output"] | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: Annotated[str, StringConstraints(max_length=200)] | None = None


class SubmissionGetQuery(Strict):
    model_config = ConfigDict(extra="forbid", strict=False)

    wait: float = Field(default=0, ge=0, le=30, description="Long-poll: wait up to this many seconds for a verdict.")


# ---- responses -------------------------------------------------------------------------------------------------


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
    thresholds: dict[str, Any] = Field(description="The thresholds applied, for the submission's role "
                                       "(`null`: the category is switched off).")
    category_decisions: dict[str, Literal["allow", "review", "block"] | None] | None = Field(
        default=None, description="Each category's own decision (null: not judged and no list match).")
    matches: list[dict[str, Any]] = Field(default_factory=list, description=(
        "Term lists that matched: `list`, `list_version`, `category`, `decision`, `text` (its index), `count`. "
        "Never the matched words."))
    shadow: dict[str, Any] | None = Field(default=None, description=(
        "The shadow policy's decision from the same scores, never acted on: `policy`, `policy_version`, "
        "`decision`, `flagged`, `category_decisions`, `matches`."))
    cached: bool
    degraded: bool
    latency_ms: int | None
    decided_at: datetime


class SubmissionError(BaseModel):
    code: str
    message: str


class ReviewOverrideOut(BaseModel):
    decision: Literal["allow", "block"]
    reason: str | None = Field(description="None once the submission was erased.")
    overridden_by: str = Field(description="The admin key's id.")
    overridden_at: datetime


class SubmissionReview(BaseModel):
    """The human side of a reviewed submission: the queue item's state and, once decided, the decision."""

    id: str
    status: Literal["pending", "claimed", "decided"]
    decision: Literal["allow", "block"] | None
    reason: str | None = Field(description="The reviewer's reason; None until decided, and once erased.")
    categories: list[str] | None = Field(
        description="The categories the reviewer says apply, where they corrected the machine's; else None.")
    decided_by: str | None = Field(description="The reviewer's key id.")
    decided_at: datetime | None
    override: ReviewOverrideOut | None = Field(
        default=None, description="An admin's later override, which is then the final decision.")
    links: dict[str, str]


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
    review: SubmissionReview | None = Field(
        default=None, description="Set when the verdict decided `review`: the human review of the submission.")
    final_decision: Literal["allow", "block"] | None = Field(
        default=None, description="The decision in force: the verdict's `allow` or `block`, or for a `review` "
        "verdict the reviewer's decision (an admin's override, if any); None while it waits for a reviewer.")
    error: SubmissionError | None
    links: dict[str, str]


def submission_out(submission: Submission, verdict: Verdict | None, review: ReviewItem | None = None) -> SubmissionOut:
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
            category_decisions=verdict.category_decisions,
            matches=verdict.matches or [],
            shadow=verdict.shadow,
            cached=verdict.cached,
            degraded=verdict.degraded,
            latency_ms=verdict.latency_ms,
            decided_at=verdict.created_at,
        ),
        review=None if review is None else review_summary(review),
        final_decision=final_decision(verdict, review),
        error=None if submission.error_code is None else SubmissionError(
            code=submission.error_code, message=submission.error_message or ""),
        links={"self": f"/v1/submissions/{submission.id}"},
    )


def final_decision(verdict: Verdict | None, review: ReviewItem | None) -> Literal["allow", "block"] | None:
    if review is not None:
        return review.final_decision  # type: ignore[return-value]
    if verdict is None or verdict.decision not in ("allow", "block"):
        return None  # no verdict yet, or a `review` verdict stored before human review existed
    return verdict.decision  # type: ignore[return-value]


def review_summary(review: ReviewItem) -> SubmissionReview:
    return SubmissionReview(
        id=review.id, status=review.status_at(), decision=review.decision, reason=review.reason,
        categories=review.corrected_categories, decided_by=review.decided_by, decided_at=review.decided_at,
        override=None if review.override_decision is None else ReviewOverrideOut(
            decision=review.override_decision, reason=review.override_reason,
            overridden_by=review.overridden_by or "", overridden_at=review.overridden_at or review.decided_at),
        links={"self": f"/v1/reviews/{review.id}"},
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


