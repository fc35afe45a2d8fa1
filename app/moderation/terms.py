"""Term lists (blocklists and allowlists): the text normalisation that defeats the usual evasions, and matching of
terms (on word boundaries) and patterns (RE2, linear time). No database. See docs/moderation.md ("Term lists")."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import re2

# Look-alike characters folded onto the Latin letter they imitate, after NFKC and casefolding (which already fold
# full-width forms, ligatures, mathematical alphabets and circled letters). Cyrillic and Greek homoglyphs, and the
# digits and symbols of "leetspeak".
_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g", "ո": "n",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x", "ω": "w",
    # Leetspeak
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s",
})
_WORD = re.compile(r"[^\W_]+")
# At least this many one-letter words in a row are read as one spaced-out word ("b a d" -> "bad").
_SPACED_RUN = 3

MAX_TERMS = 1000
MAX_TERM_CHARS = 100
MAX_PATTERNS = 100
MAX_PATTERN_CHARS = 500
# RE2's memory budget for one compiled pattern set; a pattern that needs more is refused when the list is saved.
_RE2_MAX_MEM = 8 << 20


class TermListError(ValueError):
    """A term or pattern that cannot be used; `index` says which one of its field."""

    def __init__(self, message: str, *, field: str, index: int) -> None:
        super().__init__(message)
        self.field = field
        self.index = index


def fold(text: str) -> str:
    """The text as matching sees it: NFKC, casefolded, invisible characters dropped, look-alikes folded."""
    if text.isascii():  # the common case: nothing for NFKC, invisible characters or accents to do
        return text.lower().translate(_CONFUSABLES)
    folded = unicodedata.normalize("NFKC", text).casefold()
    # Format characters (zero-width, soft hyphen, bidi controls) go, and so do accents once NFD has split them off
    # (NFKC keeps é composed), so "b\u200bàd" reads "bad".
    folded = "".join(ch for ch in unicodedata.normalize("NFD", folded) if unicodedata.category(ch) not in _DROPPED)
    return folded.translate(_CONFUSABLES)


_DROPPED = frozenset({"Cf", "Mn"})


@lru_cache(maxsize=64)
def _words(text: str) -> tuple[str, ...]:
    return tuple(_joined_words(text))


def words(text: str) -> list[str]:
    """The folded text's words, with spaced-out runs of single letters ("b a d", "b.a.d", "b-a-d") joined. (Kept
    for the last few texts: every list of a policy, and its shadow's, reads the same text.)"""
    return list(_words(text))


def _joined_words(text: str) -> list[str]:
    tokens = _WORD.findall(fold(text))
    joined: list[str] = []
    run: list[str] = []
    for token in [*tokens, ""]:
        if len(token) == 1:
            run.append(token)
            continue
        if len(run) >= _SPACED_RUN:
            joined.append("".join(run))
        else:
            joined.extend(run)
        run = []
        if token:
            joined.append(token)
    return joined


def _options() -> re2.Options:
    options = re2.Options()
    options.max_mem = _RE2_MAX_MEM
    options.case_sensitive = False
    return options


def check_pattern(pattern: str) -> None:
    """Compile one pattern with RE2; ValueError (RE2's reason) if it cannot be: backreferences and lookarounds are
    not RE2, and a pattern over the memory budget is refused."""
    try:
        re2.compile(pattern, _options())
    except re2.error as exc:
        raise ValueError(str(exc) or "not a valid RE2 pattern") from exc


def normalized_term(term: str) -> str:
    """A term as matching stores it: its folded words joined by one space ("Bad  Word" -> "bad word")."""
    return " ".join(words(term))


@dataclass(frozen=True)
class TermMatcher:
    """One term list compiled: its terms (on word boundaries, after folding) and its patterns (RE2)."""

    terms: frozenset[str]
    longest: int
    patterns: tuple[Any, ...]  # compiled RE2 patterns

    def matches(self, text: str, *, exempt: Sequence[TermMatcher] = ()) -> int:
        """How many times the list matches `text` (never which words: the count is all a verdict shows). Words the
        `exempt` lists (allowlists) hold are taken out first."""
        tokens = words(text)
        for allowed in exempt:
            tokens = allowed.remove(tokens)
        terms = self.terms
        count = sum(1 for token in tokens if token in terms) if self.longest else 0
        for size in range(2, self.longest + 1):  # phrases
            for start in range(len(tokens) - size + 1):
                if " ".join(tokens[start:start + size]) in self.terms:
                    count += 1
        if self.patterns:
            # Patterns see the folded words joined by single spaces: evasions are undone for them too.
            line = " ".join(tokens)
            count += sum(1 for pattern in self.patterns if pattern.search(line))
        return count

    def remove(self, tokens: Sequence[str]) -> list[str]:
        """`tokens` without the runs of words this list's terms cover."""
        kept: list[str] = []
        index = 0
        while index < len(tokens):
            for size in range(min(self.longest, len(tokens) - index), 0, -1):
                if " ".join(tokens[index:index + size]) in self.terms:
                    index += size
                    break
            else:
                kept.append(tokens[index])
                index += 1
        return kept


def compile_terms(terms: Sequence[str], patterns: Sequence[str]) -> TermMatcher:
    """Compile a list (its terms and patterns already checked when it was saved)."""
    return _compile(tuple(terms), tuple(patterns))


@lru_cache(maxsize=256)
def _compile(terms: tuple[str, ...], patterns: tuple[str, ...]) -> TermMatcher:
    normalized = frozenset(t for t in (normalized_term(term) for term in terms) if t)
    longest = max((t.count(" ") + 1 for t in normalized), default=0)
    return TermMatcher(terms=normalized, longest=longest,
                       patterns=tuple(re2.compile(p, _options()) for p in patterns))
