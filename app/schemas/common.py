"""What the schemas share: the operator's limits (passed in the validation context), strict models, and the
field types several resources use."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, StringConstraints, ValidationInfo


@dataclass(frozen=True)
class Limits:
    max_text_chars: int
    max_texts_per_submission: int
    max_items_per_request: int
    max_metadata_bytes: int
    max_metadata_depth: int = 5


def limits_of(info: ValidationInfo) -> Limits:
    """The operator's limits, which a schema that needs them reads from the validation context."""
    limits = (info.context or {}).get("limits")
    if not isinstance(limits, Limits):
        raise RuntimeError("schemas need Limits in the validation context")
    return limits


class Strict(BaseModel):
    """A request schema: unknown fields refused, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True)


Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]


def _iso_8601_only(value: Any) -> Any:
    # pydantic would also read a number (or a numeric string) as Unix seconds; the API, and its OpenAPI document,
    # say ISO 8601 (found by the fuzzer's negative-data check: `?start=0.5` was accepted).
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        raise ValueError("must be an ISO 8601 time with a zone, such as 2026-01-31T00:00:00Z")
    return value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
IsoDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_8601_only)]

Scores = dict[str, float | None]
Flags = dict[str, bool | None]
