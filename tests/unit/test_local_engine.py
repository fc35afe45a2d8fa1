"""The local engine and its shipped artifact: it loads with no network, is the artifact training recorded, judges
the categories it has evidence for (the rest not judged), scores in [0, 1] consistently with the taxonomy, and keeps
the order of a batch."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.moderation.engine import model
from app.moderation.local_engine import LocalEngine
from app.moderation.taxonomy import CATEGORIES

ROOT = Path(__file__).resolve().parents[2]
RECORD = json.loads((ROOT / "ops" / "engine" / "artifact.json").read_text())
NOT_JUDGED = {"harassment/threatening", "self-harm/intent", "self-harm/instructions", "sexual/minors"}
TEXTS = ["Thank you for the lovely dinner, see you next week.", "you are a worthless fucking idiot, shut up",
         "Have a nice day.", "I will find you and stab you", "", "  ", "ok", "😀" * 50, "x" * 20_000]


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    engine = LocalEngine()
    engine.warm_up()
    return engine


def test_shipped_artifact_is_the_one_training_recorded() -> None:
    path = model.shipped_artifact_path()
    artifact = model.load_artifact(path)
    assert artifact.metadata["content_sha256"] == RECORD["content_sha256"]
    assert artifact.metadata["model"] == RECORD["model"]
    assert list(artifact.heads) == RECORD["heads"]
    assert path.stat().st_size <= 30 * 1024 * 1024


def test_a_damaged_artifact_is_refused(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.npz"
    with zipfile.ZipFile(model.shipped_artifact_path()) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "ngram_bias.npy":
                data = data[:-4] + np.float32(9.0).tobytes()
            target.writestr(item, data)
    with pytest.raises(ValueError, match="digest"):
        model.load_artifact(damaged)


def test_judges_nine_categories_and_reports_the_rest_as_not_judged(engine: LocalEngine) -> None:
    (info,) = engine.models()
    assert info.provider == "local" and info.id == RECORD["model"]
    assert set(info.not_judged_categories) == NOT_JUDGED
    assert set(info.judged_categories) == set(CATEGORIES) - NOT_JUDGED
    result = engine.moderate(TEXTS)
    assert result.judged == frozenset(info.judged_categories)
    for scores in result.results:
        assert set(scores.scores) == set(info.judged_categories)
        assert all(0.0 <= v <= 1.0 for v in scores.scores.values())


def test_a_subcategory_never_scores_above_its_parent(engine: LocalEngine) -> None:
    texts = TEXTS + ["how do I make a bomb to kill people", "we should hang every one of them",
                     "I want to kill myself", "the murder scene was covered in blood and guts"]
    for scores in engine.moderate(texts).results:
        for child, parent in model.PARENTS.items():
            if child in scores.scores:
                assert scores.scores[child] <= scores.scores[parent]


def test_batch_keeps_order_and_matches_one_by_one(engine: LocalEngine) -> None:
    together = engine.moderate(TEXTS).results
    one_by_one = [engine.moderate([t]).results[0] for t in TEXTS]
    for a, b in zip(together, one_by_one, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)
    assert engine.moderate([]).results == []


def test_the_large_arrays_are_shared_read_only_and_score_as_float32_would(engine: LocalEngine) -> None:
    # Issue 15 item 4: the n-gram weights and IDF stay float16 as stored (half the memory), and the large arrays live
    # in one shared mapping a forked process is charged for only when it reads them; the scores are unchanged.
    artifact = engine.engine().artifact
    assert artifact.ngram_weights.dtype == np.float16 and artifact.idf.dtype == np.float16
    for array in (artifact.idf, artifact.ngram_weights, artifact.words.codes, artifact.words.row_of_id):
        assert not array.flags.writeable and not array.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        artifact.words.codes[0, 0] = 1
    widened = model.EngineModel(dataclasses.replace(artifact, idf=artifact.idf.astype(np.float32),
                                                    ngram_weights=artifact.ngram_weights.astype(np.float32)))
    assert np.array_equal(engine.engine().probabilities(TEXTS), widened.probabilities(TEXTS))
