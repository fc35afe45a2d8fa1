"""The trained engine as the service runs it: loads the shipped artifact and turns texts into calibrated scores.

Two views of each text are scored by linear heads: hashed word and character n-grams (features.py), and a static
sentence embedding (the mean of per-token vectors distilled from all-MiniLM-L6-v2, weighted by the tokens' IDF).
Per category, a logistic blend of the two logits, fitted on out-of-fold scores, gives the calibrated probability;
a subcategory is then capped at its parent's score. The artifact is plain numpy arrays: no scikit-learn at run time.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from app.moderation.engine import features

ARTIFACT_PACKAGE = "app.moderation.engine"
ARTIFACT_NAME = "verdict-engine.npz"
# all-MiniLM-L6-v2's WordPiece tokenizer (sentence-transformers, Apache-2.0): data, not weights.
TOKENIZER_NAME = "minilm-tokenizer.json"
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
# Token ids beyond this many per text are ignored by the embedding view (the n-gram view still sees MAX_CHARS).
MAX_TOKENS = 512


@dataclass(frozen=True)
class EngineArtifact:
    """Everything the engine computes with, as loaded from the artifact file."""

    heads: tuple[str, ...]
    metadata: dict[str, object]
    idf: npt.NDArray[np.float32]
    ngram_weights: npt.NDArray[np.float16]  # (features.DIM, heads)
    ngram_bias: npt.NDArray[np.float32]
    token_codes: npt.NDArray[np.int8]  # (vocabulary, dims), int8 with a scale per token
    token_scales: npt.NDArray[np.float32]
    token_weights: npt.NDArray[np.float32]  # (vocabulary,)
    embedding_weights: npt.NDArray[np.float32]  # (dims, heads)
    embedding_bias: npt.NDArray[np.float32]
    blend: npt.NDArray[np.float32]  # (heads, 3): a * ngram logit + b * embedding logit + c
    tokenizer_json: str


def content_digest(arrays: Mapping[str, npt.NDArray[np.generic]]) -> str:
    """A SHA-256 over the arrays' names, dtypes, shapes and bytes: the same model gives the same digest."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
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


def shipped_tokenizer_json() -> str:
    return resources.files(ARTIFACT_PACKAGE).joinpath(TOKENIZER_NAME).read_text(encoding="utf-8")


def tokenizer_digest(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()


ARRAY_NAMES = ("idf", "ngram_weights", "ngram_bias", "token_codes", "token_scales", "token_weights",
               "embedding_weights", "embedding_bias", "blend")


def load_artifact(path: Path | None = None) -> EngineArtifact:
    with np.load(path or shipped_artifact_path(), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in ARRAY_NAMES}
        metadata = json.loads(bytes(archive["metadata"]).decode())
    if content_digest(arrays) != metadata["content_sha256"]:
        raise ValueError("the engine artifact does not match the digest it records: it is damaged or was edited")
    tokenizer_json = shipped_tokenizer_json()
    if tokenizer_digest(tokenizer_json) != metadata["tokenizer_sha256"]:
        raise ValueError("the engine's tokenizer is not the one its artifact was trained with")
    return EngineArtifact(
        heads=tuple(metadata["heads"]),
        metadata=metadata,
        idf=arrays["idf"].astype(np.float32),
        ngram_weights=arrays["ngram_weights"],
        ngram_bias=arrays["ngram_bias"],
        token_codes=arrays["token_codes"],
        token_scales=arrays["token_scales"],
        token_weights=arrays["token_weights"],
        embedding_weights=arrays["embedding_weights"],
        embedding_bias=arrays["embedding_bias"],
        blend=arrays["blend"],
        tokenizer_json=tokenizer_json,
    )


def make_tokenizer(tokenizer_json: str) -> Tokenizer:
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def pool(ids: npt.NDArray[np.int64], token_vectors: npt.NDArray[np.float32],
         token_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """One text's embedding: the IDF-weighted mean of its tokens' static vectors, L2-normalised (zeros if none)."""
    if len(ids) == 0:
        return np.zeros(token_vectors.shape[1], dtype=np.float32)
    vector = (token_weights[ids] @ token_vectors[ids]).astype(np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def sentence_embeddings(tokenizer: Tokenizer, texts: Sequence[str], token_codes: npt.NDArray[np.int8],
                        token_scales: npt.NDArray[np.float32], token_weights: npt.NDArray[np.float32]
                        ) -> npt.NDArray[np.float32]:
    """The embedding view of a batch: token ids from the WordPiece tokenizer, then `pool` per text."""
    encodings = tokenizer.encode_batch([t[:features.MAX_CHARS] for t in texts], add_special_tokens=False)
    out = np.zeros((len(texts), token_codes.shape[1]), dtype=np.float32)
    for row, encoding in enumerate(encodings):
        ids = np.asarray(encoding.ids[:MAX_TOKENS], dtype=np.int64)
        # Dequantise only the rows this text uses: the table stays int8 in memory.
        vectors = token_codes[ids].astype(np.float32) * token_scales[ids, None]
        out[row] = pool(np.arange(len(ids)), vectors, token_weights[ids])
    return out


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
        self._tokenizer = make_tokenizer(artifact.tokenizer_json)

    @classmethod
    def load(cls, path: Path | None = None) -> EngineModel:
        return cls(load_artifact(path))

    def logits(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The two views' raw logits, each (texts, heads)."""
        a = self.artifact
        rows = features.featurise(texts, a.idf)
        ngram = features.linear_scores(rows, a.ngram_weights, a.ngram_bias)
        embedded = sentence_embeddings(self._tokenizer, texts, a.token_codes, a.token_scales, a.token_weights)
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
