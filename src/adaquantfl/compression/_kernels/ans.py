"""The entropy body's ANS coder as numba kernels, word for word constriction's ``AnsCoder``.

The body of an entropy message (layout in :mod:`adaquantfl.compression.entropy`)
is defined as the compressed data of constriction's ``stack.AnsCoder``
(version 0.5: 32-bit words, a 64-bit state, 24-bit probabilities) coding the
symbols with ``model.Uniform`` and ``model.Categorical(counts, perfect=False)``.
These kernels do the same arithmetic on whole arrays of level codes
``(xi << 1) | sign`` (:mod:`.fused`), so the bytes are the same; the tests
check them against constriction itself. They exist because constriction's
Python interface needs its symbols as int32 arrays in the coder's order (a
copy of the whole vector per part, several times its memory at 10^8
entries) and decodes a categorical symbol by binary search through Python's
model object (20-30 ns a symbol here, where this is a few).

The coder (constriction's ``src/stream/stack.rs``): a state ``x`` (64 bits)
and a stack of words. Encoding a symbol of probability ``p / 2**24`` whose
interval starts at ``c``: if ``x >> 40 >= p``, push the low word of ``x`` and
shift it out; then ``x = ((x // p) << 24) | (c + x % p)``. The compressed
data is the stack followed by the state's nonzero words, low word first.
Decoding reads the state from the end (its last word is never 0), then per
symbol ``q = x mod 2**24``, finds the symbol whose interval holds ``q``, sets
``x = (x >> 24) * p + q - c`` and, if ``x < 2**32`` and words remain, pops
one: ``x = (x << 32) | word``. The coder is empty when ``x == 0``.

Models (constriction's ``src/stream/model``): ``Uniform(n)`` gives every
symbol ``p = 2**24 // n`` and the last one the rest; ``Categorical(counts,
perfect=False)`` over ``n`` symbols has the interval starts
``cdf[i] = floor(C_i * ((2**24 - n) / total)) + i`` with ``C_i`` the float64
sum of the counts before ``i`` (exact: counts are integers below 2**53) and
``cdf[n] = 2**24``.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "BAD_COUNTS",
    "COUNT",
    "ENCODE",
    "LEVEL_TOO_LARGE",
    "MALFORMED",
    "NOT_EMPTY",
    "NO_ROOM",
    "VERIFY",
    "categorical_cdf",
    "decode",
    "encode",
    "histogram",
]

_U = np.uint64
_jit = numba.njit(cache=True, nogil=True)
# The per-symbol steps are inlined by numba itself: as calls (LLVM does not
# inline them here) the coder ran 10-30x slower.
_step = numba.njit(cache=True, nogil=True, inline="always")

_PRECISION = _U(24)
_ONE = _U(1 << 24)
_QMASK = _U((1 << 24) - 1)
_FLUSH = _U(64 - 24)  # push a word when x >> 40 >= p
_WORD = _U(32)
_LOW = _U(0xFFFFFFFF)
_REFILL = _U(1 << 32)
_SIGN_SHIFT = _U(23)  # Uniform(2): p = 2**23
_LOOKUP_BITS = 12  # decoding table: one entry per 2**12 quantiles

#: Modes of :func:`encode`: write the words, compare them with given words, or count them.
ENCODE, VERIFY, COUNT = 0, 1, 2

#: Statuses of :func:`decode`.
MALFORMED = 1  # the last word is 0: no coder ends so
NO_ROOM = 2  # the counts leave nothing for the largest high part
BAD_COUNTS = 3  # the decoded high parts disagree with the counts
LEVEL_TOO_LARGE = 4  # a level index above the levels
NOT_EMPTY = 5  # coded data continues after the last symbol


# --------------------------------------------------------------------------- models


@_jit
def categorical_cdf(counts):  # type: ignore[no-untyped-def]
    """``Categorical(counts, perfect=False)``'s interval starts, with ``2**24`` appended."""
    n = counts.size
    total = 0.0
    for i in range(n):
        total += np.float64(counts[i])
    scale = np.float64((1 << 24) - n) / total
    cdf = np.empty(n + 1, np.uint64)
    cumulative = 0.0
    for i in range(n):
        cdf[i] = _U(np.int64(cumulative * scale) + i)
        cumulative += np.float64(counts[i])
    cdf[n] = _ONE
    return cdf


@_step
def _uniform(symbol, size):  # type: ignore[no-untyped-def]
    # (start, p) of `symbol` under Uniform(size).
    per_bin = _ONE // _U(size)
    start = _U(symbol) * per_bin
    if symbol < size - 1:
        return start, per_bin
    return start, _ONE - start


@_jit
def histogram(codes, shift, top):  # type: ignore[no-untyped-def]
    """Counts of ``(codes >> 1) >> shift`` (all at most ``top``), int64."""
    out = np.zeros(top + 1, np.int64)
    for i in range(codes.size):
        out[(codes[i] >> 1) >> shift] += 1
    return out


# --------------------------------------------------------------------------- encoding


@_step
def _emit(word, out, ref, nw, mode, same):  # type: ignore[no-untyped-def]
    if mode == ENCODE:
        if nw < out.size:
            out[nw] = np.uint32(word)
    elif mode == VERIFY:
        same = same and nw < ref.size and ref[nw] == np.uint32(word)
    return nw + 1, same


@_step
def _push(x, start, p, out, ref, nw, mode, same):  # type: ignore[no-untyped-def]
    if (x >> _FLUSH) >= p:
        nw, same = _emit(x & _LOW, out, ref, nw, mode, same)
        x >>= _WORD
    return ((x // p) << _PRECISION) | (start + x % p), nw, same


@_step
def _push_pow2(x, start, shift, out, ref, nw, mode, same):  # type: ignore[no-untyped-def]
    # _push with p = 2**shift: the division is a shift.
    if (x >> _FLUSH) >> shift:
        nw, same = _emit(x & _LOW, out, ref, nw, mode, same)
        x >>= _WORD
    return ((x >> shift) << _PRECISION) | (start + (x & ((_U(1) << shift) - _U(1)))), nw, same


@_step
def _push_bounded(x, value, bound, out, ref, nw, mode, same):  # type: ignore[no-untyped-def]
    # A count uniform on [0, bound] (entropy module docstring).
    if bound == 0:
        return x, nw, same
    if bound < (1 << 24) - 1:
        start, p = _uniform(value, bound + 1)
        return _push(x, start, p, out, ref, nw, mode, same)
    high = value >> 16
    low = value & 0xFFFF
    low_size = 0x10000 if high < (bound >> 16) else (bound & 0xFFFF) + 1
    if low_size > 1:
        start, p = _uniform(low, low_size)
        x, nw, same = _push(x, start, p, out, ref, nw, mode, same)
    start, p = _uniform(high, (bound >> 16) + 1)
    return _push(x, start, p, out, ref, nw, mode, same)


@_jit
def encode(codes, k, counts, cdf, mode, out, ref):  # type: ignore[no-untyped-def]
    """Code the level codes' body words (entropy module docstring), ``k`` low bits uniform.

    ``counts`` are the high parts' counts (``m + 1`` of them; ``m = 0``: no
    high parts or counts are coded), ``cdf`` their :func:`categorical_cdf`.
    Symbols are pushed in the reverse of the decoding order, so that the
    words come out in their final order. ``mode`` :data:`ENCODE` writes them
    into ``out`` (as many as fit), :data:`VERIFY` compares them with ``ref``,
    :data:`COUNT` only counts them. Returns ``(count, same)``: the number of
    words, and whether they are ``ref``, all of it (:data:`VERIFY` only).
    """
    d = codes.size
    m = counts.size - 1
    x = _U(0)
    nw = 0
    same = True
    # The three loops below are _push written out: as calls, even inlined
    # by numba, they ran 10-20x slower.
    # 4. One sign per nonzero index, Uniform(2): p = 2**23.
    half = (_U(1) << _SIGN_SHIFT) - _U(1)
    for i in range(d - 1, -1, -1):
        c = codes[i]
        # Zero indices have no sign: a select, not a branch (which would be
        # mispredicted at every other entry of a sparse update).
        keep = _U(0) - _U(c > 1)  # all ones where the sign is coded
        if keep & ((x >> _FLUSH) >> _SIGN_SHIFT):
            if mode == ENCODE:
                if nw < out.size:
                    out[nw] = np.uint32(x & _LOW)
            elif mode == VERIFY:
                same = same and nw < ref.size and ref[nw] == np.uint32(x & _LOW)
            nw += 1
            x >>= _WORD
        pushed = ((x >> _SIGN_SHIFT) << _PRECISION) | ((_U(c & 1) << _SIGN_SHIFT) + (x & half))
        x = (pushed & keep) | (x & ~keep)
    # 3. The k low bits of every index, Uniform(2**k): p = 2**(24 - k).
    if k:
        shift = _PRECISION - _U(k)
        rest = (_U(1) << shift) - _U(1)
        low = (1 << k) - 1
        for i in range(d - 1, -1, -1):
            part = _U((codes[i] >> 1) & low)
            if (x >> _FLUSH) >> shift:
                if mode == ENCODE:
                    if nw < out.size:
                        out[nw] = np.uint32(x & _LOW)
                elif mode == VERIFY:
                    same = same and nw < ref.size and ref[nw] == np.uint32(x & _LOW)
                nw += 1
                x >>= _WORD
            x = ((x >> shift) << _PRECISION) | ((part << shift) + (x & rest))
    if m:
        # 2. The high parts, Categorical(counts).
        for i in range(d - 1, -1, -1):
            h = np.intp((codes[i] >> 1) >> k)
            start = cdf[h]
            p = cdf[h + 1] - start
            if (x >> _FLUSH) >= p:
                if mode == ENCODE:
                    if nw < out.size:
                        out[nw] = np.uint32(x & _LOW)
                elif mode == VERIFY:
                    same = same and nw < ref.size and ref[nw] == np.uint32(x & _LOW)
                nw += 1
                x >>= _WORD
            x = ((x // p) << _PRECISION) | (start + x % p)
        # 1. The counts c_0 .. c_{m-1}, each uniform on what the earlier ones leave.
        remaining = np.empty(m, np.int64)
        left = d
        for j in range(m):
            remaining[j] = left
            left -= counts[j]
        for j in range(m - 1, -1, -1):
            x, nw, same = _push_bounded(x, counts[j], remaining[j], out, ref, nw, mode, same)
    # The state's nonzero words, low word first.
    if x >> _WORD:
        nw, same = _emit(x & _LOW, out, ref, nw, mode, same)
        nw, same = _emit(x >> _WORD, out, ref, nw, mode, same)
    elif x:
        nw, same = _emit(x, out, ref, nw, mode, same)
    return nw, same and nw == ref.size


# --------------------------------------------------------------------------- decoding


@_step
def _refill(x, words, pos):  # type: ignore[no-untyped-def]
    if x < _REFILL and pos > 0:
        pos -= 1
        x = (x << _WORD) | _U(words[pos])
    return x, pos


@_step
def _pop_uniform(x, size, words, pos):  # type: ignore[no-untyped-def]
    q = x & _QMASK
    per_bin = _ONE // _U(size)
    last = _U(size - 1)
    symbol = q // per_bin
    if symbol < last:
        start = symbol * per_bin
        p = per_bin
    else:
        symbol = last
        start = last * per_bin
        p = _ONE - start
    x = (x >> _PRECISION) * p + (q - start)
    x, pos = _refill(x, words, pos)
    return np.int64(symbol), x, pos


@_step
def _pop_bounded(x, bound, words, pos):  # type: ignore[no-untyped-def]
    if bound == 0:
        return 0, x, pos
    if bound < (1 << 24) - 1:
        return _pop_uniform(x, bound + 1, words, pos)
    high, x, pos = _pop_uniform(x, (bound >> 16) + 1, words, pos)
    low_size = 0x10000 if high < (bound >> 16) else (bound & 0xFFFF) + 1
    low = 0
    if low_size > 1:
        low, x, pos = _pop_uniform(x, low_size, words, pos)
    return (high << 16) | low, x, pos


@_jit
def _lookup_table(cdf):  # type: ignore[no-untyped-def]
    # One entry per 2**12 quantiles: the symbol s whose interval holds the
    # slot's first quantile, packed with its start (24 bits) and p (25 bits),
    # so that one load decodes a symbol whose interval covers the quantile.
    table = np.empty(1 << _LOOKUP_BITS, np.uint64)
    s = 0
    for t in range(1 << _LOOKUP_BITS):
        q = _U(t) << _U(24 - _LOOKUP_BITS)
        while cdf[s + 1] <= q:
            s += 1
        table[t] = (_U(s) << _U(49)) | ((cdf[s + 1] - cdf[s]) << _U(24)) | cdf[s]
    return table


@_jit
def decode(words, d, k, m, levels, codes, counts):  # type: ignore[no-untyped-def]
    """Decode an entropy body's words into level codes ``(xi << 1) | sign``.

    ``codes`` (``d`` entries, wide enough for ``2 * levels + 1``) receives the
    codes and ``counts`` (``m + 1`` entries) the high parts' counts. Returns 0,
    or the first problem found: :data:`MALFORMED`, :data:`NO_ROOM`,
    :data:`BAD_COUNTS`, :data:`LEVEL_TOO_LARGE` or :data:`NOT_EMPTY`.
    """
    pos = words.size
    x = _U(0)
    if pos:
        pos -= 1
        if words[pos] == 0:
            return MALFORMED
        x = _U(words[pos])
        while pos > 0 and x < _REFILL:
            pos -= 1
            x = (x << _WORD) | _U(words[pos])
    counts[:] = 0
    if m:
        remaining = d
        for j in range(m):
            c, x, pos = _pop_bounded(x, remaining, words, pos)
            counts[j] = c
            remaining -= c
        if remaining < 1:
            return NO_ROOM
        counts[m] = remaining
        cdf = categorical_cdf(counts)
        table = _lookup_table(cdf)
        seen = np.zeros(m + 1, np.int64)
        shift = _U(24 - _LOOKUP_BITS)
        # The loops below are _pop and _refill written out (as calls they ran
        # several times slower). After every refill x >= 2**32 or no word is left.
        for i in range(d):
            q = x & _QMASK
            entry = table[q >> shift]
            s = np.intp(entry >> _U(49))
            start = entry & _QMASK
            p = (entry >> _PRECISION) & _U((1 << 25) - 1)
            if q - start >= p:  # past the slot's first symbol: the next ones, in order
                s += 1
                while cdf[s + 1] <= q:
                    s += 1
                start = cdf[s]
                p = cdf[s + 1] - start
            x = (x >> _PRECISION) * p + (q - start)
            if x < _REFILL and pos > 0:
                pos -= 1
                x = (x << _WORD) | _U(words[pos])
            codes[i] = s
            seen[s] += 1
        for j in range(m + 1):
            if seen[j] != counts[j]:
                return BAD_COUNTS
    else:
        codes[:] = 0
        counts[0] = d
    if k:
        shift = _PRECISION - _U(k)
        rest = (_U(1) << shift) - _U(1)
        low = _U((1 << k) - 1)
        top = _U(0)
        for i in range(d):
            q = x & _QMASK
            x = ((x >> _PRECISION) << shift) + (q & rest)
            if x < _REFILL and pos > 0:
                pos -= 1
                x = (x << _WORD) | _U(words[pos])
            xi = (_U(codes[i]) << _U(k)) | ((q >> shift) & low)
            top = max(top, xi)
            codes[i] = xi
        if top > _U(levels):
            return LEVEL_TOO_LARGE
    half = (_U(1) << _SIGN_SHIFT) - _U(1)
    for i in range(d):
        xi = _U(codes[i])
        keep = _U(0) - _U(xi != 0)  # all ones where a sign is coded (a select, not a branch)
        q = x & _QMASK
        popped = ((x >> _PRECISION) << _SIGN_SHIFT) + (q & half)
        x = (popped & keep) | (x & ~keep)
        if x < _REFILL and pos > 0:
            pos -= 1
            x = (x << _WORD) | _U(words[pos])
        codes[i] = (xi << _U(1)) | ((q >> _SIGN_SHIFT) & keep)
    if x != 0:
        return NOT_EMPTY
    return 0
