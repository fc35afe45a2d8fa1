"""`make bench` in miniature: the benchmark (ops/bench/run.py) runs every phase at tiny sizes against the test
suite's PostgreSQL and Redis, completes, and prints its RESULT line. A benchmark nobody runs rots (issue 15): this is
what keeps it running. It measures nothing: a tiny run's figures mean nothing, so none is compared with anything.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import TEST_DATABASE_URL, TEST_REDIS_URL
from tests.integration.processes import free_port

ROOT = Path(__file__).resolve().parents[2]

# Every figure of the RESULT line (ops/bench/README.md), in its order.
RESULT_FIELDS = [
    "upstream_ratio", "upstream_429", "intake_rps", "intake_ratio", "intake_p99_ms", "e2e_tps", "e2e_ratio",
    "e2e_p50_ms", "e2e_p99_ms", "steady_p50_ms", "steady_p99_ms", "webhook_p99_ms",
    "sync_overhead_p99_ms", "api_rss_mb", "worker_rss_mb",
]

# The bench runs Celery workers and an API of its own (grandchildren the guard does not see): serial, integration.
pytestmark = [pytest.mark.integration, pytest.mark.serial]


def test_the_benchmark_completes_and_prints_its_result_line(tmp_path: Path) -> None:
    admin = make_url(TEST_DATABASE_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    env = {**os.environ, "BENCH_PG_ADMIN_URL": admin, "BENCH_REDIS_URL": TEST_REDIS_URL,
           "BENCH_LOG_DIR": str(tmp_path / "logs")}
    report = tmp_path / "RESULTS.md"
    process = subprocess.run(  # noqa: S603
        [sys.executable, "ops/bench/run.py", "--window", "2", "--rpm", "60", "--batch", "4", "--latency", "0.01",
         "--workers", "1", "--concurrency", "1", "--intake-seconds", "1", "--intake-threads", "2",
         "--e2e-texts", "40", "--sync-seconds", "1", "--sync-threads", "1", "--steady-rate", "10",
         "--steady-seconds", "1", "--steady-latency", "0.01", "--steady-drain-seconds", "60",
         "--scale", "--scale-texts", "8", "--api-port", str(free_port()), "--report", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=420,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-4000:]
    last = process.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), output[-4000:]
    fields = dict(pair.split("=", 1) for pair in last.split()[1:])
    assert list(fields) == RESULT_FIELDS, last
    for name, value in fields.items():
        assert re.fullmatch(r"-?\d+(\.\d+)?", value), (name, value)
        assert math.isfinite(float(value)), (name, value)
    assert fields["upstream_429"] == "0", last
    assert float(fields["e2e_tps"]) > 0 and float(fields["worker_rss_mb"]) > 0, last
    # The report names the same line and the --scale figures; the repository's RESULTS.md is left alone.
    written = report.read_text()
    assert last in written, written
    assert "1 / 2 / 4 workers" in written and "one tenant's ceiling" in written, written
    # Every steady-phase text got its verdict (a slow pipeline is reported, not failed: here nothing may be missing).
    assert "0 of 10 without a verdict" in written, written


def test_some_phases_only_print_their_figures_and_need_no_report() -> None:
    # Refused before it starts anything: a report is of a whole run.
    refused = subprocess.run(  # noqa: S603
        [sys.executable, "ops/bench/run.py", "--phases", "sync"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--report ''" in refused.stderr, refused.stderr
    unknown = subprocess.run(  # noqa: S603
        [sys.executable, "ops/bench/run.py", "--phases", "sync,warp", "--report", ""], cwd=ROOT, capture_output=True,
        text=True, timeout=60)
    assert unknown.returncode == 2 and "warp" in unknown.stderr, unknown.stderr
