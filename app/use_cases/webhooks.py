"""Webhooks: managing endpoints and the callback signer, raising deliveries, and delivering them.

Durability. A finished submission's deliveries are written by `enqueue_submission_events` inside the transaction
that records the verdict (or the failure), so a verdict never exists without its notifications, nor the other way
round. The delivery row is its own outbox: a task is sent for it after the commit, and the beat sweep
(`dispatch_due`) sends one again for any row whose time has come and whose task seems lost.

One sender at a time. A worker *claims* a delivery with a conditional UPDATE (`status = 'pending'`, due, and still
the version it read) that sets a fresh fencing token, and records the attempt's outcome only by an UPDATE that still
matches that token. The task's hard time limit sits below the claim's lease; a claim whose lease ran out (the worker
was killed) is turned by the sweep into a failed attempt and retried on schedule, so nothing is lost and two workers
never send one delivery at the same moment. Delivery is at least once: a receiver deduplicates on `webhook-id`.

Retries follow WEBHOOK_RETRY_SCHEDULE (5 s, 5 min, 30 min, 2 h, 5 h, 10 h by default); after the last, the delivery is
`dead` until redelivered by hand. A 410 answer kills the delivery and disables its endpoint.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import structlog
from sqlalchemy import event, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth import Principal
from app.config import Settings
from app.db import Database
from app.errors import ApiError, InvalidRequest, NotFound
from app.models import (
    DeliveryStatus,
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
from app.use_cases.audit import record_event
from app.use_cases.submissions import decode_cursor, encode_cursor
from app.webhooks import events
from app.webhooks.sender import AttemptResult, send
from app.webhooks.signing import generate_secret, signed_headers
from app.webhooks.url_guard import Resolver, Target, UnsafeUrl, check_url, system_resolver

log = structlog.get_logger(__name__)

WORKER_ACTOR = "worker"
MAX_ENDPOINTS_PER_TENANT = 20
ABANDONED_ERROR = "abandoned: the worker stopped mid-attempt (killed, or over its time limit)"
Dispatch = Callable[[Sequence[str]], None]


def _conflict(message: str, code: str) -> ApiError:
    return ApiError(409, message, code=code)


# ---- endpoints -------------------------------------------------------------------------------------------------


def checked_target(url: str, param: str, settings: Settings, resolve: Resolver = system_resolver) -> Target:
    """The SSRF guard for a URL a client gave, as a 400 naming the field."""
    try:
        return check_url(url, settings.webhook_networks, resolve)
    except UnsafeUrl as exc:
        raise InvalidRequest(f"{param}: the URL {exc.message}.", param=param, code=exc.code) from exc


def create_endpoint(
    session: Session, principal: Principal, *, url: str, event_types: Sequence[str], description: str | None,
    settings: Settings, request_id: str | None, resolve: Resolver = system_resolver,
) -> WebhookEndpoint:
    """Register an endpoint with a new secret (the caller shows it once)."""
    target = checked_target(url, "url", settings, resolve)
    count = session.scalar(
        select(func.count()).select_from(WebhookEndpoint)
        .where(WebhookEndpoint.tenant_id == principal.tenant_id,
               WebhookEndpoint.kind == WebhookEndpointKind.ENDPOINT.value)
    ) or 0
    if count >= MAX_ENDPOINTS_PER_TENANT:
        raise _conflict(f"A tenant may have at most {MAX_ENDPOINTS_PER_TENANT} webhook endpoints; delete one first.",
                        "webhook_limit_reached")
    now = utcnow()
    endpoint = WebhookEndpoint(
        id=new_id("wh"), tenant_id=principal.tenant_id, kind=WebhookEndpointKind.ENDPOINT.value, url=url,
        description=description, events=list(dict.fromkeys(event_types)), secret=generate_secret(),
        created_at=now, updated_at=now,
    )
    session.add(endpoint)
    session.flush()
    # The host, not the URL: a path may carry a receiver's own token.
    record_event(session, tenant_id=principal.tenant_id, action="webhook.created", actor=principal.key_id,
                 subject_type="webhook_endpoint", subject_id=endpoint.id, request_id=request_id,
                 details={"kind": endpoint.kind, "host": target.host, "events": endpoint.events})
    session.commit()
    return endpoint


def list_endpoints(session: Session, tenant_id: str) -> list[WebhookEndpoint]:
    return list(session.scalars(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.kind == WebhookEndpointKind.ENDPOINT.value)
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    ))


def get_endpoint(session: Session, tenant_id: str, endpoint_id: str, *, for_update: bool = False,
                 any_kind: bool = False) -> WebhookEndpoint:
    # A NUL cannot even be sent to PostgreSQL; no id holds one, so it is simply not found.
    endpoint = None if "\x00" in endpoint_id else session.get(WebhookEndpoint, endpoint_id,
                                                               with_for_update=for_update or None)
    # Another tenant's endpoint answers exactly as a missing one does.
    if (endpoint is None or endpoint.tenant_id != tenant_id
            or (not any_kind and endpoint.kind != WebhookEndpointKind.ENDPOINT.value)):
        raise NotFound("No such webhook endpoint.", param="id")
    return endpoint


def delete_endpoint(session: Session, principal: Principal, endpoint_id: str, *, request_id: str | None) -> None:
    """Delete an endpoint with its deliveries and their attempt log (the audit trail keeps the deletion)."""
    endpoint = get_endpoint(session, principal.tenant_id, endpoint_id, for_update=True)
    pending = session.scalar(
        select(func.count()).select_from(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id,
               WebhookDelivery.status.in_([DeliveryStatus.PENDING.value, DeliveryStatus.DELIVERING.value]))
    ) or 0
    session.delete(endpoint)
    session.flush()
    record_event(session, tenant_id=principal.tenant_id, action="webhook.deleted", actor=principal.key_id,
                 subject_type="webhook_endpoint", subject_id=endpoint_id, request_id=request_id,
                 details={"undelivered_dropped": int(pending)})
    session.commit()


def rotate_secret(
    session: Session, principal: Principal, endpoint: WebhookEndpoint, *, settings: Settings,
    request_id: str | None,
) -> WebhookEndpoint:
    """A new secret (the caller shows it once); the current one keeps signing, as a second signature, for the grace
    period. Lock the endpoint first (`get_endpoint(..., for_update=True)`), so two rotations cannot interleave."""
    now = utcnow()
    grace = settings.webhook_secret_grace_seconds
    endpoint.previous_secret = endpoint.secret if grace > 0 else None
    endpoint.previous_secret_expires_at = now + timedelta(seconds=grace) if grace > 0 else None
    endpoint.secret = generate_secret()
    endpoint.secret_rotated_at = now
    endpoint.updated_at = now
    session.flush()
    record_event(session, tenant_id=principal.tenant_id, action="webhook.secret_rotated", actor=principal.key_id,
                 subject_type="webhook_endpoint", subject_id=endpoint.id, request_id=request_id,
                 details={"kind": endpoint.kind, "grace_seconds": grace})
    session.commit()
    return endpoint


def signing_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """The secrets that sign now: the current one, and the previous one while its grace period lasts."""
    valid = [endpoint.secret]
    if (endpoint.previous_secret and endpoint.previous_secret_expires_at is not None
            and endpoint.previous_secret_expires_at > now):
        valid.append(endpoint.previous_secret)
    return valid


# ---- the callback signer ---------------------------------------------------------------------------------------


def get_callback_signer(session: Session, tenant_id: str, *, for_update: bool = False) -> WebhookEndpoint:
    query = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id,
                                          WebhookEndpoint.kind == WebhookEndpointKind.CALLBACK.value)
    signer = session.scalars(query.with_for_update() if for_update else query).one_or_none()
    if signer is None:
        raise NotFound("This tenant has no callback secret yet; create it with POST /v1/webhooks/callback-secret.")
    return signer


def create_callback_signer(session: Session, principal: Principal, *, request_id: str | None) -> WebhookEndpoint:
    """The tenant's one secret for per-submission `callback_url`s (the caller shows it once)."""
    now = utcnow()
    signer = WebhookEndpoint(
        id=new_id("wh"), tenant_id=principal.tenant_id, kind=WebhookEndpointKind.CALLBACK.value, url=None,
        events=[], secret=generate_secret(), created_at=now, updated_at=now,
    )
    session.add(signer)
    try:
        session.flush()
    except IntegrityError as exc:  # the partial unique index: one signer per tenant
        session.rollback()
        raise _conflict("This tenant already has a callback secret; rotate it with "
                        "POST /v1/webhooks/callback-secret/rotate.", "callback_secret_exists") from exc
    record_event(session, tenant_id=principal.tenant_id, action="webhook.created", actor=principal.key_id,
                 subject_type="webhook_endpoint", subject_id=signer.id, request_id=request_id,
                 details={"kind": signer.kind})
    session.commit()
    return signer


def check_callback_urls(
    session: Session, tenant_id: str, urls: Sequence[str | None], *, settings: Settings,
    resolve: Resolver = system_resolver,
) -> None:
    """Refuse, before anything is stored, a submission whose `callback_url` fails the SSRF guard, or any callback
    when the tenant has no callback secret to sign it with. `urls` holds one entry per submitted item."""
    params = ["callback_url" if len(urls) == 1 else f"items[{i}].callback_url" for i in range(len(urls))]
    checked: dict[str, None] = {}
    for url, param in zip(urls, params, strict=True):
        if url is not None and url not in checked:
            checked_target(url, param, settings, resolve)
            checked[url] = None
    if not checked:
        return
    has_signer = session.scalar(
        select(func.count()).select_from(WebhookEndpoint)
        .where(WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.kind == WebhookEndpointKind.CALLBACK.value)
    )
    if not has_signer:
        first = next(param for url, param in zip(urls, params, strict=True) if url is not None)
        raise InvalidRequest(f"{first}: callbacks are signed with the tenant's callback secret, and there is none "
                             "yet; create it first with POST /v1/webhooks/callback-secret.", param=first,
                             code="callback_secret_missing")


# ---- raising deliveries ----------------------------------------------------------------------------------------


def enqueue_submission_events(session: Session, submission_id: str, verdict: Verdict | None = None) -> list[str]:
    """Write the deliveries a finished submission raises, in the caller's transaction (which commits them with the
    verdict or the failure); their tasks are sent once that transaction commits. Returns the delivery ids.

    Asynchronous submissions only: a synchronous `/v1/moderations` caller already has its answer.
    """
    submission = session.execute(
        select(Submission).where(Submission.id == submission_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if submission is None or submission.source != "async":
        return []
    event_types = events.submission_event_types(submission, verdict)
    if not event_types:
        return []
    endpoints = list(session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == submission.tenant_id,
                                      WebhookEndpoint.status == WebhookEndpointStatus.ENABLED.value)
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    ))
    targets: list[tuple[WebhookEndpoint, str, str]] = []
    for event_type in event_types:
        for endpoint in endpoints:
            if endpoint.kind == WebhookEndpointKind.ENDPOINT.value and event_type in endpoint.events and endpoint.url:
                targets.append((endpoint, endpoint.url, event_type))
            elif endpoint.kind == WebhookEndpointKind.CALLBACK.value and submission.callback_url:
                targets.append((endpoint, submission.callback_url, event_type))
    if submission.callback_url and not any(e.kind == WebhookEndpointKind.CALLBACK.value for e in endpoints):
        # Submissions are refused without a signer, so only one stored before webhooks existed gets here.
        log.warning("callback_skipped_no_secret", submission_id=submission.id)
    if not targets:
        return []
    now = utcnow()
    data = events.submission_data(submission, verdict)
    deliveries = [
        _new_delivery(endpoint, url, event_type, events.envelope(event_type, data, now), now,
                      submission_id=submission.id)
        for endpoint, url, event_type in targets
    ]
    session.add_all(deliveries)
    ids = [d.id for d in deliveries]
    dispatch_after_commit(session, ids)
    return ids


def _new_delivery(endpoint: WebhookEndpoint, url: str, event_type: str, payload: str, now: datetime, *,
                  submission_id: str | None) -> WebhookDelivery:
    return WebhookDelivery(
        id=new_id("msg"), tenant_id=endpoint.tenant_id, endpoint_id=endpoint.id, event_type=event_type,
        submission_id=submission_id, url=url, payload=payload, status=DeliveryStatus.PENDING.value,
        attempt_count=0, retries=0, next_attempt_at=now, dispatched_at=now, created_at=now, updated_at=now,
    )


_DISPATCH_KEY = "verdict.webhooks.dispatch"


def dispatch_after_commit(session: Session, delivery_ids: Sequence[str]) -> None:
    """Send the deliveries' tasks once the session's transaction commits (never before: a fast worker would look
    for rows that are not there yet); forget them if it rolls back. If sending fails, the sweep sends them."""
    session.connection()  # a transaction is under way, so a rollback() really ends it (and fires the hook below)
    session.info.setdefault(_DISPATCH_KEY, []).extend(delivery_ids)
    if not event.contains(session, "after_commit", _send_after_commit):
        event.listen(session, "after_commit", _send_after_commit)
        event.listen(session, "after_rollback", _forget_after_rollback)


def _send_after_commit(session: Session) -> None:
    ids: list[str] = session.info.pop(_DISPATCH_KEY, [])
    if ids:
        from app.queue import dispatch_webhook_deliveries  # the queue module needs Flask; import it only when used

        dispatch_webhook_deliveries(ids)


def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_DISPATCH_KEY, None)


def send_test_event(
    session: Session, principal: Principal, endpoint_id: str, *, request_id: str | None,
) -> WebhookDelivery:
    """A `webhook.test` delivery to the endpoint, through the same durable, signed path as every event."""
    endpoint = get_endpoint(session, principal.tenant_id, endpoint_id)
    if endpoint.status != WebhookEndpointStatus.ENABLED.value or endpoint.url is None:
        raise _conflict("This webhook endpoint is disabled.", "webhook_disabled")
    now = utcnow()
    delivery = _new_delivery(endpoint, endpoint.url, events.WEBHOOK_TEST,
                             events.envelope(events.WEBHOOK_TEST, events.webhook_test_data(endpoint.id), now), now,
                             submission_id=None)
    session.add(delivery)
    session.flush()
    record_event(session, tenant_id=principal.tenant_id, action="webhook.test_requested", actor=principal.key_id,
                 subject_type="webhook_delivery", subject_id=delivery.id, request_id=request_id,
                 details={"endpoint_id": endpoint.id})
    dispatch_after_commit(session, [delivery.id])
    session.commit()
    return delivery


# ---- delivering ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryClaim:
    delivery_id: str
    token: str
    attempt: int


def claim_delivery(session: Session, delivery_id: str) -> DeliveryClaim | None:
    """Take a due delivery for one attempt; None if it is not due, done, or another worker holds it."""
    now = utcnow()
    row = session.execute(
        select(WebhookDelivery.status, WebhookDelivery.attempt_count, WebhookDelivery.next_attempt_at)
        .where(WebhookDelivery.id == delivery_id)
    ).one_or_none()
    if (row is None or row.status != DeliveryStatus.PENDING.value
            or (row.next_attempt_at is not None and row.next_attempt_at > now)):
        session.rollback()
        return None
    token = secrets.token_hex(16)
    # Still pending and still the version read above: of two workers racing here, exactly one matches.
    attempt = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.PENDING.value,
               WebhookDelivery.attempt_count == row.attempt_count)
        .values(status=DeliveryStatus.DELIVERING.value, claim_token=token, claimed_at=now, dispatched_at=None,
                attempt_count=WebhookDelivery.attempt_count + 1, updated_at=now)
        .returning(WebhookDelivery.attempt_count)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    session.commit()
    if attempt is None:
        return None
    return DeliveryClaim(delivery_id=delivery_id, token=token, attempt=attempt)


def deliver(database: Database, delivery_id: str, settings: Settings, *,
            resolve: Resolver = system_resolver) -> str:
    """One attempt of a delivery, if it is due: `skipped`, `succeeded`, `retry` or `dead`."""
    with database.session_scope() as session:
        claim = claim_delivery(session, delivery_id)
        if claim is None:
            # A duplicate or early message, one for a finished delivery, or another worker holds it.
            log.info("webhook_delivery_skipped", delivery_id=delivery_id)
            return "skipped"
        log_ = log.bind(delivery_id=delivery_id, attempt=claim.attempt)
        delivery = session.get(WebhookDelivery, delivery_id)
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id) if delivery is not None else None
        if delivery is None or endpoint is None:
            return "skipped"  # deleted with its endpoint meanwhile
        started_at = utcnow()
        if endpoint.status != WebhookEndpointStatus.ENABLED.value:
            result = AttemptResult(status_code=None, latency_ms=0, error="not sent: the endpoint is disabled",
                                   response_excerpt=None)
            return conclude_attempt(session, claim, result, started_at=started_at, settings=settings, final=True)
        url, body = delivery.url, delivery.payload
        headers = signed_headers(signing_secrets(endpoint, started_at), delivery.id, started_at, body)
        session.rollback()  # hold no transaction open while the receiver works

        result = send(url, body.encode(), headers, allowed=settings.webhook_networks,
                      timeout=settings.webhook_timeout_seconds, resolve=resolve)
        outcome = conclude_attempt(session, claim, result, started_at=started_at, settings=settings)
        log_.info("webhook_attempt", outcome=outcome, status_code=result.status_code,
                  latency_ms=result.latency_ms, error=result.error)
        return outcome


def conclude_attempt(
    session: Session, claim: DeliveryClaim, result: AttemptResult, *, started_at: datetime, settings: Settings,
    final: bool = False,
) -> str:
    """Log the attempt and move the delivery on (succeeded, retry on schedule, or dead), if the claim still holds.

    One transaction: the attempt row, the delivery's new state, a 410's disabled endpoint and their audit events.
    `final` kills the delivery whatever the schedule says.
    """
    now = utcnow()
    delivery = session.execute(
        select(WebhookDelivery).where(WebhookDelivery.id == claim.delivery_id)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if delivery is None or delivery.claim_token != claim.token:
        session.rollback()
        log.warning("webhook_attempt_discarded_claim_lost", delivery_id=claim.delivery_id)
        return "lost"
    session.add(WebhookDeliveryAttempt(
        delivery_id=delivery.id, number=claim.attempt, started_at=started_at, status_code=result.status_code,
        latency_ms=result.latency_ms, error=result.error, response_excerpt=result.response_excerpt,
    ))
    values: dict[str, Any] = {"claim_token": None, "updated_at": now, "last_status_code": result.status_code,
                              "last_error": result.error}
    delays = settings.webhook_retry_delays
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
    won = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.claim_token == claim.token,
               WebhookDelivery.status == DeliveryStatus.DELIVERING.value)
        .values(**values)
        .returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if won is None:
        session.rollback()
        return "lost"
    disabled = result.gone and _disable_endpoint(session, delivery.endpoint_id, now)
    details = {"endpoint_id": delivery.endpoint_id, "event_type": delivery.event_type,
               "submission_id": delivery.submission_id, "attempts": claim.attempt,
               "status_code": result.status_code}
    if disabled:
        record_event(session, tenant_id=delivery.tenant_id, action="webhook.disabled", actor=WORKER_ACTOR,
                     subject_type="webhook_endpoint", subject_id=delivery.endpoint_id,
                     details={"reason": "the receiver answered 410 Gone", "delivery_id": delivery.id})
    if outcome == "succeeded":
        record_event(session, tenant_id=delivery.tenant_id, action="webhook.delivered", actor=WORKER_ACTOR,
                     subject_type="webhook_delivery", subject_id=delivery.id, details=details)
    elif outcome == "dead":
        record_event(session, tenant_id=delivery.tenant_id, action="webhook.dead", actor=WORKER_ACTOR,
                     subject_type="webhook_delivery", subject_id=delivery.id,
                     details={**details, "error": result.error})
    session.commit()
    return outcome


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


def dispatch_due(session: Session, settings: Settings, dispatch: Dispatch, *, batch_size: int = 500) -> int:
    """The beat sweep: turn abandoned claims into failed attempts, then send tasks for due deliveries whose task
    was not sent, or was sent longer than a lease ago and seems lost. Returns how many were sent."""
    recover_abandoned(session, settings, batch_size=batch_size)
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
        session.rollback()
        return 0
    session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(dispatched_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    dispatch(ids)
    log.info("webhook_deliveries_dispatched", count=len(ids))
    return len(ids)


def recover_abandoned(session: Session, settings: Settings, *, batch_size: int = 500) -> int:
    """Claims whose lease ran out belong to workers that died (or hit their time limit) mid-attempt; each becomes a
    failed attempt, retried on schedule like any other."""
    cutoff = utcnow() - timedelta(seconds=settings.webhook_lease_seconds)
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.claim_token, WebhookDelivery.attempt_count,
               WebhookDelivery.claimed_at)
        .where(WebhookDelivery.status == DeliveryStatus.DELIVERING.value, WebhookDelivery.claimed_at < cutoff)
        .limit(batch_size)
    ).all()
    session.rollback()
    recovered = 0
    for row in rows:
        if row.claim_token is None or row.claimed_at is None:
            continue
        claim = DeliveryClaim(delivery_id=row.id, token=row.claim_token, attempt=row.attempt_count)
        result = AttemptResult(status_code=None, latency_ms=0, error=ABANDONED_ERROR, response_excerpt=None)
        if conclude_attempt(session, claim, result, started_at=row.claimed_at, settings=settings) != "lost":
            recovered += 1
    if recovered:
        log.warning("webhook_attempts_abandoned", count=recovered)
    return recovered


def redeliver(session: Session, principal: Principal, delivery_id: str, *, request_id: str | None) -> WebhookDelivery:
    """Send a delivery again now, with the same `webhook-id` and body and a fresh retry schedule."""
    delivery = get_delivery(session, principal.tenant_id, delivery_id)
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    if endpoint is None or endpoint.status != WebhookEndpointStatus.ENABLED.value:
        raise _conflict("This delivery's webhook endpoint is disabled.", "webhook_disabled")
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
        session.rollback()
        raise _conflict("This delivery is being attempted right now; try again once the attempt ends.",
                        "delivery_in_progress")
    record_event(session, tenant_id=principal.tenant_id, action="webhook.redelivery_requested",
                 actor=principal.key_id, subject_type="webhook_delivery", subject_id=delivery.id,
                 request_id=request_id, details={"endpoint_id": delivery.endpoint_id,
                                                 "event_type": delivery.event_type})
    dispatch_after_commit(session, [delivery.id])
    session.commit()
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


def url_host(url: str | None) -> str | None:
    return None if url is None else urlsplit(url).hostname
