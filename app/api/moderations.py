"""OpenAI-compatible synchronous moderation (`POST /v1/moderations`, and `/v1/moderate`), and `GET /v1/models`.

An OpenAI SDK pointed at Verdict works unchanged. Each call is stored and audited like an async submission.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from pydantic import ValidationError

from app.api.body import current_limits, read_json_object
from app.auth import current_principal, require_scope
from app.config import Settings
from app.db import request_session
from app.errors import ApiError, InvalidRequest
from app.moderation.providers import ModerationProvider
from app.rate_limits import charge_tokens
from app.request_context import current_request_id
from app.schemas import (
    ImagePart,
    ModelList,
    ModelOut,
    ModerationRequest,
    ModerationResponse,
    TextPart,
    openai_result,
)
from app.use_cases.moderation import ModerationUnavailable, moderate_now

bp = Blueprint("moderations", __name__)


def _provider() -> ModerationProvider:
    provider: ModerationProvider = current_app.extensions["verdict.provider"]
    return provider


@bp.post("/v1/moderations")
@bp.post("/v1/moderate")
@require_scope("submit")
def create_moderation() -> Response:
    body = read_json_object()
    try:
        parsed = ModerationRequest.model_validate(body)
    except ValidationError as exc:
        if exc.errors()[0]["loc"][:1] != ("input",):
            raise  # another field (`model`): the generic handler names it
        raise InvalidRequest("'input' must be a string, a list of strings, or a list of text parts.",
                             param="input", code="invalid_input") from exc
    texts = _texts(parsed)
    charge_tokens(texts)
    settings: Settings = current_app.extensions["verdict.settings"]
    try:
        submission, verdict = moderate_now(
            request_session(), _provider(), current_principal(), texts, model=parsed.model,
            request_id=current_request_id(), settings=settings,
        )
    except ModerationUnavailable as exc:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
        raise ApiError(503, "The moderation provider is unavailable; try again later.", code=exc.code,
                       headers=headers) from exc
    response = ModerationResponse(
        id=f"modr-{submission.id.removeprefix('sub_')}",
        model=verdict.model,
        results=[openai_result(r["flagged"], r["decision"], r["categories"], r["category_scores"],
                               verdict.not_judged) for r in verdict.results],
    )
    return jsonify(response.model_dump(mode="json"))


def _texts(parsed: ModerationRequest) -> list[str]:
    raw: Any = parsed.input
    texts: list[str] = []
    items = [raw] if isinstance(raw, str) else raw
    for index, item in enumerate(items):
        if isinstance(item, ImagePart):
            raise InvalidRequest(
                f"input[{index}]: image inputs are not supported by this deployment's moderation provider.",
                param=f"input[{index}]", code="image_not_supported")
        texts.append(item.text if isinstance(item, TextPart) else item)
    limits = current_limits()
    if not texts:
        raise InvalidRequest("input: must contain at least one text.", param="input", code="empty_input")
    if len(texts) > limits.max_texts_per_submission:
        raise InvalidRequest(f"input: at most {limits.max_texts_per_submission} texts per request.", param="input",
                             code="too_many_texts")
    for index, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequest(f"input[{index}]: texts must not be empty.", param=f"input[{index}]",
                                 code="empty_input")
        if len(text) > limits.max_text_chars:
            raise InvalidRequest(f"input[{index}]: each text may be at most {limits.max_text_chars} characters.",
                                 param=f"input[{index}]", code="text_too_long")
    return texts


@bp.get("/v1/models")
@require_scope(None)
def list_models() -> Response:
    data = [ModelOut(id=m.id, owned_by=m.provider, provider=m.provider, judged_categories=m.judged_categories,
                     not_judged_categories=m.not_judged_categories, max_batch=m.max_batch)
            for m in _provider().models()]
    return jsonify(ModelList(data=data).model_dump(mode="json"))
