"""The default policy, and tenant policies built from documents: how `assess` turns a provider's per-text scores
(and texts, for the term lists) into allow / review / block, per role.

Thresholds: review at 0.5 and block at 0.8 for most categories; review at 0.2 and block at 0.5 for the categories where
a miss costs most (sexual/minors, self-harm/intent, self-harm/instructions). Categories a provider did not judge stay
None (never 0) and are listed in `not_judged`.
"""

from __future__ import annotations

import pytest

from app.models import Decision
from app.moderation.policy import DEFAULT_POLICY, Policy, assess, build_policy
from app.moderation.providers import ProviderResult, TextScores
from app.moderation.taxonomy import CATEGORIES
from app.moderation.terms import compile_terms
from app.schemas.policies import PolicyDocument
from app.use_cases.policies import diff_documents

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


# ---- tenant policies: built from documents (issue 12) ----------------------------------------------------------


KIDS = PolicyDocument.model_validate({
    "name": "kids",
    "defaults": {"review": 0.3, "block": 0.6},
    "categories": {"hate": {"review": 0.1, "block": 0.2}},
    "input": {"violence": {"review": 0.4, "block": 0.7}},
    "output": {"violence": {"review": 0.2, "block": 0.5}, "sexual": {"enabled": False},
               "hate": {"block": 0.9}},
    "blocklists": [{"list": "banned", "category": "hate", "decision": "block", "roles": ["input"]},
                   {"list": "watch", "category": "violence", "decision": "review"}],
    "allowlists": [{"list": "anatomy", "categories": ["sexual"], "max_decision": "review"}],
}).canonical()
LISTS = {("blocklist", "banned"): (3, compile_terms(["frobnicate"], [])),
         ("blocklist", "watch"): (1, compile_terms(["duel"], [])),
         ("allowlist", "anatomy"): (2, compile_terms(["breast"], []))}


def kids() -> Policy:
    return build_policy("kids", 4, KIDS, lists=LISTS)


def test_thresholds_resolve_role_then_both_roles_then_defaults_then_builtin() -> None:
    policy = kids()
    assert policy.thresholds_json("input")["violence"] == {"review": 0.4, "block": 0.7}  # input
    assert policy.thresholds_json("output")["violence"] == {"review": 0.2, "block": 0.5}  # output
    assert policy.thresholds_json("input")["hate"] == {"review": 0.1, "block": 0.2}  # categories
    assert policy.thresholds_json("output")["hate"] == {"review": None, "block": 0.9}  # output, block only
    assert policy.thresholds_json("input")["sexual"] == {"review": 0.3, "block": 0.6}  # defaults
    assert policy.thresholds_json("output")["sexual"] is None  # switched off
    builtin = build_policy("plain", 1, {"name": "plain"}, lists={})
    assert builtin.roles == DEFAULT_POLICY.roles


def test_the_same_scores_decide_differently_per_role() -> None:
    scores = all_scores(0.0, violence=0.3)
    assert assess(kids(), outcome(scores), role="input").decision is Decision.ALLOW
    assert assess(kids(), outcome(scores), role="output").decision is Decision.REVIEW
    assert assess(kids(), outcome(all_scores(0.0, violence=0.55)), role="output").decision is Decision.BLOCK
    off = assess(kids(), outcome(all_scores(0.0, sexual=0.99)), role="output")
    assert off.decision is Decision.ALLOW and off.categories["sexual"] is False
    assert off.thresholds["sexual"] is None and off.category_decisions["sexual"] == "allow"


def test_a_blocklist_match_decides_its_category_for_its_roles_only() -> None:
    result = assess(kids(), outcome(all_scores(0.0)), role="input", texts=["please F R O B N I C A T E"])
    assert result.decision is Decision.BLOCK and result.categories["hate"] is True
    assert result.category_decisions["hate"] == "block"
    assert result.matches == [{"list": "banned", "list_version": 3, "category": "hate", "decision": "block",
                               "text": 0, "count": 1}]
    as_output = assess(kids(), outcome(all_scores(0.0)), role="output", texts=["please frobnicate"])
    assert as_output.decision is Decision.ALLOW and as_output.matches == []
    # A review rule raises a category to review, and never lowers a block from the scores.
    watched = assess(kids(), outcome(all_scores(0.0), all_scores(0.0, violence=0.9)), role="input",
                     texts=["a duel at dawn", "a duel"])
    assert [r["decision"] for r in watched.results] == ["review", "block"]
    assert [m["text"] for m in watched.matches] == [0, 1]


def test_a_category_not_judged_can_still_be_matched() -> None:
    result = assess(kids(), outcome({"harassment": 0.0}, judged=("harassment",)), role="input",
                    texts=["frobnicate"])
    assert result.categories["hate"] is True and result.category_scores["hate"] is None
    assert "hate" in result.not_judged  # the provider still did not judge it


def test_an_allowlisted_term_caps_its_categories() -> None:
    scores = all_scores(0.0, sexual=0.95)
    plain = assess(kids(), outcome(scores), role="input", texts=["some text"])
    medical = assess(kids(), outcome(scores), role="input", texts=["breast examination"])
    assert plain.decision is Decision.BLOCK and medical.decision is Decision.REVIEW


def test_missing_lists_are_left_out_and_the_lists_version_names_the_rest() -> None:
    assert kids().lists_version == "anatomy:2,banned:3,watch:1"
    assert build_policy("kids", 4, KIDS, lists={}).blocklists == ()
    assert DEFAULT_POLICY.lists_version == ""


def test_what_changed_between_two_documents() -> None:
    old = {"name": "k", "input": {"violence": {"review": 0.4, "block": 0.7}}, "shadow": "s"}
    new = {"name": "k", "input": {"violence": {"review": 0.3, "block": 0.7}}, "description": "d"}
    assert diff_documents(old, new) == [
        {"field": "description", "from": None, "to": "d"},
        {"field": "input.violence.review", "from": 0.4, "to": 0.3},
        {"field": "shadow", "from": "s", "to": None},
    ]
