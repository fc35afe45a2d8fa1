"""The default policy: how `assess` turns a provider's per-text scores into allow / review / block.

Thresholds: review at 0.5 and block at 0.8 for most categories; review at 0.2 and block at 0.5 for the categories where
a miss costs most (sexual/minors, self-harm/intent, self-harm/instructions). Categories a provider did not judge stay
None (never 0) and are listed in `not_judged`.
"""

from __future__ import annotations

import pytest

from app.models import Decision
from app.moderation.policy import DEFAULT_POLICY, assess
from app.moderation.providers import ProviderResult, TextScores
from app.moderation.taxonomy import CATEGORIES

STRICT = ("sexual/minors", "self-harm/intent", "self-harm/instructions")


def outcome(*texts: dict[str, float], judged: tuple[str, ...] = CATEGORIES) -> ProviderResult:
    return ProviderResult(provider="test", model="m", results=[TextScores(scores=dict(t)) for t in texts],
                          judged=frozenset(judged), latency_ms=0)


def all_scores(value: float = 0.0, **overrides: float) -> dict[str, float]:
    """Every category at `value`, except the (slash-free) categories given as keywords."""
    return {**dict.fromkeys(CATEGORIES, value), **overrides}


@pytest.mark.parametrize(("score", "expected"), [
    (0.0, Decision.ALLOW),
    (0.499, Decision.ALLOW),
    (0.5, Decision.REVIEW),
    (0.79, Decision.REVIEW),
    (0.8, Decision.BLOCK),
    (1.0, Decision.BLOCK),
])
def test_default_thresholds_decide_allow_review_block(score: float, expected: Decision) -> None:
    scores = all_scores(0.0)
    scores["violence"] = score
    result = assess(DEFAULT_POLICY, outcome(scores))
    assert result.decision is expected
    assert result.flagged is (expected is not Decision.ALLOW)
    assert result.categories["violence"] is (expected is not Decision.ALLOW)
    assert result.category_scores["violence"] == score


@pytest.mark.parametrize("category", STRICT)
@pytest.mark.parametrize(("score", "expected"), [
    (0.19, Decision.ALLOW),
    (0.2, Decision.REVIEW),
    (0.49, Decision.REVIEW),
    (0.5, Decision.BLOCK),
])
def test_stricter_thresholds_on_the_costliest_categories(category: str, score: float, expected: Decision) -> None:
    scores = all_scores(0.0)
    scores[category] = score
    assert assess(DEFAULT_POLICY, outcome(scores)).decision is expected


def test_a_score_that_only_the_strict_categories_act_on() -> None:
    # 0.5 blocks sexual/minors but only sends sexual to review: the two categories are not treated alike.
    assert assess(DEFAULT_POLICY, outcome(all_scores(0.0, sexual=0.5))).decision is Decision.REVIEW
    assert assess(DEFAULT_POLICY, outcome({**all_scores(0.0), "sexual/minors": 0.5})).decision is Decision.BLOCK


def test_several_texts_take_the_strictest_decision_and_the_highest_score() -> None:
    first = {**all_scores(0.01), "harassment": 0.6, "violence": 0.1}   # review
    second = {**all_scores(0.02), "harassment": 0.3, "violence": 0.85}  # block
    third = all_scores(0.0)                                              # allow
    result = assess(DEFAULT_POLICY, outcome(first, second, third))

    assert result.decision is Decision.BLOCK
    assert result.flagged is True
    assert result.category_scores["harassment"] == 0.6
    assert result.category_scores["violence"] == 0.85
    assert result.category_scores["hate"] == 0.02
    assert result.categories["harassment"] is True
    assert result.categories["violence"] is True
    assert result.categories["hate"] is False
    # Per text, in the order given.
    assert [r["decision"] for r in result.results] == ["review", "block", "allow"]
    assert [r["flagged"] for r in result.results] == [True, True, False]
    assert result.results[0]["category_scores"]["harassment"] == 0.6
    assert result.results[1]["category_scores"]["violence"] == 0.85
    assert result.results[2]["categories"]["violence"] is False


def test_review_on_one_text_is_not_lost_behind_allowed_ones() -> None:
    result = assess(DEFAULT_POLICY, outcome(all_scores(0.0), {**all_scores(0.0), "hate": 0.55}, all_scores(0.0)))
    assert result.decision is Decision.REVIEW
    assert [r["decision"] for r in result.results] == ["allow", "review", "allow"]


def test_categories_not_judged_are_none_and_listed_never_zero() -> None:
    result = assess(DEFAULT_POLICY, outcome({"harassment": 0.1}, {"harassment": 0.3}, judged=("harassment",)))

    others = [c for c in CATEGORIES if c != "harassment"]
    assert result.not_judged == others
    for category in others:
        assert result.categories[category] is None
        assert result.category_scores[category] is None
        for per_text in result.results:
            assert per_text["categories"][category] is None
            assert per_text["category_scores"][category] is None
    assert result.categories["harassment"] is False
    assert result.category_scores["harassment"] == 0.3
    assert result.decision is Decision.ALLOW
    # Every category is present in the output, judged or not.
    assert set(result.categories) == set(CATEGORIES)
    assert set(result.category_scores) == set(CATEGORIES)


def test_everything_judged_leaves_nothing_in_not_judged() -> None:
    result = assess(DEFAULT_POLICY, outcome(all_scores(0.0)))
    assert result.not_judged == []
    assert all(value == 0.0 for value in result.category_scores.values())
    assert all(value is False for value in result.categories.values())


def test_default_policy_covers_every_category() -> None:
    assert set(DEFAULT_POLICY.thresholds) == set(CATEGORIES)
    as_json = DEFAULT_POLICY.thresholds_json()
    assert as_json["sexual/minors"] == {"review": 0.2, "block": 0.5}
    assert as_json["violence"] == {"review": 0.5, "block": 0.8}
