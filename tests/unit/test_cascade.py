"""The cascade provider: confident texts are answered by the local engine, only uncertain ones go upstream, and
each text says which provider decided it (the integration test runs it against the fake upstream and a worker)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from app.moderation.cascade import CascadeProvider
from app.moderation.local_engine import LocalEngine
from app.moderation.providers import ModelInfo, ProviderResult, TextScores
from app.moderation.taxonomy import CATEGORIES


class RecordingUpstream:
    """An upstream that scores every category 0.42 and records what it was asked."""

    name = "openai"
    max_batch = 32

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def warm_up(self) -> None:
        pass

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="omni", provider=self.name, judged_categories=list(CATEGORIES))]

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        self.asked.append(list(texts))
        return ProviderResult(provider=self.name, model="omni", latency_ms=1, judged=frozenset(CATEGORIES),
                              results=[TextScores(scores=dict.fromkeys(CATEGORIES, 0.42)) for _ in texts],
                              defective=frozenset({0}) if texts[0] == "broken" else frozenset())


@pytest.fixture(scope="module")
def local() -> LocalEngine:
    engine = LocalEngine()
    engine.warm_up()
    return engine


def top(local: LocalEngine, text: str) -> float:
    return max(local.moderate([text]).results[0].scores.values())


def test_only_uncertain_texts_go_upstream(local: LocalEngine) -> None:
    texts = ["Thank you for the lovely dinner, see you next week.", "you are a worthless fucking idiot, shut up",
             "I could kill for a coffee"]
    scores = [top(local, t) for t in texts]
    low, high = sorted(scores)[0] + 1e-6, sorted(scores)[-1]  # the lowest below the band, the highest at its top
    upstream = RecordingUpstream()
    result = CascadeProvider(local, upstream, band_low=low, band_high=high).moderate(texts)

    middle = [t for t, s in zip(texts, scores, strict=True) if low <= s < high]
    assert upstream.asked == [middle]
    assert result.provider == "cascade"
    for s, answer in zip(scores, result.results, strict=True):
        assert answer.decided_by == ("openai" if low <= s < high else "local")
        if answer.decided_by == "openai":
            assert answer.scores == dict.fromkeys(CATEGORIES, 0.42)
    assert result.judged == frozenset(CATEGORIES)
    assert result.model == f"{local.model_id}+omni"


def test_a_band_that_is_empty_never_calls_upstream(local: LocalEngine) -> None:
    upstream = RecordingUpstream()
    result = CascadeProvider(local, upstream, band_low=0.5, band_high=0.5).moderate(["hello", "you idiot"])
    assert upstream.asked == []
    assert {r.decided_by for r in result.results} == {"local"}
    assert result.judged == local.moderate(["x"]).judged


def test_everything_upstream_reports_the_upstream_model_and_maps_defects(local: LocalEngine) -> None:
    upstream = RecordingUpstream()
    result = CascadeProvider(local, upstream, band_low=0.0, band_high=1.0).moderate(["broken", "fine"])
    assert upstream.asked == [["broken", "fine"]]
    assert result.model == "omni" and result.defective == frozenset({0})


def test_band_must_be_ordered(local: LocalEngine) -> None:
    with pytest.raises(ValueError):
        CascadeProvider(local, RecordingUpstream(), band_low=0.9, band_high=0.1)
