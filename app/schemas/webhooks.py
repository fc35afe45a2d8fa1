"""Schemas of `/v1/webhooks` and `/v1/deliveries`: endpoints, the callback secret, deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.schemas.common import Strict

# The events an endpoint may subscribe to (app.webhooks.events.SUBSCRIBABLE_EVENTS; a unit test keeps them equal).
SubscribableEvent = Literal["submission.completed", "submission.flagged", "submission.failed", "review.decided"]
DeliveryStatusName = Literal["pending", "delivering", "succeeded", "dead"]
# No whitespace or control characters: a URL is sent as given, and such characters are how headers get injected.
WebhookUrl = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=r"^[^\s\x00-\x1f\x7f]+$")]


class WebhookEndpointIn(Strict):
    url: WebhookUrl = Field(description="An http(s) URL that resolves to public addresses only.")
    events: list[SubscribableEvent] = Field(min_length=1, max_length=10)
    description: Annotated[str, StringConstraints(max_length=500)] | None = None


class EmptyBody(Strict):
    """The POST actions (rotate, test, redeliver) take no fields; a body, if sent, must be `{}`."""


class DeliveryListQuery(Strict):
    model_config = ConfigDict(extra="forbid", strict=False)

    status: DeliveryStatusName | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: Annotated[str, StringConstraints(max_length=200)] | None = None


# ---- responses -------------------------------------------------------------------------------------------------


class WebhookEndpointOut(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str | None
    status: Literal["enabled", "disabled"]
    disabled_reason: str | None
    created_at: datetime
    secret_rotated_at: datetime | None
    previous_secret_expires_at: datetime | None
    links: dict[str, str]


class WebhookEndpointWithSecret(WebhookEndpointOut):
    secret: str = Field(description="`whsec_…`: shown here once, never again.")


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointOut]
    has_more: bool = False


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: Literal[True] = True


class CallbackSecretOut(BaseModel):
    id: str = Field(description="The signer's id: its deliveries are at /v1/webhooks/{id}/deliveries.")
    object: Literal["callback_secret"] = "callback_secret"
    created_at: datetime
    secret_rotated_at: datetime | None
    previous_secret_expires_at: datetime | None
    links: dict[str, str]


class CallbackSecretWithSecret(CallbackSecretOut):
    secret: str = Field(description="`whsec_…`: shown here once, never again.")


class DeliveryAttemptOut(BaseModel):
    number: int
    started_at: datetime
    status_code: int | None
    latency_ms: int | None
    error: str | None
    response_excerpt: str | None


class DeliveryOut(BaseModel):
    id: str = Field(description="Also the `webhook-id` header, the same on every attempt.")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    webhook_id: str
    event_type: str
    submission_id: str | None
    url: str | None = Field(description="Where it is sent. Shown to `admin` keys only; null for a `read` key, which "
                                        "may not see the endpoint itself either.")
    status: DeliveryStatusName
    attempt_count: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    completed_at: datetime | None
    payload: dict[str, Any]
    attempts: list[DeliveryAttemptOut]


class DeliveryPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryOut]
    has_more: bool
    next_cursor: str | None
