"""The engine's training code (ops/engine/pipeline.py) on a small made-up corpus: the same data gives the same
model byte for byte, and the service's scoring path (app/moderation/engine/) gives the pipeline's probabilities."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ops" / "engine"))

import pipeline  # noqa: E402

from app.moderation.engine import model  # noqa: E402
from app.moderation.taxonomy import CATEGORIES  # noqa: E402

HARMFUL = ["you are a stupid idiot", "i will hurt you badly", "they are vermin and must go", "shut up you moron",
           "i want to end my life", "how to make a pipe bomb", "buy stolen credit cards here"]
HARMLESS = ["thank you for the help", "see you at lunch tomorrow", "the weather is lovely today",
            "my cat sleeps all day", "a recipe for lemon cake", "the train was late again", "good luck on the exam"]


def small_corpus() -> pipeline.Views:
    texts = [f"{t} {n}" for n in range(6) for t in HARMFUL + HARMLESS]
    sources = [pipeline.DEV_SOURCE if n % 2 else "other" for n in range(6) for _ in HARMFUL + HARMLESS]
    labels = np.full((len(texts), len(CATEGORIES)), -1, dtype=np.int8)
    for i, text in enumerate(texts):
        harmful = any(text.startswith(h) for h in HARMFUL)
        for head in pipeline.HEADS:
            labels[i, CATEGORIES.index(head)] = int(harmful and (i + CATEGORIES.index(head)) % 3 != 0)
    tf_rows, word_rows, word_ids = pipeline.hash_corpus(texts)
    corpus = pipeline.Corpus(texts=texts, sources=sources, labels=labels, tf_rows=tf_rows, word_rows=word_rows,
                             word_ids=word_ids)
    # Random vectors stand in for the distilled ones (no ONNX model in a unit test), for every word but "the": a
    # word without a vector must be skipped by both training and serving.
    words = sorted({w for t in texts for w in t.split()} - {"the"})
    kept, row_of_id = pipeline.word_table(words)
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((len(kept), 384)).astype(np.float32)
    return pipeline.Views(corpus, row_of_id, *pipeline.quantise_rows(vectors))


def write(views: pipeline.Views, path: Path) -> tuple[str, bytes]:
    rows = np.arange(len(views.corpus), dtype=np.int64)
    fitted = views.fit(rows)
    blends = np.stack([pipeline.fit_blend(views.logits(fitted, rows)[:, k, :], views.corpus.label(h))
                       for k, h in enumerate(pipeline.HEADS)])
    arrays = {"idf": fitted.idf.astype(np.float16), "ngram_weights": fitted.ngram_weights.astype(np.float16),
              "ngram_bias": fitted.ngram_bias, "word_rows": views.row_of_id, "word_codes": views.word_codes,
              "word_scales": views.word_scales, "word_weights": fitted.word_weights,
              "embedding_weights": fitted.embedding_weights, "embedding_bias": fitted.embedding_bias, "blend": blends}
    metadata = {"model": "test", "heads": list(pipeline.HEADS)}
    digest = model.write_artifact(path, arrays, metadata)
    return digest, path.read_bytes()


@pytest.fixture(scope="module")
def views() -> pipeline.Views:
    return small_corpus()


def test_same_data_gives_the_same_artifact_byte_for_byte(views: pipeline.Views, tmp_path: Path) -> None:
    first_digest, first = write(views, tmp_path / "a.npz")
    second_digest, second = write(small_corpus(), tmp_path / "b.npz")
    assert first_digest == second_digest
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()


def test_serving_gives_the_pipelines_probabilities(views: pipeline.Views, tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    write(views, path)
    served = model.EngineModel.load(path)
    rows = np.arange(len(views.corpus), dtype=np.int64)
    fitted = views.fit(rows)
    blends = model.load_artifact(path).blend
    trained = pipeline.blended(views.logits(fitted, rows), blends)
    assert np.abs(served.probabilities(views.corpus.texts) - trained).max() < 0.02
    harmful = served.probabilities(HARMFUL).max(axis=1)
    harmless = served.probabilities(HARMLESS).max(axis=1)
    assert harmful.mean() > harmless.mean()


def test_missing_labels_are_not_training_zeros() -> None:
    views = small_corpus()
    corpus = views.corpus
    # A head fitted on rows that all leave its category unknown learns nothing from them.
    corpus.labels[:, CATEGORIES.index("sexual")] = -1
    fitted = views.fit(np.arange(len(corpus), dtype=np.int64))
    k = pipeline.HEADS.index("sexual")
    assert not fitted.ngram_weights[:, k].any() and not fitted.embedding_weights[:, k].any()
