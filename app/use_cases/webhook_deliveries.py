"""Webhook deliveries: raising them (a finished submission's events, a test event), delivering one attempt at a
time under a fenced claim, the sweep that recovers abandoned attempts and re-sends lost messages, redelivery by
hand, and the delivery log. Endpoints are app/use_cases/webhook_endpoints.py; the design is in docs/webhooks.md.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Table, Update, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from app import metrics
from app.config import Settings
from app.db import Database
from app.models import (
    DeliveryStatus,
    ReviewItem,
    Submission,
    Verdict,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookEndpoint,
    WebhookEndpointKind,
    WebhookEndpointStatus,
    new_id,
    utcnow,
)
from app.outbox import DELIVER_WEBHOOK, Message, send_after_commit
from app.use_cases.audit import record_event
from app.use_cases.authentication import Principal
from app.use_cases.errors import Conflict, NotFound
from app.use_cases.pagination import decode_cursor, encode_cursor
from app.use_cases.webhook_endpoints import get_endpoint, signing_secrets
from app.webhooks import events
from app.webhooks.sender import AttemptResult, send
from app.webhooks.signing import signed_headers
from app.webhooks.url_guard import Resolver, system_resolver

log = structlog.get_logger(__name__)

WORKER_ACTOR = "worker"
ABANDONED_ERROR = "abandoned: the worker stopped mid-attempt (killed, or over its time limit)"


# ---- raising deliveries ----------------------------------------------------------------------------------------


# Deliveries per message: attempted side by side by one task (see `deliver`), so a message takes as long as one.
DELIVERIES_PER_MESSAGE = 8


def delivery_messages(delivery_ids: Sequence[str]) -> list[Message]:
    return [Message(DELIVER_WEBHOOK, tuple(delivery_ids[start:start + DELIVERIES_PER_MESSAGE]))
            for start in range(0, len(delivery_ids), DELIVERIES_PER_MESSAGE)]


# Built once with bound parameters (their cache keys with them): they run for every verdict chunk and every delivery
# message (issue 15: at a light load a message holds a delivery or two, and building these statements was a good
# part of its CPU).
_ENABLED_ENDPOINTS = (
    select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == bindparam("tenant"),
                                  WebhookEndpoint.status == WebhookEndpointStatus.ENABLED.value)
    .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
)
_DELIVERIES: Table = WebhookDelivery.__table__  # type: ignore[assignment]
_ROW = _DELIVERIES.c
# Plain statements on the transaction's connection: the claim and the conclusion keep no object in step that the
# caller reads afterwards (the conclusion reads the claim's token from the row as read after the claim).
_CLAIM = (
    update(_DELIVERIES)
    .where(_ROW.id.in_(bindparam("ids", expanding=True)), _ROW.status == DeliveryStatus.PENDING.value,
           or_(_ROW.next_attempt_at.is_(None), _ROW.next_attempt_at <= bindparam("due_by")))
    .values(status=DeliveryStatus.DELIVERING.value, claim_token=bindparam("token"), claimed_at=bindparam("claimed"),
            dispatched_at=None, attempt_count=_ROW.attempt_count + 1, updated_at=bindparam("updated"))
    .returning(_ROW.id, _ROW.attempt_count)
)
_CLAIMED_WITH_ENDPOINTS = (
    select(WebhookDelivery, WebhookEndpoint)
    .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
    .where(WebhookDelivery.id.in_(bindparam("ids", expanding=True)))
)


_ATTEMPTS: Table = WebhookDeliveryAttempt.__table__  # type: ignore[assignment]
_INSERT_ATTEMPTS = insert(_ATTEMPTS)


@functools.cache
def _conclusion(columns: tuple[str, ...]) -> Update:
    """The fenced UPDATE that moves deliveries on, writing `columns` (a handful of shapes: succeeded, retry, dead)."""
    return (
        update(_DELIVERIES)
        .where(_ROW.id.in_(bindparam("ids", expanding=True)), _ROW.claim_token == bindparam("token"),
               _ROW.status == DeliveryStatus.DELIVERING.value)
        .values({column: bindparam(f"new_{column}") for column in columns})
        .returning(_ROW.id)
    )


class EndpointsOfTenants:
    """The enabled webhook endpoints of each tenant, read once per caller (a chunk of verdicts, in one transaction),
    and the deliveries raised meanwhile, which the caller sends together (`send`): by message, or, given `inline`,
    by the caller itself once the transaction commits."""

    def __init__(self, session: Session, inline: InlineDeliveries | None = None) -> None:
        self._session = session
        self._of: dict[str, list[WebhookEndpoint]] = {}
        self._inline = inline
        self.raised: list[tuple[WebhookDelivery, WebhookEndpoint]] = []

    def send(self) -> None:
        """The deliveries raised: taken by the caller's `inline` (claimed as they are inserted), or their messages
        sent once the transaction commits (those `inline` did not take: to a receiver that ran out of time lately)."""
        raised, self.raised = self.raised, []
        if self._inline is not None:
            raised = self._inline.take(raised)
        if raised:
            send_after_commit(self._session, *delivery_messages([delivery.id for delivery, _ in raised]))

    def of(self, tenant_id: str) -> list[WebhookEndpoint]:
        if tenant_id not in self._of:
            self._of[tenant_id] = list(self._session.scalars(_ENABLED_ENDPOINTS, {"tenant": tenant_id}))
        return self._of[tenant_id]


def raise_submission_events(
    session: Session, submission_id: str, verdict: Verdict | None = None, review: ReviewItem | None = None, *,
    event_types: list[str] | None = None, submission: Submission | None = None,
    endpoints: EndpointsOfTenants | None = None,
) -> list[str]:
    """Write the deliveries a finished submission raises (or `event_types`: a human decision's), in the caller's
    transaction (which commits them with the verdict, the failure or the decision); their messages are sent once that
    transaction commits. Returns the delivery ids.

    `submission`: the row as it now stands in this transaction (else it is read again); `endpoints`: the tenants'
    endpoints as read already in this transaction, which collects the deliveries' ids for the caller to send.

    Asynchronous submissions only: a synchronous `/v1/moderations` caller already has its answer.
    """
    if submission is None:
        # A submission's source never changes: one this session already holds says so without a query.
        known = session.identity_map.get(identity_key(Submission, submission_id))
        if isinstance(known, Submission) and known.source != "async":
            return []
        submission = session.execute(
            select(Submission).where(Submission.id == submission_id).execution_options(populate_existing=True)
        ).scalar_one_or_none()
    if submission is None or submission.source != "async":
        return []
    if event_types is None:
        event_types = events.submission_event_types(submission, verdict)
    if not event_types:
        return []
    enabled = (endpoints or EndpointsOfTenants(session)).of(submission.tenant_id)
    targets: list[tuple[WebhookEndpoint, str, str]] = []
    for event_type in event_types:
        for endpoint in enabled:
            if endpoint.kind == WebhookEndpointKind.ENDPOINT.value and event_type in endpoint.events and endpoint.url:
                targets.append((endpoint, endpoint.url, event_type))
            elif endpoint.kind == WebhookEndpointKind.CALLBACK.value and submission.callback_url:
                targets.append((endpoint, submission.callback_url, event_type))
    if submission.callback_url and not any(e.kind == WebhookEndpointKind.CALLBACK.value for e in enabled):
        # Submissions are refused without a signer, so only one stored before webhooks existed gets here.
        log.warning("callback_skipped_no_secret", submission_id=submission.id)
    if not targets:
        return []
    now = utcnow()
    data = events.submission_data(submission, verdict, review)
    deliveries = [
        _new_delivery(endpoint, url, event_type, events.envelope(event_type, data, now), now,
                      submission_id=submission.id)
        for endpoint, url, event_type in targets
    ]
    session.add_all(deliveries)
    ids = [d.id for d in deliveries]
    if endpoints is None:
        send_after_commit(session, *delivery_messages(ids))
    else:  # the caller sends them with the others it raised
        endpoints.raised.extend((delivery, endpoint) for delivery, (endpoint, _, _) in zip(deliveries, targets,
                                                                                           strict=True))
    return ids


def _new_delivery(endpoint: WebhookEndpoint, url: str, event_type: str, payload: str, now: datetime, *,
                  submission_id: str | None) -> WebhookDelivery:
    return WebhookDelivery(
        id=new_id("msg"), tenant_id=endpoint.tenant_id, endpoint_id=endpoint.id, event_type=event_type,
        submission_id=submission_id, url=url, payload=payload, status=DeliveryStatus.PENDING.value,
        attempt_count=0, retries=0, next_attempt_at=now, dispatched_at=now, created_at=now, updated_at=now,
    )


def send_test_event(
    session: Session, principal: Principal, endpoint_id: str, *, request_id: str | None,
) -> WebhookDelivery:
    """A `webhook.test` delivery to the endpoint, through the same durable, signed path as every event."""
    endpoint = get_endpoint(session, principal.tenant_id, endpoint_id)
    if endpoint.status != WebhookEndpointStatus.ENABLED.value or endpoint.url is None:
        raise Conflict("This webhook endpoint is disabled.", code="webhook_disabled")
    now = utcnow()
    delivery = _new_delivery(endpoint, endpoint.url, events.WEBHOOK_TEST,
                             events.envelope(events.WEBHOOK_TEST, events.webhook_test_data(endpoint.id), now), now,
                             submission_id=None)
    session.add(delivery)
    session.flush()
    record_event(session, tenant_id=principal.tenant_id, action="webhook.test_requested", actor=principal.key_id,
                 subject_type="webhook_delivery", subject_id=delivery.id, request_id=request_id,
                 details={"endpoint_id": endpoint.id})
    send_after_commit(session, Message(DELIVER_WEBHOOK, (delivery.id,)))
    return delivery


# ---- delivering ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryClaim:
    delivery_id: str
    token: str
    attempt: int


def claim_delivery(session: Session, delivery_id: str) -> DeliveryClaim | None:
    """Take a due delivery for one attempt, in the caller's transaction; None if it is not due, done, or another
    worker holds it."""
    claims = claim_deliveries(session, [delivery_id])
    return claims.get(delivery_id)


def claim_deliveries(session: Session, delivery_ids: Sequence[str]) -> dict[str, DeliveryClaim]:
    """Take those of the deliveries that are due, each for one attempt, in the caller's transaction: one conditional
    UPDATE (of two workers racing for a row, exactly one matches it: it is pending only until the first takes it),
    with a fresh fencing token shared by the claims it makes. The claims made, by delivery id."""
    if not delivery_ids:
        return {}
    now = utcnow()
    token = secrets.token_hex(16)
    session.flush()  # what an ORM statement's autoflush did
    rows = session.connection().execute(_CLAIM, {"ids": list(delivery_ids), "due_by": now, "token": token,
                                                 "claimed": now, "updated": now}).tuples().all()
    return {delivery_id: DeliveryClaim(delivery_id=delivery_id, token=token, attempt=attempt)
            for delivery_id, attempt in rows}


@dataclass(frozen=True)
class _Attempt:
    claim: DeliveryClaim
    delivery: WebhookDelivery
    url: str
    body: str
    headers: dict[str, str]


def deliver(database: Database, delivery_ids: Sequence[str], settings: Settings, *,
            resolve: Resolver = system_resolver) -> dict[str, str]:
    """One attempt of each of the deliveries a message names, if it is due. What became of each: `skipped`,
    `succeeded`, `retry`, `dead` (or `lost`, if its claim ran out meanwhile).

    A command in three steps: claim them and sign the bodies (one transaction), send them side by side with no
    transaction open (so the message's attempts together take as long as the slowest one, well within a claim's
    lease), then conclude the attempts (one transaction: one commit, each tenant's audit chain locked once).
    """
    ids = list(dict.fromkeys(delivery_ids))
    outcomes = dict.fromkeys(ids, "skipped")
    with database.session() as session:
        with session.begin():
            claims = claim_deliveries(session, ids)
            for delivery_id in ids:
                if delivery_id not in claims:
                    # A duplicate or early message, one for a finished delivery, or another worker holds it.
                    log.info("webhook_delivery_skipped", delivery_id=delivery_id)
            if not claims:
                return outcomes
            started_at = utcnow()
            attempts: list[_Attempt] = []
            # One deleted with its endpoint meanwhile is not found: skipped.
            for delivery, endpoint in session.execute(_CLAIMED_WITH_ENDPOINTS, {"ids": list(claims)}).tuples():
                claim = claims[delivery.id]
                if endpoint.status != WebhookEndpointStatus.ENABLED.value:
                    result = AttemptResult(status_code=None, latency_ms=0,
                                           error="not sent: the endpoint is disabled", response_excerpt=None)
                    (outcomes[delivery.id],) = conclude_attempts(session, [(claim, delivery, result)],
                                                                 started_at=started_at, settings=settings, final=True)
                    continue
                headers = signed_headers(signing_secrets(endpoint, started_at), delivery.id, started_at,
                                         delivery.payload)
                attempts.append(_Attempt(claim, delivery, delivery.url, delivery.payload, headers))
        if not attempts:
            return outcomes

        results = _send_all(attempts, settings, resolve)

        concluding = [(a.claim, a.delivery, r) for a, r in zip(attempts, results, strict=True)]
        with session.begin():
            concluded = conclude_attempts(session, concluding, started_at=started_at, settings=settings)
        outcomes.update((attempt.delivery.id, outcome) for attempt, outcome in zip(attempts, concluded, strict=True))
    _log_attempts(attempts, results, outcomes)
    return outcomes


def _log_attempts(attempts: Sequence[_Attempt], results: Sequence[AttemptResult], outcomes: dict[str, str],
                  **fields: object) -> None:
    for attempt, result in zip(attempts, results, strict=True):
        log.info("webhook_attempt", delivery_id=attempt.delivery.id, attempt=attempt.claim.attempt,
                 outcome=outcomes[attempt.delivery.id], status_code=result.status_code,
                 latency_ms=result.latency_ms, error=result.error, **fields)


# ---- a verdict's deliveries, sent by the moderation command itself ---------------------------------------------

# A receiver that let an inline attempt run out of time is sent nothing inline by this process for this long: its
# deliveries go by message, so a hanging receiver costs a moderation worker one budget a minute, not one a verdict.
SLOW_RECEIVER_SECONDS = 60.0
# This process's memory of them: endpoint id -> until when (time.monotonic()).
_slow_receivers: dict[str, float] = {}
# The fenced UPDATE that gives an inline attempt which ran out of time back, unconcluded, to the `webhooks` queue:
# pending and due, its attempt not counted (none was recorded), dispatched now (its message goes after the commit).
_HAND_OVER = (
    update(_DELIVERIES)
    .where(_ROW.id.in_(bindparam("ids", expanding=True)), _ROW.claim_token == bindparam("token"),
           _ROW.status == DeliveryStatus.DELIVERING.value)
    .values(status=DeliveryStatus.PENDING.value, claim_token=None, claimed_at=None,
            attempt_count=_ROW.attempt_count - 1, dispatched_at=bindparam("now"), updated_at=bindparam("now"))
    .returning(_ROW.id)
)


class InlineDeliveries:
    """The deliveries a chunk of verdicts raised, sent by the moderation command itself once the chunk's
    transaction commits, instead of by a `webhooks` worker after a message (WEBHOOK_INLINE_SECONDS; docs/webhooks.md,
    "Delivery"): one message and one hop fewer per verdict.

    They are inserted already claimed for this command (`delivering`, a fresh fencing token, attempt 1) and signed in
    the verdict's transaction, so they need no claim of their own and no other worker takes them; a process that
    dies before concluding them leaves claims that the sweep finds abandoned after WEBHOOK_LEASE_SECONDS, as it does
    for any attempt. Then `send_inline` (no transaction open) and `conclude_inline` (one transaction)."""

    def __init__(self, settings: Settings) -> None:
        self.timeout = min(settings.webhook_inline_seconds, settings.webhook_timeout_seconds)
        self.attempts: list[_Attempt] = []
        self.started_at = utcnow()

    def __bool__(self) -> bool:
        return bool(self.attempts)

    def take(self, raised: Sequence[tuple[WebhookDelivery, WebhookEndpoint]],
             ) -> list[tuple[WebhookDelivery, WebhookEndpoint]]:
        """Claim the deliveries raised (added to the session, not yet written) for this command and sign them, however
        many (a chunk of verdicts may raise dozens: they are sent SEND_THREADS at a time), but those to a receiver
        that ran out of time lately; the ones not taken are returned (all of them if this already holds a chunk's),
        unchanged, to go by message."""
        if self.attempts:
            return list(raised)
        now_monotonic = time.monotonic()
        left = [(d, e) for d, e in raised if _slow_receivers.get(e.id, 0.0) > now_monotonic]
        taken = [(d, e) for d, e in raised if _slow_receivers.get(e.id, 0.0) <= now_monotonic]
        if not taken:
            return left
        now = utcnow()
        token = secrets.token_hex(16)
        for delivery, endpoint in taken:
            delivery.status = DeliveryStatus.DELIVERING.value
            delivery.claim_token, delivery.claimed_at, delivery.attempt_count = token, now, 1
            delivery.dispatched_at = None
            headers = signed_headers(signing_secrets(endpoint, now), delivery.id, now, delivery.payload)
            self.attempts.append(_Attempt(DeliveryClaim(delivery_id=delivery.id, token=token, attempt=1), delivery,
                                          delivery.url, delivery.payload, headers))
        self.started_at = now
        return left


def inline_deliveries(settings: Settings) -> InlineDeliveries | None:
    """What collects a verdict chunk's deliveries for the command to send itself; None when WEBHOOK_INLINE_SECONDS
    is 0 (they go by message)."""
    return InlineDeliveries(settings) if settings.webhook_inline_seconds > 0 else None


def send_inline(inline: InlineDeliveries, settings: Settings, *,
                resolve: Resolver = system_resolver) -> list[AttemptResult]:
    """Send the deliveries `inline` holds, side by side (SEND_THREADS at a time), with no transaction open (after the
    verdicts committed), each step of an attempt waiting at most the inline budget. So that a receiver that hangs
    does not hold the command for one budget per delivery: once an attempt to an endpoint ran out of time, the
    chunk's others to it are not sent, and none starts later than INLINE_START_BUDGETS budgets after the first;
    those not sent are handed over with the late ones (`conclude_inline`). The SSRF guard, the signed bodies and the
    sender are `deliver`'s. Never raises: should anything go wrong here, the attempts count as unanswered and are
    handed to the `webhooks` queue, so the command goes on recording the rest of its batch."""
    try:
        return _send_all(inline.attempts, settings, resolve, timeout=inline.timeout,
                         start_by=time.monotonic() + INLINE_START_BUDGETS * inline.timeout)
    except Exception as exc:  # noqa: BLE001 - the moderation command must go on; the queue attempts them instead
        log.warning("webhook_inline_send_failed", count=len(inline.attempts), error_type=type(exc).__name__)
        return [AttemptResult(status_code=None, latency_ms=0, error="not sent", response_excerpt=None, timed_out=True)
                for _ in inline.attempts]


def conclude_inline(session: Session, inline: InlineDeliveries, results: Sequence[AttemptResult],
                    settings: Settings) -> dict[str, str]:
    """Conclude the inline attempts in the caller's transaction, as `deliver` does (`conclude_attempts`); an
    attempt that got no answer within the budget is not concluded but handed over: given back unclaimed and due, its
    message sent once the transaction commits, so a `webhooks` worker attempts it with the full timeout (the
    receiver may see it twice: deduplicated on `webhook-id`), and its receiver gets nothing inline from this process
    for SLOW_RECEIVER_SECONDS. What became of each (`handed_over` for those)."""
    attempts = inline.attempts
    outcomes: dict[str, str] = {}
    concluding = [(a.claim, a.delivery, r) for a, r in zip(attempts, results, strict=True) if not r.timed_out]
    if concluding:
        concluded = conclude_attempts(session, concluding, started_at=inline.started_at, settings=settings)
        outcomes.update((claim.delivery_id, outcome) for (claim, _, _), outcome in zip(concluding, concluded,
                                                                                        strict=True))
    late = [a for a, r in zip(attempts, results, strict=True) if r.timed_out]
    if late:
        now_monotonic = time.monotonic()
        for expired in [key for key, until in _slow_receivers.items() if until <= now_monotonic]:
            del _slow_receivers[expired]
        for attempt, result in zip(attempts, results, strict=True):
            if result.timed_out and result is not _NOT_SENT:  # the receiver of one not sent may be fine
                _slow_receivers[attempt.delivery.endpoint_id] = now_monotonic + SLOW_RECEIVER_SECONDS
        session.flush()  # what an ORM statement's autoflush did
        handed = set(session.connection().execute(_HAND_OVER, {
            "ids": [a.delivery.id for a in late], "token": late[0].claim.token, "now": utcnow()}).scalars())
        send_after_commit(session, *delivery_messages([a.delivery.id for a in late if a.delivery.id in handed]))
        for attempt in late:
            outcomes[attempt.delivery.id] = "handed_over" if attempt.delivery.id in handed else "lost"
    _log_attempts(attempts, results, outcomes, inline=True)
    return outcomes


# Attempts sent side by side by one process: a message's (DELIVERIES_PER_MESSAGE), or an inline chunk's that many
# at a time.
SEND_THREADS = DELIVERIES_PER_MESSAGE
# No inline attempt starts later than this many inline budgets after the chunk's first (see `send_inline`).
INLINE_START_BUDGETS = 2
# What an inline attempt that was not sent (`send_inline`) counts as: unanswered, so it is handed over.
_NOT_SENT = AttemptResult(status_code=None, latency_ms=0, error="not sent inline", response_excerpt=None,
                          timed_out=True)

_send_pool: ThreadPoolExecutor | None = None
_send_pool_lock = threading.Lock()


def _forget_send_pool() -> None:
    """In a forked child: the parent's threads are not there; the child makes its own pool on first use."""
    global _send_pool, _send_pool_lock  # noqa: PLW0603 - one pool per process
    _send_pool, _send_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_send_pool)


def _sending_pool() -> ThreadPoolExecutor:
    """This process's threads for sending attempts side by side, made on first use (a pool per message or chunk
    cost its thread start-ups each time: a good part of a delivery's CPU)."""
    global _send_pool  # noqa: PLW0603 - one pool per process, made on first use (after a fork, in the child)
    with _send_pool_lock:
        if _send_pool is None:
            _send_pool = ThreadPoolExecutor(max_workers=SEND_THREADS, thread_name_prefix="webhook")
        return _send_pool


def _send_all(attempts: Sequence[_Attempt], settings: Settings, resolve: Resolver, *,
              timeout: float | None = None, start_by: float | None = None) -> list[AttemptResult]:
    """Send each attempt (side by side when there are several, SEND_THREADS at a time: receivers wait on their own,
    none behind another), each step of each waiting at most `timeout` (WEBHOOK_TIMEOUT_SECONDS unless given).
    `start_by` (time.monotonic()): an attempt not begun by then, or to an endpoint an attempt of this call ran out of
    time for, is not sent (`_NOT_SENT`)."""
    allowed, ports = settings.webhook_networks, settings.webhook_ports
    wait = settings.webhook_timeout_seconds if timeout is None else timeout
    timed_out: set[str] = set()  # endpoint ids

    def one(attempt: _Attempt) -> AttemptResult:
        endpoint_id = attempt.delivery.endpoint_id
        if start_by is not None and (endpoint_id in timed_out or time.monotonic() > start_by):
            return _NOT_SENT
        result = send(attempt.url, attempt.body.encode(), attempt.headers, allowed=allowed, timeout=wait,
                      resolve=resolve, ports=ports)
        if result.timed_out:
            timed_out.add(endpoint_id)
        return result

    if len(attempts) == 1:
        return [one(attempts[0])]
    return list(_sending_pool().map(one, attempts))


def conclude_attempt(
    session: Session, claim: DeliveryClaim, result: AttemptResult, *, started_at: datetime, settings: Settings,
    final: bool = False,
) -> str:
    """Log the attempt and move the delivery on (succeeded, retry on schedule, or dead), in the caller's
    transaction, if the claim still holds: the attempt row, the delivery's new state, a 410's disabled endpoint and
    their audit events. `lost` (and nothing written) if it does not. `final` kills the delivery whatever the
    schedule says.
    """
    delivery = session.execute(
        select(WebhookDelivery).where(WebhookDelivery.id == claim.delivery_id)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if delivery is None:
        log.warning("webhook_attempt_discarded_claim_lost", delivery_id=claim.delivery_id)
        return "lost"
    return conclude_attempts(session, [(claim, delivery, result)], started_at=started_at, settings=settings,
                             final=final)[0]


def conclude_attempts(
    session: Session, attempts: Sequence[tuple[DeliveryClaim, WebhookDelivery, AttemptResult]], *,
    started_at: datetime, settings: Settings, final: bool = False,
) -> list[str]:
    """`conclude_attempt` for several attempts at once (each delivery as read after its claim in this session):
    the deliveries moved to the same state by one fenced UPDATE, the attempt rows inserted together, then the audit
    events. What became of each, in order."""
    now = utcnow()
    delays = settings.webhook_retry_delays
    planned: list[tuple[str, dict[str, Any]]] = []
    groups: dict[tuple[str, tuple[tuple[str, Any], ...]], list[str]] = {}
    for claim, delivery, result in attempts:
        values: dict[str, Any] = {"claim_token": None, "updated_at": now, "last_status_code": result.status_code,
                                  "last_error": result.error}
        if delivery.claim_token != claim.token:
            planned.append(("lost", values))
            continue
        if result.succeeded:
            outcome = "succeeded"
            values.update(status=DeliveryStatus.SUCCEEDED.value, completed_at=now, next_attempt_at=None)
        elif final or result.gone or delivery.retries >= len(delays):
            outcome = "dead"
            values.update(status=DeliveryStatus.DEAD.value, completed_at=now, next_attempt_at=None)
        else:
            outcome = "retry"
            values.update(status=DeliveryStatus.PENDING.value, retries=delivery.retries + 1,
                          next_attempt_at=now + timedelta(seconds=delays[delivery.retries]))
        planned.append((outcome, values))
        groups.setdefault((claim.token, tuple(sorted(values.items()))), []).append(delivery.id)
    # The fenced UPDATEs first: a claim lost since the read writes nothing at all.
    won: set[str] = set()
    if groups:
        session.flush()  # what an ORM statement's autoflush did
    for (token, items), ids in groups.items():
        won.update(session.connection().execute(
            _conclusion(tuple(column for column, _ in items)),
            {"ids": ids, "token": token, **{f"new_{column}": value for column, value in items}},
        ).scalars())
    outcomes: list[str] = []
    events: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for (claim, delivery, result), (outcome, _) in zip(attempts, planned, strict=True):
        if delivery.id not in won:
            log.warning("webhook_attempt_discarded_claim_lost", delivery_id=claim.delivery_id)
            outcomes.append("lost")
            continue
        outcomes.append(outcome)
        rows.append({"delivery_id": delivery.id, "number": claim.attempt, "started_at": started_at,
                     "status_code": result.status_code, "latency_ms": result.latency_ms, "error": result.error,
                     "response_excerpt": result.response_excerpt})
        events.extend(_concluded(session, claim, delivery, result, outcome, now=now))
    if rows:
        # The attempt rows in one plain INSERT (nothing reads them back in this transaction): a unit-of-work flush
        # of ORM objects, returning their ids, cost a few milliseconds per conclusion.
        session.connection().execute(_INSERT_ATTEMPTS, rows)
    for fields in events:
        record_event(session, **fields)
    return outcomes


def _concluded(session: Session, claim: DeliveryClaim, delivery: WebhookDelivery, result: AttemptResult,
               outcome: str, *, now: datetime) -> list[dict[str, Any]]:
    """What a concluded attempt writes besides the delivery's state and its attempt row: a 410's disabled endpoint;
    and the fields of its audit events, returned."""
    metrics.webhook_attempt_concluded(session, outcome, result.latency_ms)
    disabled = result.gone and _disable_endpoint(session, delivery.endpoint_id, now)
    details = {"endpoint_id": delivery.endpoint_id, "event_type": delivery.event_type,
               "submission_id": delivery.submission_id, "attempts": claim.attempt,
               "status_code": result.status_code}
    events: list[dict[str, Any]] = []
    if disabled:
        events.append({"tenant_id": delivery.tenant_id, "action": "webhook.disabled", "actor": WORKER_ACTOR,
                       "subject_type": "webhook_endpoint", "subject_id": delivery.endpoint_id,
                       "details": {"reason": "the receiver answered 410 Gone", "delivery_id": delivery.id}})
    if outcome == "succeeded":
        events.append({"tenant_id": delivery.tenant_id, "action": "webhook.delivered", "actor": WORKER_ACTOR,
                       "subject_type": "webhook_delivery", "subject_id": delivery.id, "details": details})
    elif outcome == "dead":
        events.append({"tenant_id": delivery.tenant_id, "action": "webhook.dead", "actor": WORKER_ACTOR,
                       "subject_type": "webhook_delivery", "subject_id": delivery.id,
                       "details": {**details, "error": result.error}})
    return events


def _disable_endpoint(session: Session, endpoint_id: str, now: datetime) -> bool:
    """Disable an endpoint after a 410 (callback signers stay: a 410 only ends that one callback)."""
    disabled = session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.kind == WebhookEndpointKind.ENDPOINT.value,
               WebhookEndpoint.status == WebhookEndpointStatus.ENABLED.value)
        .values(status=WebhookEndpointStatus.DISABLED.value, disabled_reason="the receiver answered 410 Gone",
                updated_at=now)
        .returning(WebhookEndpoint.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    return disabled is not None


# ---- the sweep -------------------------------------------------------------------------------------------------


def sweep_deliveries(database: Database, settings: Settings, *, batch_size: int = 500) -> int:
    """The beat sweep: turn abandoned claims into failed attempts, then send again the messages of due deliveries
    whose message was not sent, or was sent longer than a lease ago and seems lost. Returns how many were sent.

    A command: each abandoned attempt is concluded in a transaction of its own (each appends to its tenant's audit
    chain), then one transaction picks the due deliveries and sends their messages once it commits.
    """
    cutoff = utcnow() - timedelta(seconds=settings.webhook_lease_seconds)
    with database.session() as session:
        with session.begin():
            abandoned = session.execute(
                select(WebhookDelivery.id, WebhookDelivery.claim_token, WebhookDelivery.attempt_count,
                       WebhookDelivery.claimed_at)
                .where(WebhookDelivery.status == DeliveryStatus.DELIVERING.value, WebhookDelivery.claimed_at < cutoff)
                .limit(batch_size)
            ).all()
        recovered = 0
        for row in abandoned:
            if row.claim_token is None or row.claimed_at is None:
                continue
            claim = DeliveryClaim(delivery_id=row.id, token=row.claim_token, attempt=row.attempt_count)
            result = AttemptResult(status_code=None, latency_ms=0, error=ABANDONED_ERROR, response_excerpt=None)
            with session.begin():
                if conclude_attempt(session, claim, result, started_at=row.claimed_at, settings=settings) != "lost":
                    recovered += 1
        if recovered:
            log.warning("webhook_attempts_abandoned", count=recovered)

        with session.begin():
            return _dispatch_due(session, settings, batch_size=batch_size)


def _dispatch_due(session: Session, settings: Settings, *, batch_size: int = 500) -> int:
    """Mark the due deliveries whose message seems lost as dispatched, in the caller's transaction, and send their
    messages once it commits. Returns how many."""
    now = utcnow()
    lease = timedelta(seconds=settings.webhook_lease_seconds)
    # SKIP LOCKED (PostgreSQL; SQLite has one writer anyway): a second sweep running at the same moment takes
    # other rows instead of waiting for these and sending them twice.
    ids = list(session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == DeliveryStatus.PENDING.value, WebhookDelivery.next_attempt_at <= now,
               or_(WebhookDelivery.dispatched_at.is_(None), WebhookDelivery.dispatched_at < now - lease))
        .order_by(WebhookDelivery.next_attempt_at).limit(batch_size)
        .with_for_update(skip_locked=True)
    ))
    if not ids:
        return 0
    session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(dispatched_at=now)
        .execution_options(synchronize_session=False)
    )
    send_after_commit(session, *delivery_messages(ids))
    log.info("webhook_deliveries_dispatched", count=len(ids))
    return len(ids)


def redeliver(session: Session, principal: Principal, delivery_id: str, *, request_id: str | None) -> WebhookDelivery:
    """Send a delivery again now, with the same `webhook-id` and body and a fresh retry schedule."""
    delivery = get_delivery(session, principal.tenant_id, delivery_id)
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    if endpoint is None or endpoint.status != WebhookEndpointStatus.ENABLED.value:
        raise Conflict("This delivery's webhook endpoint is disabled.", code="webhook_disabled")
    now = utcnow()
    won = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.status != DeliveryStatus.DELIVERING.value)
        .values(status=DeliveryStatus.PENDING.value, retries=0, next_attempt_at=now, dispatched_at=now,
                completed_at=None, claim_token=None, updated_at=now)
        .returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if won is None:
        raise Conflict("This delivery is being attempted right now; try again once the attempt ends.",
                       code="delivery_in_progress")
    record_event(session, tenant_id=principal.tenant_id, action="webhook.redelivery_requested",
                 actor=principal.key_id, subject_type="webhook_delivery", subject_id=delivery.id,
                 request_id=request_id, details={"endpoint_id": delivery.endpoint_id,
                                                 "event_type": delivery.event_type})
    send_after_commit(session, Message(DELIVER_WEBHOOK, (delivery.id,)))
    session.refresh(delivery)
    return delivery


# ---- erasure ---------------------------------------------------------------------------------------------------


def erase_delivery_payloads(session: Session, submission_ids: Sequence[str], erased_at: datetime) -> int:
    """Erase what a submission's erasure erases (its `metadata` and the verdict's per-text results) from the bodies
    of its deliveries too, in the caller's transaction; later attempts and redeliveries send the erased form, with
    `erased_at` set. For the erasure use case to call beside its own updates. Returns how many bodies changed."""
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.payload).where(WebhookDelivery.submission_id.in_(submission_ids))
    ).all()
    stamp = erased_at.isoformat().replace("+00:00", "Z")
    for delivery_id, payload in rows:
        body = json.loads(payload)
        data = body.get("data")
        if not isinstance(data, dict):
            continue
        data["metadata"] = None
        data["erased_at"] = stamp
        if isinstance(data.get("verdict"), dict):
            data["verdict"]["results"] = []
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
            .values(payload=json.dumps(body, separators=(",", ":")))
            .execution_options(synchronize_session=False)
        )
    return len(rows)


# ---- reading the delivery log ----------------------------------------------------------------------------------


def get_delivery(session: Session, tenant_id: str, delivery_id: str) -> WebhookDelivery:
    delivery = None if "\x00" in delivery_id else session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.tenant_id != tenant_id:
        raise NotFound("No such delivery.", param="id")
    return delivery


@dataclass(frozen=True)
class DeliveryPage:
    deliveries: list[WebhookDelivery]
    attempts: dict[str, list[WebhookDeliveryAttempt]]
    next_cursor: str | None


def list_deliveries(
    session: Session, tenant_id: str, endpoint_id: str, *, status: str | None, limit: int, cursor: str | None,
) -> DeliveryPage:
    """An endpoint's deliveries (the callback signer's too), newest first, with their attempts; keyset-paginated."""
    endpoint = get_endpoint(session, tenant_id, endpoint_id, any_kind=True)
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    if status:
        query = query.where(WebhookDelivery.status == status)
    if cursor:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(or_(WebhookDelivery.created_at < created_at,
                                (WebhookDelivery.created_at == created_at) & (WebhookDelivery.id < last_id)))
    rows = list(session.scalars(
        query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit + 1)
    ))
    has_more = len(rows) > limit
    rows = rows[:limit]
    attempts: dict[str, list[WebhookDeliveryAttempt]] = {d.id: [] for d in rows}
    if rows:
        for attempt in session.scalars(
            select(WebhookDeliveryAttempt).where(WebhookDeliveryAttempt.delivery_id.in_(list(attempts)))
            .order_by(WebhookDeliveryAttempt.number, WebhookDeliveryAttempt.id)
        ):
            attempts[attempt.delivery_id].append(attempt)
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more and rows else None
    return DeliveryPage(deliveries=rows, attempts=attempts, next_cursor=next_cursor)


def attempts_of(session: Session, delivery_id: str) -> list[WebhookDeliveryAttempt]:
    return list(session.scalars(
        select(WebhookDeliveryAttempt).where(WebhookDeliveryAttempt.delivery_id == delivery_id)
        .order_by(WebhookDeliveryAttempt.number, WebhookDeliveryAttempt.id)
    ))


def payload_of(delivery: WebhookDelivery) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(delivery.payload)
    return payload
