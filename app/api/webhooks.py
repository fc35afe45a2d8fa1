"""`/v1/webhooks` and `/v1/deliveries`: webhook endpoints, the callback secret, and the delivery log (`admin` scope,
the log also `read`). A secret appears only in the answer that created or rotated it. See docs/webhooks.md."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from app.api.auth import current_principal, require_scope
from app.api.body import read_json_object
from app.api.request_context import current_request_id
from app.api.transactions import request_session, transaction
from app.extensions import current_settings
from app.models import WebhookDelivery, WebhookDeliveryAttempt, WebhookEndpoint
from app.schemas.webhooks import (
    CallbackSecretOut,
    CallbackSecretWithSecret,
    DeliveryAttemptOut,
    DeliveryListQuery,
    DeliveryOut,
    DeliveryPage,
    EmptyBody,
    WebhookEndpointDeleted,
    WebhookEndpointIn,
    WebhookEndpointList,
    WebhookEndpointOut,
    WebhookEndpointWithSecret,
)
from app.use_cases import webhook_deliveries as deliveries
from app.use_cases import webhook_endpoints as endpoints

bp = Blueprint("webhooks", __name__)


def _no_fields() -> None:
    # The actions take no parameters; an empty body is fine, and so is `{}`, but nothing else.
    if request.get_data(cache=True):
        EmptyBody.model_validate(read_json_object())


@bp.post("/v1/webhooks")
@require_scope("admin")
@transaction
def create_endpoint() -> tuple[Response, int, dict[str, str]]:
    body = WebhookEndpointIn.model_validate(read_json_object())
    endpoint = endpoints.create_endpoint(
        request_session(), current_principal(), url=body.url, event_types=body.events,
        description=body.description, settings=current_settings(), request_id=current_request_id(),
    )
    out = WebhookEndpointWithSecret(**_endpoint_out(endpoint).model_dump(), secret=endpoint.secret)
    return jsonify(out.model_dump(mode="json")), 201, {"Location": f"/v1/webhooks/{endpoint.id}"}


@bp.get("/v1/webhooks")
@require_scope("admin")
@transaction
def list_endpoints() -> Response:
    listed = endpoints.list_endpoints(request_session(), current_principal().tenant_id)
    return jsonify(WebhookEndpointList(data=[_endpoint_out(e) for e in listed]).model_dump(mode="json"))


@bp.get("/v1/webhooks/<webhook_id>")
@require_scope("admin")
@transaction
def get_endpoint(webhook_id: str) -> Response:
    endpoint = endpoints.get_endpoint(request_session(), current_principal().tenant_id, webhook_id)
    return jsonify(_endpoint_out(endpoint).model_dump(mode="json"))


@bp.delete("/v1/webhooks/<webhook_id>")
@require_scope("admin")
@transaction
def delete_endpoint(webhook_id: str) -> Response:
    endpoints.delete_endpoint(request_session(), current_principal(), webhook_id, request_id=current_request_id())
    return jsonify(WebhookEndpointDeleted(id=webhook_id).model_dump(mode="json"))


@bp.post("/v1/webhooks/<webhook_id>/rotate-secret")
@require_scope("admin")
@transaction
def rotate_secret(webhook_id: str) -> Response:
    _no_fields()
    session, principal = request_session(), current_principal()
    endpoint = endpoints.get_endpoint(session, principal.tenant_id, webhook_id, for_update=True)
    endpoint = endpoints.rotate_secret(session, principal, endpoint, settings=current_settings(),
                                      request_id=current_request_id())
    out = WebhookEndpointWithSecret(**_endpoint_out(endpoint).model_dump(), secret=endpoint.secret)
    return jsonify(out.model_dump(mode="json"))


@bp.post("/v1/webhooks/<webhook_id>/test")
@require_scope("admin")
@transaction
def send_test(webhook_id: str) -> tuple[Response, int]:
    _no_fields()
    delivery = deliveries.send_test_event(request_session(), current_principal(), webhook_id,
                                        request_id=current_request_id())
    return jsonify(_delivery_out(delivery, []).model_dump(mode="json")), 202


@bp.get("/v1/webhooks/<webhook_id>/deliveries")
@require_scope("read")
@transaction
def list_deliveries(webhook_id: str) -> Response:
    query = DeliveryListQuery.model_validate(request.args.to_dict())
    page = deliveries.list_deliveries(request_session(), current_principal().tenant_id, webhook_id,
                                    status=query.status, limit=query.limit, cursor=query.cursor)
    # A `read` key may see the log but not the endpoint (403 on GET /v1/webhooks/{id}), so not its URL either.
    show_url = "admin" in current_principal().scopes
    body = DeliveryPage(data=[_delivery_out(d, page.attempts[d.id], show_url=show_url) for d in page.deliveries],
                        has_more=page.next_cursor is not None, next_cursor=page.next_cursor)
    return jsonify(body.model_dump(mode="json"))


@bp.post("/v1/deliveries/<delivery_id>/redeliver")
@require_scope("admin")
@transaction
def redeliver(delivery_id: str) -> tuple[Response, int]:
    _no_fields()
    session = request_session()
    delivery = deliveries.redeliver(session, current_principal(), delivery_id, request_id=current_request_id())
    return jsonify(_delivery_out(delivery, deliveries.attempts_of(session, delivery.id)).model_dump(mode="json")), 202


@bp.get("/v1/webhooks/callback-secret")
@require_scope("admin")
@transaction
def get_callback_secret() -> Response:
    signer = endpoints.get_callback_signer(request_session(), current_principal().tenant_id)
    return jsonify(_signer_out(signer).model_dump(mode="json"))


@bp.post("/v1/webhooks/callback-secret")
@require_scope("admin")
@transaction
def create_callback_secret() -> tuple[Response, int]:
    _no_fields()
    signer = endpoints.create_callback_signer(request_session(), current_principal(), request_id=current_request_id())
    out = CallbackSecretWithSecret(**_signer_out(signer).model_dump(), secret=signer.secret)
    return jsonify(out.model_dump(mode="json")), 201


@bp.post("/v1/webhooks/callback-secret/rotate")
@require_scope("admin")
@transaction
def rotate_callback_secret() -> Response:
    _no_fields()
    session, principal = request_session(), current_principal()
    signer = endpoints.get_callback_signer(session, principal.tenant_id, for_update=True)
    signer = endpoints.rotate_secret(session, principal, signer, settings=current_settings(),
                                    request_id=current_request_id())
    out = CallbackSecretWithSecret(**_signer_out(signer).model_dump(), secret=signer.secret)
    return jsonify(out.model_dump(mode="json"))


def _endpoint_out(endpoint: WebhookEndpoint) -> WebhookEndpointOut:
    return WebhookEndpointOut(
        id=endpoint.id, url=endpoint.url or "", events=endpoint.events, description=endpoint.description,
        status=endpoint.status, disabled_reason=endpoint.disabled_reason, created_at=endpoint.created_at,
        secret_rotated_at=endpoint.secret_rotated_at, previous_secret_expires_at=endpoint.previous_secret_expires_at,
        links={"self": f"/v1/webhooks/{endpoint.id}", "deliveries": f"/v1/webhooks/{endpoint.id}/deliveries"},
    )


def _signer_out(signer: WebhookEndpoint) -> CallbackSecretOut:
    return CallbackSecretOut(
        id=signer.id, created_at=signer.created_at, secret_rotated_at=signer.secret_rotated_at,
        previous_secret_expires_at=signer.previous_secret_expires_at,
        links={"self": "/v1/webhooks/callback-secret", "deliveries": f"/v1/webhooks/{signer.id}/deliveries"},
    )


def _delivery_out(delivery: WebhookDelivery, attempts: list[WebhookDeliveryAttempt], *,
                  show_url: bool = True) -> DeliveryOut:
    return DeliveryOut(
        id=delivery.id, webhook_id=delivery.endpoint_id, event_type=delivery.event_type,
        submission_id=delivery.submission_id, url=delivery.url if show_url else None, status=delivery.status,
        attempt_count=delivery.attempt_count, next_attempt_at=delivery.next_attempt_at,
        last_status_code=delivery.last_status_code, last_error=delivery.last_error,
        created_at=delivery.created_at, completed_at=delivery.completed_at, payload=deliveries.payload_of(delivery),
        attempts=[DeliveryAttemptOut(number=a.number, started_at=a.started_at, status_code=a.status_code,
                                     latency_ms=a.latency_ms, error=a.error, response_excerpt=a.response_excerpt)
                  for a in attempts],
    )
