"""Schemas of `/v1/reviews`: the queue's filters, claims, decisions and overrides; the items as listed (no text) and
as read by a reviewer (with the text and the conversation's other turns); the queue's figures."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from app.moderation.taxonomy import CATEGORIES
from app.schemas.common import Identifier, IsoDatetime, Strict
from app.schemas.submissions import SubmissionOut

ReviewStatusName = Literal["pending", "claimed", "decided"]
Category = Literal[
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent", "self-harm",
    "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence", "violence/graphic",
]
ReviewOrder = Literal["priority", "age"]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=1000)]

assert set(Category.__args__) == set(CATEGORIES)  # type: ignore[attr-defined]


class ReviewListQuery(Strict):
    model_config = ConfigDict(extra="forbid", strict=False)

    status: ReviewStatusName | None = Field(default=None, description="A claim that ran out counts as `pending`.")
    category: Category | None = Field(default=None, description="Items flagged for this category.")
    role: Literal["input", "output"] | None = None
    conversation_id: Identifier | None = None
    created_after: IsoDatetime | None = Field(default=None, strict=False)
    created_before: IsoDatetime | None = Field(default=None, strict=False)
    order: ReviewOrder = Field(
        default="priority", description="`priority`: highest score first, then oldest; `age`: oldest first.")
    limit: int = Field(default=20, ge=1, le=100)
    cursor: Annotated[str, StringConstraints(max_length=300)] | None = None


class ReviewStatsQuery(Strict):
    model_config = ConfigDict(extra="forbid", strict=False)

    window: int = Field(default=86_400, ge=60, le=90 * 86_400,
                        description="Seconds back over which time to decision is measured.")


class ClaimNextIn(Strict):
    """Which item to claim next: the first pending one in `order` under these filters (all optional)."""

    category: Category | None = None
    role: Literal["input", "output"] | None = None
    conversation_id: Identifier | None = None
    order: ReviewOrder = "priority"


class ReviewDecisionIn(Strict):
    decision: Literal["allow", "block"]
    reason: Reason = Field(description="Why, in the reviewer's words (required; kept on the item, digested in the "
                                       "audit trail).")
    categories: list[Category] | None = Field(
        default=None, max_length=len(CATEGORIES),
        description="The categories that apply, if the machine's were wrong (an empty list: none applies).")

    @field_validator("reason")
    @classmethod
    def _not_blank(cls, reason: str) -> str:
        if not reason.strip():
            raise ValueError("must not be blank")
        return reason.strip()


class ReviewOverrideIn(ReviewDecisionIn):
    """An admin's override of a decided item: the same fields as a decision."""


# ---- responses -------------------------------------------------------------------------------------------------


class ReviewItemOut(BaseModel):
    id: str
    object: Literal["review"] = "review"
    status: ReviewStatusName
    submission_id: str
    priority: float = Field(description="The verdict's highest category score.")
    role: Literal["input", "output"]
    conversation_id: str | None
    categories: list[str] = Field(description="The categories the machine flagged.")
    created_at: datetime
    claimed_by: str | None = Field(description="The key id of the reviewer holding a live claim.")
    claim_expires_at: datetime | None
    decision: Literal["allow", "block"] | None
    reason: str | None
    corrected_categories: list[str] | None
    decided_by: str | None
    decided_at: datetime | None
    override_decision: Literal["allow", "block"] | None
    override_reason: str | None
    overridden_by: str | None
    overridden_at: datetime | None
    final_decision: Literal["allow", "block"] | None
    links: dict[str, str]


class ContextTurnOut(BaseModel):
    submission_id: str
    role: Literal["input", "output"]
    turn_id: str | None
    created_at: datetime
    text: list[str] | None = Field(description="None once erased.")
    decision: Literal["allow", "review", "block"] | None
    led_to_this: bool = Field(description="The input this output answers (same conversation and turn).")


class ReviewDetailOut(ReviewItemOut):
    text: list[str] | None = Field(
        description="The submission's texts (masked, if it was masked); None once erased. Each read is audited.")
    submission: SubmissionOut
    context: list[ContextTurnOut] = Field(
        description="The conversation's other submissions, oldest first (up to 20 before this one, 5 after).")


class ReviewCounts(BaseModel):
    pending: int
    claimed: int
    decided: int


class ReviewPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[ReviewItemOut]
    has_more: bool
    next_cursor: str | None
    counts: ReviewCounts = Field(description="Items per status under the other filters.")


class TimeToDecision(BaseModel):
    mean: float | None
    p50: float | None
    p90: float | None
    max: float | None


class ReviewStatsOut(BaseModel):
    object: Literal["review_stats"] = "review_stats"
    counts: ReviewCounts = Field(description="Queue depth: items per status now.")
    oldest_pending_at: datetime | None
    oldest_pending_age_seconds: float | None
    window_seconds: int
    decided_in_window: int
    time_to_decision_seconds: TimeToDecision = Field(
        description="From the `review` verdict to the human decision, over the window's decisions.")
