"""PII masking: typed placeholders (`<EMAIL>`, `<IBAN>`, `<CARD>`, `<IP>`, `<SSN>`, `<PHONE>`) replace personal
identifiers before text is stored or sent to a provider. See docs/compliance.md (also why not Presidio)."""

from __future__ import annotations

import ipaddress
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import phonenumbers
from stdnum import iban, luhn

from app.config import Settings

EMAIL = "<EMAIL>"
IBAN = "<IBAN>"
CARD = "<CARD>"
IP = "<IP>"
SSN = "<SSN>"
PHONE = "<PHONE>"

Span = tuple[int, int]

_EMAIL = re.compile(
    r"(?<![\w.!#$%&'*+/=?^`{|}~-])[\w.!#$%&'*+/=?^`{|}~-]+@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,63}(?![\w-])"
)
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}")
_IBAN_MAX_CHARS = 34
_IBAN_MIN_CHARS = 15
# A run of digit groups, each separated by one space or dash: where card numbers hide.
_DIGIT_RUN = re.compile(r"(?<![\w.])\d+(?:[ -]\d+)*")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})(?:%[0-9A-Za-z]+)?(?!\w)"
)
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")


@dataclass(frozen=True)
class MaskedText:
    text: str
    # kind ("email", "phone", "card", "ip", "iban", "ssn") -> how many were replaced
    counts: dict[str, int]


@dataclass(frozen=True)
class Masker:
    """How this deployment masks, and whether it masks when neither the submission nor its tenant says."""

    phone_regions: tuple[str, ...] = ("US",)
    by_default: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Masker:
        return cls(phone_regions=settings.phone_regions, by_default=settings.mask_by_default)

    def applies(self, requested: bool | None, tenant_default: bool | None) -> bool:
        """The submission's own `mask` wins, then the tenant's default, then the deployment's."""
        if requested is not None:
            return requested
        if tenant_default is not None:
            return tenant_default
        return self.by_default

    def mask(self, text: str) -> MaskedText:
        claimed: list[tuple[int, int, str]] = []
        finders: tuple[tuple[str, Iterable[Span]], ...] = (
            (EMAIL, _pattern_spans(_EMAIL, text)),
            (IBAN, _iban_spans(text)),
            (CARD, _card_spans(text)),
            (IP, _ip_spans(text)),
            (SSN, _pattern_spans(_SSN, text)),
            (PHONE, self._phone_spans(text)),
        )
        for placeholder, spans in finders:
            for start, end in spans:
                # Findings of an earlier type win over later ones they overlap.
                if all(end <= s or start >= e for s, e, _ in claimed):
                    claimed.append((start, end, placeholder))
        if not claimed:
            return MaskedText(text=text, counts={})
        claimed.sort()
        pieces: list[str] = []
        position = 0
        for start, end, placeholder in claimed:
            pieces.append(text[position:start])
            pieces.append(placeholder)
            position = end
        pieces.append(text[position:])
        return MaskedText(text="".join(pieces), counts=dict(Counter(_kind(p) for _, _, p in claimed)))

    def mask_all(self, texts: Sequence[str]) -> tuple[list[str], dict[str, int]]:
        """Every text masked, and how many of each kind were replaced over all of them."""
        total: Counter[str] = Counter()
        masked: list[str] = []
        for text in texts:
            result = self.mask(text)
            masked.append(result.text)
            total.update(result.counts)
        return masked, dict(sorted(total.items()))

    def _phone_spans(self, text: str) -> Iterator[Span]:
        for region in self.phone_regions:
            for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                yield match.start, match.end


DEFAULT_MASKER = Masker()


def _kind(placeholder: str) -> str:
    return placeholder.strip("<>").lower()


def _pattern_spans(pattern: re.Pattern[str], text: str) -> Iterator[Span]:
    for match in pattern.finditer(text):
        yield match.start(), match.end()


def _iban_spans(text: str) -> Iterator[Span]:
    for match in _IBAN_START.finditer(text):
        # Collect up to 34 letters and digits, allowing one space or dash between them; then try the longest
        # prefix that is a valid IBAN and ends at a word boundary, so trailing words are never swallowed.
        ends: list[int] = []
        position = match.start()
        while position < len(text) and len(ends) < _IBAN_MAX_CHARS:
            char = text[position]
            if char.isascii() and char.isalnum():
                ends.append(position + 1)
                position += 1
            elif char in " -" and ends and position + 1 < len(text) and text[position + 1].isalnum():
                position += 1
            else:
                break
        compact = re.sub(r"[ -]", "", text[match.start():ends[-1]]).upper()
        for length in range(len(ends), _IBAN_MIN_CHARS - 1, -1):
            end = ends[length - 1]
            if end < len(text) and text[end].isalnum():
                continue
            if iban.is_valid(compact[:length]):
                yield match.start(), end
                break


def _card_spans(text: str) -> Iterator[Span]:
    for run in _DIGIT_RUN.finditer(text):
        if run.end() < len(text) and text[run.end()].isalpha():
            continue
        groups = [(m.start() + run.start(), m.end() + run.start()) for m in re.finditer(r"\d+", run.group())]
        index = 0
        while index < len(groups):
            found = _card_at(text, groups, index)
            if found is None:
                index += 1
                continue
            yield groups[index][0], groups[found][1]
            index = found + 1


def _card_at(text: str, groups: list[Span], first: int) -> int | None:
    """The last group of the longest card number that starts at group `first`, if any."""
    digits = ""
    candidates: list[int] = []
    for last in range(first, len(groups)):
        digits += text[groups[last][0]:groups[last][1]]
        if len(digits) > 19:
            break
        if len(digits) >= 13 and luhn.is_valid(digits):
            candidates.append(last)
    return candidates[-1] if candidates else None


def _ip_spans(text: str) -> Iterator[Span]:
    # IPv6 first, so an IPv4-mapped address (::ffff:192.0.2.1) is one finding, not an IPv4 inside an IPv6.
    for match in _IPV6.finditer(text):
        candidate = match.group()
        # A sentence may end right after an address with a colon ("at fe80::1: it…").
        while candidate and not _is_ipv6(candidate) and candidate.endswith(":"):
            candidate = candidate[:-1]
        if _is_ipv6(candidate):
            yield match.start(), match.start() + len(candidate)
    for match in _IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(match.group())
        except ValueError:
            continue
        yield match.start(), match.end()


def _is_ipv6(candidate: str) -> bool:
    if not any(c in string.hexdigits for c in candidate.split("%")[0]):
        return False  # "::" alone is an address, but in prose it is punctuation
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True

