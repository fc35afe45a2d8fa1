"""What one synchronous `POST /v1/moderations` costs the API process (issue 15 item 3), measured in-process: the Flask
test client, one client thread, real PostgreSQL and Redis, the fake upstream in a process of its own (its CPU is not
counted). Counted per call, never timed by the wall clock: the calling thread's CPU time (the test client runs the
whole request in it), the process's, statements, transactions, psycopg's waits (one per statement, commit
and the pool's reset of a returned connection, which sends nothing when no transaction is open; a transaction's
BEGIN is sent in its first statement's wait: with one transaction, PostgreSQL round trips = statements + 2) and
Redis round trips, and garbage collections (how many, of which generation, and their CPU).

A distinct text per call, so every call goes upstream (no cache hit), as the bench's sync phase.

    .venv/bin/python ops/bench/sync_cost.py --requests 500 [--profile FILE]

`--server` measures `verdict api` (gunicorn, `--workers 2 --threads 8` as the bench) instead: one keep-alive
http.client connection sends the calls; printed are the API processes' CPU per call (utime + stime of the gunicorn
workers, from /proc) and, for what it is worth on a shared machine, the latency minus the upstream's `--latency`.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
import redis.connection
from sqlalchemy import event

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from app.cli import migrate_database  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db import Database  # noqa: E402
from app.extensions import PROVIDER  # noqa: E402
from app.forking import settle_before_fork  # noqa: E402
from app.use_cases.keys import create_key  # noqa: E402
from ops.bench.scratch import REDIS_URL, create_scratch, drop_scratch  # noqa: E402

UPSTREAM_KEY = "sk-upstream-sync-cost"


class Meter:
    def __init__(self) -> None:
        self.statements: Counter[str] = Counter()
        self.transactions = 0
        self.redis_round_trips = 0
        self.pg_waits = 0
        self.gc: Counter[int] = Counter()
        self.gc_cpu = 0.0
        self._gc_began = 0.0

    def reset(self) -> None:
        self.statements.clear()
        self.gc.clear()
        self.transactions = self.redis_round_trips = self.pg_waits = 0
        self.gc_cpu = 0.0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_began = time.thread_time()
        else:
            self.gc[info["generation"]] += 1
            self.gc_cpu += time.thread_time() - self._gc_began


def instrument(meter: Meter, engine: Any) -> None:
    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        meter.statements[" ".join(statement.split()[:3])[:60]] += 1

    def on_begin(_conn: Any) -> None:
        meter.transactions += 1

    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "begin", on_begin)
    original: Any = redis.connection.AbstractConnection.send_packed_command

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        meter.redis_round_trips += 1
        original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    import psycopg.waiting as waiting  # see the module's docstring

    real_wait: Any = waiting.wait

    def counted(*args: Any, **kwargs: Any) -> Any:
        meter.pg_waits += 1
        return real_wait(*args, **kwargs)

    waiting.wait = counted
    gc.callbacks.append(meter.on_gc)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def serve(args: argparse.Namespace, url: str, name: str, base_url: str, key: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UPSTREAM_", "MODERATION_", "DATABASE_", "BROKER_", "REDIS_"))}
    env.update({"DATABASE_URL": url, "BROKER_URL": REDIS_URL, "BROKER_KEY_PREFIX": f"{name}:", "LOG_FORMAT": "json",
                "LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT), "MODERATION_PROVIDER": "openai",
                "UPSTREAM_BASE_URL": base_url, "UPSTREAM_API_KEY": UPSTREAM_KEY,
                "MODERATION_FALLBACK_PROVIDER": "local", "RATE_LIMIT_RPM": "10000000",
                "RATE_LIMIT_TPM": "1000000000"})
    api = subprocess.Popen([str(Path(sys.executable).with_name("verdict")), "api", "--bind",
                            f"127.0.0.1:{args.port}", "--workers", "2", "--threads", "8"], env=env, cwd=ROOT,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        conn: http.client.HTTPConnection | None = None
        for _ in range(600):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                break
            except OSError:
                time.sleep(0.1)
        assert conn is not None

        def call(i: int) -> float:
            body = json.dumps({"input": f"sync text {i}: have a lovely day"})
            began = time.perf_counter()
            conn.request("POST", "/v1/moderations", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - began
            if response.status != 200:
                raise RuntimeError(f"answered {response.status}")
            return elapsed

        for i in range(30):
            call(10**8 + i)
        workers = _children(api.pid)
        ticks = sum(_cpu_ticks(pid) for pid in workers)
        latencies = sorted(call(i) - args.latency for i in range(args.requests))
        spent = (sum(_cpu_ticks(pid) for pid in workers) - ticks) / os.sysconf("SC_CLK_TCK")
        n = args.requests
        print(f"verdict api (2 x 8 threads), POST /v1/moderations x {n}, 1 client: API cpu "
              f"{1000 * spent / n:.2f} ms per call; latency minus the upstream's {1000 * args.latency:.0f} ms: "
              f"p50 {1000 * latencies[n // 2]:.1f}, p90 {1000 * latencies[int(n * 0.9)]:.1f}, "
              f"p99 {1000 * latencies[int(n * 0.99)]:.1f} ms (wall: the machine's load counts)")
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.0, help="the fake upstream's answer delay (s)")
    parser.add_argument("--server", action="store_true", help="measure a gunicorn API process (see above)")
    parser.add_argument("--port", type=int, default=8391, help="the --server API's port")
    parser.add_argument("--profile", help="write a CPU-time profile (the client thread's) to this file")
    args = parser.parse_args()

    name, url = create_scratch("sync_cost")
    fake = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", "0", "--api-key", UPSTREAM_KEY,
                             "--latency", str(args.latency)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    database: Any = None
    try:
        assert fake.stdout is not None
        line = fake.stdout.readline()
        base_url = line.split("serving on ", 1)[1].split()[0]
        settings = Settings(_env_file=None, database_url=url, broker_url=REDIS_URL,  # type: ignore[call-arg]
                            broker_key_prefix=f"{name}:", log_level="WARNING", moderation_provider="openai",
                            upstream_base_url=base_url, upstream_api_key=UPSTREAM_KEY,
                            moderation_fallback_provider="local",
                            rate_limit_rpm=10_000_000, rate_limit_tpm=1_000_000_000)
        migrate_database(settings)
        if args.server:
            with Database(url).transaction() as session:
                issued = create_key(session, tenant_name=name, scopes=("submit", "read"))
            serve(args, url, name, base_url, issued.plaintext)
            return 0
        app = create_app(settings)
        app.extensions[PROVIDER].warm_up()
        settle_before_fork()  # as gunicorn's master does before it forks (app/cli.py)
        database = app.extensions["verdict.db"]
        with database.transaction() as session:
            issued = create_key(session, tenant_name=name, scopes=("submit", "read"))
        headers = {"Authorization": f"Bearer {issued.plaintext}"}
        http = app.test_client()

        def call(i: int) -> None:
            response = http.post("/v1/moderations", json={"input": f"sync text {i}: have a lovely day"},
                                 headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"answered {response.status_code}: {response.get_data(as_text=True)[:300]}")

        for i in range(20):  # warm: connections, scripts, the key cache
            call(10**8 + i)
        meter = Meter()
        instrument(meter, database.engine)
        meter.reset()
        profiler = cProfile.Profile(time.thread_time) if args.profile else None
        per_call: list[float] = []
        began_thread, began_process = time.thread_time(), time.process_time()
        if profiler is not None:
            profiler.enable()
        for i in range(args.requests):
            t = time.thread_time()
            call(i)
            per_call.append(time.thread_time() - t)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        n = args.requests
        thread_cpu, process_cpu = time.thread_time() - began_thread, time.process_time() - began_process
        per_call.sort()
        print(f"POST /v1/moderations x {n} (1 client, in-process): thread cpu {1000 * thread_cpu / n:.2f} ms "
              f"(p50 {1000 * per_call[n // 2]:.2f}, p99 {1000 * per_call[int(n * 0.99)]:.2f}, max "
              f"{1000 * per_call[-1]:.2f}), process cpu {1000 * process_cpu / n:.2f} ms per call")
        print(f"  statements {sum(meter.statements.values()) / n:.2f}, transactions {meter.transactions / n:.2f}, "
              f"psycopg waits {meter.pg_waits / n:.2f}, Redis round trips {meter.redis_round_trips / n:.2f} "
              f"per call")
        print(f"  gc: {dict(sorted(meter.gc.items()))} collections by generation, {1000 * meter.gc_cpu / n:.3f} ms "
              f"cpu per call")
        for kind, count in meter.statements.most_common(10):
            print(f"    {count / n:6.2f}  {kind}")
    finally:
        if database is not None:
            database.engine.dispose()
        if fake.poll() is None:
            os.killpg(fake.pid, signal.SIGINT)
            fake.wait(timeout=20)
        drop_scratch(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
