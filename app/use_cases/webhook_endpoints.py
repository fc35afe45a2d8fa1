"""Webhook endpoints and the tenant's callback signer: registering, listing, deleting, rotating their secrets,
and the SSRF check of every URL a client gives. Delivering is app/use_cases/webhook_deliveries.py; the design is
in docs/webhooks.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import String, column, func, select, table, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint, WebhookEndpointKind, new_id, utcnow
from app.secrets_at_rest import SecretBox
from app.use_cases.audit import record_event
from app.use_cases.authentication import Principal
from app.use_cases.errors import Conflict, InvalidInput, NotFound
from app.webhooks.signing import generate_secret
from app.webhooks.url_guard import Resolver, Target, UnsafeUrl, check_url, resolve_once, system_resolver

MAX_ENDPOINTS_PER_TENANT = 20


# ---- endpoints -------------------------------------------------------------------------------------------------


def checked_target(url: str, param: str, settings: Settings, resolve: Resolver = system_resolver) -> Target:
    """The SSRF guard for a URL a client gave, as a 400 naming the field."""
    try:
        return check_url(url, settings.webhook_networks, resolve, ports=settings.webhook_ports)
    except UnsafeUrl as exc:
        raise InvalidInput(f"{param}: the URL {exc.message}.", param=param, code=exc.code) from exc


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
        raise Conflict(f"A tenant may have at most {MAX_ENDPOINTS_PER_TENANT} webhook endpoints; delete one first.",
                       code="webhook_limit_reached")
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
    except IntegrityError as exc:  # the partial unique index: one signer per tenant (the caller rolls back)
        raise Conflict("This tenant already has a callback secret; rotate it with "
                       "POST /v1/webhooks/callback-secret/rotate.", code="callback_secret_exists") from exc
    record_event(session, tenant_id=principal.tenant_id, action="webhook.created", actor=principal.key_id,
                 subject_type="webhook_endpoint", subject_id=signer.id, request_id=request_id,
                 details={"kind": signer.kind})
    return signer


def check_callback_urls(
    session: Session, tenant_id: str, urls: Sequence[str | None], *, settings: Settings,
    resolve: Resolver = system_resolver,
) -> None:
    """Refuse, before anything is stored, a submission whose `callback_url` fails the SSRF guard, or any callback
    when the tenant has no callback secret to sign it with. `urls` holds one entry per submitted item."""
    params = ["callback_url" if len(urls) == 1 else f"items[{i}].callback_url" for i in range(len(urls))]
    # Each distinct host is looked up once, side by side with the others, all within one time bound.
    resolve = resolve_once([url for url in urls if url is not None], resolve,
                           timeout=settings.callback_resolve_timeout_seconds)
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
        raise InvalidInput(f"{first}: callbacks are signed with the tenant's callback secret, and there is none "
                             "yet; create it first with POST /v1/webhooks/callback-secret.", param=first,
                             code="callback_secret_missing")


# ---- secrets at rest -------------------------------------------------------------------------------------------

# The stored columns as they are (Fernet tokens), without the ORM type that decrypts them.
_STORED_SECRETS = table("webhook_endpoints", column("id", String), column("secret", String),
                        column("previous_secret", String))


def reencrypt_secrets(session: Session, box: SecretBox) -> int:
    """Re-encrypt every endpoint's stored secrets with the box's first key, in the caller's transaction, without
    ever holding them in plaintext; returns the endpoints rewritten. SecretKeyMismatch if one was made with a key
    the box no longer has."""
    rows = session.execute(select(_STORED_SECRETS).with_for_update()).all()
    for row in rows:
        session.execute(update(_STORED_SECRETS).where(_STORED_SECRETS.c.id == row.id).values(
            secret=box.rotate(row.secret),
            previous_secret=box.rotate(row.previous_secret) if row.previous_secret else None,
        ))
    return len(rows)
