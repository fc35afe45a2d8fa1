"""The trained engine as the service runs it: loads the shipped artifact and turns texts into calibrated scores.

Two views of each text are scored by linear heads: hashed word and character n-grams (features.py), and a static
sentence embedding, the IDF-weighted mean of per-word vectors distilled from all-MiniLM-L6-v2 (each word of the
training vocabulary run alone through the model at training time), looked up by the same word hash the n-gram view
computes, so a text is split and hashed once. Per category, a logistic blend of the two views' logits, fitted on
out-of-fold scores, gives the calibrated probability; a subcategory is then capped at its parent's score. The
artifact is plain numpy arrays: no scikit-learn, tokenizer or ONNX runtime at run time.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from app.moderation.engine import features

ARTIFACT_PACKAGE = "app.moderation.engine"
ARTIFACT_NAME = "verdict-engine.npz"
# The taxonomy's parents: a text cannot be more likely in a subcategory than in the category that contains it.
PARENTS: Mapping[str, str] = {
    "harassment/threatening": "harassment",
    "hate/threatening": "hate",
    "illicit/violent": "illicit",
    "self-harm/intent": "self-harm",
    "self-harm/instructions": "self-harm",
    "sexual/minors": "sexual",
    "violence/graphic": "violence",
}


@dataclass(frozen=True)
class WordVectors:
    """The embedding view's vocabulary: a word's hashed unigram id -> its row (-1: not in the vocabulary), and per
    row an int8 vector with its scale and the word's IDF weight."""

    row_of_id: npt.NDArray[np.int32]  # (features.WORD_DIM,)
    codes: npt.NDArray[np.int8]  # (vocabulary, dims)
    scales: npt.NDArray[np.float32]  # (vocabulary,)
    weights: npt.NDArray[np.float32]  # (vocabulary,)

    def vectors(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The float vectors of some rows (the table itself stays int8 in memory)."""
        return self.codes[rows].astype(np.float32) * self.scales[rows, None]


@dataclass(frozen=True)
class EngineArtifact:
    """Everything the engine computes with, as loaded from the artifact file."""

    heads: tuple[str, ...]
    metadata: dict[str, object]
    # Kept as stored, float16 (half the memory of float32 in every process that loads the engine: issue 15); the
    # scoring widens the rows it gathers to float32, which float16 values convert to exactly: the same scores.
    idf: npt.NDArray[np.float16]
    ngram_weights: npt.NDArray[np.float16]  # (features.DIM, heads)
    ngram_bias: npt.NDArray[np.float32]
    words: WordVectors
    embedding_weights: npt.NDArray[np.float32]  # (dims, heads)
    embedding_bias: npt.NDArray[np.float32]
    blend: npt.NDArray[np.float32]  # (heads, 3): a * ngram logit + b * embedding logit + c


def content_digest(arrays: Mapping[str, npt.NDArray[np.generic]]) -> str:
    """A SHA-256 over the arrays' names, dtypes, shapes and bytes: the same model gives the same digest."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.data)  # the array's own buffer, not a copy of it
    return digest.hexdigest()


def write_artifact(path: Path, arrays: Mapping[str, npt.NDArray[np.generic]], metadata: Mapping[str, object]) -> str:
    """Write an .npz byte-for-byte reproducibly (fixed zip timestamps, sorted members); return the content digest."""
    digest = content_digest(arrays)
    body = dict(metadata) | {"content_sha256": digest}
    with zipfile.ZipFile(path, "w") as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue(),
                             compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        meta = np.frombuffer(json.dumps(body, sort_keys=True).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, meta, allow_pickle=False)
        archive.writestr(zipfile.ZipInfo("metadata.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue(),
                         compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return digest


def shipped_artifact_path() -> Path:
    return Path(str(resources.files(ARTIFACT_PACKAGE).joinpath(ARTIFACT_NAME)))


ARRAY_NAMES = ("idf", "ngram_weights", "ngram_bias", "word_rows", "word_codes", "word_scales", "word_weights",
               "embedding_weights", "embedding_bias", "blend")


# The large arrays (about 22 MB together), kept in memory shared between the process and those it forks.
SHARED_ARRAYS = ("idf", "ngram_weights", "word_rows", "word_codes")


def shared_read_only(arrays: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
    """The arrays copied into one anonymous shared mapping, read-only. The API's gunicorn master and a Celery worker
    load the engine before they fork: a shared mapping's pages join a forked process's resident set only when it
    reads them (a private mapping's are all counted in each one at once, shared or not), so an API process that never
    scores (its provider is upstream, the engine a fallback) is not charged for the model, and the processes that do
    score share one copy, as before (issue 15)."""
    sizes = [arrays[name].nbytes for name in arrays]
    offsets = [sum(sizes[:i]) // 64 * 64 + 64 * i for i in range(len(sizes))]  # 64-byte aligned, never overlapping
    total = max(offsets[-1] + sizes[-1], 1) if sizes else 1
    memory = mmap.mmap(-1, total)  # anonymous, MAP_SHARED
    shared: dict[str, npt.NDArray[np.generic]] = {}
    for (name, array), offset in zip(arrays.items(), offsets, strict=True):
        view = np.frombuffer(memory, dtype=array.dtype, count=array.size, offset=offset).reshape(array.shape)
        view[...] = array
        view.flags.writeable = False
        shared[name] = view
    return shared


def load_artifact(path: Path | None = None) -> EngineArtifact:
    with np.load(path or shipped_artifact_path(), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in ARRAY_NAMES}
        metadata = json.loads(bytes(archive["metadata"]).decode())
    if content_digest(arrays) != metadata["content_sha256"]:
        raise ValueError("the engine artifact does not match the digest it records: it is damaged or was edited")
    arrays |= shared_read_only({name: arrays[name] for name in SHARED_ARRAYS})
    return EngineArtifact(
        heads=tuple(metadata["heads"]),
        metadata=metadata,
        idf=arrays["idf"],
        ngram_weights=arrays["ngram_weights"],
        ngram_bias=arrays["ngram_bias"],
        words=WordVectors(row_of_id=arrays["word_rows"], codes=arrays["word_codes"], scales=arrays["word_scales"],
                          weights=arrays["word_weights"]),
        embedding_weights=arrays["embedding_weights"],
        embedding_bias=arrays["embedding_bias"],
        blend=arrays["blend"],
    )


def word_occurrences(hashed: features.Hashed, row_of_id: npt.NDArray[np.int32]
                     ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(text, vocabulary row) of every word occurrence of a hashed batch that is in the vocabulary, repeats kept."""
    rows = row_of_id[hashed.ids[hashed.unigram]]
    known = rows >= 0
    return hashed.rows[hashed.unigram][known], rows[known].astype(np.int64)


def pool(size: int, texts: npt.NDArray[np.int64], rows: npt.NDArray[np.int64], words: WordVectors
         ) -> npt.NDArray[np.float32]:
    """Each text's embedding: the IDF-weighted sum of its words' vectors, L2-normalised (zeros if it has none).
    One matrix product: (texts x distinct words) weights times the distinct words' vectors."""
    out = np.zeros((size, words.codes.shape[1]), dtype=np.float32)
    if len(rows) == 0:
        return out
    distinct, position = np.unique(rows, return_inverse=True)
    mixing = np.bincount(texts * len(distinct) + position, weights=words.weights[rows],
                         minlength=size * len(distinct)).reshape(size, len(distinct)).astype(np.float32)
    out = mixing @ words.vectors(distinct)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    result: npt.NDArray[np.float32] = (out / norms).astype(np.float32)
    return result


def sigmoid(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    result: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-np.clip(x, -40.0, 40.0)))).astype(np.float32)
    return result


def consistent_with_taxonomy(heads: Sequence[str], probabilities: npt.NDArray[np.float32]
                             ) -> npt.NDArray[np.float32]:
    """Cap each subcategory's probability at its parent's (when the engine judges the parent)."""
    capped = probabilities.copy()
    for k, head in enumerate(heads):
        parent = PARENTS.get(head)
        if parent in heads:
            capped[:, k] = np.minimum(capped[:, k], capped[:, heads.index(parent)])
    return capped


class EngineModel:
    """The loaded engine. `probabilities` is thread-safe (it only reads the arrays)."""

    def __init__(self, artifact: EngineArtifact) -> None:
        self.artifact = artifact
        self.heads = artifact.heads
        # The engine's matrix products are small: a multi-threaded BLAS spends more time waking threads that fight
        # the service's other processes for the cores than it saves (measured: pooling a batch 1.8 ms on one thread,
        # often 80 ms with two on a busy machine). The service runs in parallel across processes and requests.
        threadpool_limits(limits=1, user_api="blas")

    @classmethod
    def load(cls, path: Path | None = None) -> EngineModel:
        return cls(load_artifact(path))

    def logits(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The two views' raw logits, each (texts, heads)."""
        a = self.artifact
        hashed = features.hash_batch(features.normalise_batch(texts))
        ngram = features.linear_scores(features.tfidf_rows(hashed, a.idf), a.ngram_weights, a.ngram_bias)
        embedded = pool(len(texts), *word_occurrences(hashed, a.words.row_of_id), a.words)
        embedding = (embedded @ a.embedding_weights + a.embedding_bias).astype(np.float32)
        return ngram, embedding

    def probabilities(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Calibrated, taxonomy-consistent probabilities, (texts, heads) in the order of `heads`."""
        if not texts:
            return np.zeros((0, len(self.heads)), dtype=np.float32)
        ngram, embedding = self.logits(texts)
        blend = self.artifact.blend
        combined = ngram * blend[:, 0] + embedding * blend[:, 1] + blend[:, 2]
        return consistent_with_taxonomy(self.heads, sigmoid(combined))
