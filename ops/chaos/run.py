"""Verdict's chaos run (`make chaos`; see ops/chaos/README.md).

A deployment of its own — a private PostgreSQL cluster, a private redis-server, the API under gunicorn (`verdict api`),
two workers and beat, and the fake upstream failing a share of its calls — takes N texts through
`POST /v1/submissions` with Idempotency-Keys while workers are SIGKILLed every few seconds, the API is SIGKILLed once,
and PostgreSQL and Redis are restarted once each. Then the database is checked (ops/chaos/check.py). The last line
printed is the RESULT line; ops/chaos/RESULTS.md gets the run's report (`--report ''`: none).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import select  # noqa: E402

from app.cli import migrate_database  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db import Database  # noqa: E402
from app.models import Submission, SubmissionStatus  # noqa: E402
from app.use_cases.keys import KeyLimits, create_key  # noqa: E402
from ops.chaos.check import Findings, check  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.integration.processes import (  # noqa: E402
    ApiProcess,
    BeatProcess,
    PrivatePostgres,
    PrivateRedis,
    WorkerProcess,
    free_port,
)

UPSTREAM_KEY = "sk-chaos"
FINAL = (SubmissionStatus.COMPLETED.value, SubmissionStatus.FAILED.value)
KEY_LIMITS = KeyLimits(rpm=1_000_000_000, tpm=1_000_000_000)
# Short timings, so recovery is seen within the run (production defaults: docs/configuration.md). Retries are few so
# that `failed` counts something: with 30 % of calls failing, 0.3^(retries + 1) of attempts run out of retries.
RUN_ENV = {
    # 60, not the tests' 20: on a loaded machine a batch of 32 can take longer than a 20 s lease's 12 s soft limit to
    # settle, and is cut off mid-way (README.md, "Leases on a loaded machine").
    "PROCESSING_LEASE_SECONDS": "60",
    "SWEEP_INTERVAL_SECONDS": "5",
    "REQUEUE_AFTER_SECONDS": "10",
    "REDISPATCH_AFTER_SECONDS": "30",
    "MODERATION_MAX_RETRIES": "2",
    "MODERATION_RETRY_BACKOFF_MAX": "2",
    "UPSTREAM_TIMEOUT_SECONDS": "2",
    "IDEMPOTENCY_CLAIM_LEASE_SECONDS": "15",
    "MODERATION_PROVIDER": "openai",
    "UPSTREAM_API_KEY": UPSTREAM_KEY,
    "UPSTREAM_MODEL": "omni-moderation-latest",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
}
WORDS = ("hello", "kill", "stupid", "weather", "bomb", "garden", "idiot", "music")


def log(message: str) -> None:
    print(f"[chaos {datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


@dataclass
class KeyOutcome:
    """One Idempotency-Key's story: what the client was answered, try after try."""

    key: str
    ids: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    succeeded: bool = False
    replayed: bool = False


@dataclass
class Kill:
    """A worker SIGKILL: the claims (submission id -> claim token) held when it died, and when each was let go."""

    worker: int
    at: float
    held: dict[str, str]
    released: dict[str, float] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return len(self.released) < len(self.held)

    def recovery_s(self) -> float:
        return max(self.released.values(), default=self.at) - self.at


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.logs = Path(args.log_dir or tempfile.mkdtemp(prefix="verdict-chaos-"))
        self.logs.mkdir(parents=True, exist_ok=True)
        self.postgres = PrivatePostgres()
        self.redis = PrivateRedis(self.logs)
        self.upstream = FakeUpstream(api_key=UPSTREAM_KEY, latency=args.latency, fault_rate=args.fault_rate,
                                     fault_hang=args.fault_hang)
        self.api_port = free_port()
        self.api: ApiProcess | None = None
        self.workers: list[WorkerProcess] = []
        self.beat: BeatProcess | None = None
        self.database: Database | None = None
        self.tenant_id = ""
        self.used_env: dict[str, str] = {}
        self.key = ""
        self.outcomes: list[KeyOutcome] = []
        self.kills: list[Kill] = []
        self.events: list[str] = []
        self.lock = threading.Lock()  # one fault at a time: a worker kill never lands during an outage
        self.done = threading.Event()
        self.submitted = threading.Event()

    # -- the deployment --------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("UPSTREAM_", "MODERATION_", "DATABASE_", "BROKER_", "REDIS_"))}
        env.update(RUN_ENV)
        env.update({"DATABASE_URL": self.postgres.url, "BROKER_URL": self.redis.url,
                    "UPSTREAM_BASE_URL": self.upstream.base_url, "PYTHONPATH": str(ROOT)})
        if self.args.max_retries is not None:
            env["MODERATION_MAX_RETRIES"] = str(self.args.max_retries)
        if self.args.lease is not None:
            env["PROCESSING_LEASE_SECONDS"] = str(self.args.lease)
        return env

    def setup(self) -> None:
        log(f"logs in {self.logs}")
        self.postgres.init()
        migrate_database(Settings(_env_file=None, database_url=self.postgres.url))  # type: ignore[call-arg]
        self.database = Database(self.postgres.url)
        with self.database.transaction() as session:
            issued = create_key(session, tenant_name=f"chaos-{self.run_id}", scopes=("submit", "read"),
                                limits=KEY_LIMITS)
            self.key = issued.plaintext
            self.tenant_id = issued.key.tenant_id
        self.redis.start()
        self.upstream.start()
        self.used_env = self.env()  # what the report says the run used (the upstream's port is gone by then)
        self.start_api()
        self.beat = BeatProcess(self.env(), self.logs / "beat.log").start()
        for index in range(2):
            worker = WorkerProcess(self.env(), self.logs / f"worker-{index}.log", concurrency=self.args.concurrency,
                                   beat=False, name=f"chaos{index}@%h")
            self.workers.append(worker.start())
        log(f"PostgreSQL :{self.postgres.port}, Redis :{self.redis.port}, API :{self.api_port}, 2 workers, beat, "
            f"upstream failing {self.args.fault_rate:.0%} of calls")

    def start_api(self) -> None:
        self.api = ApiProcess(self.env(), self.logs / "api.log", "--workers", "2", "--threads", "8",
                              port=self.api_port)

    def teardown(self) -> None:
        for process in [*self.workers, self.beat]:
            if process is not None:
                with contextlib.suppress(Exception):
                    process.stop()
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.api.stop()
        self.upstream.stop()
        self.redis.stop()
        if self.database is not None:
            self.database.engine.dispose()
        self.postgres.remove()

    # -- the clients -----------------------------------------------------------------------------------------

    def batches(self) -> list[tuple[str, list[str]]]:
        size, total = self.args.batch, self.args.texts
        batches = []
        for start in range(0, total, size):
            texts = [f"chaos {self.run_id} text {n} {WORDS[n % len(WORDS)]}" for n in range(start,
                                                                                            min(total, start + size))]
            batches.append((f"chaos-{self.run_id}-{start // size}", texts))
        return batches

    def submit(self, key: str, texts: list[str]) -> KeyOutcome:
        """POST one batch under its key until an answer that is not 409 in-progress, a 503 or a connection error."""
        outcome = KeyOutcome(key)
        body = {"items": [{"input": text} for text in texts]}
        headers = {"Authorization": f"Bearer {self.key}", "Idempotency-Key": key}
        deadline = time.monotonic() + self.args.key_deadline
        with httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30) as http:
            while time.monotonic() < deadline:
                try:
                    response = http.post("/v1/submissions", json=body, headers=headers)
                except httpx.HTTPError as exc:
                    outcome.answers[type(exc).__name__] += 1
                    time.sleep(0.5)
                    continue
                outcome.answers[str(response.status_code)] += 1
                if response.status_code == 202:
                    outcome.ids = [item["id"] for item in response.json()["data"]]
                    outcome.succeeded = True
                    outcome.replayed = response.headers.get("Idempotent-Replayed") == "true"
                    return outcome
                if response.status_code in (409, 429, 503) or response.status_code >= 500:
                    time.sleep(min(2.0, float(response.headers.get("Retry-After", "1"))))
                    continue
                log(f"key {key}: {response.status_code} {response.text[:200]}")
                return outcome  # anything else is final for the client: not a success
        return outcome

    def clients(self) -> None:
        batches = self.batches()
        pace = self.args.submit_seconds / max(1, len(batches))
        started = time.monotonic()

        def send(index: int, key: str, texts: list[str]) -> KeyOutcome:
            time.sleep(max(0.0, started + index * pace - time.monotonic()))
            return self.submit(key, texts)

        with ThreadPoolExecutor(max_workers=self.args.clients) as pool:
            self.outcomes = list(pool.map(lambda item: send(item[0], *item[1]), enumerate(batches)))
        self.submitted.set()

    # -- the faults ------------------------------------------------------------------------------------------

    def note(self, what: str) -> None:
        log(what)
        self.events.append(f"{datetime.now(UTC):%H:%M:%S} {what}")

    def held_claims(self) -> dict[str, str]:
        assert self.database is not None
        with self.database.transaction() as session:
            return dict(session.execute(
                select(Submission.id, Submission.claim_token)
                .where(Submission.status == SubmissionStatus.PROCESSING.value)).tuples().all())

    def kill_worker(self, index: int) -> None:
        with self.lock:
            worker = self.workers[index]
            worker.kill()
            at = time.monotonic()
            held = {}
            for _ in range(20):
                try:
                    held = self.held_claims()
                    break
                except Exception:  # noqa: BLE001 - the database is the one thing that may be restarting
                    time.sleep(0.5)
            self.kills.append(Kill(index, at, held))
            self.note(f"SIGKILL worker {index} ({len(held)} claims held at the time, by it or the other)")
            worker.start()

    def killer(self) -> None:
        index = 0
        while not self.done.wait(self.args.kill_interval):
            if self.args.max_kills is not None and len(self.kills) >= self.args.max_kills:
                return
            self.kill_worker(index % 2)
            index += 1

    def single_faults(self, started: float) -> None:
        plan = sorted([(self.args.api_kill_at, self.kill_api), (self.args.pg_restart_at, self.restart_postgres),
                       (self.args.redis_restart_at, self.restart_redis)], key=lambda item: item[0])
        for at, fault in plan:
            if self.done.wait(max(0.0, started + at - time.monotonic())):
                return
            with self.lock:
                fault()

    def kill_api(self) -> None:
        assert self.api is not None
        self.api.kill()
        self.note("SIGKILL the API")
        time.sleep(1)
        self.start_api()
        self.note("API restarted")

    def restart_postgres(self) -> None:
        self.postgres.stop()
        self.note("PostgreSQL stopped (-m immediate)")
        time.sleep(self.args.outage)
        self.postgres.start()
        self.note("PostgreSQL started")

    def restart_redis(self) -> None:
        self.redis.stop()
        self.note("Redis SIGKILLed (nothing kept)")
        time.sleep(self.args.outage)
        self.redis.start()
        self.note("Redis started")

    def tracker(self) -> None:
        """Every half second: which claims held at each kill have been let go (final, given back or claimed
        again: the row no longer carries that claim's token)."""
        assert self.database is not None
        while not self.done.wait(0.5):
            open_kills = [kill for kill in self.kills if kill.open]
            if not open_kills:
                continue
            try:
                with self.database.transaction() as session:
                    pending = {i for kill in open_kills for i in kill.held if i not in kill.released}
                    tokens = dict(session.execute(select(Submission.id, Submission.claim_token)
                                                  .where(Submission.id.in_(pending))).tuples().all())
            except Exception:  # noqa: BLE001 - the database is restarting; the next look will tell
                continue
            now = time.monotonic()
            for kill in open_kills:
                for submission_id, token in kill.held.items():
                    if submission_id not in kill.released and tokens.get(submission_id) != token:
                        kill.released[submission_id] = now

    def unfinished(self, ids: list[str]) -> int:
        assert self.database is not None
        with self.database.transaction() as session:
            done = session.scalar(select(Submission.id).where(Submission.id.in_(ids),
                                                              Submission.status.not_in(FINAL)).limit(1))
            if done is None:
                return 0
            return len(session.scalars(select(Submission.id).where(Submission.id.in_(ids),
                                                                   Submission.status.not_in(FINAL))).all())

    # -- the run ---------------------------------------------------------------------------------------------

    def run(self) -> tuple[Findings, float]:
        started = time.monotonic()
        threads = [threading.Thread(target=target, daemon=True, name=name) for name, target in
                   (("clients", self.clients), ("killer", self.killer), ("tracker", self.tracker),
                    ("faults", lambda: self.single_faults(started)))]
        for thread in threads:
            thread.start()
        self.submitted.wait()
        ids = [i for outcome in self.outcomes for i in outcome.ids]
        log(f"submitted: {len(ids)} accepted under {sum(o.succeeded for o in self.outcomes)} of "
            f"{len(self.outcomes)} keys")
        threads[3].join()  # every single fault has happened
        deadline = time.monotonic() + self.args.drain_timeout
        while time.monotonic() < deadline:
            try:
                left = self.unfinished(ids)
            except Exception:  # noqa: BLE001
                left = -1
            if left == 0:
                break
            log(f"draining: {left} not final yet")
            time.sleep(5)
        drain_s = time.monotonic() - started
        self.done.set()
        for thread in threads:
            thread.join(timeout=60)
        assert self.database is not None
        return check(self.database, self.tenant_id, ids), drain_s

    def result_line(self, findings: Findings, drain_s: float) -> str:
        stuck = sum(not outcome.succeeded for outcome in self.outcomes)
        recovery = max((kill.recovery_s() for kill in self.kills), default=0.0)
        return (f"RESULT accepted={findings.accepted} completed={findings.completed} failed={findings.failed} "
                f"lost={len(findings.lost)} duplicates={len(findings.duplicates)} idempotency_stuck={stuck} "
                f"chain_ok={str(findings.chain_ok).lower()} max_recovery_s={recovery:.1f} drain_s={drain_s:.0f} "
                f"kills={len(self.kills)}")

    def details(self, findings: Findings) -> list[str]:
        answers: Counter[str] = Counter()
        for outcome in self.outcomes:
            answers.update(outcome.answers)
        lines = [
            f"client answers, all keys: {dict(sorted(answers.items()))}",
            f"keys answered by a replay: {sum(o.replayed for o in self.outcomes)}",
            f"upstream: {len(self.upstream.requests)} calls, random faults {self.upstream.faults}",
            "recovery per kill (s, claims held): " + ", ".join(
                f"{kill.recovery_s():.1f} ({len(kill.held)})" for kill in self.kills),
            f"chains verified: {findings.chains_verified}, broken: {findings.broken_chains}",
        ]
        if findings.lost:
            lines.append(f"lost: {len(findings.lost)}, of which {len(findings.unfinished)} exist but were not final "
                         f"at the drain deadline; first 10: {findings.lost[:10]}")
        if findings.duplicates:
            lines.append(f"duplicates (first 10): {findings.duplicates[:10]}")
        return lines


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,  # noqa: S607
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(path: Path, chaos: Chaos, line: str, details: list[str], started: datetime, seconds: float) -> None:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    args = " ".join(sys.argv[1:])
    text = "\n".join([
        "# Chaos run: the latest recorded run",
        "",
        "What the run does and what each figure means: [README.md](README.md).",
        "",
        f"- when: {started:%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} minutes",
        f"- commit: {commit()}",
        f"- machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
        f"load average at the end {load} (the machine is shared: other runs may have been running)",
        f"- command: `make chaos CHAOS_ARGS='{args}'`",
        f"- settings: {', '.join(f'{k}={chaos.used_env[k]}' for k in RUN_ENV if 'KEY' not in k)}",
        "",
        "## Faults, in order",
        "",
        *[f"- {event}" for event in chaos.events],
        "",
        "## Details",
        "",
        *[f"- {detail}" for detail in details],
        "",
        "## The RESULT line",
        "",
        "```",
        line,
        "```",
        "",
    ])
    path.write_text(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ops/chaos/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=10_000, help="texts to submit (default 10000)")
    parser.add_argument("--batch", type=int, default=50, help="texts per request, one submission each (default 50)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--submit-seconds", type=float, default=60, help="spread the requests over this long")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per worker (default 2)")
    parser.add_argument("--kill-interval", type=float, default=10, help="seconds between worker SIGKILLs")
    parser.add_argument("--max-kills", type=int, default=None, help="stop killing workers after this many")
    parser.add_argument("--api-kill-at", type=float, default=15, help="seconds into the run the API is SIGKILLed")
    parser.add_argument("--pg-restart-at", type=float, default=30, help="seconds into the run PostgreSQL stops")
    parser.add_argument("--redis-restart-at", type=float, default=50, help="seconds into the run Redis stops")
    parser.add_argument("--outage", type=float, default=8, help="seconds PostgreSQL and Redis stay away")
    parser.add_argument("--fault-rate", type=float, default=0.3, help="share of upstream calls that fail")
    parser.add_argument("--fault-hang", type=float, default=4, help="seconds an upstream timeout fault hangs")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds every upstream answer takes")
    parser.add_argument("--max-retries", type=int, default=None, help="MODERATION_MAX_RETRIES (default 2)")
    parser.add_argument("--lease", type=int, default=None, help="PROCESSING_LEASE_SECONDS (default 60)")
    parser.add_argument("--key-deadline", type=float, default=300, help="a key still not answered then is stuck")
    parser.add_argument("--drain-timeout", type=float, default=1200, help="give up waiting for the drain after")
    parser.add_argument("--log-dir", default=None, help="where the processes' logs go (default: a temp folder)")
    parser.add_argument("--report", default=str(ROOT / "ops" / "chaos" / "RESULTS.md"),
                        help="the report to write ('' for none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    began, started = datetime.now(UTC), time.monotonic()
    chaos = Chaos(args)
    try:
        chaos.setup()
        findings, drain_s = chaos.run()
    finally:
        chaos.done.set()  # no fault may land while the deployment is taken down
        chaos.teardown()
    line = chaos.result_line(findings, drain_s)
    details = chaos.details(findings)
    for detail in details:
        log(detail)
    if args.report:
        write_report(Path(args.report), chaos, line, details, began, time.monotonic() - started)
    print(line, flush=True)
    healthy = not findings.lost and not findings.duplicates and findings.chain_ok and \
        all(outcome.succeeded for outcome in chaos.outcomes)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
