"""What one `POST /v1/submissions` costs the API process, next to one `GET /v1/models`, with concurrent clients,
measured in-process (the Flask test client, one per thread; real PostgreSQL and Redis; no wall clock).

A scratch PostgreSQL database and one app; `--threads` client threads send `--requests` requests each, first GETs,
then POSTs (one text each, as the bench's intake phase). Printed per request: this process's CPU time (the clients
are in-process too, but the test client is a thin caller of the app), statements, commits, broker publishes and
moderation messages; and the POST/GET CPU ratio.

    .venv/bin/python ops/bench/intake_cost.py --threads 8 --requests 250
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import event

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from app.cli import migrate_database  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db import Database  # noqa: E402
from app.outbox import MODERATE_SUBMISSION, Message  # noqa: E402
from app.use_cases.keys import create_key  # noqa: E402
from ops.bench.scratch import REDIS_URL, create_scratch, drop_scratch  # noqa: E402


class Meter:
    """Statements, commits and published messages, counted from every thread."""

    def __init__(self, database: Database) -> None:
        self.statements: Counter[str] = Counter()
        self.commits = 0
        self.publishes = 0
        self.messages = 0
        self.ids = 0
        self._lock = threading.Lock()
        event.listen(database.engine, "before_cursor_execute", self._statement)
        event.listen(database.engine, "commit", self._commit)
        publisher = database.outbox.publisher

        def counting(messages: Sequence[Message]) -> None:
            with self._lock:
                self.publishes += 1
                self.messages += sum(1 for m in messages if m.task == MODERATE_SUBMISSION)
                self.ids += sum(len(m.args) for m in messages if m.task == MODERATE_SUBMISSION)
            if publisher is not None:
                publisher(messages)

        database.outbox.publisher = counting

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        with self._lock:
            self.statements[" ".join(statement.split()[:3])[:60]] += 1

    def _commit(self, conn: Any) -> None:
        with self._lock:
            self.commits += 1

    def reset(self) -> None:
        with self._lock:
            self.statements.clear()
            self.commits = self.publishes = self.messages = self.ids = 0


def run(app: Any, threads: int, requests: int, send: Callable[[Any, int], Any], expected: int,
        profile: str | None = None) -> None:
    errors: list[int] = []
    profiles: list[cProfile.Profile] = []

    def client(slot: int) -> None:
        http = app.test_client()
        # A profiler sees only its own thread: one per client thread, added up at the end.
        profiler = cProfile.Profile(time.thread_time) if profile else None
        if profiler is not None:
            profiles.append(profiler)
            profiler.enable()
        for i in range(requests):
            response = send(http, slot * requests + i)
            if response.status_code != expected:
                errors.append(response.status_code)
        if profiler is not None:
            profiler.disable()

    workers = [threading.Thread(target=client, args=(slot,)) for slot in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise RuntimeError(f"{len(errors)} unexpected answers, e.g. {errors[:5]}")
    if profile:
        stats = pstats.Stats(profiles[0])
        for other in profiles[1:]:
            stats.add(other)
        stats.dump_stats(profile)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--requests", type=int, default=250, help="per thread")
    parser.add_argument("--profile", help="write a CPU-time profile of the POST phase to this file "
                        "(the client threads' own, added up)")
    parser.add_argument("--idempotency", action="store_true", help="every POST carries its own Idempotency-Key")
    args = parser.parse_args()

    name, url = create_scratch("intake_cost")
    database: Database | None = None
    try:
        settings = Settings(_env_file=None, database_url=url, broker_url=REDIS_URL,  # type: ignore[call-arg]
                            broker_key_prefix=f"{name}:", log_level="WARNING", moderation_provider="local",
                            rate_limit_rpm=10_000_000, rate_limit_tpm=1_000_000_000)
        migrate_database(settings)
        app = create_app(settings)
        database = app.extensions["verdict.db"]
        assert database is not None
        with database.transaction() as session:
            issued = create_key(session, tenant_name=name, scopes=("submit", "read"))
        headers = {"Authorization": f"Bearer {issued.plaintext}"}
        meter = Meter(database)

        def get(http: Any, _i: int) -> Any:
            return http.get("/v1/models", headers=headers)

        def post(http: Any, i: int) -> Any:
            extra = {"Idempotency-Key": f"{name}-{i}"} if args.idempotency else {}
            return http.post("/v1/submissions", json={"input": f"intake text {i}: have a lovely day"},
                             headers={**headers, **extra})

        run(app, 2, 25, get, 200)
        run(app, 2, 25, lambda http, i: post(http, 10**8 + i), 202)
        total = args.threads * args.requests
        cpu: dict[str, float] = {}
        for label, send, expected in (("GET /v1/models", get, 200), ("POST /v1/submissions", post, 202)):
            meter.reset()
            began = time.process_time()
            run(app, args.threads, args.requests, send, expected,
                args.profile if label.startswith("POST") else None)
            cpu[label] = time.process_time() - began
            print(f"{label}: {args.threads} threads x {args.requests}: cpu {1000 * cpu[label] / total:.2f} ms, "
                  f"statements {sum(meter.statements.values()) / total:.2f}, commits {meter.commits / total:.2f}, "
                  f"publishes {meter.publishes / total:.2f}, moderation messages {meter.messages / total:.2f} "
                  f"(ids {meter.ids / total:.2f}) per request")
            for kind, count in meter.statements.most_common(8):
                print(f"    {count / total:6.2f}  {kind}")
        print(f"POST/GET cpu: {cpu['POST /v1/submissions'] / cpu['GET /v1/models']:.2f}")
    finally:
        if database is not None:
            database.engine.dispose()
        drop_scratch(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
