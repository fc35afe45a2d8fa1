"""`make train-engine`: train the embedded engine on the data folder and write the shipped artifact.

    python ops/engine/train.py [DATA_DIR] [--out PATH]

DATA_DIR defaults to ../shared/data/moderation. The same data gives the same artifact, byte for byte: the sampling,
the folds and the solvers are seeded, the distillation runs on one thread, and the archive has fixed timestamps.
Writes app/moderation/engine/verdict-engine.npz and records its digest in ops/engine/artifact.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import pipeline
from pipeline import HEADS, ROOT, Views

from app.moderation.engine import features, model
from app.moderation.taxonomy import CATEGORIES

RECORD = ROOT / "ops" / "engine" / "artifact.json"
MODEL_ID = "verdict-local-3"


def data_digest(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(data_dir.glob("*.jsonl")):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def training_config() -> dict[str, object]:
    return {
        "seed": pipeline.SEED, "folds": pipeline.FOLDS, "source_cap": pipeline.SOURCE_CAP,
        "default_cap": pipeline.DEFAULT_CAP, "ngram_dev_weight": pipeline.NGRAM_DEV_WEIGHT,
        "embedding_dev_weight": pipeline.EMBEDDING_DEV_WEIGHT, "source_weight": pipeline.SOURCE_WEIGHT,
        "proxy_harassment": pipeline.PROXY_HARASSMENT, "ngram_c": pipeline.NGRAM_C,
        "embedding_c": pipeline.EMBEDDING_C, "min_dev_positives": pipeline.MIN_DEV_POSITIVES,
        "word_bits": features.WORD_BITS, "char_bits": features.CHAR_BITS, "char_ngrams": list(features.CHAR_NGRAMS),
        "max_chars": features.MAX_CHARS, "min_word_documents": pipeline.MIN_WORD_DOCUMENTS,
        "max_word_pieces": pipeline.MAX_WORD_PIECES,
    }


def train(data_dir: Path, out: Path) -> dict[str, object]:
    started = time.monotonic()
    corpus = pipeline.load_corpus(data_dir)
    print(f"corpus: {len(corpus)} rows from {len(set(corpus.sources))} sources ({time.monotonic() - started:.0f}s)")
    words, row_of_id = pipeline.word_table(pipeline.vocabulary(corpus))
    codes, scales = pipeline.quantise_rows(pipeline.distil_word_vectors(words))
    views = Views(corpus, row_of_id, codes, scales)
    print(f"{len(words)} word vectors distilled ({time.monotonic() - started:.0f}s)")
    dev_rows, dev_logits, _ = pipeline.dev_oof(views)
    other_rows, other_logits = pipeline.grouped_oof(views)
    blends = pipeline.fit_blends(corpus, dev_rows, dev_logits, other_rows, other_logits)
    fitted = views.fit(np.arange(len(corpus), dtype=np.int64))
    print(f"fitted on every row ({time.monotonic() - started:.0f}s)")
    arrays = {
        "idf": fitted.idf.astype(np.float16),
        "ngram_weights": fitted.ngram_weights.astype(np.float16),
        "ngram_bias": fitted.ngram_bias,
        "word_rows": row_of_id,
        "word_codes": codes,
        "word_scales": scales,
        "word_weights": fitted.word_weights,
        "embedding_weights": fitted.embedding_weights,
        "embedding_bias": fitted.embedding_bias,
        "blend": blends,
    }
    counts = {s: corpus.sources.count(s) for s in sorted(set(corpus.sources))}
    metadata = {
        "model": MODEL_ID,
        "heads": list(HEADS),
        "not_judged": [c for c in CATEGORIES if c not in HEADS],
        "calibrated_on": {h: "in-domain" if pipeline.dev_positives(corpus, h) >= pipeline.MIN_DEV_POSITIVES
                          else "other sources" for h in HEADS},
        "rows_per_source": counts,
        "data_sha256": data_digest(data_dir),
        "vocabulary_words": len(words),
        "tokenizer_sha256": hashlib.sha256(pipeline.TOKENIZER_PATH.read_bytes()).hexdigest(),
        "config": training_config(),
    }
    digest = model.write_artifact(out, arrays, metadata)
    check_serving_agrees(views, fitted, blends, out)
    file_sha = hashlib.sha256(out.read_bytes()).hexdigest()
    record = {"model": MODEL_ID, "content_sha256": digest, "file_sha256": file_sha, "bytes": out.stat().st_size,
              "data_sha256": metadata["data_sha256"], "config": metadata["config"], "heads": list(HEADS),
              "trained_with": {"python": platform.python_version(), "numpy": np.__version__}}
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, content sha256 {digest[:16]}…, "
          f"{time.monotonic() - started:.0f}s)")
    return record


def check_serving_agrees(views: Views, fitted: pipeline.Fitted, blends: np.ndarray, path: Path) -> None:
    """The service's code path (features.py, model.py) must give the training pipeline's probabilities."""
    sample = np.arange(0, len(views.corpus), max(1, len(views.corpus) // 300), dtype=np.int64)
    trained = pipeline.blended(views.logits(fitted, sample), blends)
    served = model.EngineModel.load(path).probabilities([views.corpus.texts[i] for i in sample])
    worst = float(np.abs(trained - served).max())
    # float16 storage of the n-gram weights and IDF moves probabilities by well under a hundredth.
    if worst > 0.02:
        raise SystemExit(f"serving disagrees with training by {worst:.4f}: features or artifact are out of sync")
    print(f"serving agrees with training (largest difference {worst:.4f} over {len(sample)} texts)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", nargs="?", type=Path, default=pipeline.DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=model.shipped_artifact_path())
    parser.add_argument("--no-record", action="store_true", help="do not update ops/engine/artifact.json")
    parser.add_argument("--jobs", type=int, default=pipeline.JOBS, help="folds fitted at once (same result)")
    args = parser.parse_args()
    pipeline.JOBS = args.jobs
    record = train(args.data_dir.resolve(), args.out)
    if not args.no_record:
        RECORD.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
