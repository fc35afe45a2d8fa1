"""`make eval`: the shipped engine's quality, calibration, cascade share, speed and memory, on this machine.

    python ops/engine/evaluate.py [DATA_DIR] [--jobs 2] [--band-low 0.1 --band-high 0.9] [--skip-sources]

Quality is measured by re-running the training procedure (pipeline.py) so that no text is scored by a model that
was trained on it: on openai_moderation_dev by 5-fold cross-validation (blend and calibration cross-fitted too), and
on each other source held out in turn. Speed and memory are measured on the shipped artifact, in a fresh process
(bench.py). Writes ops/engine/RESULTS.md; the last line printed is the RESULT line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pipeline
from pipeline import DEV_SOURCE, HEADS, ROOT, Views
from sklearn.metrics import average_precision_score

from app.moderation.engine import model
from app.moderation.taxonomy import CATEGORIES

RESULTS = ROOT / "ops" / "engine" / "RESULTS.md"
REVIEW, BLOCK = 0.5, 0.8  # the default policy's thresholds for every category the engine judges
DEV_JUDGED = [h for h in HEADS if h not in ("illicit", "illicit/violent")]  # the dev set labels no illicit


def auprc(y: npt.NDArray[np.int8], score: npt.NDArray[np.floating]) -> float | None:
    known = y >= 0
    if known.sum() == 0 or y[known].min() == y[known].max():
        return None
    return float(average_precision_score(y[known], score[known]))


def ece(y: npt.NDArray[np.int8], p: npt.NDArray[np.floating], bins: int = 10) -> float | None:
    """Expected calibration error over equal-width bins of the predicted probability."""
    known = y >= 0
    if known.sum() == 0:
        return None
    y, p = y[known].astype(float), p[known]
    edges = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = edges == b
        if inside.any():
            total += inside.sum() / len(p) * abs(p[inside].mean() - y[inside].mean())
    return float(total)


def reliability(y: npt.NDArray[np.int8], p: npt.NDArray[np.floating]) -> list[tuple[str, int, float, float]]:
    known = y >= 0
    y, p = y[known].astype(float), p[known]
    rows = []
    for lo, hi in ((0, 0.1), (0.1, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.01)):
        inside = (p >= lo) & (p < hi)
        if inside.any():
            rows.append((f"[{lo:.1f}, {min(hi, 1.0):.1f})", int(inside.sum()), float(p[inside].mean()),
                         float(y[inside].mean())))
    return rows


@dataclass
class DevReport:
    probabilities: npt.NDArray[np.float32]  # (dev rows, heads)
    labels: npt.NDArray[np.int8]  # (dev rows, CATEGORIES)
    ngram_only: npt.NDArray[np.float32]
    embedding_only: npt.NDArray[np.float32]


def dev_cross_validation(views: Views, shipped_blend: npt.NDArray[np.float32]) -> DevReport:
    corpus = views.corpus
    rows, logits, fold_of = pipeline.dev_oof(views)
    folds = np.asarray(fold_of)
    probabilities = np.zeros((len(rows), len(HEADS)), dtype=np.float32)
    single = {0: np.zeros_like(probabilities), 1: np.zeros_like(probabilities)}
    for k in range(pipeline.FOLDS):
        test, train = folds == k, folds != k
        blends = shipped_blend.copy()
        for j, head in enumerate(HEADS):
            if pipeline.dev_positives(corpus, head) >= pipeline.MIN_DEV_POSITIVES:
                blends[j] = pipeline.fit_blend(logits[train, j, :], corpus.label(head)[rows[train]])
        probabilities[test] = pipeline.blended(logits[test], blends)
        for view in (0, 1):  # each view alone, Platt-calibrated the same cross-fitted way
            only = np.zeros_like(logits[test])
            only[:, :, view] = logits[test][:, :, view]
            view_blends = blends.copy()
            for j, head in enumerate(HEADS):
                masked = np.zeros_like(logits[train, j, :])
                masked[:, view] = logits[train, j, view]
                view_blends[j] = pipeline.fit_blend(masked, corpus.label(head)[rows[train]])
            single[view][test] = pipeline.blended(only, view_blends)
    return DevReport(probabilities, corpus.labels[rows], single[0], single[1])


def any_label(labels: npt.NDArray[np.int8]) -> npt.NDArray[np.int8]:
    return (labels.max(axis=1) > 0).astype(np.int8)


def any_score(probabilities: npt.NDArray[np.float32], heads: list[str] | tuple[str, ...] = HEADS
              ) -> npt.NDArray[np.float32]:
    return probabilities[:, [HEADS.index(h) for h in heads]].max(axis=1)


def hold_out(args: tuple[Views, str, npt.NDArray[np.float32]]) -> tuple[str, dict[str, float | None], int]:
    views, source, blend = args
    corpus = views.corpus
    test = corpus.indices([source])
    train = np.setdiff1d(np.arange(len(corpus)), test)
    fitted = views.fit(train)
    probabilities = pipeline.blended(views.logits(fitted, test), blend)
    result: dict[str, float | None] = {h: auprc(corpus.label(h)[test], probabilities[:, j])
                                       for j, h in enumerate(HEADS)}
    return source, result, len(test)


def run_bench() -> dict[str, float]:
    out = subprocess.run([sys.executable, str(ROOT / "ops" / "engine" / "bench.py"), "--json"], check=True,
                         capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", nargs="?", type=Path, default=pipeline.DEFAULT_DATA)
    parser.add_argument("--jobs", type=int, default=2, help="folds and held-out sources trained at once")
    parser.add_argument("--band-low", type=float, default=0.1)
    parser.add_argument("--band-high", type=float, default=0.9)
    parser.add_argument("--skip-sources", action="store_true", help="only the dev cross-validation (faster)")
    args = parser.parse_args()
    pipeline.JOBS = args.jobs
    started = time.monotonic()
    artifact = model.load_artifact()
    corpus = pipeline.load_corpus(args.data_dir.resolve())
    views = Views(corpus, artifact.words.row_of_id, artifact.words.codes, artifact.words.scales)
    print(f"corpus: {len(corpus)} rows; dev cross-validation ({pipeline.FOLDS} folds)", flush=True)
    dev = dev_cross_validation(views, artifact.blend)
    lines: list[str] = []
    emit = lines.append
    y_any = any_label(dev.labels)
    p_any = any_score(dev.probabilities)
    emit("## In-domain: openai_moderation_dev, 5-fold cross-validation\n")
    emit(f"{len(y_any)} texts, {int(y_any.sum())} harmful in at least one category. Every score below comes from a "
         "model (heads, blend and calibration) that never saw the text.\n")
    emit("| category | positives | AUPRC | AUPRC n-gram view | AUPRC embedding view | ECE | Brier |")
    emit("|---|---:|---:|---:|---:|---:|---:|")
    per_category: dict[str, float] = {}
    for head in DEV_JUDGED:
        j, c = HEADS.index(head), CATEGORIES.index(head)
        y = dev.labels[:, c]
        value = auprc(y, dev.probabilities[:, j])
        if value is not None:
            per_category[head] = value
        known = y >= 0
        brier = float(np.mean((dev.probabilities[known, j] - y[known]) ** 2))
        emit(f"| {head} | {int((y == 1).sum())} | {fmt(value)} | {fmt(auprc(y, dev.ngram_only[:, j]))} | "
             f"{fmt(auprc(y, dev.embedding_only[:, j]))} | {fmt(ece(y, dev.probabilities[:, j]))} | {brier:.3f} |")
    auprc_any = auprc(y_any, p_any)
    emit(f"| **any** (max over the {len(HEADS)} judged) | {int(y_any.sum())} | **{fmt(auprc_any)}** | "
         f"{fmt(auprc(y_any, any_score(dev.ngram_only)))} | {fmt(auprc(y_any, any_score(dev.embedding_only)))} | "
         f"{fmt(ece(y_any, p_any))} | {float(np.mean((p_any - y_any) ** 2)):.3f} |")
    emit(f"\nany over the {len(DEV_JUDGED)} categories the dev set labels (no illicit heads): "
         f"{fmt(auprc(y_any, any_score(dev.probabilities, DEV_JUDGED)))}.")
    macro = float(np.mean(list(per_category.values())))
    flagged = p_any >= REVIEW
    recall = float(flagged[y_any == 1].mean())
    fpr = float(flagged[y_any == 0].mean())
    blocked = p_any >= BLOCK
    emit(f"\nAt the default policy (review at 0.5, block at 0.8): flagged (review or block) {recall:.3f} of the "
         f"harmful texts and {fpr:.3f} of the harmless ones; blocked {float(blocked[y_any == 1].mean()):.3f} of the "
         f"harmful and {float(blocked[y_any == 0].mean()):.3f} of the harmless.\n")
    emit("Reliability of 'any' (predicted vs observed share harmful):\n")
    emit("| predicted | texts | mean predicted | observed |")
    emit("|---|---:|---:|---:|")
    for name, n, mean_p, observed in reliability(y_any, p_any):
        emit(f"| {name} | {n} | {mean_p:.3f} | {observed:.3f} |")

    emit(f"\n## Cascade band [{args.band_low}, {args.band_high}) on the dev data\n")
    emit("| band | share sent upstream | harmful let through by the engine alone (below the band) | "
         "harmless flagged by the engine alone (above the band) |")
    emit("|---|---:|---:|---:|")
    bands = [(args.band_low, args.band_high), (0.05, 0.95), (0.2, 0.8), (0.3, 0.7)]
    for low, high in dict.fromkeys(bands):
        upstream = (p_any >= low) & (p_any < high)
        missed = int(((p_any < low) & (y_any == 1)).sum())
        wrong = int(((p_any >= high) & (y_any == 0)).sum())
        emit(f"| [{low}, {high}) | {float(upstream.mean()):.3f} | {missed} of {int(y_any.sum())} | "
             f"{wrong} of {int((y_any == 0).sum())} |")
    share_upstream = float(((p_any >= args.band_low) & (p_any < args.band_high)).mean())

    if not args.skip_sources:
        emit("\n## Each other source held out in turn (AUPRC; trained on everything else)\n")
        emit("The blend and calibration are the shipped model's. `–`: the source labels no positives (or no "
             "negatives) there.\n")
        emit("| source | rows | " + " | ".join(HEADS) + " |")
        emit("|---|---:|" + "---:|" * len(HEADS))
        sources = sorted(set(corpus.sources) - {DEV_SOURCE})
        print(f"holding out {len(sources)} sources, {args.jobs} at a time", flush=True)
        with ProcessPoolExecutor(args.jobs) as pool:
            for source, result, n in pool.map(hold_out, [(views, s, artifact.blend) for s in sources]):
                print(f"  {source} done", flush=True)
                emit(f"| {source} | {n} | " + " | ".join(fmt(result[h]) for h in HEADS) + " |")

    print("speed and memory (fresh process)", flush=True)
    bench = run_bench()
    emit("\n## Speed and memory (shipped artifact, this machine)\n")
    emit("| measure | value |")
    emit("|---|---:|")
    for key, value in bench.items():
        emit(f"| {key} | {value} |")
    result = (f"RESULT auprc_any={auprc_any:.3f} auprc_macro={macro:.3f} judged={len(HEADS)} "
              f"recall_at_policy={recall:.3f} fpr_at_policy={fpr:.3f} texts_per_s={bench['texts_per_s']:.0f} "
              f"single_p50_ms={bench['single_p50_ms']:.2f} rss_mb={bench['worker_rss_mb']:.0f}")
    header = [
        "# Engine evaluation results", "",
        f"Written by `make eval` (ops/engine/evaluate.py) on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; model "
        f"`{artifact.metadata['model']}`, artifact content sha256 `{artifact.metadata['content_sha256'][:16]}…`; "
        f"{time.monotonic() - started:.0f} s. Cascade share upstream at the chosen band: {share_upstream:.3f}.", "",
        "Reproduce: `make train-engine` (then the artifact's digest must equal ops/engine/artifact.json) and "
        "`make eval`.", "",
    ]
    RESULTS.write_text("\n".join(header + lines + ["", "```", result, "```", ""]))
    print("\n".join(lines))
    print(result)


if __name__ == "__main__":
    main()
