"""Reading a JSON request body safely: media type, size (enforced by Flask's MAX_CONTENT_LENGTH), UTF-8, syntax,
nesting, and characters no database column can hold."""

from __future__ import annotations

import json
import math
from typing import Any

from flask import request

from app.api.errors import ApiError
from app.extensions import current_settings
from app.schemas.common import Limits
from app.use_cases.errors import InvalidInput


def read_json_object() -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise ApiError(415, "Send a JSON body with 'Content-Type: application/json'.", code="unsupported_media_type")
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise ApiError(415, "Send the JSON body in UTF-8 (charset=utf-8, or no charset).", code="unsupported_charset",
                       param="Content-Type")
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise InvalidInput("The request body is empty.", code="empty_body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput("The request body is not valid UTF-8.", code="invalid_utf8") from exc
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError as exc:
        raise InvalidInput("The request body is nested too deeply.", code="too_deep") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"The request body is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).",
            code="invalid_json",
        ) from exc
    except ValueError as exc:
        raise InvalidInput(str(exc), code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidInput("The request body must be a JSON object.", code="invalid_body")
    try:
        _check_strings(data, "")
    except RecursionError as exc:
        raise InvalidInput("The request body is nested too deeply.", code="too_deep") from exc
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"The request body contains {name}, which is not valid JSON.")


def _finite_float(literal: str) -> float:
    # `1e999` parses as infinity, which no JSON column (PostgreSQL's jsonb) can store.
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"The request body contains a number out of range ({literal[:32]}).")
    return value


def _check_strings(value: Any, path: str) -> None:
    # NUL and lone surrogates parse as JSON but cannot be stored (PostgreSQL refuses both), so refuse them here.
    if isinstance(value, str):
        prefix = f"{path}: " if path else ""  # name the field, as every validation message does
        if "\x00" in value:
            raise InvalidInput(f"{prefix}Text must not contain NUL characters.", param=path or None,
                               code="invalid_text")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"{prefix}Text contains an unpaired surrogate.", param=path or None,
                               code="invalid_text") from exc
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, path)
            _check_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_strings(item, f"{path}[{index}]")


def current_limits() -> Limits:
    settings = current_settings()
    return Limits(
        max_text_chars=settings.max_text_chars,
        max_texts_per_submission=settings.max_texts_per_submission,
        max_items_per_request=settings.max_items_per_request,
        max_metadata_bytes=settings.max_metadata_bytes,
    )
