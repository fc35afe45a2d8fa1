"""Text to hashed n-gram features: the one featuriser both training (ops/engine/) and serving use, so they agree.

Word unigrams and bigrams are hashed with CRC-32, character 2- to 5-grams with a vectorised polynomial hash over the
UTF-8 bytes; each block gets sublinear term frequency, the trained IDF weights and its own L2 norm. Nothing here
depends on Python's salted `hash()`, so the same text gives the same features in every process.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

WORD_BITS = 18
CHAR_BITS = 18
WORD_DIM = 1 << WORD_BITS
CHAR_DIM = 1 << CHAR_BITS
DIM = WORD_DIM + CHAR_DIM
CHAR_NGRAMS = (2, 3, 4, 5)
# Long texts are judged on their first MAX_CHARS characters: the cost stays bounded, and harm is rarely only later.
MAX_CHARS = 4000

_WORD = re.compile(r"\w+(?:'\w+)?")
_SPACE = re.compile(r"\s+")
_PRIME = np.uint64(1_000_003)
# Per-n seeds and a final multiply keep the 2-grams' hashes from crowding the low buckets.
_MIX = np.uint64(0x9E3779B97F4A7C15)
_CHAR_MASK = np.uint64(CHAR_DIM - 1)


@dataclass(frozen=True)
class SparseRows:
    """A batch of feature rows in CSR form: row i is `indices[indptr[i]:indptr[i+1]]` with those `values`."""

    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.indptr) - 1


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text[:MAX_CHARS]).lower()
    return _SPACE.sub(" ", text).strip()


def _word_ids(text: str) -> list[int]:
    words = _WORD.findall(text)
    ids = [zlib.crc32(w.encode()) & (WORD_DIM - 1) for w in words]
    ids.extend(zlib.crc32(f"{a} {b}".encode()) & (WORD_DIM - 1) for a, b in zip(words, words[1:], strict=False))
    return ids


def _char_ids(text: str) -> npt.NDArray[np.int64]:
    data = np.frombuffer(f" {text} ".encode(), dtype=np.uint8).astype(np.uint64)
    parts = []
    for n in CHAR_NGRAMS:
        if len(data) < n:
            continue
        rolling = np.full(len(data) - n + 1, np.uint64(n), dtype=np.uint64)
        for j in range(n):
            rolling = rolling * _PRIME + data[j:len(data) - n + 1 + j]
        parts.append(((rolling * _MIX) >> np.uint64(64 - CHAR_BITS)) & _CHAR_MASK)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(parts).astype(np.int64) + WORD_DIM


def _block(ids: npt.NDArray[np.int64], idf: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int64],
                                                                                  npt.NDArray[np.float32]]:
    if len(ids) == 0:
        return ids, np.zeros(0, dtype=np.float32)
    unique, counts = np.unique(ids, return_counts=True)
    weights = (1.0 + np.log(counts.astype(np.float32))) * idf[unique]
    norm = float(np.sqrt(np.dot(weights, weights)))
    return unique, (weights / norm if norm > 0 else weights).astype(np.float32)


def raw_ids(text: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The hashed word and character n-gram ids of one text, repeats kept (IDF is counted from these)."""
    clean = normalise(text)
    return np.asarray(_word_ids(clean), dtype=np.int64), _char_ids(clean)


def featurise(texts: Sequence[str], idf: npt.NDArray[np.float32]) -> SparseRows:
    """TF-IDF rows for `texts` (each block L2-normalised), with `idf` of length DIM."""
    indptr = [0]
    all_ids: list[npt.NDArray[np.int64]] = []
    all_values: list[npt.NDArray[np.float32]] = []
    for text in texts:
        words, chars = raw_ids(text)
        for ids in (words, chars):
            unique, weights = _block(ids, idf)
            all_ids.append(unique)
            all_values.append(weights)
        indptr.append(indptr[-1] + len(all_ids[-1]) + len(all_ids[-2]))
    return SparseRows(
        indptr=np.asarray(indptr, dtype=np.int64),
        indices=np.concatenate(all_ids).astype(np.int32) if all_ids else np.zeros(0, dtype=np.int32),
        values=np.concatenate(all_values) if all_values else np.zeros(0, dtype=np.float32),
    )


def linear_scores(rows: SparseRows, weights: npt.NDArray[np.floating], bias: npt.NDArray[np.floating]
                  ) -> npt.NDArray[np.float32]:
    """rows @ weights + bias for a (DIM, heads) weight matrix, without scipy: one gather and a segment sum."""
    gathered = weights[rows.indices].astype(np.float32) * rows.values[:, None]
    sums = np.add.reduceat(gathered, rows.indptr[:-1], axis=0) if len(gathered) else np.zeros(
        (len(rows), weights.shape[1]), dtype=np.float32)
    # reduceat repeats the next row for an empty row; an empty text has no features and scores the bias alone.
    empty = rows.indptr[1:] == rows.indptr[:-1]
    sums[empty] = 0.0
    return (sums + bias.astype(np.float32)).astype(np.float32)
