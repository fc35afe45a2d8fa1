"""Celery, wired the way Flask documents it: every Celery setting in one place, and the publisher that sends the
outbox's messages (app/outbox.py) once their transaction commits. The API only ever sends tasks by their stable
names; the worker loads them from `workers.tasks`. See docs/architecture.md ("The queue").
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import structlog
from celery import Celery, Task
from celery.signals import worker_init, worker_process_init
from flask import Flask
from kombu.entity import Queue
from kombu.transport import redis as kombu_redis
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from app.config import Settings
from app.db import Database
from app.doorbell import build_doorbell
from app.extensions import CELERY, DOORBELL, PROVIDER
from app.forking import settle_before_fork
from app.outbox import (
    DELIVER_WEBHOOK,
    DISPATCH_WEBHOOKS,
    ERASE_EXPIRED_CONTENT,
    PURGE_IDEMPOTENCY_KEYS,
    RELEASE_EXPIRED_CLAIMS,
    REQUEUE_BACKTESTS,
    REQUEUE_STALLED,
    SUMMARIZE_AUTH_FAILURES,
    Message,
    Publisher,
)
from app.use_cases.moderation import mark_undispatched

log = structlog.get_logger(__name__)

MODERATION_QUEUE = "moderation"
# Webhook deliveries wait on other people's servers; their own queue lets an operator give them their own workers
# (`verdict worker -Q webhooks`) so a slow receiver never holds up moderation. A plain worker consumes both.
WEBHOOKS_QUEUE = "webhooks"


class _RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, except that it sends through one client of its connection pool instead of building a
    new `redis.Redis` (with its ~165 response callbacks) for every message it publishes: ~0.4 ms of an intake's CPU
    (issue 15). A client holds no state of its own (each command takes a connection from the pool and gives it
    back, and is thread-safe), so one per pool behaves exactly as a new one each time; a new pool (after a fork or a
    reconnect) gets a new client."""

    _kept_client: tuple[object, Any] | None = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool, kept = self.pool, self._kept_client
        if kept is None or kept[0] is not pool:
            kept = self._kept_client = (pool, self._create_client())  # type: ignore[no-untyped-call]
        yield kept[1]


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with `_RedisChannel`: Celery's `broker_transport` for a `redis://` broker."""

    Channel = _RedisChannel


def celery_config(settings: Settings) -> dict[str, Any]:
    transport_options: dict[str, Any] = {}
    transport: str | None = None
    if settings.broker_url.startswith("redis://"):
        transport = f"{__name__}:{RedisTransport.__name__}"
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Redis hands an unacknowledged message to another worker after this long; no countdown may exceed it.
        transport_options["visibility_timeout"] = settings.broker_visibility_timeout
        if settings.broker_key_prefix:
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    elif settings.broker_url.startswith("sqla+"):
        # The SQLAlchemy transport polls (kombu's default: once a second, most of an idle verdict's time). Not as a
        # transport option: that transport hands every option it does not know to create_engine(), which refuses
        # `polling_interval`; kombu's virtual transports read the interval from their class otherwise.
        kombu_sqlalchemy.Transport.polling_interval = settings.broker_polling_interval
    return {
        "broker_url": settings.broker_url,
        "broker_transport": transport,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 4,
        "include": ["workers.tasks"],
        "task_ignore_result": True,
        "task_default_queue": MODERATION_QUEUE,
        "task_routes": {"moderation.*": {"queue": MODERATION_QUEUE}, "webhooks.*": {"queue": WEBHOOKS_QUEUE}},
        # A worker started without -Q consumes every queue declared here.
        "task_queues": (Queue(MODERATION_QUEUE), Queue(WEBHOOKS_QUEUE)),  # type: ignore[no-untyped-call]
        # A delivery's claim lasts WEBHOOK_LEASE_SECONDS: its task is gone before then, so no two workers send it.
        "task_annotations": {DELIVER_WEBHOOK: {"time_limit": settings.webhook_lease_seconds - 5,
                                               "soft_time_limit": settings.webhook_lease_seconds - 8}},
        "task_serializer": "json",
        "accept_content": ["json"],
        # A message is acknowledged only after the task ran, and given back if the worker process dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Celery's prefork pool, except that a time limit never cancels a task that already finished while the
        # worker was reconnecting to the broker (workers/pool.py). A reconnect cancels no running task either: that
        # is Celery 5's default, said here so Celery 6's change of default cannot slip in.
        "worker_pool": "workers.pool:TaskPool",
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # The soft limit leaves the task most of its time (see Settings.task_soft_time_limit).
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        # Publishing must not hang an API request when the broker is down: the row stays queued and the sweep
        # sends it later.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                                      "interval_max": 1},
        "worker_hijack_root_logger": False,
        "worker_concurrency": settings.worker_concurrency,
        "beat_schedule": {
            "requeue-stalled-submissions": {"task": REQUEUE_STALLED, "schedule": settings.sweep_interval_seconds},
            "erase-expired-content": {"task": ERASE_EXPIRED_CONTENT,
                                      "schedule": settings.retention_sweep_interval_seconds},
            "purge-idempotency-keys": {"task": PURGE_IDEMPOTENCY_KEYS,
                                       "schedule": settings.retention_sweep_interval_seconds},
            "dispatch-webhook-deliveries": {"task": DISPATCH_WEBHOOKS,
                                            "schedule": settings.webhook_sweep_interval_seconds},
            "summarize-auth-failures": {"task": SUMMARIZE_AUTH_FAILURES,
                                        "schedule": settings.auth_failure_window_seconds},
            "requeue-stalled-backtests": {"task": REQUEUE_BACKTESTS, "schedule": settings.sweep_interval_seconds},
            "release-expired-review-claims": {"task": RELEASE_EXPIRED_CLAIMS,
                                              "schedule": settings.sweep_interval_seconds},
        },
        "timezone": "UTC",
    }


def celery_init_app(app: Flask, settings: Settings, database: Database) -> Celery:
    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(celery_config(settings))
    celery_app.set_default()
    app.extensions[CELERY] = celery_app
    # Committed transactions' messages leave through this Celery app; with a Redis broker, new submissions' through
    # the doorbell (app/doorbell.py).
    doorbell = app.extensions[DOORBELL] = build_doorbell(settings)
    publisher = celery_publisher(celery_app)
    database.outbox.publisher = publisher if doorbell is None else doorbell.publisher(publisher)
    # A submission whose message the broker refused is re-sent by the sweep soon, not after REDISPATCH_AFTER_SECONDS.
    database.outbox.on_publish_failure = functools.partial(mark_undispatched, database)

    @worker_process_init.connect(weak=False)
    def _dispose_inherited_connections(**_kwargs: Any) -> None:
        # A forked pool process must open its own database connections, never reuse the parent's.
        database.dispose_after_fork()

    @worker_init.connect(weak=False)
    def _serve_metrics(**_kwargs: Any) -> None:
        # In the worker's main process: its pool processes count into the multiprocess files this serves.
        if settings.worker_metrics_port is not None:
            from app.metrics import serve_worker_metrics  # noqa: PLC0415 - only a worker that serves them

            serve_worker_metrics(settings.worker_metrics_port)

    @worker_init.connect(weak=False)
    def _warm_up_provider(**_kwargs: Any) -> None:
        # In the worker's main process, before the pool forks: what the provider loads (the local engine's model)
        # is loaded once, shared by the pool processes, and never counted against a task's time limit. The engine
        # loads in well under a second, so the embedded default (whose worker must create the broker's SQLite file
        # before `verdict dev` is ready) warms up too.
        app.extensions[PROVIDER].warm_up()
        # Everything loaded so far (the app, its libraries, the engine's arrays' owners) moves to the collector's
        # permanent generation: a pool process's collections then never touch those objects, so the pages the fork
        # shares stay shared instead of being copied into every pool process (issue 15 item 4).
        settle_before_fork()

    return celery_app


def declare_queues(settings: Settings) -> None:
    """Declare the broker's queues (and, on kombu's SQLAlchemy transport, create its tables) from this one process.
    `verdict dev` does it before it starts its API and worker: on SQLite, two processes declaring a queue at once
    race on `kombu_queue.name` (one of them dies with an IntegrityError); a queue that exists is left as it is."""
    celery_app = Celery("verdict-declare", set_as_current=False)
    celery_app.config_from_object(celery_config(settings))
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in celery_app.conf.task_queues:
            queue.bind(channel).declare()


def alive_workers(settings: Settings, *, timeout: float) -> list[str] | None:
    """The names of the workers that answer Celery's ping within `timeout` seconds; None when the broker offers no
    remote control (kombu's SQLAlchemy transport, the embedded default's) or cannot be reached."""
    if settings.broker_url.startswith("sqla+"):
        return None
    celery_app = Celery("verdict-status", set_as_current=False)
    celery_app.config_from_object(celery_config(settings))
    try:
        replies = celery_app.control.ping(timeout=timeout) or []
    except Exception as exc:  # noqa: BLE001 - an unreachable broker means "cannot tell"
        log.warning("worker_ping_failed", error_type=type(exc).__name__)
        return None
    finally:
        celery_app.close()
    return sorted(name for reply in replies for name in reply)


def celery_publisher(celery_app: Celery) -> Publisher:
    """Send messages as Celery tasks, over one broker connection. A failure propagates to the outbox, which logs it
    (publishing retries briefly first: `task_publish_retry_policy`, so a dead broker never hangs a request).

    No queue is declared per message (`declare=[]`): a task is sent to its queue by name through the default
    exchange, which needs no binding; the workers declare the queues they consume, and `declare_queues` does for
    `verdict dev`. (Celery would copy and bind the queue for every message, to look it up in the declared ones.)"""

    def publish(messages: Sequence[Message]) -> None:
        with celery_app.producer_or_acquire() as producer:
            for message in messages:
                celery_app.send_task(message.task, args=list(message.args), producer=producer,
                                     countdown=message.countdown, declare=[])

    return publish
