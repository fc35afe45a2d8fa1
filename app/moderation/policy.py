"""Policy: per-category thresholds that turn a provider's scores into `allow`, `review` or `block` (over several
texts, the strictest decision and each category's highest score). See docs/moderation.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.models import Decision
from app.moderation.providers import ProviderResult
from app.moderation.taxonomy import CATEGORIES


@dataclass(frozen=True)
class Threshold:
    review: float
    block: float


@dataclass(frozen=True)
class Policy:
    name: str
    version: int
    thresholds: dict[str, Threshold]

    def thresholds_json(self) -> dict[str, Any]:
        return {c: {"review": t.review, "block": t.block} for c, t in self.thresholds.items()}


_STRICT = Threshold(review=0.2, block=0.5)
_DEFAULT = Threshold(review=0.5, block=0.8)

# Categories where a missed case costs most get lower thresholds.
DEFAULT_POLICY = Policy(
    name="default",
    version=1,
    thresholds={c: _STRICT if c in {"sexual/minors", "self-harm/intent", "self-harm/instructions"} else _DEFAULT
                for c in CATEGORIES},
)

POLICIES: dict[str, Policy] = {DEFAULT_POLICY.name: DEFAULT_POLICY}


def get_policy(name: str) -> Policy | None:
    return POLICIES.get(name)


@dataclass(frozen=True)
class Assessment:
    decision: Decision
    flagged: bool
    categories: dict[str, bool | None]
    category_scores: dict[str, float | None]
    results: list[dict[str, Any]]
    not_judged: list[str]


_SEVERITY = {Decision.ALLOW: 0, Decision.REVIEW: 1, Decision.BLOCK: 2}


def _decide(score: float, threshold: Threshold) -> Decision:
    if score >= threshold.block:
        return Decision.BLOCK
    if score >= threshold.review:
        return Decision.REVIEW
    return Decision.ALLOW


def assess(policy: Policy, outcome: ProviderResult) -> Assessment:
    not_judged = [c for c in CATEGORIES if c not in outcome.judged]
    decision = Decision.ALLOW
    top: dict[str, float | None] = {c: None for c in CATEGORIES}
    per_text: list[dict[str, Any]] = []
    for text in outcome.results:
        text_decision = Decision.ALLOW
        text_categories: dict[str, bool | None] = {}
        for category in CATEGORIES:
            score = text.scores.get(category)
            if score is None:
                text_categories[category] = None
                continue
            category_decision = _decide(score, policy.thresholds[category])
            text_categories[category] = category_decision is not Decision.ALLOW
            if _SEVERITY[category_decision] > _SEVERITY[text_decision]:
                text_decision = category_decision
            previous = top[category]
            top[category] = score if previous is None else max(previous, score)
        if _SEVERITY[text_decision] > _SEVERITY[decision]:
            decision = text_decision
        per_text.append({
            # Which provider's answer decided this text (they differ within one verdict under the cascade).
            "provider": text.decided_by or outcome.provider,
            "decision": text_decision.value,
            "flagged": text_decision is not Decision.ALLOW,
            "categories": text_categories,
            "category_scores": {c: text.scores.get(c) for c in CATEGORIES},
        })
    categories: dict[str, bool | None] = {
        c: None if top[c] is None else any(r["categories"][c] for r in per_text) for c in CATEGORIES
    }
    return Assessment(
        decision=decision,
        flagged=decision is not Decision.ALLOW,
        categories=categories,
        category_scores=top,
        results=per_text,
        not_judged=not_judged,
    )
