"""Entropy-coded bodies (wire format v1, encoding 2) with constriction's ANS coder.

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

The canonical check costs one encode per decode: about 1.6x the decode time
of ``decode_dequantize`` without it (d = 1e5 and 1e6, s in {1, 15, 255};
``python -m benchmarks.entropy_check``). A cheaper check of ``k`` and the
stored/coded choice alone would rest on the coder's words being unique for
given symbols and models, which constriction does not document.
"""

from __future__ import annotations

import math

import constriction
import numpy as np

from adaquantfl.compression import _kernels as kernels
from adaquantfl.compression.container import CodecError, get_varint, put_varint
from adaquantfl.compression.packed import pack_into, packed_body_bytes, packed_levels

__all__ = ["MAX_ALPHABET", "decode_body", "empirical_entropy_bits", "encode_body"]

#: Largest number of high-part symbols (``m + 1``) a body may use.
MAX_ALPHABET = 4096
_STORED = 0xFF  # first body byte of the packed fallback
_MAX_LOW_BITS = 23  # constriction's Uniform needs 2 <= size < 2**24
_UNIFORM_LIMIT = 2**24 - 1
_Uniform = constriction.stream.model.Uniform
_Categorical = constriction.stream.model.Categorical
_AnsCoder = constriction.stream.stack.AnsCoder


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


def choose_low_bits(
    mags: np.ndarray, histogram: np.ndarray | None = None
) -> tuple[int, np.ndarray]:
    """The number of uniform low bits ``k`` and the high-part counts the encoder uses.

    Minimises ``d H(h) + d k + count bits`` over every ``k`` that keeps the
    high alphabet below :data:`MAX_ALPHABET` (the sign bits do not depend on k).
    ``histogram``, if given, is ``np.bincount(mags)`` (its last count nonzero),
    which saves a pass over ``mags``.
    """
    d = mags.size
    top = histogram.size - 1 if histogram is not None else int(mags.max()) if d else 0
    bits = top.bit_length()
    k_min = max(0, bits - (MAX_ALPHABET.bit_length() - 1))
    if histogram is not None and k_min == 0:
        counts = histogram
    else:
        counts = np.bincount(mags >> k_min if k_min else mags)
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


def encode_body(mags: np.ndarray, signs: np.ndarray, levels: int) -> bytes:
    """The entropy-coded body of level indices ``mags`` and ``signs`` (see the module doc).

    Raises
    ------
    ValueError
        If an index is outside ``[0, levels]`` or a zero index has its sign set.
    """
    d = mags.size
    if d == 0:
        return b""
    if int(mags.min()) < 0 or int(mags.max()) > levels or bool((signs & (mags == 0)).any()):
        raise ValueError(
            f"cannot encode: a level index is outside [0, {levels}] or a zero level "
            "has its sign set"
        )
    body = _coded_body(mags, signs)
    packed = packed_body_bytes(d, levels)
    if len(body) <= 1 + packed:
        return body
    out = np.empty(1 + packed + kernels.PACK_SLACK, dtype=np.uint8)
    out[0] = _STORED
    pack_into(mags, signs, levels, out[1:])
    return out[: 1 + packed].tobytes()


def _coded_body(mags: np.ndarray, signs: np.ndarray, histogram: np.ndarray | None = None) -> bytes:
    """The ANS-coded body of valid level indices with the encoder's ``k`` (not the stored form).

    ``histogram`` is as in :func:`choose_low_bits`.
    """
    d = mags.size
    k, counts = choose_low_bits(mags, histogram)
    m = counts.size - 1
    coder = _AnsCoder()
    # A stack: push in the reverse of the decoding order.
    nonzero = mags != 0
    if nonzero.any():
        coder.encode_reverse(signs[nonzero].astype(np.int32), _Uniform(2))
    if k:
        coder.encode_reverse((mags & ((1 << k) - 1)).astype(np.int32), _Uniform(1 << k))
    if m:
        model = _Categorical(counts.astype(np.float64), perfect=False)
        coder.encode_reverse((mags >> k if k else mags).astype(np.int32, copy=False), model)
        remaining = d - np.concatenate(([0], np.cumsum(counts[:-1])))
        for j in range(m - 1, -1, -1):
            _push_bounded(coder, int(counts[j]), int(remaining[j]))
    words = coder.get_compressed().astype("<u4", copy=False)
    head = bytearray([k])
    put_varint(head, m)
    body: bytes = bytes(head) + words.tobytes()
    return body


def decode_body(body: memoryview, numel: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Level indices (int32) and signs (bool) of an entropy-coded body, validated.

    Raises
    ------
    CodecError
        If any field is out of range or the coded data disagrees with it.
    """
    if numel == 0:
        if len(body):
            raise CodecError("an empty vector's entropy body must be empty")
        return np.zeros(0, np.int32), np.zeros(0, np.bool_)
    if len(body) < 2:
        raise CodecError(f"entropy body is {len(body)} bytes; it has at least 2")
    k = body[0]
    if k == _STORED:
        if len(body) != 1 + packed_body_bytes(numel, levels):
            raise CodecError(
                f"stored entropy body is {len(body)} bytes; expected "
                f"{1 + packed_body_bytes(numel, levels)} for numel {numel} and levels {levels}"
            )
        mags, signs = packed_levels(body[1:], numel, levels)
        _check_canonical(body, mags, signs, levels)
        return mags, signs
    if k > min(_MAX_LOW_BITS, levels.bit_length()):
        raise CodecError(f"entropy body sends {k} low bits; at most {levels.bit_length()} here")
    m, pos = get_varint(body, 1, "entropy high-part maximum")
    if m > levels >> k or m >= MAX_ALPHABET:
        raise CodecError(f"entropy high-part maximum {m} exceeds {min(levels >> k, 4095)}")
    if (len(body) - pos) % 4:
        raise CodecError("entropy body's coded data is not a whole number of 32-bit words")
    words = np.frombuffer(body, dtype="<u4", offset=pos).astype(np.uint32)
    try:
        coder = _AnsCoder(words)
    except ValueError as exc:
        raise CodecError(f"entropy coded data is malformed: {exc}") from None
    mags = np.zeros(numel, dtype=np.int32)
    counts = np.array([numel], dtype=np.int64)
    if m:
        counts = np.zeros(m + 1, dtype=np.int64)
        remaining = numel
        for j in range(m):
            counts[j] = _pop_bounded(coder, remaining)
            remaining -= int(counts[j])
        if remaining < 1:
            raise CodecError(f"entropy counts leave nothing for the largest high part {m}")
        counts[m] = remaining
        model = _Categorical(counts.astype(np.float64), perfect=False)
        mags = coder.decode(model, numel).astype(np.int32)
        if not np.array_equal(np.bincount(mags, minlength=m + 1), counts):
            raise CodecError("decoded high parts disagree with their transmitted counts")
    if k:
        mags = (mags << k) | coder.decode(_Uniform(1 << k), numel).astype(np.int32)
        if int(mags.max()) > levels:
            raise CodecError(f"a level index exceeds levels {levels}")
    nonzero = mags != 0
    signs = np.zeros(numel, dtype=np.bool_)
    nnz = int(np.count_nonzero(nonzero))
    if nnz:
        signs[nonzero] = coder.decode(_Uniform(2), nnz) != 0
    if not coder.is_empty():
        raise CodecError("entropy coded data continues after the last symbol")
    # With k = 0 the high-part counts are the histogram of the level indices.
    _check_canonical(body, mags, signs, levels, None if k else counts)
    return mags, signs


def _check_canonical(
    body: memoryview,
    mags: np.ndarray,
    signs: np.ndarray,
    levels: int,
    histogram: np.ndarray | None = None,
) -> None:
    """Reject a valid body that is not the one :func:`encode_body` makes for these symbols.

    The layout leaves the encoder choices (``k``, the stored form) that a
    decoder would otherwise accept in any legal combination; rebuilding the
    encoder's coded body from the decoded symbols and comparing bytes closes
    those and anything else the coder's words might allow, at the cost of one
    encode per decode.
    """
    coded = _coded_body(mags, signs, histogram)
    packed = packed_body_bytes(mags.size, levels)
    if body[0] == _STORED:
        if len(coded) <= 1 + packed:
            raise CodecError(
                f"entropy body is stored, but the encoder ANS-codes this vector in "
                f"{len(coded)} <= {1 + packed} bytes (one canonical body per vector)"
            )
    elif len(coded) > 1 + packed:
        raise CodecError(
            f"entropy body is ANS-coded, but the encoder stores this vector: its coded "
            f"form is {len(coded)} > {1 + packed} bytes (one canonical body per vector)"
        )
    elif body[0] != coded[0]:
        raise CodecError(
            f"entropy body sends k = {body[0]} low bits; the encoder sends this vector "
            f"with k = {coded[0]} (one canonical body per vector)"
        )
    elif body != coded:
        raise CodecError(
            "entropy body's coded words are not the encoder's for the symbols they "
            "decode to (one canonical body per vector)"
        )


def _push_bounded(coder: constriction.stream.stack.AnsCoder, value: int, bound: int) -> None:
    """Push ``value``, uniform on ``[0, bound]`` (see the module docstring)."""
    if bound == 0:
        return
    if bound < _UNIFORM_LIMIT:
        coder.encode_reverse(np.array([value], dtype=np.int32), _Uniform(bound + 1))
        return
    high, low = value >> 16, value & 0xFFFF
    low_size = 0x10000 if high < bound >> 16 else (bound & 0xFFFF) + 1
    if low_size > 1:
        coder.encode_reverse(np.array([low], dtype=np.int32), _Uniform(low_size))
    coder.encode_reverse(np.array([high], dtype=np.int32), _Uniform((bound >> 16) + 1))


def _pop_bounded(coder: constriction.stream.stack.AnsCoder, bound: int) -> int:
    if bound == 0:
        return 0
    if bound < _UNIFORM_LIMIT:
        return int(coder.decode(_Uniform(bound + 1), 1)[0])
    high = int(coder.decode(_Uniform((bound >> 16) + 1), 1)[0])
    low_size = 0x10000 if high < bound >> 16 else (bound & 0xFFFF) + 1
    low = int(coder.decode(_Uniform(low_size), 1)[0]) if low_size > 1 else 0
    return (high << 16) | low
