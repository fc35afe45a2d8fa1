"""The engine's speed and memory on this machine, in a fresh process (run by `make eval`, or alone).

    python ops/engine/bench.py [--json]

Batched: batches of 100 texts of about 600 characters (built from the repository's own docs, so no data folder is
needed); single: one text per call, p50 and p95. Memory: peak RSS of this process with the model loaded and used,
beside the same-run baselines of the interpreter with numpy imported but no model, and of a worker's
process (the Flask app and Celery configured, `workers.entry`) with the model warmed up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BATCH = 100
TEXT_CHARS = 600


# Peak RSS from /proc (VmHWM): ru_maxrss survives exec on Linux, so a child started by a big parent would report
# the parent's peak.
PEAK_RSS = ("next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024")


def rss_mb() -> float:
    return float(eval(PEAK_RSS))  # noqa: S307 - our own constant expression


def texts() -> list[str]:
    """Deterministic ~600-character English texts: sliding windows over the README and the engine docs."""
    paths = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    corpus = " ".join(p.read_text(encoding="utf-8") for p in paths)
    corpus = " ".join(corpus.split())
    step = max(1, (len(corpus) - TEXT_CHARS) // (4 * BATCH))
    return [corpus[i:i + TEXT_CHARS] for i in range(0, step * 4 * BATCH, step)][:4 * BATCH]


def child_rss(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, cwd=str(ROOT))
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report: dict[str, float] = {}
    baseline = child_rss("import numpy; "
                         f"print({PEAK_RSS})")
    started = time.perf_counter()
    from app.moderation.local_engine import LocalEngine

    engine = LocalEngine()
    engine.warm_up()
    report["load_s"] = round(time.perf_counter() - started, 3)
    sample = texts()
    batches = [sample[i:i + BATCH] for i in range(0, len(sample), BATCH)]
    engine.moderate(batches[0])
    timings, cpu = [], []
    for _ in range(3):
        for batch in batches:
            t, c = time.perf_counter(), time.process_time()
            engine.moderate(batch)
            timings.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    report["texts_per_s"] = round(BATCH / statistics.median(timings), 1)
    # CPU time, not wall time: what one core does when it is not shared. On a busy machine the wall-clock figure
    # above measures the other processes as much as the engine; the load average says how busy it was.
    report["texts_per_cpu_s"] = round(BATCH / statistics.median(cpu), 1)
    report["load_average_1m"] = round(os.getloadavg()[0], 1)
    singles = []
    for text in sample[:300]:
        t = time.perf_counter()
        engine.moderate([text])
        singles.append((time.perf_counter() - t) * 1000)
    report["single_p50_ms"] = round(statistics.median(singles), 3)
    report["single_p95_ms"] = round(statistics.quantiles(singles, n=20)[-1], 3)
    report["engine_process_rss_mb"] = round(rss_mb(), 1)
    report["baseline_numpy_rss_mb"] = round(baseline, 1)
    report["worker_rss_mb"] = round(child_rss(
        "import os; os.environ.setdefault('VAR_DIR', '/tmp/verdict-engine-bench'); "
        "import workers.entry as w; w.flask_app.extensions['verdict.provider'].warm_up(); "
        "w.flask_app.extensions['verdict.provider'].moderate(['warm ' * 100] * 100); "
        f"print({PEAK_RSS})"), 1)
    report["worker_without_model_rss_mb"] = round(child_rss(
        "import os; os.environ.setdefault('VAR_DIR', '/tmp/verdict-engine-bench'); "
        f"import workers.entry; print({PEAK_RSS})"), 1)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
