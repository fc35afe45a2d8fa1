"""The local engine: judges harassment (abusive language) only, reports every other category as not judged, and keeps
the order of a batch."""

from __future__ import annotations

from app.moderation.local_engine import LOCAL_MODEL, LocalEngine
from app.moderation.taxonomy import CATEGORIES

BENIGN = "Thank you for the lovely dinner, see you next week."
OFFENSIVE = "you are a worthless fucking idiot, shut up"


def test_judges_only_harassment() -> None:
    result = LocalEngine().moderate([BENIGN])
    assert result.provider == "local"
    assert result.model == LOCAL_MODEL
    assert result.judged == frozenset({"harassment"})
    assert set(result.results[0].scores) == {"harassment"}
    assert 0.0 <= result.results[0].scores["harassment"] <= 1.0


def test_offensive_text_scores_higher_than_benign() -> None:
    benign, offensive = LocalEngine().moderate([BENIGN, OFFENSIVE]).results
    assert offensive.scores["harassment"] > benign.scores["harassment"]
    assert offensive.scores["harassment"] >= 0.8
    assert benign.scores["harassment"] < 0.5


def test_batch_keeps_order() -> None:
    engine = LocalEngine()
    texts = [BENIGN, OFFENSIVE, "Have a nice day.", "shut up you stupid bitch", BENIGN]
    together = engine.moderate(texts).results
    one_by_one = [engine.moderate([t]).results[0] for t in texts]
    assert len(together) == len(texts)
    assert [r.scores for r in together] == [r.scores for r in one_by_one]
    assert together[0].scores == together[4].scores


def test_models_lists_the_other_twelve_as_not_judged() -> None:
    (info,) = LocalEngine().models()
    assert info.id == LOCAL_MODEL
    assert info.provider == "local"
    assert info.judged_categories == ["harassment"]
    assert len(info.not_judged_categories) == 12
    assert set(info.not_judged_categories) == set(CATEGORIES) - {"harassment"}
