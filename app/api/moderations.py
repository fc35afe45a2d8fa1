"""OpenAI-compatible synchronous moderation (`POST /v1/moderations`, and `/v1/moderate`), and `GET /v1/models`.

An OpenAI SDK pointed at Verdict works unchanged. Each call is stored and audited like an async submission.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import ValidationError

from app.api.auth import current_principal, require_scope
from app.api.body import current_limits, read_json_object
from app.api.rate_limits import charge_tokens
from app.api.request_context import current_request_id
from app.extensions import current_cache, current_database, current_provider, current_settings
from app.schemas.moderations import (
    ImagePart,
    ModelList,
    ModelOut,
    ModerationRequest,
    ModerationResponse,
    TextPart,
    openai_result,
)
from app.use_cases.errors import InvalidInput
from app.use_cases.sync_moderation import moderate_now

bp = Blueprint("moderations", __name__)


@bp.post("/v1/moderations")
@bp.post("/v1/moderate")
@require_scope("submit", charges_tokens=True)
def create_moderation() -> Response:
    body = read_json_object()
    try:
        parsed = ModerationRequest.model_validate(body)
    except ValidationError as exc:
        if exc.errors()[0]["loc"][:1] != ("input",):
            raise  # another field (`model`): the generic handler names it
        raise InvalidInput("'input' must be a string, a list of strings, or a list of text parts.",
                           param="input", code="invalid_input") from exc
    texts = _texts(parsed)
    charge_tokens(texts)
    # A command with transactions of its own: none is open while the provider works.
    submission, verdict = moderate_now(
        current_database(), current_provider(), current_principal(), texts, model=parsed.model,
        request_id=current_request_id(), settings=current_settings(), cache=current_cache(),
    )
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
            raise InvalidInput(
                f"input[{index}]: image inputs are not supported by this deployment's moderation provider.",
                param=f"input[{index}]", code="image_not_supported")
        texts.append(item.text if isinstance(item, TextPart) else item)
    limits = current_limits()
    if not texts:
        raise InvalidInput("input: must contain at least one text.", param="input", code="empty_input")
    if len(texts) > limits.max_texts_per_submission:
        raise InvalidInput(f"input: at most {limits.max_texts_per_submission} texts per request.", param="input",
                           code="too_many_texts")
    for index, text in enumerate(texts):
        if not text.strip():
            raise InvalidInput(f"input[{index}]: texts must not be empty.", param=f"input[{index}]",
                               code="empty_input")
        if len(text) > limits.max_text_chars:
            raise InvalidInput(f"input[{index}]: each text may be at most {limits.max_text_chars} characters.",
                               param=f"input[{index}]", code="text_too_long")
    return texts


@bp.get("/v1/models")
@require_scope(None)
def list_models() -> Response:
    data = [ModelOut(id=m.id, owned_by=m.provider, provider=m.provider, judged_categories=m.judged_categories,
                     not_judged_categories=m.not_judged_categories, max_batch=m.max_batch)
            for m in current_provider().models()]
    return jsonify(ModelList(data=data).model_dump(mode="json"))
