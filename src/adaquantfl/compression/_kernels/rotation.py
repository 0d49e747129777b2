"""Compiled kernels of the ``"eden"`` compressor: rotate, quantize, pack, and back.

Serial numba kernels over flat NumPy arrays; what they compute (the sign
stream, the rotation, the quantizers, the code layout, the per-block checks)
is specified in :mod:`adaquantfl.compression.rotation`, and
``tests/test_rotation.py`` re-implements it in NumPy and compares.

Notes
-----
Everything is done one block at a time in a scratch buffer of the block's
size (4096 float32 = 16 KiB by default, inside the L1 cache), so the
vector is read once and the message written once, and no buffer of the
vector's size is made. The Walsh-Hadamard transform does its first three
butterfly stages on 8 entries held in registers and the rest two stages at
a time (radix 4); each pass over the scratch is a loop without a
cross-iteration dependence, which LLVM vectorises. The random signs are XORed
into the float32 sign bits, 64 entries per SplitMix64 draw. Sums that decide
the bytes (the block's squared norm, the inner product that gives the scale)
are float64 with a fixed order, so every machine makes the same message.
Array indices are non-negative loop counters or slices: an index of unknown
sign makes numba add a wrap-around check per element that blocks
vectorisation (see :mod:`.fused`).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "MODE_BASE",
    "MODE_EXTRA",
    "MODE_RAW",
    "check_blocks",
    "decode_blocks",
    "encode_blocks",
    "flip_signs",
    "fwht",
]

_U = np.uint64
_F = np.float32
_GOLDEN = _U(0x9E3779B97F4A7C15)
_MIX1 = _U(0xBF58476D1CE4E5B9)
_MIX2 = _U(0x94D049BB133111EB)
#: Interleaved float64 partial sums of the squared norm (fixed order: lane j holds
#: entries j, j + LANES, ...; the lanes are added in order).
_LANES = 32
#: Per-block modes (2 bits each in the message).
MODE_BASE = 0  # the base number of rotations
MODE_EXTRA = 1  # one rotation more
MODE_RAW = 2  # the block's entries as float32

_jit = numba.njit(cache=True, nogil=True)


# --------------------------------------------------------------------------- rotation


@_jit
def _mix(z):  # type: ignore[no-untyped-def]
    z = (z ^ (z >> _U(30))) * _MIX1
    z = (z ^ (z >> _U(27))) * _MIX2
    return z ^ (z >> _U(31))


@_jit
def flip_signs(blk, n, seed, layer, base):  # type: ignore[no-untyped-def]
    """Multiply ``blk[:n]`` by the signs ``D_layer[base .. base + n - 1]`` (in place).

    Word ``w`` of layer ``l`` (< 8) is SplitMix64's output for the state
    ``seed + (8 w + l + 1) * golden``; entry ``i`` is negated when bit ``i % 64``
    of word ``i // 64`` is set. ``base`` and ``n`` are multiples of 64.
    """
    u = blk[:n].view(np.uint32)
    first = base >> 6
    for w in range(n >> 6):
        h = _mix(seed + _U(8 * (first + w) + layer + 1) * _GOLDEN)
        row = u[w * 64 : w * 64 + 64]
        for j in range(64):
            row[j] ^= np.uint32((h >> _U(j)) & _U(1)) << np.uint32(31)


@_jit
def fwht(blk, n):  # type: ignore[no-untyped-def]
    """Unnormalised Walsh-Hadamard transform of ``blk[:n]`` in place (``n`` = 2^k >= 8).

    The result is ``H blk`` with ``H[i, j] = (-1)^popcount(i & j)`` (Sylvester's
    ordering), computed in float32 in a fixed order of butterflies.
    """
    for i in range(0, n, 8):
        a0 = blk[i]
        a1 = blk[i + 1]
        a2 = blk[i + 2]
        a3 = blk[i + 3]
        a4 = blk[i + 4]
        a5 = blk[i + 5]
        a6 = blk[i + 6]
        a7 = blk[i + 7]
        b0 = a0 + a1
        b1 = a0 - a1
        b2 = a2 + a3
        b3 = a2 - a3
        b4 = a4 + a5
        b5 = a4 - a5
        b6 = a6 + a7
        b7 = a6 - a7
        c0 = b0 + b2
        c1 = b1 + b3
        c2 = b0 - b2
        c3 = b1 - b3
        c4 = b4 + b6
        c5 = b5 + b7
        c6 = b4 - b6
        c7 = b5 - b7
        blk[i] = c0 + c4
        blk[i + 1] = c1 + c5
        blk[i + 2] = c2 + c6
        blk[i + 3] = c3 + c7
        blk[i + 4] = c0 - c4
        blk[i + 5] = c1 - c5
        blk[i + 6] = c2 - c6
        blk[i + 7] = c3 - c7
    h = 8
    while 4 * h <= n:
        for i in range(0, n, 4 * h):
            p0 = blk[i : i + h]
            p1 = blk[i + h : i + 2 * h]
            p2 = blk[i + 2 * h : i + 3 * h]
            p3 = blk[i + 3 * h : i + 4 * h]
            for j in range(h):
                a0 = p0[j]
                a1 = p1[j]
                a2 = p2[j]
                a3 = p3[j]
                s0 = a0 + a1
                d0 = a0 - a1
                s1 = a2 + a3
                d1 = a2 - a3
                p0[j] = s0 + s1
                p1[j] = d0 + d1
                p2[j] = s0 - s1
                p3[j] = d0 - d1
        h *= 4
    if h < n:
        p0 = blk[:h]
        p1 = blk[h : 2 * h]
        for j in range(h):
            a0 = p0[j]
            a1 = p1[j]
            p0[j] = a0 + a1
            p1[j] = a0 - a1


@_jit
def _sum_squares(xs):  # type: ignore[no-untyped-def]
    acc = np.zeros(_LANES, np.float64)
    m = xs.size
    full = m - m % _LANES
    for i in range(0, full, _LANES):
        row = xs[i : i + _LANES]
        for j in range(_LANES):
            v = np.float64(row[j])
            acc[j] += v * v
    row = xs[full:]
    for j in range(row.size):
        v = np.float64(row[j])
        acc[j] += v * v
    total = 0.0
    for j in range(_LANES):
        total += acc[j]
    return total


# --------------------------------------------------------------------------- quantizers


@_jit
def _quantize_groups(y, n, glog, gval, codes):  # type: ignore[no-untyped-def]
    # One code per group: (index of the largest |y| in the group, the first on
    # ties) << 1 | (that entry < 0). The 64-entry pattern (group sizes 2^glog[g],
    # reconstruction magnitudes gval[g]) repeats n / 64 times.
    # Returns (sum_g gval[g] * |y_chosen|, sum_g gval[g]^2) in float64.
    ng = glog.size
    dot = 0.0
    sv2 = 0.0
    k = 0
    start = 0
    for _ in range(n >> 6):
        for g in range(ng):
            size = 1 << glog[g]
            best = 0
            top = abs(y[start])
            for j in range(1, size):
                a = abs(y[start + j])
                if a > top:
                    top = a
                    best = j
            neg = 1 if y[start + best] < 0 else 0
            codes[k] = np.uint32((best << 1) | neg)
            c = np.float64(gval[g])
            dot += c * np.float64(top)
            sv2 += c * c
            k += 1
            start += size
    return dot, sv2


@_jit
def _quantize_uniform(y, n, bits, inv, codes):  # type: ignore[no-untyped-def]
    # codes[i] = clamp(floor(y[i] * inv) + 2^(bits-1), 0, 2^bits - 1); the value
    # of code c is 2c - (2^bits - 1). Returns (<y, v>, ||v||^2) in float64, the
    # inner product summed in _LANES interleaved partial sums (a fixed order).
    half = _F(1 << (bits - 1))
    top = (1 << bits) - 1
    ftop = _F(top)
    acc = np.zeros(_LANES, np.float64)
    sv2 = 0
    for i in range(0, n, _LANES):
        row = y[i : i + _LANES]
        out = codes[i : i + _LANES]
        for j in range(_LANES):
            t = min(max(np.floor(row[j] * inv) + half, _F(0.0)), ftop)
            c = np.int32(t)
            out[j] = np.uint32(c)
            v = 2 * c - top
            acc[j] += np.float64(v) * np.float64(row[j])
            sv2 += v * v
    dot = 0.0
    for j in range(_LANES):
        dot += acc[j]
    return dot, np.float64(sv2)


@_jit
def _sign_words(y, n, codes):  # type: ignore[no-untyped-def]
    # 1-bit quantizer: 32 entries per code word, bit j set when y[j] >= 0 (code
    # 1 = +1, code 0 = -1). Returns (||y||_1, n) in float64 (lane sums).
    acc = np.zeros(32, np.float64)
    for w in range(n >> 5):
        row = y[w * 32 : w * 32 + 32]
        word = np.uint32(0)
        for j in range(32):
            word |= np.uint32(1 if row[j] >= 0 else 0) << np.uint32(j)
            acc[j] += abs(np.float64(row[j]))
        codes[w] = word
    dot = 0.0
    for j in range(32):
        dot += acc[j]
    return dot, np.float64(n)


@_jit
def _quantize(y, n, bits, inv, glog, gval, codes):  # type: ignore[no-untyped-def]
    if bits == 0:
        return _quantize_groups(y, n, glog, gval, codes)
    if bits == 1:
        return _sign_words(y, n, codes)
    return _quantize_uniform(y, n, bits, inv, codes)


# --------------------------------------------------------------------------- bits


@_jit
def _put(out, state, code, width):  # type: ignore[no-untyped-def]
    # Append `width` (<= 32) bits of `code` to the LSB-first stream held in the
    # uint32 words `out` (little-endian, so its bytes are the stream's bytes).
    # state = (accumulator, bits in it, next word).
    acc, nacc, w = state
    acc |= _U(code) << _U(nacc)
    nacc += width
    if nacc >= 32:
        out[w] = np.uint32(acc & _U(0xFFFFFFFF))
        acc >>= _U(32)
        nacc -= 32
        w += 1
    return acc, nacc, w


@_jit
def _put_block(out, state, codes, n, bits, glog):  # type: ignore[no-untyped-def]
    # The writer's state is kept in locals here: passing it through _put for
    # every code measured 7x slower.
    acc, nacc, w = state
    mask32 = _U(0xFFFFFFFF)
    if bits == 1:
        for k in range(n >> 5):
            acc |= _U(codes[k]) << _U(nacc)
            out[w] = np.uint32(acc & mask32)
            acc >>= _U(32)
            w += 1
    elif bits > 1:
        # Eight codes of b <= 8 bits make 8b bits: written as a 32-bit half and the rest.
        rest = 8 * bits - 32 if bits > 4 else 0
        first = 8 * bits - rest
        for i in range(0, n, 8):
            word = _U(0)
            for j in range(8):
                word |= _U(codes[i + j]) << _U(bits * j)
            acc |= (word & mask32) << _U(nacc)
            nacc += first
            if nacc >= 32:
                out[w] = np.uint32(acc & mask32)
                acc >>= _U(32)
                nacc -= 32
                w += 1
            if rest:
                acc |= (word >> _U(32)) << _U(nacc)
                nacc += rest
                if nacc >= 32:
                    out[w] = np.uint32(acc & mask32)
                    acc >>= _U(32)
                    nacc -= 32
                    w += 1
    else:
        ng = glog.size
        k = 0
        for _ in range(n >> 6):
            for g in range(ng):
                acc |= _U(codes[k]) << _U(nacc)
                nacc += glog[g] + 1
                if nacc >= 32:
                    out[w] = np.uint32(acc & mask32)
                    acc >>= _U(32)
                    nacc -= 32
                    w += 1
                k += 1
    return acc, nacc, w


@_jit
def _seek(words, position):  # type: ignore[no-untyped-def]
    # A reader positioned at stream bit `position` of the uint32 words.
    w = position >> 5
    r = position & 31
    return _U(words[w]) >> _U(r), 32 - r, w + 1


@_jit
def _get(words, state, width):  # type: ignore[no-untyped-def]
    # Read `width` (<= 32) bits; `words` must have a spare zero word at the end.
    acc, nacc, w = state
    if nacc < width:
        acc |= _U(words[w]) << _U(nacc)
        nacc += 32
        w += 1
    code = acc & ((_U(1) << _U(width)) - _U(1))
    return code, (acc >> _U(width), nacc - width, w)


@_jit
def _zero_bits(words, position, count):  # type: ignore[no-untyped-def]
    # True if stream bits position .. position + count - 1 are all 0.
    state = _seek(words, position)
    while count > 0:
        width = min(count, 32)
        code, state = _get(words, state, width)
        if code != 0:
            return False
        count -= width
    return True


@_jit
def _padded_size(m, block):  # type: ignore[no-untyped-def]
    # A block of m entries is transformed at size n: the block size, or for a
    # shorter last block the next power of two >= max(m, 64) (0 for no entries).
    if m == block or m == 0:
        return m
    n = 64
    while n < m:
        n *= 2
    return n


@_jit
def rotations(n):  # type: ignore[no-untyped-def]
    """Randomized Hadamard transforms of a block of ``n`` (padded) entries.

    Two make any block of 1024 or more close enough to Gaussian that EDEN's
    scale leaves no measurable bias; smaller blocks need three (256-512) or
    four (64-128); see :mod:`adaquantfl.compression.rotation`.
    """
    if n >= 1024:
        return 2
    if n >= 256:
        return 3
    return 4


@_jit
def _block_bits(n, bits, pattern_bits):  # type: ignore[no-untyped-def]
    if bits > 0:
        return n * bits
    return (n >> 6) * pattern_bits


# --------------------------------------------------------------------------- encode


@_jit
def _norm(n, layers):  # type: ignore[no-untyped-def]
    # ||H D ... H D x|| = n^(layers / 2) ||x|| for `layers` unnormalised transforms.
    norm = np.float64(n) ** (layers // 2)
    if layers % 2:
        norm *= np.sqrt(np.float64(n))
    return norm


@_jit
def _scale_and_omega(dot_un, sv2, norm, nx, max_scale):  # type: ignore[no-untyped-def]
    # EDEN's scale (float32) and the realized omega it gives, or inf if the
    # scale is not a normal float below max_scale.
    dot = dot_un / norm  # <R x, v> for the orthonormal rotation R
    if not dot > 0.0:
        return _F(0.0), np.inf
    scale = _F(nx / dot)
    s = np.float64(scale)
    if not (s >= 2.0**-126 and s < max_scale):
        return scale, np.inf
    # ||R^T (s v) - x||^2 = s^2 ||v||^2 - 2 s <v, R x> + ||x||^2
    return scale, (s * s * sv2 - 2.0 * s * dot + nx) / nx


@_jit
def _max_abs(y, n):  # type: ignore[no-untyped-def]
    top = _F(0.0)
    for i in range(n):
        top = max(top, abs(y[i]))
    return top


@_jit
def _try_rotation(y, n, layers, nx, bits, delta, glog, gval, omega_max, max_scale, codes):  # type: ignore[no-untyped-def]
    # Quantize the rotated block y (unnormalised: y = H D_l ... H D_1 x for
    # `layers` rotations); return (ok, scale, realized omega).
    norm = _norm(n, layers)
    inv = _F(0.0)
    if bits > 1:
        # 1 / (step * the entries' RMS); the RMS of y is norm * ||x|| / sqrt(n).
        inv = _F(np.sqrt(np.float64(n)) / (np.sqrt(nx) * norm * delta))
    dot_un, sv2 = _quantize(y, n, bits, inv, glog, gval, codes)
    scale, omega = _scale_and_omega(dot_un, sv2, norm, nx, max_scale)
    if omega > omega_max and bits > 1:
        # The Gaussian-optimal step clips the largest entries; a block with an
        # outlier errs less with the step that clips nothing.
        top = _max_abs(y, n)
        if top > 0:
            inv = _F((1 << (bits - 1)) / top)
            dot_un, sv2 = _quantize_uniform(y, n, bits, inv, codes)
            scale, omega = _scale_and_omega(dot_un, sv2, norm, nx, max_scale)
    return omega <= omega_max, scale, omega


@_jit
def encode_blocks(  # type: ignore[no-untyped-def]
    x,
    block,
    seed,
    bits,
    delta,
    glog,
    gval,
    pattern_bits,
    omega_max,
    max_scale,
    scales,
    modes,
    codes_out,
    raw_out,
):
    """Rotate, quantize and pack every block of ``x``.

    Writes each block's scale and mode into ``scales`` and ``modes``, the code
    stream into the uint32 words ``codes_out`` (zeroed, from bit 0) and the
    entries of raw blocks into ``raw_out``. ``bits`` is 0 for the grouped
    sub-bit quantizer (``glog``, ``gval``, ``pattern_bits`` per 64 entries),
    1 for signs, 2..8 for the uniform quantizer of step ``delta``.
    Returns ``(code bits, raw entries, worst realized omega, status)``: status 0,
    or (with the outputs incomplete) 1 if ``x`` holds NaN or inf, 2 if the
    raw entries do not fit ``raw_out``.
    """
    d = x.size
    nb = scales.size
    scratch = np.empty(block, np.float32)
    codes = np.empty(block, np.uint32)
    state = (_U(0), 0, 0)
    raw = 0
    worst = 0.0
    for b in range(nb):
        lo = b * block
        m = min(block, d - lo)
        n = _padded_size(m, block)
        xs = x[lo : lo + m]
        nx = _sum_squares(xs)
        if not np.isfinite(nx):
            return 0, 0, worst, 1
        if nx == 0.0:
            scales[b] = 0.0
            modes[b] = MODE_BASE
            for _ in range(_block_bits(n, bits, pattern_bits) >> 5):
                state = _put(codes_out, state, 0, 32)
            rest = _block_bits(n, bits, pattern_bits) & 31
            if rest:
                state = _put(codes_out, state, 0, rest)
            continue
        scratch[:m] = xs
        scratch[m:n] = 0.0
        base = rotations(n)
        for layer in range(base):
            flip_signs(scratch, n, seed, layer, lo)
            fwht(scratch, n)
        ok, scale, omega = _try_rotation(
            scratch, n, base, nx, bits, delta, glog, gval, omega_max, max_scale, codes
        )
        mode = MODE_BASE
        if not ok:
            # One more rotation of the same coordinates (the codes are overwritten).
            flip_signs(scratch, n, seed, base, lo)
            fwht(scratch, n)
            ok, scale, omega = _try_rotation(
                scratch, n, base + 1, nx, bits, delta, glog, gval, omega_max, max_scale, codes
            )
            mode = MODE_EXTRA
        if ok:
            scales[b] = scale
            modes[b] = mode
            state = _put_block(codes_out, state, codes, n, bits, glog)
            worst = max(worst, omega)
        else:
            if raw + m > raw_out.size:
                return 0, 0, worst, 2
            scales[b] = 0.0
            modes[b] = MODE_RAW
            raw_out[raw : raw + m] = xs
            raw += m
    acc, nacc, w = state
    if nacc > 0:
        codes_out[w] = np.uint32(acc & _U(0xFFFFFFFF))
    return w * 32 + nacc, raw, worst, 0


# --------------------------------------------------------------------------- decode


@_jit
def check_blocks(words, total, d, block, bits, pattern_bits, scales, modes):  # type: ignore[no-untyped-def]
    """Check the code stream (``total`` bits in the uint32 ``words``) against the blocks.

    Returns ``(status, block)``: status 0 if every zero-scale block that is
    not raw has mode 0 and zero codes and the padding bits up to the next
    byte are 0; 1 a zero-scale block with a non-zero code, 2 a zero-scale block
    with mode 1, 4 a padding bit. (The stream's length is checked by the caller.)
    """
    nb = scales.size
    position = 0
    for b in range(nb):
        if modes[b] == MODE_RAW:
            continue
        lo = b * block
        n = _padded_size(min(block, d - lo), block)
        nbits = _block_bits(n, bits, pattern_bits)
        if scales[b] == 0:
            if modes[b] != MODE_BASE:
                return 2, b
            if not _zero_bits(words, position, nbits):
                return 1, b
        position += nbits
    if not _zero_bits(words, total, (8 - total % 8) % 8):
        return 4, -1
    return 0, -1


@_jit
def decode_blocks(  # type: ignore[no-untyped-def]
    words, raw, seed, block, bits, glog, gval, pattern_bits, scales, modes, out
):
    """Decode every block into ``out`` (after :func:`check_blocks` passed).

    Block ``b`` with scale ``s`` and codes ``v`` becomes the first ``m`` entries
    of ``D_1 H ... D_k H (s v) / n^(k/2)`` with ``k`` = :func:`rotations` (mode 0)
    or one more (mode 1); raw blocks are copied from ``raw`` and zero-scale
    blocks are zeros.
    """
    d = out.size
    nb = scales.size
    scratch = np.empty(block, np.float32)
    top = (1 << bits) - 1 if bits > 0 else 0
    ng = glog.size
    r = 0
    position = 0
    for b in range(nb):
        lo = b * block
        m = min(block, d - lo)
        n = _padded_size(m, block)
        mode = modes[b]
        if mode == MODE_RAW:
            out[lo : lo + m] = raw[r : r + m]
            r += m
            continue
        start = position
        position += _block_bits(n, bits, pattern_bits)
        if scales[b] == 0:
            out[lo : lo + m] = 0.0
            continue
        layers = rotations(n) + (0 if mode == MODE_BASE else 1)
        a = scales[b] * _F(1.0 / _norm(n, layers))
        acc, nacc, w = _seek(words, start)
        if bits == 0:
            scratch[:n] = 0.0
            pos = 0
            for _ in range(n >> 6):
                for g in range(ng):
                    width = glog[g] + 1
                    if nacc < width:
                        acc |= _U(words[w]) << _U(nacc)
                        nacc += 32
                        w += 1
                    c = np.int64(acc & ((_U(1) << _U(width)) - _U(1)))
                    acc >>= _U(width)
                    nacc -= width
                    v = a * gval[g]
                    scratch[pos + (c >> 1)] = -v if c & 1 else v
                    pos += 1 << glog[g]
        elif bits == 1:
            # Whole words: the stream is read 32 bits at a time from bit `start`.
            for k in range(n >> 5):
                acc |= _U(words[w]) << _U(nacc)
                w += 1
                code = acc & _U(0xFFFFFFFF)
                acc >>= _U(32)
                row = scratch[k * 32 : k * 32 + 32]
                for j in range(32):
                    row[j] = a if (code >> _U(j)) & _U(1) else -a
        else:
            mask = _U(top)
            width = 4 * bits
            wmask = (_U(1) << _U(width)) - _U(1)
            for i in range(0, n, 4):
                if nacc < width:
                    acc |= _U(words[w]) << _U(nacc)
                    nacc += 32
                    w += 1
                word = acc & wmask
                acc >>= _U(width)
                nacc -= width
                for j in range(4):
                    c = np.int64((word >> _U(bits * j)) & mask)
                    scratch[i + j] = a * _F(2 * c - top)
        for layer in range(layers - 1, -1, -1):
            fwht(scratch, n)
            flip_signs(scratch, n, seed, layer, lo)
        out[lo : lo + m] = scratch[:m]
