"""Text to hashed features: the one featuriser both training (ops/engine/) and serving use, so they agree.

A batch of texts is normalised together (one pass of each regular expression over the joined batch), encoded to one
array of UTF-8 bytes, and hashed there with numpy: words (runs of word bytes) and word bigrams by a polynomial hash
computed from prefix sums, character 2- to 5-grams by a rolling polynomial hash. One sort of (text, id) keys then
counts them. Each of the word and character blocks gets sublinear term frequency, the trained IDF weights and its own
L2 norm. The word ids also key the embedding view's word vectors (model.py). Nothing here depends on Python's salted
`hash()`, so the same text gives the same features in every process.

Id-like tokens (hex runs such as hashes and uuids, runs of 5+ digits, long letter-and-digit codes) are dropped before
anything is hashed: they carry no meaning, and a long one appended to a text would otherwise dilute its n-grams
enough to hide abuse.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

WORD_BITS = 18
CHAR_BITS = 18
WORD_DIM = 1 << WORD_BITS
CHAR_DIM = 1 << CHAR_BITS
DIM = WORD_DIM + CHAR_DIM
CHAR_NGRAMS = (2, 3, 4, 5)
# Long texts are judged on their first MAX_CHARS characters: the cost stays bounded, and harm is rarely only later.
MAX_CHARS = 4000

_SEPARATOR = "\x00"  # joins a batch's texts while it is normalised; never left inside a text
# White space other than a single plain space (one sub, and single spaces, the common case, are not even matched).
_SPACE = re.compile(r"[^\S\x00 ][^\S\x00]*| [^\S\x00]+")
# Tokens with a digit are the only id candidates: found from their digit runs (one fast scan), widened to the token
# around them, and `_is_id_like` decides.
_DIGITS = re.compile(r"\d+")
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.:/-")
_HEX_ID = re.compile(r"[0-9a-f]{8,}(?:-[0-9a-f]+)*|[0-9a-f]+(?:-[0-9a-f]+){2,}")
_CODE = re.compile(r"\w{12,}")
_QUOTES = ("\u2019", "\u2018", "\u02bc", "`")  # written as an apostrophe
_U64 = np.uint64
_PRIME = _U64(1_000_003)
_PRIME_INVERSE = _U64(pow(1_000_003, -1, 1 << 64))
# Final multiplies spread the hashes before their top bits are taken; the bigram key mixes its two words' hashes.
_MIX = _U64(0x9E3779B97F4A7C15)
_BIGRAM = _U64(0xC2B2AE3D27D4EB4F)
_CHAR_MASK = _U64(CHAR_DIM - 1)
# Bytes that make up words: ASCII letters, digits and '_' (the text is lower-cased), and every byte of a non-ASCII
# character (so words of other scripts stay words). An apostrophe between two word bytes joins them ("you're").
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[[*range(ord("0"), ord("9") + 1), *range(ord("a"), ord("z") + 1), ord("_"), *range(0x80, 0x100)]] = True
_APOSTROPHE = ord("'")


@dataclass(frozen=True)
class SparseRows:
    """A batch of feature rows in CSR form: row i is `indices[indptr[i]:indptr[i+1]]` with those `values`."""

    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.indptr) - 1


@dataclass(frozen=True)
class Hashed:
    """Every hashed id of a batch, repeats kept: `rows[i]` is the text `ids[i]` came from. Word unigram ids are in
    [0, WORD_DIM) like bigrams; `unigram` marks them (the embedding view looks their vectors up)."""

    size: int
    rows: npt.NDArray[np.int64]
    ids: npt.NDArray[np.int64]
    unigram: npt.NDArray[np.bool_]


def _is_id_like(token: str) -> bool:
    digits = sum(c.isdigit() for c in token)
    if _HEX_ID.fullmatch(token):
        return True
    if digits >= 5 and digits * 2 >= len(token):
        return True  # phone, order and account numbers; a year has 4 digits and stays
    return _CODE.fullmatch(token) is not None  # keys and codes: long, letters and digits, no dashes or dots


def _drop_ids(text: str) -> str:
    kept: list[str] = []
    copied = scanned = 0
    for match in _DIGITS.finditer(text):
        start, end = match.span()
        if start < scanned:
            continue  # a later digit run of a token already judged
        while start > 0 and (text[start - 1] in _TOKEN_CHARS or text[start - 1].isalnum()):
            start -= 1
        while end < len(text) and (text[end] in _TOKEN_CHARS or text[end].isalnum()):
            end += 1
        scanned = end
        if _is_id_like(text[start:end].strip(".:/-")):
            kept.append(text[copied:start])
            kept.append(" ")
            copied = end
    kept.append(text[copied:])
    return "".join(kept)


def normalise_batch(texts: Sequence[str]) -> list[str]:
    """NFKC, lower case, id-like tokens dropped, white space collapsed: what both views see of each text."""
    joined = _SEPARATOR.join(t[:MAX_CHARS].replace(_SEPARATOR, " ") for t in texts)
    if not joined.isascii():  # ASCII is its own NFKC form
        joined = unicodedata.normalize("NFKC", joined)
    joined = joined.lower()
    for quote in _QUOTES:
        joined = joined.replace(quote, "'")
    joined = _SPACE.sub(" ", _drop_ids(joined))
    return [t.strip() for t in joined.split(_SEPARATOR)]


def normalise(text: str) -> str:
    return normalise_batch([text])[0]


def _top_bits(values: npt.NDArray[np.uint64], bits: int) -> npt.NDArray[np.int64]:
    return ((values * _MIX) >> _U64(64 - bits)).astype(np.int64)


def _encode(cleaned: Sequence[str]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The batch as one byte array (each text padded with a space on both sides), its texts' ends, each byte's row."""
    encoded = [f" {t} ".encode() for t in cleaned]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return data, np.cumsum(lengths), np.repeat(np.arange(len(encoded), dtype=np.int64), lengths)


def _word_spans(data: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """First and last byte of every word. Texts are space-padded, so no word runs from one text into the next."""
    word = _WORD_BYTE[data]
    inner = np.flatnonzero(data[1:-1] == _APOSTROPHE) + 1
    word[inner[word[inner - 1] & word[inner + 1]]] = True
    edges = np.diff(word.astype(np.int8))
    return np.flatnonzero(edges == 1) + 1, np.flatnonzero(edges == -1)


def _word_hashes(data: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64]
                 ) -> npt.NDArray[np.uint64]:
    """sum(byte[k] * PRIME^(end - k)) over each word, mod 2^64, from one prefix sum (PRIME is odd, so invertible)."""
    n = len(data)
    powers = np.cumprod(np.full(n, _PRIME, dtype=np.uint64))  # PRIME^(k+1)
    inverse = np.cumprod(np.full(n, _PRIME_INVERSE, dtype=np.uint64))  # PRIME^-(k+1)
    prefix = np.cumsum(data.astype(np.uint64) * inverse)  # sum of byte[j] * PRIME^-(j+1) for j <= k
    before = prefix[np.maximum(starts - 1, 0)]
    before[starts == 0] = 0
    hashes = (prefix[ends] - before) * powers[ends] + (ends - starts + 1).astype(np.uint64)
    return hashes.astype(np.uint64, copy=False)


def hash_batch(cleaned: Sequence[str]) -> Hashed:
    """The hashed word unigram and bigram ids and character n-gram ids of a batch of normalised texts."""
    data, text_ends, row_of_byte = _encode(cleaned)
    starts, ends = _word_spans(data)
    hashes = _word_hashes(data, starts, ends)
    word_rows = row_of_byte[starts]
    same_text = word_rows[1:] == word_rows[:-1]
    bigrams = hashes[:-1][same_text] * _BIGRAM + hashes[1:][same_text]
    rows = [word_rows, word_rows[1:][same_text]]
    ids = [_top_bits(hashes, WORD_BITS), _top_bits(bigrams, WORD_BITS)]
    wide = data.astype(np.uint64)
    for n in CHAR_NGRAMS:
        windows = len(data) - n + 1
        if windows <= 0:
            continue
        rolling = np.full(windows, _U64(n), dtype=np.uint64)
        for j in range(n):
            rolling = rolling * _PRIME + wide[j:windows + j]
        row = row_of_byte[:windows]
        inside = np.arange(n, windows + n, dtype=np.int64) <= text_ends[row]  # the window ends inside its text
        rows.append(row[inside])
        ids.append((_top_bits(rolling[inside], CHAR_BITS) & int(_CHAR_MASK)) + WORD_DIM)
    unigram = np.zeros(sum(len(i) for i in ids), dtype=bool)
    unigram[:len(ids[0])] = True
    return Hashed(size=len(cleaned), rows=np.concatenate(rows), ids=np.concatenate(ids), unigram=unigram)


def word_strings(clean: str) -> list[str]:
    """The words of one normalised text as the hash sees them (training uses these to build the word vectors)."""
    data, _, _ = _encode([clean])
    starts, ends = _word_spans(data)
    raw = data.tobytes()
    return [raw[a:b + 1].decode(errors="replace") for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def word_ids(words: Sequence[str]) -> npt.NDArray[np.int64]:
    """The unigram id of each word, as `hash_batch` gives it inside a text."""
    data, _, _ = _encode([" ".join(words)])
    starts, ends = _word_spans(data)
    return _top_bits(_word_hashes(data, starts, ends), WORD_BITS)


def counted(hashed: Hashed) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(row, id, count) of each distinct hashed id per text, sorted by row then id: one sort of (row, id) keys."""
    # int32 keys sort twice as fast as int64; a batch of up to 4095 texts fits.
    if hashed.size < (1 << (31 - WORD_BITS - 1)):
        keys = np.sort((hashed.rows.astype(np.int32) << (WORD_BITS + 1)) | hashed.ids.astype(np.int32))
    else:
        keys = np.sort((hashed.rows << (WORD_BITS + 1)) | hashed.ids)
    if len(keys) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    new = np.empty(len(keys), dtype=bool)
    new[0] = True
    np.not_equal(keys[1:], keys[:-1], out=new[1:])
    first = np.flatnonzero(new)
    counts = np.diff(first, append=len(keys))
    unique = keys[first]
    return unique >> (WORD_BITS + 1), unique & (DIM - 1), counts


def tfidf_rows(hashed: Hashed, idf: npt.NDArray[np.floating]) -> SparseRows:
    """TF-IDF rows (each of the word and character blocks L2-normalised) of a hashed batch, `idf` of length DIM."""
    n = hashed.size
    row, ids, counts = counted(hashed)
    weights = (1.0 + np.log(counts.astype(np.float32))) * idf[ids]
    block = (row << 1) | (ids >> WORD_BITS)  # 2 * row + (1 for the character block)
    norms = np.sqrt(np.bincount(block, weights=np.square(weights, dtype=np.float64), minlength=2 * n))
    norms[norms == 0] = 1.0
    indptr = np.searchsorted(row, np.arange(n + 1)).astype(np.int64)
    return SparseRows(indptr=indptr, indices=ids.astype(np.int32),
                      values=(weights / norms[block]).astype(np.float32))


def featurise(texts: Sequence[str], idf: npt.NDArray[np.floating]) -> SparseRows:
    """TF-IDF rows for raw texts."""
    return tfidf_rows(hash_batch(normalise_batch(texts)), idf)


def raw_ids(text: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The hashed word and character n-gram ids of one text, repeats kept (IDF is counted from these)."""
    hashed = hash_batch([normalise(text)])
    return hashed.ids[hashed.ids < WORD_DIM], hashed.ids[hashed.ids >= WORD_DIM]


def linear_scores(rows: SparseRows, weights: npt.NDArray[np.floating], bias: npt.NDArray[np.floating]
                  ) -> npt.NDArray[np.float32]:
    """rows @ weights + bias for a (DIM, heads) weight matrix, without scipy: one gather and a segment sum."""
    # np.take along axis 0 is several times faster than fancy indexing for this gather.
    gathered = np.take(weights, rows.indices, axis=0).astype(np.float32, copy=False) * rows.values[:, None]
    sums = np.add.reduceat(gathered, rows.indptr[:-1], axis=0) if len(gathered) else np.zeros(
        (len(rows), weights.shape[1]), dtype=np.float32)
    # reduceat repeats the next row for an empty row; an empty text has no features and scores the bias alone.
    empty = rows.indptr[1:] == rows.indptr[:-1]
    sums[empty] = 0.0
    return (sums + bias.astype(np.float32)).astype(np.float32)
