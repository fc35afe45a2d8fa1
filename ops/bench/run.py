"""Verdict's benchmark (`make bench`; see ops/bench/README.md): upstream efficiency, intake, the synchronous path,
end to end.

Everything is real except the upstream moderation API, which is `tests.fake_upstream.FakeUpstream` (in this
process for the upstream phase, enforcing a provider's requests-per-minute limit; a process of its own for the phases
that measure latency): a scratch PostgreSQL database, the Redis broker, the
API under gunicorn and Celery worker processes. Each figure comes with a baseline measured in the same run. The
last line printed is the RESULT line; ops/bench/RESULTS.md gets the run's report.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402
from sqlalchemy import event, func, select, update  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from app.cli import migrate_database  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db import Database  # noqa: E402
from app.models import Submission, Verdict  # noqa: E402
from app.use_cases.audit import record_event  # noqa: E402
from app.use_cases.keys import KeyLimits, create_key  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.webhook_receiver import WebhookReceiver  # noqa: E402

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
UPSTREAM_KEY = "sk-bench"
LOG_DIR = Path(os.environ.get("BENCH_LOG_DIR", ROOT / "var" / "bench"))
# The bench's own keys carry limits far above what its clients can send (the per-key limit stays on, as in
# production, and is checked on every request; it just never refuses the benchmark's clients).
BENCH_KEY_LIMITS = KeyLimits(rpm=1_000_000_000, tpm=1_000_000_000)


# The RESULT line's figures, in order, with their formats.
RESULT_FIELDS = (
    ("upstream_ratio", ".3f"), ("upstream_429", "d"), ("intake_rps", ".1f"), ("intake_ratio", ".3f"),
    ("intake_p99_ms", ".1f"), ("e2e_tps", ".1f"), ("e2e_ratio", ".3f"), ("e2e_p50_ms", ".0f"), ("e2e_p99_ms", ".0f"),
    ("steady_p50_ms", ".0f"), ("steady_p99_ms", ".0f"), ("webhook_p99_ms", ".0f"), ("sync_overhead_p99_ms", ".1f"),
    ("api_rss_mb", ".0f"), ("worker_rss_mb", ".0f"),
)
PHASES = ("upstream", "intake", "sync", "e2e", "steady")
# Where an intake request's CPU goes (per request, each route): the API's processes, PostgreSQL, the client threads.
INTAKE_CPU_PARTS = ("api", "pg", "clients")


def log(message: str) -> None:
    print(f"[bench {datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


class KeptConnection:
    """One keep-alive `http.client` connection to the API, for a load generator that shares the machine with what it
    measures: ~0.26 ms of CPU a request here, against ~1.05 ms through httpx, CPU that would otherwise count in the
    figures it measures (a latency, or the machine's busy share). One per client thread: not thread-safe."""

    def __init__(self, url: str) -> None:
        self._target = urlsplit(url)
        self._conn: http.client.HTTPConnection | None = None

    def post(self, path: str, headers: dict[str, str], body: str) -> tuple[int, bytes]:
        """The answer's status and body; status 0 when no connection could be made. A kept-alive connection the
        server has closed meanwhile (gunicorn's keep-alive timeout) fails before the request reaches it: sent again
        once on a new connection, as httpx's pool does."""
        for fresh in (self._conn is None, True):
            if fresh:
                self._conn = http.client.HTTPConnection(self._target.hostname, self._target.port, timeout=30)
            assert self._conn is not None
            try:
                self._conn.request("POST", path, headers=headers, body=body)
                response = self._conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if fresh:
                    return 0, b""
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def cpu_of_group(pgid: int | None = None, pids: set[int] | None = None) -> dict[int, float]:
    """CPU seconds (utime + stime) of the processes in process group `pgid`, or of `pids`, by pid."""
    found: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            if pids is not None and pid not in pids:
                continue
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if pgid is not None and int(fields[2]) != pgid:
                continue
            found[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return float(sum(fields) - idle), float(sum(fields))


def machine_busy(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The share of the machine's CPU time that was busy between two machine_cpu() readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


class Proc:
    """A child process in its own process group (so its pool processes are found and stopped with it)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.log_path = LOG_DIR / f"{name}.log"
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_for_log(self, marker: bytes, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            if marker in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s")

    def peak_rss_mb(self) -> float:
        """The sum of the peak resident sets (VmHWM) of every process in the group."""
        total_kb = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != self.process.pid:  # field 5 of stat: the process group
                    continue
                for line in (stat.parent / "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total_kb += int(line.split()[1])
            except (OSError, IndexError, ValueError):
                continue
        return total_kb / 1024

    def cpu_seconds(self) -> float:
        """The CPU time (user + system) the group's live processes have used so far."""
        return sum(cpu_of_group(self.process.pid).values())

    def pss_mb(self) -> float:
        """The sum of the proportional set sizes (Pss of /proc/PID/smaps_rollup) of every process in the group, now:
        a page the pool processes share with the main process since the fork counts once, split among them."""
        return sum(pss for _, _, pss in self.memory_per_process_mb())

    def memory_per_process_mb(self) -> list[tuple[int, float, float]]:
        """(pid, peak RSS = VmHWM, PSS now) in MB of every process in the group: PSS shares each page among the
        processes that map it, so pages a preloaded parent shares with its forked children are counted once."""
        found: list[tuple[int, float, float]] = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != self.process.pid:
                    continue
                hwm = next(int(line.split()[1]) for line in (stat.parent / "status").read_text().splitlines()
                           if line.startswith("VmHWM:"))
                pss = next((int(line.split()[1]) for line in (stat.parent / "smaps_rollup").read_text().splitlines()
                            if line.startswith("Pss:")), 0)
                found.append((int(stat.parent.name), hwm / 1024, pss / 1024))
            except (OSError, IndexError, ValueError, StopIteration):
                continue
        return sorted(found)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


class UpstreamProcess:
    """The fake upstream in a process of its own (`python -m tests.fake_upstream`), for the phases that measure latency:
    in the benchmark's process its answers would wait for the GIL behind the benchmark's own client threads."""

    def __init__(self, bench: Bench, name: str, *, latency: float, rpm: int | None = None,
                 max_batch: int | None = None) -> None:
        argv = [sys.executable, "-m", "tests.fake_upstream", "--port", "0", "--api-key", UPSTREAM_KEY,
                "--latency", str(latency)]
        if rpm is not None:
            argv += ["--rpm", str(rpm)]
        if max_batch is not None:
            argv += ["--max-batch", str(max_batch)]
        self.bench = bench
        self.proc = bench.start(name, argv, {**os.environ, "PYTHONUNBUFFERED": "1"}, ready=b"serving on ")
        self.base_url = self.proc.log_path.read_text().split("serving on ", 1)[1].split()[0]
        self.requests = 0
        self.rejected_429 = 0

    def __enter__(self) -> UpstreamProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Interrupt it (it prints what it answered as it stops) and read its counts."""
        process = self.proc.process
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if self.proc in self.bench.procs:
            self.bench.procs.remove(self.proc)
        tail = self.proc.log_path.read_text(errors="replace").rsplit("fake upstream stopped:", 1)
        if len(tail) == 2:
            counts = dict(field.split("=", 1) for field in tail[1].split())
            self.requests, self.rejected_429 = int(counts["requests"]), int(counts["rejected_429"])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        run = uuid.uuid4().hex[:8]
        self.db_name = f"verdict_bench_{run}"
        self.prefix = f"verdict-bench-{run}:"
        # The scratch database lives on the server BENCH_PG_ADMIN_URL names.
        self.database_url = make_url(PG_ADMIN).set(drivername="postgresql+psycopg", database=self.db_name) \
            .render_as_string(hide_password=False)
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.database: Database | None = None
        self.procs: list[Proc] = []
        self.results: dict[str, Any] = {}

    # -- setup -----------------------------------------------------------------------------------------------

    def base_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("UPSTREAM_", "MODERATION_", "DATABASE_", "BROKER_", "REDIS_"))}
        env.update({"DATABASE_URL": self.database_url, "BROKER_URL": REDIS_URL, "BROKER_KEY_PREFIX": self.prefix,
                    "LOG_FORMAT": "json", "LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT),
                    # The steady phase's webhook receiver listens on this machine.
                    "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8", "WEBHOOK_ALLOWED_PORTS": "*"})
        env.update(extra)
        return env

    def setup(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        migrate_database(Settings(_env_file=None, database_url=self.database_url))  # type: ignore[call-arg]
        self.database = Database(self.database_url)

    def teardown(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.flush_broker()
        if self.database is not None:
            self.database.engine.dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    def postgres_cpu(self) -> dict[int, float]:
        """CPU seconds of the scratch database's server processes, by pid (on this host: the benchmark's PostgreSQL
        runs here)."""
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            pids = {row[0] for row in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                                   (self.db_name,))}
        return cpu_of_group(pids=pids)

    def cpu_per_text(self, label: str, workers: list[Proc], api: Proc | None, texts: int,
                     before: tuple[float, float, dict[int, float]]) -> None:
        """Record the CPU milliseconds per text of the workers, the API and PostgreSQL since `before`."""
        worker_cpu, api_cpu, pg_before = before
        pg_after = self.postgres_cpu()
        pg = sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items())
        self.results[f"{label}_worker_cpu_ms"] = 1000 * (sum(w.cpu_seconds() for w in workers) - worker_cpu) / texts
        if api is not None:
            self.results[f"{label}_api_cpu_ms"] = 1000 * (api.cpu_seconds() - api_cpu) / texts
        self.results[f"{label}_pg_cpu_ms"] = 1000 * pg / texts

    def cpu_before(self, workers: list[Proc], api: Proc | None) -> tuple[float, float, dict[int, float]]:
        return (sum(w.cpu_seconds() for w in workers), 0.0 if api is None else api.cpu_seconds(),
                self.postgres_cpu())

    def flush_broker(self) -> None:
        keys = list(self.redis.scan_iter(match=f"{self.prefix}*", count=1000))
        if keys:
            self.redis.delete(*keys)

    def new_key(self, scopes: tuple[str, ...] = ("submit", "read")) -> str:
        assert self.database is not None
        with self.database.transaction() as session:
            issued = create_key(session, tenant_name=f"bench-{uuid.uuid4().hex[:8]}", scopes=scopes,
                                limits=BENCH_KEY_LIMITS)
            return issued.plaintext

    def start(self, name: str, argv: list[str], env: dict[str, str], ready: bytes) -> Proc:
        proc = Proc(name, argv, env)
        self.procs.append(proc)
        proc.wait_for_log(ready)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.procs.remove(proc)

    def start_workers(self, label: str, env: dict[str, str], app: str = "workers.entry",
                      queue: str = "moderation", count: int | None = None) -> list[Proc]:
        return [self.start(f"{label}-{i}", [sys.executable, "-m", "celery", "-A", app, "worker",
                                             "-c", str(self.args.concurrency),
                                             "-Q", queue, "-n", f"{label}{i}@%h", "--loglevel", "INFO",
                                             "--without-gossip", "--without-mingle", "--without-heartbeat"],
                           env, b" ready.")
                for i in range(self.args.workers if count is None else count)]

    def start_api(self, env: dict[str, str], name: str = "api", port: int | None = None) -> tuple[Proc, str]:
        port = port or self.args.api_port
        proc = self.start(name, [str(Path(sys.executable).with_name("verdict")), "api", "--bind",
                                  f"127.0.0.1:{port}", "--workers", "2", "--threads", "8"], env, b"Booting worker")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the API did not answer /healthz")

    def abandon_unfinished(self) -> None:
        """Between phases: what one phase left queued must not be worked on by the next one's workers."""
        assert self.database is not None
        self.flush_broker()
        with self.database.transaction() as session:
            session.execute(update(Submission).where(Submission.status.in_(["queued", "processing"]))
                            .values(status="failed", error_code="bench_abandoned", claim_token=None))

    def submit_texts(self, url: str, key: str, texts: list[str], threads: int = 2) -> None:
        chunks = [texts[i:i + 100] for i in range(0, len(texts), 100)]

        def post(chunk: list[str]) -> None:
            response = http.post(f"{url}/v1/submissions", json={"items": [{"input": t} for t in chunk]},
                                 headers={"Authorization": f"Bearer {key}"})
            if response.status_code != 202:
                raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")

        with httpx.Client(timeout=60) as http, ThreadPoolExecutor(threads) as pool:
            list(pool.map(post, chunks))

    # -- phase 1: upstream efficiency ------------------------------------------------------------------------

    def upstream(self, url: str) -> None:
        args = self.args
        rpm, batch, window = args.rpm, args.batch, args.window
        assert self.database is not None
        key = self.new_key()
        with FakeUpstream(api_key=UPSTREAM_KEY, rpm=rpm, max_batch=batch, latency=args.latency) as fake:
            # A backlog that outlasts the window, so every call can be full.
            backlog = int(math.ceil(rpm * batch * (window / 60 + 0.5) / 100) * 100)
            log(f"upstream: submitting a backlog of {backlog} texts")
            self.submit_texts(url, key, [f"upstream text {i}: have a lovely day" for i in range(backlog)])
            env = self.base_env(MODERATION_PROVIDER="openai", UPSTREAM_BASE_URL=fake.base_url,
                                UPSTREAM_API_KEY=UPSTREAM_KEY, UPSTREAM_MAX_BATCH=str(batch),
                                UPSTREAM_RPM=str(rpm))
            workers = self.start_workers("upstream", env)
            while not fake.requests:
                time.sleep(0.01)
            started = datetime.now(UTC)
            log(f"upstream: first call; measuring {window:.0f} s at R={rpm}/min, B={batch}, "
                f"{args.workers} workers x {args.concurrency}")
            time.sleep(window)
            ended = datetime.now(UTC)
            with self.database.transaction() as session:
                moderated = session.scalar(select(func.count()).select_from(Verdict)
                                           .where(Verdict.created_at >= started, Verdict.created_at < ended))
            calls = fake.requests
            rejected = fake.rejected_429
            for worker in workers:
                self.stop(worker)
        moderated = int(moderated or 0)
        per_minute = moderated / window * 60
        ratio = per_minute / (rpm * batch)
        sizes = [len(r.json["input"]) for r in calls if isinstance(r.json, dict) and "input" in r.json]
        self.results.update(upstream_ratio=ratio, upstream_429=rejected, upstream_texts_per_min=per_minute,
                            upstream_calls=len(calls), upstream_mean_batch=statistics.fmean(sizes) if sizes else 0)
        log(f"upstream: {moderated} texts in {window:.0f} s = {per_minute:.0f}/min of {rpm * batch} possible "
            f"(ratio {ratio:.3f}), {rejected} x 429, mean batch {self.results['upstream_mean_batch']:.1f}")
        self.abandon_unfinished()

    # -- phase 2: intake -------------------------------------------------------------------------------------

    def load(self, request: Callable[[Any], int], expected: int, *, seconds: float | None = None,
             threads: int | None = None, client: Callable[[], Any] | None = None) -> tuple[float, list[float]]:
        """`threads` clients sending `request` (given the client, it returns the answer's status) back to back for
        `seconds`: requests/s and every latency (ms). Each client thread has its own `client()` (an httpx client
        unless given)."""
        duration = self.args.intake_seconds if seconds is None else seconds
        threads = self.args.intake_threads if threads is None else threads
        new_client = client or (lambda: httpx.Client(timeout=30))
        latencies: list[list[float]] = [[] for _ in range(threads)]
        errors: list[int] = []
        stop_at = time.monotonic() + duration

        def run(slot: int) -> None:
            http = new_client()
            try:
                while time.monotonic() < stop_at:
                    began = time.perf_counter()
                    status = request(http)
                    latencies[slot].append((time.perf_counter() - began) * 1000)
                    if status != expected:
                        errors.append(status)
            finally:
                http.close()

        began = time.monotonic()
        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        elapsed = time.monotonic() - began
        if errors:
            raise RuntimeError(f"{len(errors)} unexpected answers, e.g. {errors[:5]}")
        flat = [v for slot in latencies for v in slot]
        return len(flat) / elapsed, flat

    def intake(self, url: str, api: Proc) -> None:
        key = self.new_key()
        headers = {"Authorization": f"Bearer {key}"}
        base_rps, base_lat = self._intake_cpu("baseline", api, lambda: self.load(
            lambda http: http.get(f"{url}/v1/models", headers=headers).status_code, 200))
        counter = iter(range(10**9))
        rps, lat = self._intake_cpu("intake", api, lambda: self.load(lambda http: http.post(
            f"{url}/v1/submissions", json={"input": f"intake text {next(counter)}: have a lovely day"},
            headers=headers).status_code, 202))
        self.results.update(intake_rps=rps, intake_ratio=rps / base_rps, intake_p50_ms=percentile(lat, 0.5),
                            intake_p99_ms=percentile(lat, 0.99), baseline_rps=base_rps,
                            baseline_p50_ms=percentile(base_lat, 0.5), baseline_p99_ms=percentile(base_lat, 0.99))
        r = self.results
        log(f"intake: POST /v1/submissions {rps:.0f} req/s (p50 {r['intake_p50_ms']:.1f} ms, "
            f"p99 {r['intake_p99_ms']:.1f} ms); GET /v1/models {base_rps:.0f} req/s "
            f"(p50 {r['baseline_p50_ms']:.1f} ms, p99 {r['baseline_p99_ms']:.1f} ms); CPU per request, "
            + "; ".join(f"{route}: " + ", ".join(f"{part} {r[f'{label}_{part}_cpu_ms']:.2f} ms"
                                                 for part in INTAKE_CPU_PARTS)
                        for route, label in (("POST", "intake"), ("GET", "baseline"))))
        self.abandon_unfinished()

    def _intake_cpu(self, label: str, api: Proc,
                    run: Callable[[], tuple[float, list[float]]]) -> tuple[float, list[float]]:
        """Run one intake load and record the CPU each part spent per request: the API's processes, PostgreSQL's
        backends and this process's client threads. On two cores the parts share the machine, so a route's rate is
        about 2 / the sum of its parts; the parts say which one to cut."""
        api_cpu, pg_before, own = api.cpu_seconds(), self.postgres_cpu(), time.process_time()
        rps, latencies = run()
        requests = max(1, len(latencies))
        pg = sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in self.postgres_cpu().items())
        self.results.update({f"{label}_api_cpu_ms": 1000 * (api.cpu_seconds() - api_cpu) / requests,
                             f"{label}_pg_cpu_ms": 1000 * pg / requests,
                             f"{label}_clients_cpu_ms": 1000 * (time.process_time() - own) / requests})
        return rps, latencies

    # -- phase: the synchronous path -------------------------------------------------------------------------

    def sync_path(self) -> None:
        """`POST /v1/moderations` against the fake upstream answering in `--sync-latency`: client latency minus that
        configured latency (the fake's own parsing and scoring, well under a millisecond, is counted as overhead), one
        distinct text per request so every one goes upstream (no cache hit), one client, then `--sync-threads`. A second
        API of its own (the OpenAI provider, the local engine as fallback: everything an API process can load)."""
        args = self.args
        key = self.new_key()
        with UpstreamProcess(self, "upstream-sync", latency=args.sync_latency) as fake:
            env = self.base_env(MODERATION_PROVIDER="openai", UPSTREAM_BASE_URL=fake.base_url,
                                UPSTREAM_API_KEY=UPSTREAM_KEY, MODERATION_FALLBACK_PROVIDER="local")
            api, url = self.start_api(env, name="api-sync", port=args.api_port + 1)
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            counter = iter(range(10**9))

            def moderate(http: KeptConnection) -> int:
                status, _ = http.post("/v1/moderations", headers,
                                      json.dumps({"input": f"sync text {next(counter)}: have a lovely day"}))
                return status

            # The clients are kept cheap (KeptConnection): their own CPU would count in the latency measured.
            def client() -> KeptConnection:
                return KeptConnection(url)

            warm = client()  # warm: a connection, the first policy load
            for _ in range(5):
                moderate(warm)
            warm.close()
            # One client: the latency one call adds (the RESULT figure); then --sync-threads clients, where the
            # two cores' queueing adds to it (in the report).
            rps, latencies = self.load(moderate, 200, seconds=args.sync_seconds, threads=1, client=client)
            loaded_rps, loaded = self.load(moderate, 200, seconds=args.sync_seconds, threads=args.sync_threads,
                                           client=client)
            memory = api.memory_per_process_mb()
            self.stop(api)
        upstream_calls = fake.requests
        overhead = [ms - args.sync_latency * 1000 for ms in latencies]
        self.results.update(sync_rps=rps, sync_p50_ms=percentile(latencies, 0.5),
                            sync_p99_ms=percentile(latencies, 0.99), sync_overhead_p50_ms=percentile(overhead, 0.5),
                            sync_overhead_p99_ms=percentile(overhead, 0.99), sync_upstream_calls=upstream_calls,
                            sync_api_memory=memory, sync_loaded_rps=loaded_rps,
                            sync_loaded_overhead_p50_ms=percentile(loaded, 0.5) - args.sync_latency * 1000,
                            sync_loaded_overhead_p99_ms=percentile(loaded, 0.99) - args.sync_latency * 1000)
        log(f"sync: POST /v1/moderations {rps:.0f} req/s, p50 {self.results['sync_p50_ms']:.1f} ms, p99 "
            f"{self.results['sync_p99_ms']:.1f} ms; minus the upstream's {args.sync_latency * 1000:.0f} ms: p50 "
            f"{self.results['sync_overhead_p50_ms']:.1f} ms, p99 {self.results['sync_overhead_p99_ms']:.1f} ms "
            f"(1 client); {args.sync_threads} clients: {loaded_rps:.0f} req/s, overhead p50 "
            f"{self.results['sync_loaded_overhead_p50_ms']:.1f} ms, "
            f"p99 {self.results['sync_loaded_overhead_p99_ms']:.1f} ms ({upstream_calls} upstream calls)"
            f"; per process (pid, VmHWM MB, PSS MB): {memory}")
        self.abandon_unfinished()

    # -- phase 3: end to end ---------------------------------------------------------------------------------

    def drain(self, url: str, count: int, label: str, workers: int | None = None,
              api: Proc | None = None) -> dict[str, float]:
        """Start the workers on the local engine, submit `count` texts at once (100 per request), wait until every
        one has its verdict: texts/s from the first submit to the last verdict, each one's latency, the workers'
        peak RSS."""
        assert self.database is not None
        key = self.new_key()
        procs = self.start_workers(label, self.base_env(MODERATION_PROVIDER="local"), count=workers)
        cpu = self.cpu_before(procs, api)
        began = datetime.now(UTC)
        self.submit_texts(url, key, [f"end to end text {i}: " + ("you idiot" if i % 5 == 0 else "thank you")
                                     for i in range(count)])
        deadline = time.monotonic() + 600
        pss = 0.0
        while True:
            pss = max([pss, *(w.pss_mb() for w in procs)])
            with self.database.transaction() as session:
                rows = session.execute(
                    select(Submission.created_at, Verdict.created_at).join(Verdict)
                    .where(Submission.created_at >= began)).tuples().all()
            if len(rows) >= count:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(rows)} of {count} verdicts after 600 s")
            time.sleep(0.5)
        self.cpu_per_text(label, procs, api, count, cpu)
        finished = max(decided for _, decided in rows)
        elapsed = (finished - began).total_seconds()
        latencies = [(decided - submitted).total_seconds() * 1000 for submitted, decided in rows]
        pss = max([pss, *(w.pss_mb() for w in procs)])
        rss = max(w.peak_rss_mb() for w in procs)
        for proc in procs:
            self.stop(proc)
        return {"tps": count / elapsed, "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
                "rss_mb": rss, "pss_mb": pss}

    def end_to_end(self, url: str, api: Proc) -> None:
        count = self.args.e2e_texts
        drained = self.drain(url, count, "e2e", api=api)
        self.results.update(e2e_tps=drained["tps"], e2e_p50_ms=drained["p50_ms"], e2e_p99_ms=drained["p99_ms"],
                            worker_rss_mb=drained["pss_mb"], worker_hwm_mb=drained["rss_mb"],
                            api_group_rss_mb=api.peak_rss_mb(), api_memory=api.memory_per_process_mb())
        # Per API process (issue 15 item 4): the largest peak RSS of the gunicorn processes serving requests (the
        # master only forks and watches them; its own figure is in the report).
        serving = [hwm for pid, hwm, _ in self.results["api_memory"] if pid != api.process.pid]
        self.results["api_rss_mb"] = max(serving) if serving else self.results["api_group_rss_mb"]

        counter = f"{self.prefix}noop-count"
        env = self.base_env(BENCH_BROKER_URL=REDIS_URL, BENCH_KEY_PREFIX=self.prefix, BENCH_COUNTER=counter)
        noop_workers = self.start_workers("noop", env, app="ops.bench.noop", queue="bench-noop")
        from celery import Celery

        sender = Celery("bench-sender", broker=REDIS_URL)
        sender.conf.update(broker_transport_options={"global_keyprefix": self.prefix}, task_serializer="json")
        began_noop = time.monotonic()
        with sender.producer_or_acquire() as producer:
            for i in range(count):
                sender.send_task("bench.noop", args=[str(i)], queue="bench-noop", producer=producer)
        while int(self.redis.get(counter) or 0) < count:
            if time.monotonic() - began_noop > 600:
                raise RuntimeError("the no-op tasks did not finish")
            time.sleep(0.05)
        noop_tps = count / (time.monotonic() - began_noop)
        for worker in noop_workers:
            self.stop(worker)
        self.results.update(e2e_ratio=self.results["e2e_tps"] / noop_tps, noop_tps=noop_tps)
        log(f"end to end: {count} texts at {self.results['e2e_tps']:.1f}/s (p50 {self.results['e2e_p50_ms']:.0f} ms,"
            f" p99 {self.results['e2e_p99_ms']:.0f} ms); no-op task {noop_tps:.0f}/s")

    # -- phase 4: latency at steady load ---------------------------------------------------------------------

    def steady(self, url: str, api: Proc | None = None) -> None:
        """Open-loop arrivals: one text per request at --steady-rate a second for --steady-seconds (each request
        sent at its time whatever the earlier ones are doing), the fake upstream answering in --steady-latency,
        the workers consuming both queues, a webhook endpoint on a local receiver. Latency from the submission's
        creation to its stored verdict, and to the `submission.completed` webhook's arrival at the receiver."""
        assert self.database is not None
        a = self.args
        key = self.new_key(scopes=("submit", "read", "admin"))
        headers = {"Authorization": f"Bearer {key}"}
        count = max(1, int(a.steady_rate * a.steady_seconds))
        with WebhookReceiver() as receiver, UpstreamProcess(self, "upstream-steady", rpm=1_000_000, max_batch=a.batch,
                                                            latency=a.steady_latency) as fake:
            created = httpx.post(f"{url}/v1/webhooks", json={"url": receiver.url, "events": ["submission.completed"]},
                                 headers=headers, timeout=30)
            if created.status_code != 201:
                raise RuntimeError(f"webhook registration answered {created.status_code}: {created.text[:300]}")
            env = self.base_env(MODERATION_PROVIDER="openai", UPSTREAM_BASE_URL=fake.base_url,
                                UPSTREAM_API_KEY=UPSTREAM_KEY, UPSTREAM_MAX_BATCH=str(a.batch))
            workers = self.start_workers("steady", env, queue="moderation,webhooks")
            cpu = self.cpu_before(workers, api)
            machine, own = machine_cpu(), time.process_time()
            ids: list[str] = []
            errors: list[int] = []

            # The load generator shares the machine with what it measures, so it is kept cheap (KeptConnection).
            connections = threading.local()
            post_headers = {**headers, "Content-Type": "application/json"}

            def post(number: int) -> None:
                if getattr(connections, "kept", None) is None:
                    connections.kept = KeptConnection(url)
                status, answer = connections.kept.post(
                    "/v1/submissions", post_headers, json.dumps({"input": f"steady text {number}: have a lovely day"}))
                if status == 202:
                    ids.append(json.loads(answer)["id"])
                else:
                    errors.append(status)

            log(f"steady: {count} texts at {a.steady_rate:g}/s, upstream latency {a.steady_latency * 1000:.0f} ms")
            with ThreadPoolExecutor(64) as pool:
                start = time.monotonic()
                for number in range(count):
                    delay = start + number / a.steady_rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    pool.submit(post, number)
            accepted_rate = len(ids) / (time.monotonic() - start)
            # How busy the whole machine was while the texts arrived (every process, this one included), and
            # what this process (the load generator and the webhook receiver) took of it.
            busy = machine_busy(machine, machine_cpu())
            bench_cpu_ms = 1000 * (time.process_time() - own) / max(1, len(ids))
            if errors:
                raise RuntimeError(f"steady: {len(errors)} unexpected answers, e.g. {errors[:5]}")
            # A pipeline that cannot keep up is a result, not a failure: after the wait, what has no verdict (or no
            # webhook) yet counts with the time it has waited so far, a lower bound of its latency.
            deadline = time.monotonic() + a.steady_drain_seconds
            while True:
                with self.database.transaction() as session:
                    rows = session.execute(select(Submission.id, Submission.created_at, Verdict.created_at)
                                           .outerjoin(Verdict).where(Submission.id.in_(ids))).tuples().all()
                hooks = {r.json["data"]["id"]: r.received_at for r in list(receiver.requests)
                         if r.json.get("type") == "submission.completed"}
                decided = sum(1 for row in rows if row[2] is not None)
                if (decided >= len(ids) and len(hooks) >= len(ids)) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            now = datetime.now(UTC)
            self.cpu_per_text("steady", workers, api, max(1, len(ids)), cpu)
            for worker in workers:
                self.stop(worker)
        verdict_ms = [((verdict_at or now) - submitted).total_seconds() * 1000 for _, submitted, verdict_at in rows]
        webhook_ms = [(hooks.get(sid, now.timestamp()) - submitted.timestamp()) * 1000 for sid, submitted, _ in rows]
        self.results.update(steady_p50_ms=percentile(verdict_ms, 0.5), steady_p99_ms=percentile(verdict_ms, 0.99),
                            webhook_p50_ms=percentile(webhook_ms, 0.5), webhook_p99_ms=percentile(webhook_ms, 0.99),
                            steady_texts=len(ids), steady_unfinished=len(ids) - decided,
                            steady_accepted_rate=accepted_rate, steady_machine_busy=busy,
                            steady_bench_cpu_ms=bench_cpu_ms)
        log(f"steady: machine {100 * busy:.0f} % busy while texts arrived; CPU per text: workers "
            f"{self.results['steady_worker_cpu_ms']:.1f} ms, API {self.results.get('steady_api_cpu_ms', 0):.1f} ms, "
            f"PostgreSQL {self.results['steady_pg_cpu_ms']:.1f} ms, load generator and receiver {bench_cpu_ms:.1f} ms")
        log(f"steady: {len(ids)} texts accepted at {accepted_rate:.1f}/s, {len(ids) - decided} without a verdict "
            f"after the wait; to verdict p50 {self.results['steady_p50_ms']:.0f} ms, "
            f"p99 {self.results['steady_p99_ms']:.0f} ms; to webhook p50 {self.results['webhook_p50_ms']:.0f} ms, "
            f"p99 {self.results['webhook_p99_ms']:.0f} ms")
        self.abandon_unfinished()

    # -- option --scale: end to end with 1, 2 and 4 workers; the chain lock's hold time --------------------------

    def scale(self, url: str) -> None:
        rates: dict[int, float] = {}
        for workers in (1, 2, 4):
            drained = self.drain(url, self.args.scale_texts, f"scale{workers}", workers=workers)
            rates[workers] = drained["tps"]
            log(f"scale: {workers} workers x {self.args.concurrency}: {drained['tps']:.1f} texts/s "
                f"(p99 {drained['p99_ms']:.0f} ms)")
            self.abandon_unfinished()
        self.results["scale_tps"] = rates
        self.chain_lock()

    def chain_lock(self, transactions: int = 40, verdicts: int = 50) -> None:
        """How long one transaction holds a tenant's chain head: from the statement that locks it to the end of its
        commit, for transactions shaped like a worker's (`verdicts` verdicts, two events each), one after the other
        in this process. One tenant can record at most `verdicts` / hold verdicts a second, however many workers."""
        assert self.database is not None
        holds: list[float] = []
        locked_at: list[float] = []

        def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # The head is locked by `SELECT … FOR UPDATE` (first created by an INSERT on a chain's first event:
            # app/use_cases/audit.py's _lock_head); the first such statement of the transaction counts.
            text = statement.lstrip()
            if "audit_chain_heads" in text and ("FOR UPDATE" in text or text.startswith("INSERT")):
                locked_at.append(time.perf_counter())

        event.listen(self.database.engine, "before_cursor_execute", on_statement)
        try:
            with self.database.transaction() as session:
                tenant = create_key(session, tenant_name=f"bench-lock-{uuid.uuid4().hex[:8]}", scopes=("read",),
                                    limits=BENCH_KEY_LIMITS).key.tenant_id
            for _ in range(transactions):
                locked_at.clear()
                with self.database.transaction() as session:
                    for number in range(verdicts):
                        for action in ("verdict.decided", "submission.completed"):
                            record_event(session, tenant_id=tenant, action=action, actor="worker",
                                         subject_type="submission", subject_id=f"sub_bench{number}",
                                         decision="allow", categories=["harassment"], details={"attempt": 1})
                holds.append((time.perf_counter() - locked_at[0]) * 1000)
        finally:
            event.remove(self.database.engine, "before_cursor_execute", on_statement)
        hold = statistics.median(holds)
        self.results.update(lock_hold_ms=hold, lock_hold_p99_ms=percentile(holds, 0.99),
                            tenant_ceiling_vps=verdicts / (hold / 1000), lock_verdicts=verdicts)
        log(f"chain lock: held {hold:.1f} ms per transaction of {verdicts} verdicts (p99 "
            f"{self.results['lock_hold_p99_ms']:.1f} ms): one tenant's ceiling about "
            f"{self.results['tenant_ceiling_vps']:.0f} verdicts/s")

    # -- report ----------------------------------------------------------------------------------------------

    def result_line(self) -> str:
        """The RESULT line: every figure of the phases that ran (all of them unless `--phases` chose fewer)."""
        r = self.results
        fields = [f"{name}={r[name]:{spec}}" for name, spec in RESULT_FIELDS if name in r]
        return " ".join(["RESULT", *fields])

    def scale_rows(self) -> list[tuple[str, str, str, str]]:
        r = self.results
        if "scale_tps" not in r:
            return []
        rates = r["scale_tps"]
        return [
            (f"scale (`--scale`): end to end, {self.args.scale_texts} texts, 1 / 2 / 4 workers x "
             f"{self.args.concurrency}", " / ".join(f"{rates[n]:.1f}" for n in (1, 2, 4)) + " texts/s", "", ""),
            (f"chain lock: head held per transaction of {r['lock_verdicts']} verdicts (100 events)",
             f"median {r['lock_hold_ms']:.1f} ms, p99 {r['lock_hold_p99_ms']:.1f} ms",
             "one tenant's ceiling", f"{r['tenant_ceiling_vps']:.0f} verdicts/s"),
        ]

    def write_report(self, line: str, started: datetime, seconds: float) -> None:
        r, a = self.results, self.args
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        with psycopg.connect(PG_ADMIN) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            pg_version = row[0] if row else "?"
        redis_version = self.redis.info("server").get("redis_version", "?")
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor() or "?")
        memory_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal:")), 0)
        load = os.getloadavg()
        rows = [
            ("figure", "value", "baseline (same run)", "ratio"),
            ("---", "---", "---", "---"),
            (f"upstream: texts moderated per minute, R={a.rpm}/min, B={a.batch}, {a.window:.0f} s window",
             f"{r['upstream_texts_per_min']:.0f}", f"R x B = {a.rpm * a.batch}", f"**{r['upstream_ratio']:.3f}**"),
            ("upstream: 429 answers received", f"**{r['upstream_429']}**", "target 0", ""),
            ("upstream: calls made / mean texts per call",
             f"{r['upstream_calls']} / {r['upstream_mean_batch']:.1f}", "", ""),
            (f"intake: `POST /v1/submissions` (one text), {a.intake_threads} clients, {a.intake_seconds:.0f} s",
             f"{r['intake_rps']:.1f} req/s, p50 {r['intake_p50_ms']:.1f} ms, p99 {r['intake_p99_ms']:.1f} ms",
             f"`GET /v1/models`: {r['baseline_rps']:.1f} req/s, p50 {r['baseline_p50_ms']:.1f} ms, "
             f"p99 {r['baseline_p99_ms']:.1f} ms", f"{r['intake_ratio']:.3f}"),
            ("intake: CPU per request (API / PostgreSQL / clients)",
             " / ".join(f"{r[f'intake_{part}_cpu_ms']:.2f}" for part in INTAKE_CPU_PARTS) + " ms",
             " / ".join(f"{r[f'baseline_{part}_cpu_ms']:.2f}" for part in INTAKE_CPU_PARTS) + " ms", ""),
            (f"end to end: {a.e2e_texts} texts, submit to stored verdict, local engine",
             f"{r['e2e_tps']:.1f} texts/s", f"no-op Celery task: {r['noop_tps']:.1f} tasks/s",
             f"{r['e2e_ratio']:.3f}"),
            ("end to end: submit-to-verdict latency",
             f"p50 {r['e2e_p50_ms']:.0f} ms, p99 {r['e2e_p99_ms']:.0f} ms", "", ""),
            (f"steady load: {a.steady_rate:g} texts/s open-loop for {a.steady_seconds:g} s, one per request, upstream "
             f"{a.steady_latency * 1000:.0f} ms (accepted at {r['steady_accepted_rate']:.1f}/s; "
             f"{r['steady_unfinished']} of {r['steady_texts']} without a verdict {a.steady_drain_seconds:g} s after "
             "the last arrival, counted with the time they waited)",
             f"to stored verdict p50 {r['steady_p50_ms']:.0f} ms, "
             f"p99 **{r['steady_p99_ms']:.0f}** ms", f"to webhook delivered p50 {r['webhook_p50_ms']:.0f} ms, "
             f"p99 {r['webhook_p99_ms']:.0f} ms", "target p99 <= 250 ms"),
            ("steady load: CPU per text (what the 2 cores must cover at the arrival rate)",
             f"workers {r['steady_worker_cpu_ms']:.1f} ms, API {r.get('steady_api_cpu_ms', 0):.1f} ms, "
             f"PostgreSQL {r['steady_pg_cpu_ms']:.1f} ms, load generator and receiver "
             f"{r['steady_bench_cpu_ms']:.1f} ms", f"machine {100 * r['steady_machine_busy']:.0f} % busy while "
             "texts arrived", ""),
            *self.scale_rows(),
            (f"sync: `POST /v1/moderations` (one distinct text), 1 client, {a.sync_seconds:.0f} s, "
             f"upstream answering in {a.sync_latency * 1000:.0f} ms",
             f"{r['sync_rps']:.1f} req/s, p50 {r['sync_p50_ms']:.1f} ms, p99 {r['sync_p99_ms']:.1f} ms",
             f"minus the configured upstream latency: p50 {r['sync_overhead_p50_ms']:.1f} ms",
             f"**p99 overhead {r['sync_overhead_p99_ms']:.1f} ms**"),
            (f"sync: the same, {a.sync_threads} clients", f"{r['sync_loaded_rps']:.1f} req/s",
             f"overhead p50 {r['sync_loaded_overhead_p50_ms']:.1f} ms",
             f"p99 overhead {r['sync_loaded_overhead_p99_ms']:.1f} ms"),
            ("peak RSS (VmHWM) per API process (gunicorn workers; master and PSS beside)",
             f"**{r['api_rss_mb']:.0f} MB**", _memory_cell(r["api_memory"]) + "; sync API: "
             + _memory_cell(r["sync_api_memory"]), ""),
            ("peak RSS (VmHWM summed over a process group)",
             f"API {r['api_group_rss_mb']:.0f} MB, one worker {r['worker_hwm_mb']:.0f} MB", "", ""),
            ("one worker's memory, PSS summed over its process group (`worker_rss_mb`), largest sample",
             f"{r['worker_rss_mb']:.0f} MB", "", "target <= 200 MB"),
        ]
        table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
        report = f"""# Benchmark results

Written by `make bench` (ops/bench/run.py); how to run it and what each figure means: ops/bench/README.md.

## The run

- when: {started:%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} minutes
- commit: {commit}{" (with uncommitted changes)" if dirty else ""}
- machine: {platform.node()}, {cpu}, {os.cpu_count()} CPUs, {memory_kb / 1024 / 1024:.1f} GiB RAM,
  {platform.system()} {platform.release()}; load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}
  (the machine is shared: other test runs may have been running)
- software: Python {platform.python_version()}, PostgreSQL {pg_version}, Redis {redis_version}
- command: `make bench BENCH_ARGS='{" ".join(sys.argv[1:])}'`
- setup: {a.workers} Celery workers (`celery worker -c {a.concurrency}` each), the API under gunicorn
  (2 processes x 8 threads), PostgreSQL and Redis on this machine; the fake upstream (tests/fake_upstream.py)
  in the benchmark's process for the upstream phase, a process of its own for the sync and steady phases

## Figures

{table}

## The RESULT line

```
{line}
```
"""
        Path(self.args.report).write_text(report)


def _memory_cell(memory: list[tuple[int, float, float]]) -> str:
    return ", ".join(f"pid {pid}: VmHWM {hwm:.0f} MB, PSS {pss:.0f} MB" for pid, hwm, pss in memory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rpm", type=int, default=60, help="the fake upstream's requests per minute (R)")
    parser.add_argument("--batch", type=int, default=32, help="texts per upstream call (B)")
    parser.add_argument("--window", type=float, default=180, help="seconds the upstream phase is measured")
    parser.add_argument("--latency", type=float, default=0.05, help="the fake upstream's answer latency")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="pool processes per worker (Verdict's default WORKER_CONCURRENCY is 2)")
    parser.add_argument("--intake-seconds", type=float, default=15)
    parser.add_argument("--intake-threads", type=int, default=8)
    parser.add_argument("--e2e-texts", type=int, default=2000)
    parser.add_argument("--steady-rate", type=float, default=100, help="steady phase: texts per second (open loop)")
    parser.add_argument("--steady-seconds", type=float, default=60, help="steady phase: how long texts arrive")
    parser.add_argument("--steady-latency", type=float, default=0.02,
                        help="steady phase: the fake upstream's answer latency")
    parser.add_argument("--steady-drain-seconds", type=float, default=60,
                        help="steady phase: how long to wait after the last arrival for the last verdicts")
    parser.add_argument("--scale", action="store_true",
                        help="also run end to end with 1, 2 and 4 workers and measure the chain lock's hold time")
    parser.add_argument("--scale-texts", type=int, default=1000, help="texts per --scale run")
    parser.add_argument("--sync-seconds", type=float, default=15, help="seconds the synchronous phase is measured")
    parser.add_argument("--sync-threads", type=int, default=4, help="clients of the synchronous phase's loaded run")
    parser.add_argument("--sync-latency", type=float, default=0.02,
                        help="the fake upstream's latency in the synchronous phase (subtracted from each request)")
    parser.add_argument("--api-port", type=int, default=8791, help="the API's port (the synchronous phase's: +1)")
    parser.add_argument("--report", default=str(ROOT / "ops" / "bench" / "RESULTS.md"),
                        help="where the run's report is written ('' writes none: the smoke test's tiny runs)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated phases to run (default all: {','.join(PHASES)}); fewer than all "
                             "needs --report '' (a report is of a whole run)")
    args = parser.parse_args()
    phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {list(PHASES)}")
    if set(phases) != set(PHASES) and args.report:
        parser.error("--phases with fewer than every phase writes no report: add --report ''")

    bench = Bench(args)
    started, began = datetime.now(UTC), time.monotonic()
    bench.setup()
    try:
        api, url = bench.start_api(bench.base_env())
        if "upstream" in phases:
            bench.upstream(url)
        if "intake" in phases:
            bench.intake(url, api)
        if "sync" in phases:
            bench.sync_path()
        if "e2e" in phases:
            bench.end_to_end(url, api)
        if "steady" in phases:
            bench.steady(url, api)
        if args.scale:
            bench.scale(url)
    finally:
        bench.teardown()
    if set(phases) != set(PHASES):
        # A partial run: its figures only, and no report (RESULTS.md holds whole runs).
        print("PARTIAL " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in bench.results.items() if isinstance(v, int | float)), flush=True)
        return 0
    line = bench.result_line()
    if args.report:
        bench.write_report(line, started, time.monotonic() - began)
        log(f"wrote {args.report}")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
