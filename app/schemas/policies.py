"""Schemas of `/v1/policies`, `/v1/blocklists`, `/v1/allowlists`, `/v1/default-policy` and `/v1/backtests`: the
policy document (validated strictly: every refusal names its field), term lists, shadow reports and backtests.
See docs/moderation.md ("Policies")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from app.moderation.taxonomy import CATEGORIES
from app.schemas.common import IsoDatetime, Strict

# Lower-case letters, digits, `.`, `_`, `-`; 1 to 64 characters, starting with a letter or digit.
PolicyName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
ListName = PolicyName
Score = Annotated[float, Field(ge=0, le=1)]
Role = Literal["input", "output"]
_BOTH_ROLES: tuple[Role, ...] = ("input", "output")


def _known_category(value: str) -> str:
    if value not in CATEGORIES:
        raise ValueError(f"unknown category {value[:64]!r}; the categories are {', '.join(CATEGORIES)}")
    return value


Category = Annotated[str, AfterValidator(_known_category), Field(json_schema_extra={"enum": list(CATEGORIES)})]


class ThresholdIn(Strict):
    """A category's thresholds: `review` at or above one score, `block` at or above another (unset: never);
    `enabled: false` switches the category off (never acted on)."""

    review: Score | None = None
    block: Score | None = None
    enabled: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdIn:
        if self.review is not None and self.block is not None and self.review > self.block:
            raise ValueError(f"review ({self.review}) must not be above block ({self.block})")
        if self.enabled and self.review is None and self.block is None:
            raise ValueError("give review, block, or both (or enabled: false to switch the category off)")
        return self


_T = ThresholdIn | None


class CategoryThresholds(Strict):
    """Thresholds per category; a category left out follows the policy's `defaults` (or the built-in policy)."""

    harassment: _T = None
    harassment_threatening: _T = Field(default=None, alias="harassment/threatening")
    hate: _T = None
    hate_threatening: _T = Field(default=None, alias="hate/threatening")
    illicit: _T = None
    illicit_violent: _T = Field(default=None, alias="illicit/violent")
    self_harm: _T = Field(default=None, alias="self-harm")
    self_harm_intent: _T = Field(default=None, alias="self-harm/intent")
    self_harm_instructions: _T = Field(default=None, alias="self-harm/instructions")
    sexual: _T = None
    sexual_minors: _T = Field(default=None, alias="sexual/minors")
    violence: _T = None
    violence_graphic: _T = Field(default=None, alias="violence/graphic")

    def named(self) -> dict[str, ThresholdIn]:
        """The categories given, by their canonical names."""
        dumped = self.model_dump(by_alias=True, exclude_none=True)
        return {c: getattr(self, _field_of(c)) for c in CATEGORIES if c in dumped}


def _field_of(category: str) -> str:
    return category.replace("/", "_").replace("-", "_")


class BlocklistRule(Strict):
    """A match of the term list `list` decides `category` as `decision` (for the roles given)."""

    list_name: ListName = Field(alias="list", description="A blocklist's name (`PUT /v1/blocklists/{name}`).")
    category: Category
    decision: Literal["review", "block"] = "block"
    roles: list[Role] = Field(default_factory=lambda: list(_BOTH_ROLES), min_length=1, max_length=2)


class AllowlistRule(Strict):
    """The terms of `list` are exempt from `categories`: they never count as a blocklist match there, and a text
    that holds one is decided at most `max_decision` in those categories."""

    list_name: ListName = Field(alias="list", description="An allowlist's name (`PUT /v1/allowlists/{name}`).")
    categories: list[Category] = Field(min_length=1, max_length=len(CATEGORIES))
    max_decision: Literal["allow", "review"] = "review"


class PolicyDocument(Strict):
    """A tenant's policy. Thresholds for a role and category come from, in order: `input`/`output`, then
    `categories` (both roles), then `defaults`, then the built-in `default` policy."""

    name: PolicyName
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    defaults: ThresholdIn | None = Field(default=None, description="For every category the policy does not name.")
    categories: CategoryThresholds | None = Field(default=None, description="Both roles.")
    input: CategoryThresholds | None = Field(default=None, description="What users type.")
    output: CategoryThresholds | None = Field(default=None, description="What models answer.")
    blocklists: list[BlocklistRule] = Field(default_factory=list, max_length=20)
    allowlists: list[AllowlistRule] = Field(default_factory=list, max_length=20)
    shadow: PolicyName | None = Field(default=None, description="Another policy decided beside this one, never "
                                      "acted on (`GET /v1/policies/{name}/shadow-report`).")

    def canonical(self) -> dict[str, Any]:
        """The stored form: JSON, categories by their canonical names, unset parts left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True) | {
            "name": self.name}


# ---- term lists ------------------------------------------------------------------------------------------------

Term = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Pattern = Annotated[str, StringConstraints(min_length=1, max_length=500)]


class TermListIn(Strict):
    terms: list[Term] = Field(default_factory=list, max_length=1000, description=(
        "Words or phrases, matched case-insensitively on word boundaries after Unicode normalisation."))
    patterns: list[Pattern] = Field(default_factory=list, max_length=100, description=(
        "RE2 regular expressions (linear time; no backreferences or lookarounds), matched on the normalised text."))
    description: Annotated[str, StringConstraints(max_length=500)] | None = None


class TermListOut(BaseModel):
    object: Literal["blocklist", "allowlist"]
    name: str
    version: int = Field(description="1, 2, 3…: raised by every change; a verdict's match names it.")
    description: str | None
    terms: list[str]
    patterns: list[str]
    created_at: datetime
    updated_at: datetime
    links: dict[str, str]


class TermListList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TermListOut]
    has_more: bool = False


# ---- policies out ----------------------------------------------------------------------------------------------


class PolicyOut(BaseModel):
    object: Literal["policy"] = "policy"
    name: str
    version: int = Field(description="The current version (also the `ETag`).")
    builtin: bool = Field(description="The built-in `default` policy: read-only, for every tenant.")
    description: str | None
    document: dict[str, Any]
    created_at: datetime | None
    updated_at: datetime | None
    retired_at: datetime | None
    links: dict[str, str]


class PolicyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PolicyOut]
    has_more: bool = False


class PolicyVersionOut(BaseModel):
    object: Literal["policy_version"] = "policy_version"
    name: str
    version: int
    document: dict[str, Any]
    created_at: datetime | None
    created_by: str | None


class PolicyVersionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PolicyVersionOut]
    has_more: bool = False


class DefaultPolicyIn(Strict):
    policy: PolicyName | None = Field(description="The policy for submissions that name none; null: `default`.")


class DefaultPolicyOut(BaseModel):
    object: Literal["default_policy"] = "default_policy"
    policy: str


# ---- shadow reports and backtests ------------------------------------------------------------------------------

DecisionName = Literal["allow", "review", "block"]
Matrix = dict[str, dict[str, int]]


class ShadowReportQuery(Strict):
    model_config = ConfigDict(extra="forbid", strict=False)

    start: IsoDatetime | None = Field(default=None, description="From this time (ISO 8601 with a zone).")
    end: IsoDatetime | None = Field(default=None, description="Until this time, exclusive.")


class Comparison(BaseModel):
    """Two deciders compared over the same verdicts: rows are the decision made, columns the other's."""

    total: int
    agreed: int
    agreement_rate: float | None = Field(description="agreed / total; null when there were none.")
    matrix: Matrix = Field(description="matrix[made][other]: how many verdicts (allow, review, block each).")
    by_category: dict[str, Matrix] = Field(description="The same matrix for each category's own decision.")


class ShadowReportOut(Comparison):
    object: Literal["shadow_report"] = "shadow_report"
    policy: str
    shadow_versions: list[dict[str, Any]] = Field(description="The shadow policies and versions that decided.")
    start: datetime | None
    end: datetime | None


class BacktestIn(Strict):
    document: PolicyDocument | None = Field(default=None, description="A candidate policy (not saved).")
    version: int | None = Field(default=None, ge=1, le=2**31 - 1,
                                description="Or a stored version of this policy.")
    start: IsoDatetime = Field(strict=False, description="Verdicts decided from this time (ISO 8601 with a zone).")
    end: IsoDatetime = Field(strict=False, description="Until this time, exclusive.")
    verdicts: Literal["policy", "tenant"] = Field(
        default="policy", description="`policy`: the verdicts this policy decided; `tenant`: all of the tenant's.")

    @model_validator(mode="after")
    def _one_candidate(self) -> BacktestIn:
        if (self.document is None) == (self.version is None):
            raise ValueError("give a candidate `document` or a `version`, one of them")
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class ReviewedComparison(BaseModel):
    """The candidate against the people: over the verdicts in range that a reviewer decided."""

    total: int = Field(description="Verdicts in range whose review a person decided.")
    agreed: int = Field(description="Of those, how many the candidate decides as the person did.")
    agreement_rate: float | None = Field(description="agreed / total; null when there were none.")
    matrix: Matrix = Field(description="matrix[reviewer][candidate]: rows allow and block (the decision in force, "
                                       "an admin's override if there is one), columns allow, review and block.")


class BacktestResult(Comparison):
    skipped: int = Field(description="Verdicts with no scores to re-decide (fail-open or fail-closed).")
    reviewed: ReviewedComparison | None = Field(
        default=None, description="The candidate against human reviewers' decisions (null in results stored before "
                                  "reviews were compared).")


class BacktestOut(BaseModel):
    id: str | None = Field(description="The job's id (poll `GET /v1/backtests/{id}`); null when answered at once.")
    object: Literal["backtest"] = "backtest"
    policy: str
    candidate: dict[str, Any] = Field(description="The candidate: `{version}` or `{document}`.")
    status: Literal["queued", "running", "completed", "failed"]
    start: datetime
    end: datetime
    verdicts: Literal["policy", "tenant"]
    result: BacktestResult | None
    error: str | None
    created_at: datetime
    completed_at: datetime | None
    links: dict[str, str]
