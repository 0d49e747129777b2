"""Entropy-coded bodies (wire format v1, encoding 2): constriction's ANS coder's words.

The level indices ``xi_i`` of a quantized vector are far from uniform (QSGD
sends mostly zeros at coarse levels), so coding them with their empirical
distribution costs about ``d * H(p_hat)`` bits instead of ``d * ceil(log2(s+1))``
(Alistarh et al. 2017, Sec. 3.1, use Elias codes for the same reason). Signs
cost one bit per nonzero index: an unbiased update's signs are close to fair
coins, so modelling them would save little and cost a parameter.

Each index is split as ``xi = (h << k) | l``: the high part ``h`` is coded with
a categorical model whose counts travel in the body, and the ``k`` low bits
uniformly. ``k = 0`` (a plain categorical over ``0..max xi``) is the usual
choice; a larger ``k`` keeps the model small when ``s`` is large, and with
``h`` always 0 the body is never much larger than the packed one.

Body layout (all inside the body length of the header)::

    offset  size  field
    0       1     k, the number of low bits sent uniformly (0 .. min(23, bits(s))),
                  or 0xFF: the rest of the body is a packed body (codec docstring)
    1       ...   m = max_i (xi_i >> k), unsigned LEB128 (canonical; m <= s >> k,
                  m < 4096)
    ...     4*n   n words, uint32 little-endian: the compressed data of a
                  constriction ``stack.AnsCoder`` (32-bit words, 64-bit state,
                  24-bit probabilities), which decodes, in this order:
                  1. if m > 0, the counts c_0 .. c_{m-1} of the high parts
                     0 .. m-1: c_j is uniform on [0, R_j] with
                     R_j = d - c_0 - ... - c_{j-1} (not coded when R_j = 0; when
                     R_j >= 2**24 - 1 as c_j >> 16 uniform on [0, R_j >> 16], then
                     c_j & 0xFFFF uniform on its remaining range); c_m = R_m >= 1;
                  2. if m > 0, the d high parts h_i, each from
                     ``model.Categorical(counts, perfect=False)`` over 0 .. m;
                  3. if k > 0, the d low parts l_i, uniform on [0, 2**k);
                  4. one sign per nonzero xi_i, in index order, uniform on {0, 1}
                     (1 = negative).

The encoder falls back to the 0xFF form when the coded form would be longer
(tiny vectors: the ANS state costs up to 8 bytes), so an entropy message is
never more than one byte longer than the packed one. A message with d = 0 has
an empty body. The decoder checks that k and m
are in range, that the decoded high parts have exactly the transmitted counts,
that every index is at most s and that the coder is empty afterwards; it
allocates at most ``d`` symbols of each kind and 4096 counts.

Canonical form: each vector has exactly one valid entropy body, the one
:func:`encode_body` makes, so a decoded message re-encodes to the same bytes
(as raw and packed messages do). The layout alone admits more (any legal
``k``; the stored form of a vector the encoder codes, or the coded form of
one it stores), so after decoding, the decoder rebuilds the encoder's coded
body from the decoded symbols (its ``k``, ``m``, counts and ANS words) and
rejects the body unless it is byte-identical to it, or, for the stored form,
unless it is longer than ``1 +`` the packed body.

Notes
-----
The counts are exact, so the model is the empirical distribution and the
symbols cost ``d * H(p_hat)`` up to the coder's 24-bit quantisation; the counts
themselves cost ``sum_j log2(R_j + 1)`` bits, far less than a float table (a
naive table costs 1.5x at d = 410). The encoder picks ``k`` by the estimated
size ``d H(h) + d k + nnz + count bits``; ``k = bits(max xi)`` (every index
sent uniformly) is always a candidate.

The canonical check costs one encode per decode; it compares the words as
the encoder produces them, without keeping them (``python -m
benchmarks.entropy_check`` times the decoder with and without it). A cheaper
check of ``k`` and the stored/coded choice alone would rest on the coder's
words being unique for given symbols and models, which constriction does not
document.

The coder runs as numba kernels (:mod:`._kernels.ans`) that do constriction's
arithmetic word for word, on arrays of level codes ``(xi << 1) | sign`` of 1,
2 or 4 bytes (:func:`._kernels.code_dtype`): no int32 copy of the vector per
part, and a categorical symbol decoded by a table lookup instead of a binary
search. The tests check the bytes against constriction itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from adaquantfl.compression import _kernels as kernels
from adaquantfl.compression._kernels import ans
from adaquantfl.compression.container import CodecError, get_varint, put_varint
from adaquantfl.compression.packed import code_width, packed_body_bytes

__all__ = [
    "MAX_ALPHABET",
    "body_writer",
    "decode_body",
    "decode_codes",
    "empirical_entropy_bits",
    "encode_body",
]

#: Largest number of high-part symbols (``m + 1``) a body may use.
MAX_ALPHABET = 4096
_STORED = 0xFF  # first body byte of the packed fallback
_MAX_LOW_BITS = 23  # constriction's Uniform needs 2 <= size < 2**24
# Word arrays the coder reads are read-only and those it writes writable, in
# every mode, so that numba compiles each kernel once per code width.
_NO_OUT = np.zeros(0, np.uint32)
_NO_WORDS = np.zeros(0, np.uint32)
_NO_WORDS.flags.writeable = False
_NO_CDF = np.zeros(2, np.uint64)
_CODER_ERRORS = {
    ans.MALFORMED: "entropy coded data is malformed: Invalid compressed data: ANS compressed "
    "data never ends in a zero word.",
    ans.BAD_COUNTS: "decoded high parts disagree with their transmitted counts",
    ans.NOT_EMPTY: "entropy coded data continues after the last symbol",
}


def empirical_entropy_bits(mags: np.ndarray) -> float:
    """``d * H(p_hat) + nnz``: the ideal size of what this body codes, in bits.

    ``p_hat`` is the empirical distribution of the level indices; each nonzero
    index adds one bit for its sign.
    """
    counts = np.bincount(np.asarray(mags, dtype=np.int64).reshape(-1))
    return _entropy_bits(counts) + float(np.count_nonzero(mags))


def _entropy_bits(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    d = float(c.sum())
    return float(d * math.log2(d) - (c * np.log2(c)).sum()) if d else 0.0


def _count_bits(counts: np.ndarray, d: int) -> float:
    # Counts c_0..c_{m-1}, each uniform on [0, R_j]: log2(R_j + 1) bits.
    before = np.concatenate(([0], np.cumsum(counts[:-1])))[:-1]
    return float(np.log2(d - before + 1.0).sum())


def choose_low_bits(counts: np.ndarray, k_min: int, bits: int) -> tuple[int, np.ndarray]:
    """The number of uniform low bits ``k`` and the high-part counts the encoder uses.

    ``counts`` is ``np.bincount`` of the level indices shifted right by
    ``k_min = max(0, bits - 12)``, where ``bits`` is the bit length of the
    largest index. Minimises ``d H(h) + d k + count bits`` over every
    ``k >= k_min`` (so that the high alphabet stays below
    :data:`MAX_ALPHABET`; the sign bits do not depend on k).
    """
    d = int(counts.sum())
    best_k, best_counts, best_bits = k_min, counts, math.inf
    for k in range(k_min, min(bits, _MAX_LOW_BITS) + 1):
        if k > k_min:
            if counts.size % 2:
                counts = np.append(counts, 0)
            counts = counts.reshape(-1, 2).sum(axis=1)
        size = _entropy_bits(counts) + d * k + _count_bits(counts, d)
        if size < best_bits:
            best_k, best_counts, best_bits = k, counts, size
    return best_k, best_counts


def _low_bits_floor(top: int) -> int:
    # The fewest low bits that keep the high parts of indices up to `top` below 4096.
    return max(0, top.bit_length() - (MAX_ALPHABET.bit_length() - 1))


def _head(k: int, m: int) -> bytes:
    head = bytearray([k])
    put_varint(head, m)
    return bytes(head)


def _model(codes: np.ndarray, histogram: np.ndarray | None) -> tuple[int, np.ndarray, np.ndarray]:
    """The encoder's ``k``, high-part counts and their categorical model for these codes.

    ``histogram``, if given, is ``np.bincount`` of the level indices (its
    last count nonzero, fewer than 4096 counts), which saves two passes.
    """
    if histogram is None:
        top = int(kernels.max_level(codes))
        k_min = _low_bits_floor(top)
        histogram = ans.histogram(codes, k_min, top >> k_min)
    else:
        top, k_min = histogram.size - 1, 0
    k, counts = choose_low_bits(histogram, k_min, top.bit_length())
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    return k, counts, ans.categorical_cdf(counts) if counts.size > 1 else _NO_CDF


def _coded_words(codes: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The head (``k``, ``m``) and the ANS words of the coded body of valid level codes."""
    k, counts, cdf = _model(codes, None)
    # Room for the words: the model's cost in bits (each symbol costs
    # log2(2**24 / p) bits in the coder, to within far less than a bit over
    # the vector) with a margin; in the rare case that is short, code again.
    d = codes.size
    probabilities = np.diff(cdf).astype(np.float64) if counts.size > 1 else np.ones(1)
    bits = float((counts * (24.0 - np.log2(probabilities))).sum()) if counts.size > 1 else 0.0
    bits += d * k + np.count_nonzero(codes) + 64.0 * (counts.size + 2)
    words = np.empty(int(bits / 32 * 1.002) + 64, np.uint32)
    count, _ = ans.encode(codes, k, counts, cdf, ans.ENCODE, words, _NO_WORDS)
    if count > words.size:
        words = np.empty(count, np.uint32)
        ans.encode(codes, k, counts, cdf, ans.ENCODE, words, _NO_WORDS)
    return _head(k, counts.size - 1), words[:count]


def body_writer(codes: np.ndarray, levels: int) -> tuple[int, Callable[[np.ndarray], None]]:
    """The entropy body of valid level codes ``(xi << 1) | sign``: its size and a writer.

    The writer fills a buffer with the body (and may use :data:`.PACK_SLACK`
    bytes after it), so that the body goes into the message without a copy of
    its own.
    """
    d = codes.size
    if d == 0:
        return 0, lambda out: None
    head, words = _coded_words(codes)
    size = len(head) + 4 * words.size
    packed = packed_body_bytes(d, levels)
    if size <= 1 + packed:

        def write_coded(out: np.ndarray) -> None:
            out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
            out[len(head) : size] = words.astype("<u4", copy=False).view(np.uint8)

        return size, write_coded

    def write_stored(out: np.ndarray) -> None:
        out[0] = _STORED
        kernels.pack_codes(codes, code_width(levels), out[1:])

    return 1 + packed, write_stored


def codes_of(mags: np.ndarray, signs: np.ndarray, levels: int) -> np.ndarray:
    """Level codes ``(xi << 1) | sign`` of level indices and signs.

    Raises
    ------
    ValueError
        If an index is outside ``[0, levels]`` or a zero index has its sign set.
    """
    codes = np.empty(mags.size, kernels.code_dtype(code_width(levels)))
    if kernels.codes_from_levels(mags, signs, levels, codes):
        raise ValueError(
            f"cannot encode: a level index is outside [0, {levels}] or a zero level "
            "has its sign set"
        )
    return codes


def encode_body(mags: np.ndarray, signs: np.ndarray, levels: int) -> bytes:
    """The entropy-coded body of level indices ``mags`` and ``signs`` (see the module doc).

    Raises
    ------
    ValueError
        If an index is outside ``[0, levels]`` or a zero index has its sign set.
    """
    size, write = body_writer(codes_of(mags, signs, levels), levels)
    out = np.zeros(size + kernels.PACK_SLACK, dtype=np.uint8)
    write(out)
    return out[:size].tobytes()


def decode_body(body: memoryview, numel: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Level indices (int32) and signs (bool) of an entropy-coded body, validated.

    Raises
    ------
    CodecError
        If any field is out of range or the coded data disagrees with it.
    """
    codes = decode_codes(body, numel, levels)
    mags = np.empty(numel, dtype=np.int32)
    signs = np.empty(numel, dtype=np.bool_)
    kernels.levels_from_codes(codes, mags, signs)
    return mags, signs


def decode_codes(body: memoryview, numel: int, levels: int) -> np.ndarray:
    """Level codes ``(xi << 1) | sign`` of an entropy-coded body, validated.

    Allocates one code per entry (1, 2 or 4 bytes) and at most 4096 counts.

    Raises
    ------
    CodecError
        If any field is out of range or the coded data disagrees with it.
    """
    dtype = kernels.code_dtype(code_width(levels))
    if numel == 0:
        if len(body):
            raise CodecError("an empty vector's entropy body must be empty")
        return np.zeros(0, dtype)
    if len(body) < 2:
        raise CodecError(f"entropy body is {len(body)} bytes; it has at least 2")
    k = body[0]
    if k == _STORED:
        if len(body) != 1 + packed_body_bytes(numel, levels):
            raise CodecError(
                f"stored entropy body is {len(body)} bytes; expected "
                f"{1 + packed_body_bytes(numel, levels)} for numel {numel} and levels {levels}"
            )
        codes = _stored_codes(body, numel, levels, dtype)
        _check_canonical(body, codes, levels)
        return codes
    if k > min(_MAX_LOW_BITS, levels.bit_length()):
        raise CodecError(f"entropy body sends {k} low bits; at most {levels.bit_length()} here")
    m, pos = get_varint(body, 1, "entropy high-part maximum")
    if m > levels >> k or m >= MAX_ALPHABET:
        raise CodecError(f"entropy high-part maximum {m} exceeds {min(levels >> k, 4095)}")
    if (len(body) - pos) % 4:
        raise CodecError("entropy body's coded data is not a whole number of 32-bit words")
    codes = np.empty(numel, dtype)
    counts = np.empty(m + 1, np.int64)
    status = ans.decode(_words(body, pos), numel, k, m, levels, codes, counts)
    if status == ans.NO_ROOM:
        raise CodecError(f"entropy counts leave nothing for the largest high part {m}")
    if status == ans.LEVEL_TOO_LARGE:
        raise CodecError(f"a level index exceeds levels {levels}")
    if status:
        raise CodecError(_CODER_ERRORS[status])
    # With k = 0 the high-part counts are the histogram of the level indices.
    _check_canonical(body, codes, levels, None if k else counts)
    return codes


def _words(body: memoryview, pos: int) -> np.ndarray:
    """The body's ANS words from byte ``pos`` on: a read-only view, or a read-only copy
    where the view would be unaligned."""
    words = np.frombuffer(body, dtype="<u4", offset=pos)
    if not words.flags.aligned:
        words = words.copy()
    words.flags.writeable = False
    return words


def _stored_codes(body: memoryview, numel: int, levels: int, dtype: Any) -> np.ndarray:
    """The level codes of a stored (packed) entropy body, validated as a packed body."""
    from adaquantfl.compression.packed import check_padding

    arr = np.frombuffer(body, dtype=np.uint8, offset=1)
    check_padding(arr, packed_body_bytes(numel, levels), numel, levels)
    codes = np.empty(numel, dtype)
    if kernels.unpack_codes(arr, numel, levels, code_width(levels), codes):
        if kernels.max_level(codes) > levels:
            raise CodecError(f"a level index exceeds levels {levels}")
        raise CodecError("a sign bit is set on a zero level (non-canonical encoding)")
    return codes


def _check_canonical(
    body: memoryview,
    codes: np.ndarray,
    levels: int,
    histogram: np.ndarray | None = None,
) -> None:
    """Reject a valid body that is not the one :func:`encode_body` makes for these codes.

    The layout leaves the encoder choices (``k``, the stored form) that a
    decoder would otherwise accept in any legal combination; running the
    encoder on the decoded symbols and comparing its words with the body's
    as they come closes those and anything else the coder's words might
    allow, at the cost of one encode per decode. ``histogram`` is that of
    the level indices, when the caller has it.
    """
    k, counts, cdf = _model(codes, histogram)
    head = _head(k, counts.size - 1)
    packed = packed_body_bytes(codes.size, levels)
    if body[0] == _STORED:
        count, _ = ans.encode(codes, k, counts, cdf, ans.COUNT, _NO_OUT, _NO_WORDS)
        coded = len(head) + 4 * count
        if coded <= 1 + packed:
            raise CodecError(
                f"entropy body is stored, but the encoder ANS-codes this vector in "
                f"{coded} <= {1 + packed} bytes (one canonical body per vector)"
            )
        return
    same_head = bytes(body[: len(head)]) == head
    reference = _words(body, len(head)) if same_head else _NO_WORDS
    count, same = ans.encode(codes, k, counts, cdf, ans.VERIFY, _NO_OUT, reference)
    coded = len(head) + 4 * count
    if coded > 1 + packed:
        raise CodecError(
            f"entropy body is ANS-coded, but the encoder stores this vector: its coded "
            f"form is {coded} > {1 + packed} bytes (one canonical body per vector)"
        )
    if body[0] != k:
        raise CodecError(
            f"entropy body sends k = {body[0]} low bits; the encoder sends this vector "
            f"with k = {k} (one canonical body per vector)"
        )
    if not (same_head and same and len(body) == coded):
        raise CodecError(
            "entropy body's coded words are not the encoder's for the symbols they "
            "decode to (one canonical body per vector)"
        )
