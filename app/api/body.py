"""Reading a JSON request body safely: media type, size (MAX_CONTENT_LENGTH, chunked bodies included), UTF-8, syntax,
nesting, and characters no database column can hold."""

from __future__ import annotations

import json
import math
from functools import cached_property
from typing import IO, Any, cast

from flask import Flask, Request, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import LimitedStream

from app.api.errors import ApiError
from app.extensions import current_settings
from app.schemas.common import Limits
from app.use_cases.errors import InvalidInput

# A refused body is still read and thrown away up to this many bytes, so that the client, which is most likely still
# sending it, finishes and reads the 413: gunicorn itself drains only 64 KiB of an unread body before it closes the
# connection, and a client still sending then sees a reset instead of the answer. Past this, the connection closes.
DRAIN_LIMIT_BYTES = 16 * 1024 * 1024


def _drain(stream: IO[bytes], limit: int) -> None:
    left = limit
    while left > 0:
        chunk = stream.read(min(left, 64 * 1024))
        if not chunk:
            return
        left -= len(chunk)


class _StrictMaximum(LimitedStream):
    """werkzeug's limit on a body of no stated length (chunked) stops reading silently when the body reaches it
    exactly, so a longer body arrives cut to the limit (issue 17, item 4). This stream reads up to one byte past the
    maximum and refuses the body (413) if that byte exists; a body of exactly the maximum still reads whole."""

    def __init__(self, stream: IO[bytes], maximum: int) -> None:
        super().__init__(stream, maximum + 1, is_max=True)
        self._maximum = maximum

    def readinto(self, b: bytearray) -> int | None:  # type: ignore[override]
        size = super().readinto(b)
        if self._pos > self._maximum:
            _drain(self._stream, DRAIN_LIMIT_BYTES)
            raise RequestEntityTooLarge()
        return size


class BoundedRequest(Request):
    """Flask's request, whose body stream refuses more than MAX_CONTENT_LENGTH bytes whether or not the body says
    its length: every reader (the JSON parser, the idempotency fingerprint) sees the whole body or a 413, never a cut
    one. A refused body is drained (up to DRAIN_LIMIT_BYTES) so the client reads the 413."""

    @cached_property
    def stream(self) -> IO[bytes]:
        maximum = self.max_content_length
        if maximum is not None and "wsgi.input_terminated" in self.environ:
            length = self.content_length
            if length is None:
                return cast(IO[bytes], _StrictMaximum(self.environ["wsgi.input"], maximum))
            if length > maximum:
                # The server stops the input at the stated length, so draining it cannot read into the next request.
                _drain(self.environ["wsgi.input"], min(length, DRAIN_LIMIT_BYTES))
                raise RequestEntityTooLarge()
        return super().stream


def init_app(app: Flask) -> None:
    app.request_class = BoundedRequest


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
