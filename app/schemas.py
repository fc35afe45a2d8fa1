"""Request and response schemas of the HTTP API (pydantic v2). They validate what comes in and shape what goes out.

Limits that operators configure (text length, texts per submission, metadata size) come in through the validation
context as `Limits`, so one schema serves every deployment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from app.moderation.taxonomy import CATEGORIES


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
    mask: bool = False
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
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


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
    verdict: VerdictOut | None
    error: SubmissionError | None
    links: dict[str, str]


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
