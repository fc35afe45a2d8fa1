"""The audit chain's pure part, with no database: the canonical form an event's hash covers, hashing, the export
lines (NDJSON, CSV), and the verifier that walks a chain from the database or from an export file.
See docs/compliance.md for the chain's design.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any

import rfc8785

SYSTEM_CHAIN = "system"
GENESIS_HASH = "0" * 64
CANONICAL_VERSION = 1
CANONICAL_KEYS = (
    "action", "actor", "categories", "chain", "content_digest", "conversation_id", "decision", "details",
    "occurred_at", "prev_hash", "request_id", "seq", "subject_id", "subject_type", "tenant_id", "turn_id", "v",
)


def content_digest(texts: Sequence[str]) -> str:
    """SHA-256 over the texts as a JSON list: identifies content in the audit trail without holding it."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def chain_of(tenant_id: str | None) -> str:
    return tenant_id if tenant_id is not None else SYSTEM_CHAIN


def format_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_fields(event: Any) -> dict[str, Any]:
    """The object an event's hash covers, from an AuditEvent or a row with the same attribute names.

    Canonical form, version 1 (a public contract: exports are re-verified with it offline). The hash is the
    lowercase hex SHA-256 of the RFC 8785 (JCS) serialization of this object: keys sorted, no whitespace, UTF-8,
    numbers as ECMAScript prints them. Every key of CANONICAL_KEYS is present (null when empty); `v` is 1;
    `occurred_at` is UTC as `YYYY-MM-DDTHH:MM:SS.ffffffZ`; `categories` is a sorted list or null; `details` is an
    object (`{}` when empty); `prev_hash` is the previous event's hash, or GENESIS_HASH (64 zeros) for `seq` 1. An
    NDJSON export line is exactly this object plus `"hash"`.
    """
    categories = event.categories
    return {
        "v": CANONICAL_VERSION,
        "chain": event.chain_id,
        "tenant_id": event.tenant_id,
        "seq": event.seq,
        "prev_hash": event.prev_hash,
        "occurred_at": format_timestamp(event.occurred_at),
        "action": event.action,
        "actor": event.actor,
        "subject_type": event.subject_type,
        "subject_id": event.subject_id,
        "request_id": event.request_id,
        "content_digest": event.content_digest,
        "conversation_id": event.conversation_id,
        "turn_id": event.turn_id,
        "decision": event.decision,
        "categories": None if categories is None else list(categories),
        "details": event.details if event.details is not None else {},
    }


_SAFE_INTEGER = 2**53 - 1


def plain_json(details: Mapping[str, Any] | None) -> dict[str, Any]:
    """Details as the database will give them back, so the hash covers what is stored: JSON types only (tuples
    become lists), finite numbers, integral floats as integers (jsonb returns `2.0` as `2`), and integers that RFC
    8785 can print exactly."""
    plain: dict[str, Any] = json.loads(json.dumps(dict(details or {}), allow_nan=False), parse_float=_json_float,
                                       parse_int=_json_int)
    return plain


def _json_float(literal: str) -> float | int:
    value = float(literal)
    return _json_int(str(int(value))) if value.is_integer() else value


def _json_int(literal: str) -> int:
    value = int(literal)
    if abs(value) > _SAFE_INTEGER:
        raise ValueError("audit details may hold integers up to 2**53 - 1 only")
    return value


def canonical_bytes(fields: Mapping[str, Any]) -> bytes:
    return _utf8(_jcs(dict(fields)))


def hash_fields(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(fields)).hexdigest()


def canonical_members(fields: Mapping[str, Any]) -> dict[str, bytes]:
    """Each member of the canonical object serialized on its own (`"key":value`, RFC 8785), so an event is
    serialized before its `seq` and `prev_hash` are known (before the chain is locked) and hashed once they are.
    `hash_members` of these equals `hash_fields` of the same fields: JCS writes an object's members in sorted key
    order (every canonical key is ASCII), joined by commas, within braces."""
    return {key: _utf8(_jcs(key) + ":" + _jcs(value)) for key, value in fields.items()}


def hash_members(members: Mapping[str, bytes]) -> str:
    return hashlib.sha256(b"{" + b",".join(members[key] for key in sorted(members)) + b"}").hexdigest()


# RFC 8785 (JCS) serialization, byte for byte what `rfc8785.dumps` writes (tests/unit/test_audit_canonical.py
# compares them), several times faster: the library is pure Python and writes value by value into a buffer, and an
# event's hash is computed in every transaction that records one (issue 15). The JSON string escaping of the standard
# library's C encoder (ensure_ascii=False) is exactly JCS's: `"`, `\\`, and the control characters below 0x20 (\b
# \f \n \r \t by name, the others as lowercase \u00xx), everything else as is. What it has no quick answer for
# (floats printed with an exponent, subclasses, anything unsupported) goes to the library itself.
_SAFE_INTEGER_MIN = -(2**53) + 1


def _jcs(value: Any) -> str:
    kind = type(value)
    if kind is str:
        quoted: str = encode_basestring(value)
        return quoted
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is int:
        if _SAFE_INTEGER_MIN <= value <= _SAFE_INTEGER:
            return str(value)
    elif kind is float:
        if value == 0:
            return "0"  # -0.0 too
        # Without an exponent (1e-4 <= |value| < 1e16) Python's shortest round-trip repr is ECMAScript's, but for
        # a trailing ".0"; with one (or inf, nan) the library applies ECMAScript's rules.
        literal = repr(value)
        if "e" not in literal and "n" not in literal:
            return literal[:-2] if literal.endswith(".0") else literal
    elif kind is list or kind is tuple:
        return "[" + ",".join([_jcs(item) for item in value]) + "]"
    elif kind is dict and all(type(key) is str for key in value):
        # Members sorted by their keys' UTF-16 code units: code point order, unless a key is outside the BMP.
        keys = sorted(value) if all(key.isascii() for key in value) else sorted(value, key=_utf16)
        return "{" + ",".join([encode_basestring(key) + ":" + _jcs(value[key]) for key in keys]) + "}"
    return rfc8785.dumps(value).decode("utf-8")


def _utf16(key: str) -> bytes:
    return key.encode("utf-16be")  # as the library sorts them (a lone surrogate fails alike)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: not UTF-8, as the library says too
        raise rfc8785.CanonicalizationError("input contains non-UTF-8 codepoints") from exc


def export_line(event: Any) -> bytes:
    """One NDJSON export line: the canonical object plus its hash, itself in canonical form."""
    fields = canonical_fields(event)
    fields["hash"] = event.hash
    return canonical_bytes(fields) + b"\n"


CSV_COLUMNS = (
    "seq", "occurred_at", "action", "actor", "subject_type", "subject_id", "request_id", "content_digest",
    "conversation_id", "turn_id", "decision", "categories", "details", "tenant_id", "chain", "v", "prev_hash", "hash",
)
# A spreadsheet runs a cell that starts with one of these as a formula; client-chosen ids must not get that far.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_lines(events: Iterable[Any]) -> Iterator[str]:
    """A CSV export, a header and then a line per event: for reading in a spreadsheet. Verify with NDJSON, which
    carries the canonical form exactly (a CSV cell that looks like a formula is prefixed with `'`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    yield buffer.getvalue()
    for event in events:
        buffer.seek(0)
        buffer.truncate()
        fields = canonical_fields(event)
        fields["hash"] = event.hash
        fields["categories"] = " ".join(fields["categories"] or ())
        fields["details"] = json.dumps(fields["details"], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        writer.writerow([_csv_cell(fields[column]) for column in CSV_COLUMNS])
        yield buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


# ---- verifying -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainBreak:
    """The first place a chain does not hold, and why."""

    seq: int | None
    code: str
    reason: str
    line: int | None = None


@dataclass(frozen=True)
class Verification:
    chain: str | None
    count: int
    first_seq: int | None
    last_seq: int | None
    head_hash: str | None
    broken: ChainBreak | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken is None


class ChainVerifier:
    """Recomputes a chain event by event, in `seq` order, and stops at the first link that does not hold.

    The same checks serve the database (`verify_chain`) and an export file (`verify_export`): each event's hash
    must match its canonical form (else it was altered), `seq` must go up by one (else events were deleted or
    reordered), and `prev_hash` must be the previous event's hash (else an event was altered and re-hashed, or
    replaced).
    """

    def __init__(self, *, first_seq: int | None = None, anchor_hash: str | None = None) -> None:
        # first_seq: the seq the range must start with; anchor_hash: the hash of the event before it, if known.
        self.expected_first = first_seq
        self.anchor = GENESIS_HASH if first_seq == 1 else anchor_hash
        self.chain: str | None = None
        self.count = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.last_hash: str | None = None
        self.broken: ChainBreak | None = None
        self.notes: list[str] = []

    def feed(self, fields: Mapping[str, Any], stored_hash: Any, *, line: int | None = None) -> bool:
        """Check one event (its canonical fields and the hash stored with it); False once the chain is broken."""
        if self.broken is not None:
            return False
        seq = fields.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return self.mark_broken(None, "malformed", "the event has no integer seq", line)
        if self.chain is None:
            self.chain = fields.get("chain")
        elif fields.get("chain") != self.chain:
            return self.mark_broken(seq, "chain_mismatch", f"event belongs to chain {fields.get('chain')!r}, "
                               f"not {self.chain!r}", line)
        if self.last_seq is None:
            if self.expected_first is not None and seq != self.expected_first:
                missing = span(self.expected_first, seq - 1)
                return self.mark_broken(seq, "missing", f"the range should start at seq {self.expected_first}, "
                                   f"but seq {missing} is missing", line)
            if seq == 1:
                self.anchor = GENESIS_HASH
        elif seq != self.last_seq + 1:
            if seq <= self.last_seq:
                return self.mark_broken(seq, "out_of_order", f"seq {seq} follows seq {self.last_seq}: events were "
                                   "reordered or duplicated", line)
            return self.mark_broken(seq, "missing", f"seq {span(self.last_seq + 1, seq - 1)} is missing "
                               "(deleted)", line)
        try:
            computed = hash_fields(fields)
        except (TypeError, ValueError, rfc8785.CanonicalizationError) as exc:
            return self.mark_broken(seq, "malformed", f"the event cannot be canonicalized ({exc})", line)
        if computed != stored_hash:
            return self.mark_broken(seq, "hash_mismatch", "the event's content does not match its stored hash: the "
                               "event (or its hash) was altered", line)
        expected_prev = self.last_hash if self.last_seq is not None else self.anchor
        if expected_prev is not None and fields.get("prev_hash") != expected_prev:
            before = self.last_seq if self.last_seq is not None else seq - 1
            return self.mark_broken(seq, "prev_hash_mismatch", f"prev_hash is not the hash of seq {before}: an event "
                               "was altered and re-hashed, or replaced", line)
        if self.last_seq is None and expected_prev is None:
            self.notes.append(f"the range starts at seq {seq}; its link to seq {seq - 1} was not checked")
        self.count += 1
        self.first_seq = seq if self.first_seq is None else self.first_seq
        self.last_seq = seq
        self.last_hash = stored_hash
        return True

    def check_head(self, head_seq: int, head_hash: str) -> None:
        """The chain's newest event must be the one its head row names (else events were cut off the end)."""
        if self.broken is not None:
            return
        last = self.last_seq or 0
        if last < head_seq:
            self.mark_broken(last + 1, "missing", f"the chain head is at seq {head_seq}, but events "
                        f"{span(last + 1, head_seq)} are missing (deleted from the end)", None)
        elif last > head_seq:
            self.mark_broken(head_seq + 1, "head_mismatch", f"events after the chain head (seq {head_seq}) were "
                        "inserted without going through the writer", None)
        elif head_seq > 0 and self.last_hash != head_hash:
            self.mark_broken(last, "head_mismatch", f"seq {last} is not the event the chain head recorded: it was "
                        "altered and re-hashed", None)

    def result(self) -> Verification:
        return Verification(chain=self.chain, count=self.count, first_seq=self.first_seq, last_seq=self.last_seq,
                            head_hash=self.last_hash, broken=self.broken, notes=list(self.notes))

    def mark_broken(self, seq: int | None, code: str, reason: str, line: int | None) -> bool:
        self.broken = ChainBreak(seq=seq, code=code, reason=reason, line=line)
        return False


def span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"


def verify_export(lines: Iterable[bytes | str]) -> Verification:
    """Verify an NDJSON export offline: every line is an event's canonical object plus its `hash`."""
    verifier = ChainVerifier()
    for number, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            verifier.mark_broken(None, "malformed", f"line {number} is not JSON ({exc.msg})", number)
            break
        if not isinstance(fields, dict) or "hash" not in fields:
            verifier.mark_broken(None, "malformed", f"line {number} is not an audit event with a hash", number)
            break
        stored = fields.pop("hash")
        if not verifier.feed(fields, stored, line=number):
            break
    return verifier.result()
