"""The audit chain's canonical form and the verifier, without a database: the exact bytes an event's hash covers
(as docs/compliance.md and app/audit_chain.py document them), and every way a chain can break, found and located."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from app.audit_chain import (
    GENESIS_HASH,
    ChainVerifier,
    canonical_bytes,
    canonical_fields,
    canonical_members,
    export_line,
    format_timestamp,
    hash_fields,
    hash_members,
    verify_export,
)


def event(seq: int, prev_hash: str, **overrides: Any) -> SimpleNamespace:
    values: dict[str, Any] = {
        "chain_id": "ten_1", "tenant_id": "ten_1", "seq": seq, "prev_hash": prev_hash,
        "occurred_at": datetime(2026, 1, 2, 3, 4, 5, 60, tzinfo=UTC) + timedelta(seconds=seq),
        "action": "verdict.decided", "actor": "worker", "subject_type": "submission", "subject_id": f"sub_{seq}",
        "request_id": "req_1", "content_digest": "ab" * 32, "conversation_id": "conv-1", "turn_id": None,
        "decision": "block", "categories": ["harassment", "violence"],
        "details": {"scores": {"violence": 0.97, "harassment": 1e-7}, "policy_version": 1, "note": "é\n"},
    }
    values.update(overrides)
    namespace = SimpleNamespace(**values)
    namespace.hash = hash_fields(canonical_fields(namespace))
    return namespace


def chain(length: int) -> list[SimpleNamespace]:
    events: list[SimpleNamespace] = []
    prev = GENESIS_HASH
    for seq in range(1, length + 1):
        events.append(event(seq, prev))
        prev = events[-1].hash
    return events


def test_the_canonical_form_is_rfc8785_of_the_documented_fields() -> None:
    expected = (
        '{"action":"verdict.decided","actor":"worker","categories":["harassment","violence"],"chain":"ten_1",'
        '"content_digest":"' + "ab" * 32 + '","conversation_id":"conv-1","decision":"block",'
        '"details":{"note":"é\\n","policy_version":1,"scores":{"harassment":1e-7,"violence":0.97}},'
        '"occurred_at":"2026-01-02T03:04:06.000060Z","prev_hash":"' + GENESIS_HASH + '","request_id":"req_1",'
        '"seq":1,"subject_id":"sub_1","subject_type":"submission","tenant_id":"ten_1","turn_id":null,"v":1}'
    ).encode()
    first = event(1, GENESIS_HASH)
    assert canonical_bytes(canonical_fields(first)) == expected
    assert first.hash == hashlib.sha256(expected).hexdigest()


def test_timestamps_are_utc_with_microseconds_and_z() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert format_timestamp(datetime(2026, 5, 6, 9, 0, 0, tzinfo=plus_two)) == "2026-05-06T07:00:00.000000Z"


def test_an_export_line_is_the_canonical_object_plus_its_hash() -> None:
    first = event(1, GENESIS_HASH)
    line = export_line(first)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parsed = json.loads(line)
    assert parsed.pop("hash") == first.hash
    assert canonical_bytes(parsed) == canonical_bytes(canonical_fields(first))


def test_a_sound_chain_verifies() -> None:
    result = verify_export(export_line(e) for e in chain(5))
    assert result.ok and result.count == 5 and result.first_seq == 1 and result.last_seq == 5
    assert result.head_hash == chain(5)[-1].hash
    assert result.notes == []


def lines_of(events: list[SimpleNamespace]) -> list[dict[str, Any]]:
    return [json.loads(export_line(e)) for e in events]


def verify_lines(lines: list[dict[str, Any]]) -> Any:
    return verify_export(json.dumps(line) for line in lines)


@pytest.mark.parametrize(("field", "value"), [
    ("action", "verdict.overridden"), ("actor", "key_attacker"), ("subject_id", "sub_other"),
    ("occurred_at", "2026-01-02T03:04:09.000061Z"), ("decision", "allow"), ("categories", ["violence"]),
    ("content_digest", "cd" * 32), ("conversation_id", "conv-2"), ("tenant_id", "ten_2"), ("request_id", None),
    ("details", {"scores": {}}), ("v", 2),
])
def test_an_altered_field_is_found_at_its_event(field: str, value: Any) -> None:
    lines = lines_of(chain(5))
    lines[2][field] = value
    result = verify_lines(lines)
    assert not result.ok
    assert (result.broken.seq, result.broken.code) == (3, "hash_mismatch")
    assert result.count == 2


def test_an_added_field_is_found() -> None:
    lines = lines_of(chain(3))
    lines[1]["reviewed_by"] = "someone"
    assert (verify_lines(lines).broken.seq, verify_lines(lines).broken.code) == (2, "hash_mismatch")


def test_an_altered_and_rehashed_event_breaks_the_next_link() -> None:
    lines = lines_of(chain(4))
    lines[1]["decision"] = "allow"
    lines[1].pop("hash")
    lines[1]["hash"] = hash_fields(lines[1])
    result = verify_lines(lines)
    assert (result.broken.seq, result.broken.code) == (3, "prev_hash_mismatch")


def test_a_deleted_event_is_named() -> None:
    lines = lines_of(chain(5))
    del lines[2]
    result = verify_lines(lines)
    assert (result.broken.seq, result.broken.code) == (4, "missing")
    assert "seq 3 is missing" in result.broken.reason


def test_swapped_events_are_found() -> None:
    lines = lines_of(chain(5))
    lines[1], lines[2] = lines[2], lines[1]
    result = verify_lines(lines)
    assert (result.broken.seq, result.broken.code) == (3, "missing")


def test_swapped_seq_numbers_are_found() -> None:
    lines = lines_of(chain(5))
    lines[1]["seq"], lines[2]["seq"] = lines[2]["seq"], lines[1]["seq"]
    lines[1], lines[2] = lines[2], lines[1]  # the reader orders by seq, as the database does
    result = verify_lines(lines)
    assert (result.broken.seq, result.broken.code) == (2, "hash_mismatch")


def test_a_first_event_that_does_not_start_from_genesis_is_found() -> None:
    forged = event(1, "f" * 64)
    result = verify_export([export_line(forged)])
    assert (result.broken.seq, result.broken.code) == (1, "prev_hash_mismatch")


def test_a_range_not_starting_at_one_is_checked_inside_and_says_so() -> None:
    result = verify_export(export_line(e) for e in chain(6)[3:])
    assert result.ok and result.count == 3 and result.first_seq == 4
    assert result.notes == ["the range starts at seq 4; its link to seq 3 was not checked"]


def test_an_unreadable_line_is_named() -> None:
    lines = [export_line(e) for e in chain(3)]
    lines[1] = lines[1][:40] + b"\n"
    result = verify_export(lines)
    assert (result.broken.line, result.broken.code) == (2, "malformed")
    result = verify_export([b'{"seq": 1}\n'])
    assert result.broken.code == "malformed"


def test_events_of_another_chain_are_found() -> None:
    lines = [export_line(e) for e in chain(2)] + [export_line(event(3, chain(2)[-1].hash, chain_id="ten_2"))]
    assert verify_export(lines).broken.code == "chain_mismatch"


def test_head_check_finds_events_cut_off_the_end() -> None:
    verifier = ChainVerifier(first_seq=1)
    events = chain(5)
    for e in events[:3]:
        assert verifier.feed(canonical_fields(e), e.hash)
    verifier.check_head(5, events[-1].hash)
    assert verifier.broken is not None
    assert (verifier.broken.seq, verifier.broken.code) == (4, "missing")


@pytest.mark.parametrize("overrides", [
    {}, {"details": {}, "categories": None, "turn_id": "t-\u2028", "subject_id": "sub_😀"},
    {"details": {"big": 2**53 - 1, "neg": -0.5, "list": [1, "x", None, {"b": True, "a": 1e21}]}},
])
def test_hashing_an_events_members_one_by_one_is_hashing_its_canonical_form(overrides: dict[str, Any]) -> None:
    # The chain writer serializes members before it locks the head, then adds seq and prev_hash (issue 15).
    fields = canonical_fields(event(7, "cd" * 32, **overrides))
    members = canonical_members({key: value for key, value in fields.items() if key not in ("seq", "prev_hash")})
    members.update(canonical_members({"seq": 7, "prev_hash": "cd" * 32}))
    assert hash_members(members) == hash_fields(fields)


# ---- the serializer against the reference implementation -------------------------------------------------------

_JSON_TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "\x00\x1f\x7f", '"\\/', "\b\f\n\r\t", "é", "\U0001f600", "\ufb01", "\ue000"])
_JSON_NUMBER = (st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.sampled_from([0.0, -0.0, 1e-7, 1e-6, 1e-5, 1e-4, 0.97, 1e15, 1e16, 1e20, 1e21, 1e22, 5e-324,
                                   1.7976931348623157e308, -2.5, 123456789.125, 2.0**53]))
_JSON = st.recursive(st.none() | st.booleans() | _JSON_NUMBER | _JSON_TEXT,
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_JSON_TEXT, inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_JSON_TEXT, _JSON, max_size=6))
def test_the_serializer_writes_what_rfc8785_writes(value: dict[str, Any]) -> None:
    # Byte for byte: the chain's hashes (and every export verified offline) depend on it.
    assert canonical_bytes(value) == rfc8785.dumps(value)
    assert canonical_members(value) == {key: rfc8785.dumps(key) + b":" + rfc8785.dumps(item)
                                        for key, item in value.items()}


def test_the_serializer_refuses_what_rfc8785_refuses() -> None:
    for value in ({"x": 2**53}, {"x": -(2**53)}, {"x": float("nan")}, {"x": [float("inf")]}, {"x": "\ud800"},
                  {"x": {1: 2}}, {"x": object()}):
        with pytest.raises(ValueError):
            rfc8785.dumps(value)
        with pytest.raises(ValueError):
            canonical_bytes(value)
