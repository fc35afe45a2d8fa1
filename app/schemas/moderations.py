"""Schemas of the OpenAI-compatible `/v1/moderations` (OpenAI's request and response shapes) and `/v1/models`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints

from app.moderation.taxonomy import CATEGORIES
from app.schemas.common import Flags, Scores, Strict


class TextPart(Strict):
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
