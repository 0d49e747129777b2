"""Compiled kernels behind :mod:`adaquantfl.compression.qsgd` and the packed codec.

Every function here is a serial numba kernel over flat NumPy arrays; the
definitions they implement (norms, rounding stream, packed layout) are stated
in the docstrings of :mod:`adaquantfl.compression.qsgd` and :mod:`adaquantfl.compression.codec`,
and ``tests/reference.py`` re-implements them element by element.

Notes
-----
Work is done in blocks of :data:`BLOCK` entries. A block is first turned into
codes ``(xi << 1) | sign`` in a small scratch array (one loop with no
cross-iteration dependence, which LLVM vectorises), and the codes are then
packed by :mod:`adaquantfl.compression._kernels.bitpack` straight into the message buffer; the
scratch holds bytes for ``w <= 8`` (``s <= 127``), two-byte codes for
``w <= 16`` and four-byte codes above. Decoding unpacks a block into the
scratch and dequantizes it in a second vectorised loop.

Array indices are always slices or non-negative loop counters: indexing with
an offset of unknown sign makes numba emit a wrap-around check per element,
which blocks vectorisation (a 7x slowdown measured on the quantize loop).
Every kernel is compiled lazily on first use and cached on disk
(``cache=True``). Numba keys a cached kernel on its own source file only: after
editing :mod:`adaquantfl.compression._kernels.bitpack` or
:mod:`adaquantfl.compression._kernels.measure` (whose sums are compiled in here)
in a source checkout, delete the caches (``make clean-cache``) or the kernels
here keep the old code compiled in.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from adaquantfl.compression._kernels.bitpack import PACK_SLACK, pack, unpack
from adaquantfl.compression._kernels.measure import (
    BLOCK,
    LANES,
    block_error_squares,
    block_squares,
    compensated_add,
)

__all__ = [
    "BLOCK",
    "LANES",
    "PACK_SLACK",
    "code_dtype",
    "codes_from_levels",
    "decode_packed_into",
    "decode_packed_to_codes",
    "dequantize_codes_into",
    "dequantize_into",
    "encode_packed",
    "encode_packed_measured",
    "levels_from_codes",
    "max_level",
    "norms_l2",
    "norms_max",
    "pack_codes",
    "pack_quantized",
    "quantize_codes",
    "quantize_into",
    "unpack_codes",
]

_U = np.uint64
_F = np.float32
_GOLDEN = _U(0x9E3779B97F4A7C15)
_MIX1 = _U(0xBF58476D1CE4E5B9)
_MIX2 = _U(0x94D049BB133111EB)
_INV24 = _F(2.0**-24)
# BLOCK (entries per block: the code scratch, <= 16 KiB, stays in the L1
# cache) and LANES (interleaved float64 partial sums of the L2 norm, see
# ``adaquantfl.compression.qsgd``) are shared with .measure, whose blocked
# sums the measuring encoders below follow block by block.

_jit = numba.njit(cache=True, nogil=True)


# --------------------------------------------------------------------------- norms


@_jit
def norms_l2(x, bucket, out):  # type: ignore[no-untyped-def]
    """L2 norm of each bucket of ``x`` into ``out`` (float32; inf/NaN flag bad input)."""
    acc = np.zeros(LANES, np.float64)
    d = x.size
    for k in range(out.size):
        lo = min(k * bucket, d)
        hi = min(lo + bucket, d)
        out[k] = np.float32(np.sqrt(block_squares(x[lo:hi], acc)))


@_jit
def norms_max(x, bucket, out):  # type: ignore[no-untyped-def]
    """Max-norm of each bucket into ``out``; NaN in ``out`` where a bucket holds NaN or inf."""
    top = np.zeros(LANES, np.float32)
    chk = np.zeros(LANES, np.float32)
    d = x.size
    for k in range(out.size):
        lo = min(k * bucket, d)
        hi = min(lo + bucket, d)
        xs = x[lo:hi]
        top[:] = 0.0
        chk[:] = 0.0
        full = xs.size - xs.size % LANES
        for i in range(0, full, LANES):
            row = xs[i : i + LANES]
            for j in range(LANES):
                a = abs(row[j])
                top[j] = max(top[j], a)
                chk[j] += row[j] - row[j]  # 0, or NaN for an inf or NaN entry
        row = xs[full:]
        for j in range(row.size):
            a = abs(row[j])
            top[j] = max(top[j], a)
            chk[j] += row[j] - row[j]
        out[k] = top.max() + chk.sum()


# --------------------------------------------------------------------------- quantize


@_jit
def _codes(xs, n, sf, counter, codes):  # type: ignore[no-untyped-def]
    # codes[j] = (xi << 1) | sign for entries xs (one bucket, norm n > 0);
    # `counter` is SplitMix64's state for the first entry. The float steps are
    # the ones in the quantize module docstring, in that order.
    one = _F(1.0)
    zero = _F(0.0)
    for j in range(xs.size):
        v = xs[j]
        r = min((abs(v) / n) * sf, sf)
        lo = _F(np.int32(r))
        z = counter
        counter += _GOLDEN
        z = (z ^ (z >> _U(30))) * _MIX1
        z = (z ^ (z >> _U(27))) * _MIX2
        # Top 24 bits of z ^ (z >> 31) are the top 24 bits of z.
        u = _F(np.int32(z >> _U(40))) * _INV24
        xi = np.int32(lo + (one if u < r - lo else zero))
        codes[j] = xi + xi + (1 if (v < zero and xi > 0) else 0)


@_jit
def _block_codes(x, norms, bucket, sf, key, start, stop, codes):  # type: ignore[no-untyped-def]
    i = start
    while i < stop:
        k = i // bucket
        end = min(stop, (k + 1) * bucket)
        n = norms[k]
        seg = codes[i - start : end - start]
        if n > 0:
            _codes(x[i:end], n, sf, key + _U(i + 1) * _GOLDEN, seg)
        else:
            seg[:] = 0
        i = end


@_jit
def quantize_into(x, norms, bucket, levels, key, mags, signs):  # type: ignore[no-untyped-def]
    """QSGD level indices and signs of ``x`` into ``mags`` (int32) and ``signs`` (bool)."""
    codes = np.empty(BLOCK, np.int32)
    sf = _F(levels)
    d = x.size
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        _block_codes(x, norms, bucket, sf, key, start, stop, codes)
        c = codes[: stop - start]
        ms = mags[start:stop]
        ss = signs[start:stop]
        for j in range(c.size):
            ms[j] = c[j] >> 1
            ss[j] = (c[j] & 1) != 0


def _code_scratch(w: int) -> np.ndarray:
    return np.zeros(BLOCK, code_dtype(w))


@_jit
def _encode_packed(x, norms, bucket, levels, key, w, out, codes):  # type: ignore[no-untyped-def]
    sf = _F(levels)
    d = x.size
    pos = 0
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        _block_codes(x, norms, bucket, sf, key, start, stop, codes)
        m = stop - start
        codes[m : m + 8] = 0  # the last group's missing entries pack to zero bits
        pos = pack(codes, m, w, out, pos)
    return pos


def encode_packed(
    x: np.ndarray,
    norms: np.ndarray,
    bucket: int,
    levels: int,
    key: int,
    w: int,
    out: np.ndarray,
) -> None:
    """Quantize ``x`` and write its packed body into ``out`` (with :data:`PACK_SLACK` spare)."""
    _encode_packed(x, norms, bucket, levels, _U(key), w, out, _code_scratch(w))


# --------------------------------------------------------------------------- arrays of codes


@_jit
def _sent_block(codes, steps, bucket, start, stop, scale, ys):  # type: ignore[no-untyped-def]
    # ys[j] = scale * (+-xi * step) for entries start + j (codes[j] their codes).
    i = start
    while i < stop:
        k = i // bucket
        end = min(stop, (k + 1) * bucket)
        step = steps[k]
        c = codes[i - start : end - start]
        o = ys[i - start : end - start]
        for j in range(c.size):
            code = np.int32(c[j])
            y = _F(code >> 1) * step
            o[j] = (-y if (code & 1) else y) * scale
        i = end


def code_dtype(w: int) -> type[np.unsignedinteger[Any]]:
    """The narrowest unsigned type that holds a code of ``w`` bits (1, 2 or 4 bytes)."""
    return np.uint8 if w <= 8 else np.uint16 if w <= 16 else np.uint32


@_jit
def dequantize_codes_into(codes, steps, bucket, out):  # type: ignore[no-untyped-def]
    """``out_i = +-(xi_i * step_k)`` from level codes (as :func:`dequantize_into`)."""
    d = codes.size
    one = _F(1.0)
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        _sent_block(codes[start:stop], steps, bucket, start, stop, one, out[start:stop])


@_jit
def codes_from_levels(mags, signs, levels, codes):  # type: ignore[no-untyped-def]
    """``codes = (mags << 1) | signs``; True if an index is outside ``[0, levels]`` or a
    zero index has its sign set."""
    bad = False
    for i in range(mags.size):
        xi = mags[i]
        sg = signs[i]
        bad |= (xi < 0) | (xi > levels) | (sg & (xi == 0))
        codes[i] = xi + xi + sg
    return bad


@_jit
def levels_from_codes(codes, mags, signs):  # type: ignore[no-untyped-def]
    """Level indices (int32) and signs (bool) of level codes."""
    for i in range(codes.size):
        c = codes[i]
        mags[i] = c >> 1
        signs[i] = (c & 1) != 0


@_jit
def max_level(codes):  # type: ignore[no-untyped-def]
    """The largest level index ``codes >> 1`` (0 for no codes)."""
    top = np.int64(0)
    for i in range(codes.size):
        code = np.int64(codes[i])
        if code > top:
            top = code
    return top >> 1


@_jit
def _pack_codes(codes, w, out, scratch):  # type: ignore[no-untyped-def]
    d = codes.size
    pos = 0
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        m = stop - start
        scratch[:m] = codes[start:stop]
        scratch[m : m + 8] = 0
        pos = pack(scratch, m, w, out, pos)


def pack_codes(codes: np.ndarray, w: int, out: np.ndarray) -> None:
    """Pack valid level codes as a packed body into ``out`` (with :data:`PACK_SLACK` spare)."""
    _pack_codes(codes, w, out, _code_scratch(w))


@_jit
def _unpack_codes(buf, numel, levels, w, codes, scratch):  # type: ignore[no-untyped-def]
    bad = False
    top = levels + levels + 1
    for start in range(0, numel, BLOCK):
        stop = min(start + BLOCK, numel)
        unpack(buf, start, stop - start, w, scratch)
        c = codes[start:stop]
        for j in range(c.size):
            code = np.int32(scratch[j])
            bad |= (code > top) | (code == 1)
            c[j] = code
    return bad


def unpack_codes(buf: np.ndarray, numel: int, levels: int, w: int, codes: np.ndarray) -> bool:
    """Unpack a packed body into level codes; True if a code is invalid."""
    return bool(_unpack_codes(buf, numel, levels, w, codes, _code_scratch(w)))


# --------------------------------------------------------------------------- measuring encoders
#
# A client sends C(v) and reports ||v||^2 and ||scale C(v) - v||^2 (and, under
# error feedback, keeps v - scale C(v)). These encoders compute, block by
# block, what the server will decode (the dequantization of the decoders
# below, then times `scale` in float32, as torch's `mul_` does) and measure it
# against the input while its block is in the cache, in .measure's fixed order.


@_jit
def _measure_block(x, start, stop, ys, residual, keep, acc, sums):  # type: ignore[no-untyped-def]
    # sums: (||v||^2, its carry, error^2, its carry); the residual may be x itself.
    xs = x[start:stop]
    got = ys[: stop - start]
    sums[0], sums[1] = compensated_add(sums[0], sums[1], block_squares(xs, acc))
    sums[2], sums[3] = compensated_add(sums[2], sums[3], block_error_squares(xs, got, acc))
    if keep:
        r = residual[start:stop]
        for j in range(r.size):
            r[j] = xs[j] - got[j]


@_jit
def _encode_packed_measured(x, norms, steps, bucket, levels, key, w, out, codes,  # type: ignore[no-untyped-def]
                            scale, residual, keep):  # fmt: skip
    sf = _F(levels)
    d = x.size
    pos = 0
    ys = np.empty(BLOCK, np.float32)
    acc = np.zeros(LANES, np.float64)
    sums = np.zeros(4, np.float64)
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        _block_codes(x, norms, bucket, sf, key, start, stop, codes)
        _sent_block(codes, steps, bucket, start, stop, scale, ys)
        _measure_block(x, start, stop, ys, residual, keep, acc, sums)
        m = stop - start
        codes[m : m + 8] = 0
        pos = pack(codes, m, w, out, pos)
    return sums[0] + sums[1], sums[2] + sums[3]


_NO_RESIDUAL = np.zeros(0, np.float32)


def encode_packed_measured(
    x: np.ndarray,
    norms: np.ndarray,
    steps: np.ndarray,
    bucket: int,
    levels: int,
    key: int,
    w: int,
    out: np.ndarray,
    scale: float,
    residual: np.ndarray | None,
) -> tuple[float, float]:
    """:func:`encode_packed`, measuring: ``(sum x^2, sum (scale C(x) - x)^2)``.

    ``steps`` are the buckets' ``norm / s``; ``residual`` (``x`` itself
    allowed), if given, receives ``x - scale C(x)`` in float32.
    """
    keep = residual is not None
    norm_sq, error_sq = _encode_packed_measured(
        x, norms, steps, bucket, levels, _U(key), w, out, _code_scratch(w), _F(scale),
        residual if keep else _NO_RESIDUAL, keep,
    )  # fmt: skip
    return float(norm_sq), float(error_sq)


@_jit
def _quantize_codes(x, norms, steps, bucket, levels, key, codes, scale, residual, keep,  # type: ignore[no-untyped-def]
                    measure):  # fmt: skip
    sf = _F(levels)
    d = x.size
    ys = np.empty(BLOCK, np.float32)
    acc = np.zeros(LANES, np.float64)
    sums = np.zeros(4, np.float64)
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        block = codes[start:stop]
        _block_codes(x, norms, bucket, sf, key, start, stop, block)
        if measure:
            _sent_block(block, steps, bucket, start, stop, scale, ys)
            _measure_block(x, start, stop, ys, residual, keep, acc, sums)
    return sums[0] + sums[1], sums[2] + sums[3]


def quantize_codes(
    x: np.ndarray,
    norms: np.ndarray,
    bucket: int,
    levels: int,
    key: int,
    codes: np.ndarray,
    *,
    steps: np.ndarray | None = None,
    scale: float = 1.0,
    residual: np.ndarray | None = None,
) -> tuple[float, float]:
    """QSGD level codes ``(xi << 1) | sign`` of ``x`` into ``codes`` (one per entry).

    With ``steps`` (the buckets' ``norm / s``), also measures as
    :func:`encode_packed_measured` and returns its two sums; else ``(0, 0)``.
    """
    keep = residual is not None
    measure = steps is not None
    norm_sq, error_sq = _quantize_codes(
        x, norms, steps if measure else norms, bucket, levels, _U(key), codes, _F(scale),
        residual if keep else _NO_RESIDUAL, keep, measure,
    )  # fmt: skip
    return float(norm_sq), float(error_sq)


@_jit
def _pack_quantized(mags, signs, levels, w, out, codes):  # type: ignore[no-untyped-def]
    d = mags.size
    pos = 0
    bad = False
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        ms = mags[start:stop]
        ss = signs[start:stop]
        m = stop - start
        for j in range(m):
            xi = ms[j]
            sg = ss[j]
            bad |= (xi < 0) | (xi > levels) | (sg & (xi == 0))
            codes[j] = xi + xi + sg
        codes[m : m + 8] = 0
        pos = pack(codes, m, w, out, pos)
    return bad


def pack_quantized(
    mags: np.ndarray, signs: np.ndarray, levels: int, w: int, out: np.ndarray
) -> bool:
    """Pack level indices and signs into ``out``; True if any entry is out of range."""
    return bool(_pack_quantized(mags, signs, levels, w, out, _code_scratch(w)))


# --------------------------------------------------------------------------- unpacking


@_jit
def _decode_packed_into(buf, numel, levels, w, steps, bucket, out, codes):  # type: ignore[no-untyped-def]
    bad = False
    top = levels + levels + 1
    for start in range(0, numel, BLOCK):
        stop = min(start + BLOCK, numel)
        unpack(buf, start, stop - start, w, codes)
        i = start
        while i < stop:
            k = i // bucket
            end = min(stop, (k + 1) * bucket)
            step = steps[k]
            c = codes[i - start : end - start]
            o = out[i:end]
            for j in range(c.size):
                code = np.int32(c[j])
                # A code above 2s+1 has xi > s; code 1 is a sign on a zero level.
                bad |= (code > top) | (code == 1)
                y = _F(code >> 1) * step
                o[j] = -y if (code & 1) else y
            i = end
    return bad


def decode_packed_into(
    buf: np.ndarray,
    numel: int,
    levels: int,
    w: int,
    steps: np.ndarray,
    bucket: int,
    out: np.ndarray,
) -> bool:
    """Unpack and dequantize a packed body into ``out``; True if a code is invalid.

    ``buf`` starts at the body and extends at least 4 bytes past it.
    """
    return bool(_decode_packed_into(buf, numel, levels, w, steps, bucket, out, _code_scratch(w)))


@_jit
def _decode_packed_to_codes(buf, numel, levels, w, mags, signs, codes):  # type: ignore[no-untyped-def]
    bad = False
    top = levels + levels + 1
    for start in range(0, numel, BLOCK):
        stop = min(start + BLOCK, numel)
        unpack(buf, start, stop - start, w, codes)
        c = codes[: stop - start]
        ms = mags[start:stop]
        ss = signs[start:stop]
        for j in range(c.size):
            code = np.int32(c[j])
            bad |= (code > top) | (code == 1)
            ms[j] = code >> 1
            ss[j] = (code & 1) != 0
    return bad


def decode_packed_to_codes(
    buf: np.ndarray, numel: int, levels: int, w: int, mags: np.ndarray, signs: np.ndarray
) -> bool:
    """Unpack a packed body into level indices and signs; True if a code is invalid."""
    return bool(_decode_packed_to_codes(buf, numel, levels, w, mags, signs, _code_scratch(w)))


@_jit
def dequantize_into(mags, signs, steps, bucket, out):  # type: ignore[no-untyped-def]
    """``out_i = +-(xi_i * step_k)`` for the bucket ``k`` of entry ``i`` (float32)."""
    d = mags.size
    i = 0
    while i < d:
        k = i // bucket
        end = min(d, (k + 1) * bucket)
        step = steps[k]
        ms = mags[i:end]
        ss = signs[i:end]
        o = out[i:end]
        for j in range(ms.size):
            y = _F(ms[j]) * step
            o[j] = -y if ss[j] else y
        i = end
