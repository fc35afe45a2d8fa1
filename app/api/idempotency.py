"""`Idempotency-Key` on any POST: the same key with the same request gets the first response again, without
anything being created twice; the same key with another request is refused (422), and while the first is running a
second is told so (409). The store is app/use_cases/idempotency.py; see docs/api.md."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, g, request
from sqlalchemy.orm import Session

from app.api.errors import ApiError, error_response
from app.extensions import current_database, current_settings
from app.use_cases import idempotency
from app.use_cases.authentication import Principal
from app.use_cases.errors import InvalidInput
from app.use_cases.idempotency import Claimed, InProgress, Mismatch, StoredResponse

IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
# Response headers worth replaying; the per-request ones (X-Request-ID, timing, rate limits) are the retry's own.
_KEPT_HEADERS = ("Content-Type", "Location")


def run_once(principal: Principal, view: Callable[[], Any]) -> Response:
    """Claim the key (a transaction of its own, so a racing request sees the claim at once), run the view, keep its
    answer. A view in `@transaction` keeps a success in its own transaction, so what it created and the answer a
    retry replays commit together (issue 11: neither a crash nor a database outage after the view's commit may let
    a retry run it again); any other answer is kept (or the claim released) in a transaction of its own afterwards,
    so it outlives a view that rolled back."""
    key = request.headers.get(IDEMPOTENCY_HEADER, "")
    if not _KEY.match(key):
        raise InvalidInput(f"{IDEMPOTENCY_HEADER}: must be 1 to 255 printable ASCII characters without spaces.",
                           param=IDEMPOTENCY_HEADER, code="invalid_idempotency_key")
    fingerprint = _fingerprint()
    database = current_database()
    settings = current_settings()
    with database.transaction() as session:
        outcome = idempotency.claim(session, principal.tenant_id, key, fingerprint, api_key_id=principal.key_id,
                                    ttl_seconds=settings.idempotency_ttl_seconds,
                                    lease_seconds=settings.idempotency_claim_lease_seconds)
    if isinstance(outcome, Mismatch):
        raise ApiError(422, f"This {IDEMPOTENCY_HEADER} was already used with a different request; use a new key "
                       "for a new request.", code="idempotency_key_reused", param=IDEMPOTENCY_HEADER)
    if isinstance(outcome, InProgress):
        raise ApiError(409, f"A request with this {IDEMPOTENCY_HEADER} is still in progress; retry shortly.",
                       code="idempotency_request_in_progress", param=IDEMPOTENCY_HEADER,
                       headers={"Retry-After": "1"})
    if isinstance(outcome, StoredResponse):
        replay = Response(outcome.body, status=outcome.status_code, headers=outcome.headers)
        replay.headers["Idempotent-Replayed"] = "true"
        return replay
    assert isinstance(outcome, Claimed)

    kept_with_the_view: list[bool] = []

    def keep(result: Any) -> Callable[[Session], None] | None:
        # Shaped here, in the request's thread; written by whoever commits the view's write (app/api/transactions.py).
        response = current_app.make_response(result)
        if not _worth_keeping(response):
            return None
        stored = _kept(response)
        kept_with_the_view.append(True)
        return lambda session: idempotency.store_response(session, principal.tenant_id, key, stored)

    g.idempotency_keep = keep
    try:
        response = current_app.make_response(view())
    except Exception as exc:
        kept_with_the_view.clear()  # the view's transaction rolled back (or never committed), the answer with it
        try:
            # The app's own error handlers shape it, exactly as they would outside this wrapper.
            response = current_app.make_response(current_app.handle_user_exception(exc))
        except Exception:
            with database.transaction() as session:
                idempotency.release(session, principal.tenant_id, key)
            raise
    finally:
        g.pop("idempotency_keep", None)
    if kept_with_the_view:
        return response
    with database.transaction() as session:
        if _worth_keeping(response):
            idempotency.store_response(session, principal.tenant_id, key, _kept(response))
        else:
            idempotency.release(session, principal.tenant_id, key)
    return response


def _worth_keeping(response: Response) -> bool:
    """A 5xx or a 429 is not replayed: the claim is released so a retry can run."""
    return not (response.status_code >= 500 or response.status_code == 429 or response.is_streamed)


def _kept(response: Response) -> StoredResponse:
    """What a retry gets. A secret (a new API key, a webhook secret) is shown once and never stored a second time:
    such a response is kept as a 409 that names what was created, so a retry still creates nothing."""
    body = response.get_json(silent=True) if response.is_json else None
    if isinstance(body, dict) and "secret" in body:
        created = f" ({body.get('object', 'object')} {body['id']})" if "id" in body else ""
        conflict = error_response(
            409, f"The request with this {IDEMPOTENCY_HEADER} already succeeded{created}. Its secret was shown "
            "once and is not kept; if it was lost, revoke what was created and create it again.",
            code="idempotency_secret_not_replayed", param=IDEMPOTENCY_HEADER)
        return StoredResponse(status_code=409, body=conflict.get_data(as_text=True),
                              headers={"Content-Type": conflict.content_type})
    headers = {name: response.headers[name] for name in _KEPT_HEADERS if name in response.headers}
    return StoredResponse(status_code=response.status_code, body=response.get_data(as_text=True), headers=headers)


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.path.encode(), request.query_string):
        digest.update(part + b"\n")
    digest.update(request.get_data(cache=True))
    return digest.hexdigest()
