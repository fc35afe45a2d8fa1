"""The engine's featuriser (app/moderation/engine/features.py): a batch is hashed as a whole, so a text's features must
not depend on the texts beside it; id-like tokens are dropped and ordinary numbers kept; the embedding view's word
ids are the n-gram view's unigram ids."""

from __future__ import annotations

import numpy as np
import pytest

from app.moderation.engine import features

TEXTS = ["Thank you for the lovely dinner, see you next week.", "you're a worthless idiot", "", "  ", "a",
         "Don\u2019t\tdo that\n\nagain", "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600", "x" * 5000,
         "order 1234567 from 2024 at 10:30, ref 3f9a1c0e7b2d4e6f8a0b1c2d3e4f5a6b", "nul\x00inside"]


def rows_of(sparse: features.SparseRows, i: int) -> tuple[list[int], list[float]]:
    a, b = sparse.indptr[i], sparse.indptr[i + 1]
    return sparse.indices[a:b].tolist(), sparse.values[a:b].tolist()


def test_a_text_gets_the_same_features_alone_as_in_a_batch() -> None:
    idf = np.linspace(1.0, 3.0, features.DIM, dtype=np.float32)
    together = features.featurise(TEXTS, idf)
    assert len(together) == len(TEXTS)
    for i, text in enumerate(TEXTS):
        alone = features.featurise([text], idf)
        ids, values = rows_of(together, i)
        assert ids == rows_of(alone, 0)[0]
        assert values == pytest.approx(rows_of(alone, 0)[1], abs=1e-6)


def test_each_block_is_l2_normalised_and_ids_are_in_range() -> None:
    rows = features.featurise(TEXTS, np.ones(features.DIM, dtype=np.float32))
    assert rows.indices.min() >= 0 and rows.indices.max() < features.DIM
    for i in range(len(TEXTS)):
        ids, values = map(np.asarray, rows_of(rows, i))
        for block in (ids < features.WORD_DIM, ids >= features.WORD_DIM):
            if block.any():
                assert float(np.sum(np.square(values[block]))) == pytest.approx(1.0, abs=1e-5)
        assert np.all(np.diff(ids) > 0)  # sorted, each id once


@pytest.mark.parametrize(("text", "expected"), [
    ("shut up 3f9a1c0e7b2d4e6f8a0b1c2d3e4f5a6b", "shut up"),
    ("id 550e8400-e29b-41d4-a716-446655440000 here", "id here"),
    ("call 0123456789 now", "call now"),
    ("token sk_live_4eC39HqLyjWDarjtT1zdp7dc end", "token end"),
    ("in 1994 about 800,000 people, 12 dogs, v2.0, covid19", "in 1994 about 800,000 people, 12 dogs, v2.0, covid19"),
])
def test_id_like_tokens_are_dropped_and_ordinary_numbers_kept(text: str, expected: str) -> None:
    assert features.normalise(text) == expected


def test_an_appended_id_leaves_the_features_unchanged() -> None:
    idf = np.ones(features.DIM, dtype=np.float32)
    clean = features.featurise(["you are a worthless idiot"], idf)
    padded = features.featurise(["you are a worthless idiot 3f9a1c0e7b2d4e6f8a0b1c2d3e4f5a6b"], idf)
    assert rows_of(clean, 0) == rows_of(padded, 0)


def test_word_ids_are_the_unigram_ids_of_the_hash() -> None:
    clean = features.normalise("You're a moron, don't 'quote' me: caf\u00e9!")
    words = features.word_strings(clean)
    assert words == ["you're", "a", "moron", "don't", "quote", "me", "caf\u00e9"]
    hashed = features.hash_batch([clean])
    assert features.word_ids(words).tolist() == hashed.ids[hashed.unigram].tolist()
