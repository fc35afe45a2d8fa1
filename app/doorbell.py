"""The doorbell: with a Redis broker, new submissions are sent to the queue as one message that names no ids ("claim
what is queued"), rung only when none is pending, instead of one message per submission. See docs/architecture.md
("The queue") and docs/moderation.md.

Under a backlog a worker fills its provider call with other queued rows, so most per-submission messages used to
find nothing left to do: each still cost a broker round trip and a claim transaction (issue 15). A doorbell is a key
in the broker's Redis, `<prefix>verdict-doorbell`, set (SET NX PX) by whoever rings it and deleted by the worker
that answers it, before that worker reads the queue:

- Ringing (after the intake transaction commits, app/outbox.py): SET NX PX DOORBELL_TTL_MS; one doorbell message is
  published only if the SET took. If the publish fails the key is deleted (the next submission rings), and the
  outbox marks the submissions undispatched as for any refused message. If Redis errors, the submissions' own
  messages are sent as before the doorbell (fail open: a message too many is harmless, one too few strands rows
  until the sweep).
- Answering (app/use_cases/moderation.py, moderate_queued): DEL first, then claim a provider call's worth of the
  oldest queued rows; if any are left, ring again once the claim commits, before calling the provider, so another
  worker process claims the next batch meanwhile. A doorbell that finds nothing rings nothing.

No wakeup is lost: a sender that found the key set committed its rows before its SET, and its SET came before the
DEL of the worker that answers the pending doorbell, which comes before that worker's SELECT: so that SELECT sees
the rows (PostgreSQL's READ COMMITTED: a statement sees what committed before it started). Rows that do not fit
that worker's call are left for the doorbell it rings next. A doorbell message that is lost (the process died
between its SET and its publish) holds the key for at most the TTL; the rows' `dispatched_at` stays set, so if no
other submission rings after that, the sweep sends them again after REDISPATCH_AFTER_SECONDS, like any message the
broker lost.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.config import Settings
from app.outbox import MODERATE_QUEUED, Message, Publisher

log = structlog.get_logger(__name__)

DOORBELL_KEY = "verdict-doorbell"
# The connection is opened on first use (redis-py opens new ones in a forked process). One try, no backoff: a Redis
# that does not answer must not hold up the API request that rings (it falls back to the submissions' own messages).
CLIENT_OPTIONS: dict[str, object] = {"socket_timeout": 2, "socket_connect_timeout": 2, "retry": Retry(NoBackoff(), 0)}
# The one message a doorbell is.
DOORBELL_MESSAGE = Message(MODERATE_QUEUED, ())


class Doorbell:
    """The doorbell's key in Redis: rung (SET NX PX) by senders, answered (DEL) by the worker that takes its message."""

    def __init__(self, client: redis.Redis, *, prefix: str, ttl_ms: int) -> None:
        self._client = client
        self.key = f"{prefix}{DOORBELL_KEY}"
        self._ttl_ms = ttl_ms

    def ring(self) -> bool:
        """Whether this caller rang (no doorbell was pending): it must then publish the doorbell message, or call
        `answer` if it could not. Raises redis.RedisError when Redis cannot be asked."""
        return bool(self._client.set(self.key, b"1", nx=True, px=self._ttl_ms))

    def answer(self) -> None:
        """The pending doorbell is being answered: the next sender rings again. Called before the queue is read (see
        the module's docstring). A Redis error is logged: the key then expires by itself within the TTL."""
        try:
            self._client.delete(self.key)
        except redis.RedisError as exc:
            log.warning("doorbell_unavailable", op="answer", error_type=type(exc).__name__)

    def publisher(self, publish: Publisher) -> Publisher:
        """`publish`, except that the messages a doorbell may stand for (`Message.ring`) ring it instead: one doorbell
        message if none was pending, nothing if one was, or (Redis errors) those messages as they are."""

        def ring_then_publish(messages: Sequence[Message]) -> None:
            ringing = [m for m in messages if m.ring]
            if not ringing:
                publish(messages)
                return
            others = [m for m in messages if not m.ring]
            try:
                rang = self.ring()
            except redis.RedisError as exc:
                log.warning("doorbell_unavailable", op="ring", error_type=type(exc).__name__)
                # Fail open: the submissions' own messages, as without a doorbell (one that names no ids goes as it is).
                publish(others + [m if m.args else DOORBELL_MESSAGE for m in ringing])
                return
            if not rang:
                if others:
                    publish(others)
                return
            try:
                publish([*others, DOORBELL_MESSAGE])
            except Exception:
                self.answer()  # nobody will answer it: the next sender rings again
                raise

        return ring_then_publish


def build_doorbell(settings: Settings) -> Doorbell | None:
    """The doorbell, when the broker is Redis (its key is kept in the broker's Redis, so losing one loses the other
    too); None otherwise (the embedded default's SQLAlchemy broker, or DOORBELL_TTL_MS=0: every submission keeps
    its own message)."""
    if not settings.broker_url.startswith(("redis://", "rediss://")) or settings.doorbell_ttl_ms == 0:
        return None
    client = redis.Redis.from_url(settings.broker_url, **CLIENT_OPTIONS)
    return Doorbell(client, prefix=settings.broker_key_prefix, ttl_ms=settings.doorbell_ttl_ms)
