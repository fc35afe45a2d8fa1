"""What one verdict costs the worker side, in CPU and statements, measured in-process (no Celery, no wall clock).

A scratch PostgreSQL database; texts submitted 100 per transaction (or one per transaction: --per-post 1), each
message the outbox would send run through the worker's use cases in this process, the local engine answering; then
the webhook deliveries those verdicts raised, sent to a local receiver. Printed per verdict (and per delivery): this
process's CPU time, the PostgreSQL backends' CPU time (/proc of the server processes: run it on the database's
host), statements and commits, and how many messages were sent and how many of them found nothing to do.

    .venv/bin/python ops/bench/verdict_cost.py --texts 2000 --per-post 100
"""

from __future__ import annotations

import argparse
import cProfile
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import event, select

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from app.cli import migrate_database  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db import Database  # noqa: E402
from app.extensions import DOORBELL, PROVIDER  # noqa: E402
from app.models import WebhookDelivery  # noqa: E402
from app.outbox import DELIVER_WEBHOOK, MODERATE_QUEUED, MODERATE_SUBMISSION, Message  # noqa: E402
from app.schemas.common import Limits  # noqa: E402
from app.schemas.submissions import SubmissionIn  # noqa: E402
from app.use_cases import moderation, webhook_deliveries  # noqa: E402
from app.use_cases.authentication import Principal  # noqa: E402
from app.use_cases.keys import create_key  # noqa: E402
from app.use_cases.submissions import submit_content  # noqa: E402
from app.use_cases.webhook_endpoints import create_endpoint  # noqa: E402
from ops.bench.scratch import create_scratch, drop_scratch  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.webhook_receiver import WebhookReceiver  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


class Meter:
    def __init__(self, database: Database) -> None:
        self.statements: Counter[str] = Counter()
        self.commits = 0
        self.database = database
        event.listen(database.engine, "before_cursor_execute", self._statement)
        event.listen(database.engine, "commit", self._commit)

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements[" ".join(statement.split()[:3])[:60]] += 1

    def _commit(self, conn: Any) -> None:
        self.commits += 1

    def backend_pids(self) -> list[int]:
        with self.database.engine.connect() as conn:
            return [row[0] for row in conn.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]


def steady(database: Database, provider: Any, settings: Settings, principal: Principal, texts: list[str],
           limits: Limits, sent: list[Message], profile: str | None) -> None:
    meter = Meter(database)
    pids = meter.backend_pids()
    profiler = cProfile.Profile(time.process_time) if profile else None
    cpu0, pg0 = time.process_time(), backend_cpu(pids)
    if profiler is not None:
        profiler.enable()
    outcomes: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    # This thread's CPU only (time.thread_time): the fake upstream and the receiver answer from threads of their own.
    spent: Counter[str] = Counter()
    for text in texts:
        began = time.thread_time()
        with database.transaction() as session:
            submit_content(session, principal, [SubmissionIn.model_validate({"input": text},
                                                                            context={"limits": limits})],
                           request_id=None)
        spent["submit"] += time.thread_time() - began
        while sent:
            message = sent.pop(0)
            messages[message.task] += 1
            began = time.thread_time()
            if message.task == MODERATE_SUBMISSION:
                outcomes.update(moderation.moderate_submissions(database, provider, message.args, settings).values())
                spent["moderate"] += time.thread_time() - began
            elif message.task == DELIVER_WEBHOOK:
                outcomes.update(webhook_deliveries.deliver(database, message.args, settings).values())
                spent["deliver"] += time.thread_time() - began
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    cpu1, pg1 = time.process_time(), backend_cpu(pids + meter.backend_pids())
    n = len(texts)
    inline = "inline" if settings.webhook_inline_seconds else "by message"
    print(f"steady: {n} texts one at a time, webhooks {inline}, {dict(outcomes)}")
    print("  messages per text: " + ", ".join(f"{task} {count / n:.2f}" for task, count in messages.items()))
    print("  per text, this thread's cpu: " + ", ".join(f"{k} {1000 * v / n:.2f} ms" for k, v in spent.items()))
    print(f"  per text (submit + moderate + deliver): process cpu {1000 * (cpu1 - cpu0) / n:.2f} ms, "
          f"postgres cpu {1000 * (pg1 - pg0) / n:.2f} ms, statements {sum(meter.statements.values()) / n:.2f}, "
          f"commits {meter.commits / n:.2f}")
    for kind, count in meter.statements.most_common(20):
        print(f"    {count / n:6.2f}  {kind}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--per-post", type=int, default=100)
    parser.add_argument("--no-webhook", action="store_true")
    parser.add_argument("--top", type=int, default=12, help="statement kinds listed")
    parser.add_argument("--steady", action="store_true",
                        help="one text at a time, as at a light steady load: each is submitted, moderated by the "
                             "OpenAI-compatible provider (the fake upstream, 20 ms) and its webhook delivered before "
                             "the next; CPU and statements per text for the whole of it")
    parser.add_argument("--inline-seconds", type=float, default=None,
                        help="WEBHOOK_INLINE_SECONDS (0: every webhook by message, as before issue 15 item 2); the "
                             "moderation step then includes the inline sending")
    parser.add_argument("--profile", help="write a CPU-time profile of the moderation phase to this file")
    parser.add_argument("--doorbell", action="store_true",
                        help="new submissions ring the doorbell (app/doorbell.py, on this run's Redis key) instead of "
                             "sending a message each, as with a Redis broker; without it, a message per POST (the "
                             "embedded default's way, and the way before the doorbell)")
    args = parser.parse_args()

    name, url = create_scratch("verdict_cost")
    upstream = FakeUpstream(api_key="sk-cost", latency=0.02).__enter__() if args.steady else None
    try:
        provider_settings: dict[str, Any] = {"moderation_provider": "local"} if upstream is None else {
            "moderation_provider": "openai", "upstream_base_url": upstream.base_url, "upstream_api_key": "sk-cost"}
        settings = Settings(_env_file=None, database_url=url, broker_url="redis://127.0.0.1:6379/0",  # type: ignore[call-arg]
                            broker_key_prefix=f"{name}:", log_level="WARNING", webhook_allowed_networks="127.0.0.0/8",
                            webhook_allowed_ports="*", cache_ttl_seconds=0, **provider_settings,
                            **({} if args.inline_seconds is None else {"webhook_inline_seconds": args.inline_seconds}))
        migrate_database(settings)
        app = create_app(settings)
        database: Database = app.extensions["verdict.db"]
        provider = app.extensions[PROVIDER]
        provider.warm_up()
        sent: list[Message] = []
        doorbell = app.extensions[DOORBELL]
        database.outbox.publisher = doorbell.publisher(sent.extend) if args.doorbell else sent.extend
        with database.transaction() as session:
            issued = create_key(session, tenant_name=name, scopes=("submit", "read", "admin"))
            principal = Principal(key_id=issued.key.id, tenant_id=issued.key.tenant_id,
                                  scopes=frozenset(("submit", "read", "admin")))
        with WebhookReceiver() as receiver:
            if not args.no_webhook:
                with database.transaction() as session:
                    create_endpoint(session, principal, url=receiver.url, event_types=["submission.completed"],
                                    description=None, settings=settings, request_id=None)
            limits = Limits(max_text_chars=10_000, max_texts_per_submission=100, max_items_per_request=100,
                            max_metadata_bytes=4096)
            texts = [f"cost text {i}: " + ("you idiot" if i % 5 == 0 else "thank you") for i in range(args.texts)]
            if args.steady:
                steady(database, provider, settings, principal, texts, limits, sent, args.profile)
                return 0
            for start in range(0, len(texts), args.per_post):
                with database.transaction() as session:
                    items = [SubmissionIn.model_validate({"input": t}, context={"limits": limits})
                             for t in texts[start:start + args.per_post]]
                    submit_content(session, principal, items, request_id=None)
            moderating = (MODERATE_SUBMISSION, MODERATE_QUEUED)
            queued = [m for m in sent if m.task in moderating]
            sent.clear()
            meter = Meter(database)
            pids = meter.backend_pids()
            cpu0, pg0 = time.process_time(), backend_cpu(pids)
            outcomes: Counter[str] = Counter()
            messages: Counter[str] = Counter()
            profiler = cProfile.Profile(time.process_time) if args.profile else None
            if profiler is not None:
                profiler.enable()
            while queued:
                message = queued.pop(0)
                messages[message.task] += 1
                answer = doorbell.answer if message.task == MODERATE_QUEUED else None
                statuses = moderation.moderate_submissions(database, provider, message.args, settings,
                                                           answer_doorbell=answer)
                outcomes.update(statuses.values() if statuses else ["nothing"])
                queued.extend(m for m in sent if m.task in moderating)
                sent[:] = [m for m in sent if m.task not in moderating]
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
            cpu1, pg1 = time.process_time(), backend_cpu(pids + meter.backend_pids())
            verdicts = args.texts
            statements = sum(meter.statements.values())
            print(f"moderation: {verdicts} verdicts, {sum(messages.values())} messages {dict(messages)}, "
                  f"{sum(messages.values()) / verdicts:.3f} per verdict, outcomes {dict(outcomes)}")
            print(f"  per verdict: worker cpu {1000 * (cpu1 - cpu0) / verdicts:.2f} ms, "
                  f"postgres cpu {1000 * (pg1 - pg0) / verdicts:.2f} ms, "
                  f"statements {statements / verdicts:.2f}, commits {meter.commits / verdicts:.3f}")
            for kind, count in meter.statements.most_common(args.top):
                print(f"    {count / verdicts:6.2f}  {kind}")
            deliveries = [m for m in sent if m.task == DELIVER_WEBHOOK]
            if deliveries:
                meter.statements.clear()
                meter.commits = 0
                cpu0, pg0 = time.process_time(), backend_cpu(pids)
                delivered: Counter[str] = Counter()
                profiler = cProfile.Profile(time.process_time) if args.profile else None
                if profiler is not None:
                    profiler.enable()
                for message in deliveries:
                    delivered.update(webhook_deliveries.deliver(database, message.args, settings).values())
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(f"{args.profile}.deliveries")
                cpu1, pg1 = time.process_time(), backend_cpu(pids + meter.backend_pids())
                n = sum(delivered.values())
                print(f"deliveries: {n} in {len(deliveries)} messages {dict(delivered)}, "
                      f"received {len(receiver.requests)}")
                print(f"  per delivery: worker cpu {1000 * (cpu1 - cpu0) / n:.2f} ms, "
                      f"postgres cpu {1000 * (pg1 - pg0) / n:.2f} ms, "
                      f"statements {sum(meter.statements.values()) / n:.2f}, commits {meter.commits / n:.3f}")
                for kind, count in meter.statements.most_common(args.top):
                    print(f"    {count / n:6.2f}  {kind}")
                with database.transaction() as session:
                    errors = Counter(session.scalars(select(WebhookDelivery.last_error)
                                                     .where(WebhookDelivery.status != "succeeded")))
                if errors:
                    print(f"  not delivered: {dict(errors)}")
        database.engine.dispose()
    finally:
        if upstream is not None:
            upstream.__exit__(None, None, None)
        drop_scratch(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
