"""The end-to-end baseline: a Celery app whose one task does nothing but count itself, on Verdict's broker.

Run by the benchmark as `celery -A ops.bench.noop worker`; BENCH_BROKER_URL, BENCH_KEY_PREFIX and BENCH_COUNTER
(a Redis key) come from the environment. Same serializer, acknowledgement and prefetch settings as Verdict's
workers (app/queue.py), so the difference between the two is Verdict's own work.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

BROKER_URL = os.environ["BENCH_BROKER_URL"]
COUNTER = os.environ["BENCH_COUNTER"]
NOOP = "bench.noop"

app = Celery("bench-noop")
app.conf.update(
    broker_url=BROKER_URL,
    broker_transport_options={"global_keyprefix": os.environ["BENCH_KEY_PREFIX"]},
    task_ignore_result=True,
    task_default_queue="bench-noop",
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
_counter = redis.Redis.from_url(BROKER_URL)


@app.task(name=NOOP)
def noop(_payload: str) -> None:
    _counter.incr(COUNTER)
