"""Request schemas: `SubmissionIn` and `SubmissionBatchIn` with operator limits from the validation context, and the
opaque list cursor (`encode_cursor` / `decode_cursor`)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from app.api.errors import api_error
from app.schemas.common import Limits
from app.schemas.submissions import SubmissionBatchIn, SubmissionIn
from app.use_cases.errors import InvalidInput
from app.use_cases.pagination import decode_cursor, encode_cursor

LIMITS = Limits(max_text_chars=20, max_texts_per_submission=3, max_items_per_request=4, max_metadata_bytes=64,
                max_metadata_depth=3)


def validate(body: dict[str, Any], limits: Limits = LIMITS) -> SubmissionIn:
    return SubmissionIn.model_validate(body, context={"limits": limits})


def error_of(body: dict[str, Any], model: Any = SubmissionIn) -> dict[str, Any]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body, context={"limits": LIMITS})
    first: dict[str, Any] = caught.value.errors()[0]
    return first


def test_a_string_becomes_a_list_of_one() -> None:
    assert validate({"input": "hello"}).input == ["hello"]
    assert validate({"input": ["a", "b"]}).input == ["a", "b"]


def test_defaults() -> None:
    submission = validate({"input": "hello"})
    assert submission.role == "input"
    assert submission.policy is None  # the tenant's default policy decides (app/use_cases/submissions.py)
    assert submission.mask is None  # not said: the tenant's default applies
    assert submission.metadata is None
    assert submission.callback_url is None


def test_all_fields() -> None:
    submission = validate({"input": ["q"], "role": "output", "conversation_id": "c-1", "turn_id": "t-2",
                           "metadata": {"user": "u-7"}, "policy": "default", "model": "m", "mask": True,
                           "callback_url": "https://example.com/hook"})
    assert submission.role == "output"
    assert submission.metadata == {"user": "u-7"}
    assert submission.mask is True


def test_text_length_limit() -> None:
    assert validate({"input": "x" * 20}).input == ["x" * 20]
    error = error_of({"input": ["ok", "x" * 21]})
    assert error["loc"][0] == "input"
    assert "20 characters" in error["msg"]


def test_text_count_limit() -> None:
    assert len(validate({"input": ["a", "b", "c"]}).input) == 3
    error = error_of({"input": ["a", "b", "c", "d"]})
    assert "at most 3 texts" in error["msg"]


@pytest.mark.parametrize("bad", [[], [""], ["ok", "   "], [1], ["a", None], 5, None, {"text": "a"}])
def test_bad_inputs_are_refused(bad: Any) -> None:
    error = error_of({"input": bad})
    assert error["loc"][0] == "input"


def test_missing_input_is_refused() -> None:
    assert error_of({"role": "input"})["type"] == "missing"


def test_metadata_size_limit() -> None:
    validate({"input": "a", "metadata": {"k": "v" * 40}})
    error = error_of({"input": "a", "metadata": {"k": "v" * 64}})
    assert error["loc"] == ("metadata",)
    assert "64 bytes" in error["msg"]


def test_metadata_size_counts_bytes_not_characters() -> None:
    # 20 three-byte characters: 20 characters, but 60 bytes plus the JSON around them.
    with pytest.raises(ValidationError):
        validate({"input": "a", "metadata": {"k": "€" * 20}}, Limits(
            max_text_chars=20, max_texts_per_submission=3, max_items_per_request=4, max_metadata_bytes=30))


def test_metadata_depth_limit() -> None:
    validate({"input": "a", "metadata": {"a": {"b": {"c": 1}}}})
    error = error_of({"input": "a", "metadata": {"a": {"b": {"c": {"d": 1}}}}})
    assert "3 levels" in error["msg"]
    error = error_of({"input": "a", "metadata": {"a": [[{"d": 1}]]}})
    assert "3 levels" in error["msg"]


@pytest.mark.parametrize(("field", "value"), [
    ("mask", "true"),
    ("mask", 1),
    ("role", 1),
    ("policy", 5),
    ("metadata", "{}"),
    ("metadata", [1]),
    ("conversation_id", 42),
])
def test_types_are_strict(field: str, value: Any) -> None:
    error = error_of({"input": "a", field: value})
    assert error["loc"][0] == field


@pytest.mark.parametrize(("field", "value"), [
    ("role", "system"),
    ("conversation_id", ""),
    ("conversation_id", "has space"),
    ("turn_id", "x" * 129),
    ("policy", ""),
])
def test_field_values_are_checked(field: str, value: Any) -> None:
    assert error_of({"input": "a", field: value})["loc"][0] == field


def test_extra_fields_are_forbidden() -> None:
    error = error_of({"input": "a", "inputs": "b"})
    assert error["type"] == "extra_forbidden"
    assert error["loc"] == ("inputs",)


@pytest.mark.parametrize("url", ["http://example.com/hook", "https://example.com:8443/a?b=c"])
def test_callback_url_accepts_http_and_https(url: str) -> None:
    assert validate({"input": "a", "callback_url": url}).callback_url == url


@pytest.mark.parametrize("url", ["ftp://example.com/x", "javascript:alert(1)", "file:///etc/passwd", "/relative",
                                 "example.com/hook", "http://", ""])
def test_callback_url_refuses_other_schemes_and_relative_urls(url: str) -> None:
    assert error_of({"input": "a", "callback_url": url})["loc"] == ("callback_url",)


def test_limits_must_be_in_the_context() -> None:
    with pytest.raises(RuntimeError, match="Limits"):
        SubmissionIn.model_validate({"input": "a"})


def test_batch_within_bounds() -> None:
    batch = SubmissionBatchIn.model_validate({"items": [{"input": "a"}, {"input": ["b", "c"]}]},
                                             context={"limits": LIMITS})
    assert [item.input for item in batch.items] == [["a"], ["b", "c"]]


def test_batch_bounds() -> None:
    assert "at least one" in error_of({"items": []}, SubmissionBatchIn)["msg"]
    SubmissionBatchIn.model_validate({"items": [{"input": "a"}] * 4}, context={"limits": LIMITS})
    assert "at most 4 submissions" in error_of({"items": [{"input": "a"}] * 5}, SubmissionBatchIn)["msg"]


def test_batch_item_errors_name_the_item() -> None:
    error = error_of({"items": [{"input": "a"}, {"input": "x" * 21}]}, SubmissionBatchIn)
    assert error["loc"][:3] == ("items", 1, "input")


def test_batch_refuses_extra_fields_and_non_lists() -> None:
    assert error_of({"items": [{"input": "a"}], "input": "b"}, SubmissionBatchIn)["type"] == "extra_forbidden"
    assert error_of({"items": {"input": "a"}}, SubmissionBatchIn)["loc"] == ("items",)


# ---- cursors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("created_at", [
    datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
    datetime(1999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-5))),
])
def test_cursor_round_trip(created_at: datetime) -> None:
    cursor = encode_cursor(created_at, "sub_abc123")
    assert "=" not in cursor
    assert decode_cursor(cursor) == (created_at, "sub_abc123")


def _raw_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    "",
    "not a cursor!",
    "%%%%",
    "curs\u00e9r",
    _raw_cursor(5),
    base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
    _raw_cursor("just a string"),
    _raw_cursor(["2024-05-01T12:00:00+00:00"]),
    _raw_cursor(["2024-05-01T12:00:00+00:00", "sub_a", "extra"]),
    _raw_cursor(["yesterday", "sub_a"]),
    _raw_cursor(["2024-05-01T12:00:00", "sub_a"]),  # no time zone
    _raw_cursor(["2024-05-01T12:00:00+00:00", 17]),
    _raw_cursor([None, "sub_a"]),
    _raw_cursor({"created_at": "2024-05-01T12:00:00+00:00", "id": "sub_a"}),
])
def test_garbage_cursors_are_invalid_requests(cursor: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        decode_cursor(cursor)
    assert api_error(caught.value).status == 400
    assert caught.value.param == "cursor"
    assert caught.value.code == "invalid_cursor"
